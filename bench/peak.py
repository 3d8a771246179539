"""The device's ceilings, measured: a bf16 matmul (8192^3, random data) and a device copy.

    python bench/peak.py --json peak.json

bench/common.py's MEASURED_BF16_PEAK_TFLOPS holds what this printed on each device (% of peak and
the labelled MFU of the other benchmarks are against it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench.common import add_timing_args, device_description, smoke_size, time_ms, write_json


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="the matmul's size n (n x n times n x n)")
    p.add_argument("--copy-gib", type=float, default=4.0, help="GiB copied")
    p.add_argument("--json", help="write the two records to this path")
    add_timing_args(p)
    args = p.parse_args(argv)
    if smoke_size(args.full):   # a 512^3 matmul and 16 MiB copied
        args.n, args.copy_gib = min(args.n, 512), min(args.copy_gib, 1 / 64)
    timing = dict(warmup=args.warmup, repeats=args.repeats, calls=args.calls)
    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, args.n, args.n), jnp.bfloat16)
    matmul_ms = time_ms(jax.jit(lambda a, b: a @ b), a, b, **timing)
    x = jnp.ones(int(args.copy_gib * 2**30) // 4, jnp.float32)
    copy_ms = time_ms(jax.jit(lambda x: x + 1), x, **timing)   # reads and writes every byte
    records = [dict(what=f"bf16 matmul {args.n}^3", ms=matmul_ms,
                    tflops=2 * args.n ** 3 / (matmul_ms * 1e-3) / 1e12),
               dict(what=f"copy of {args.copy_gib:g} GiB", ms=copy_ms,
                    tb_per_s=2 * x.nbytes / (copy_ms * 1e-3) / 1e12)]
    print(f"on {device_description()}: {records[0]['what']} {records[0]['tflops']:.0f} TF/s, "
          f"{records[1]['what']} (read + write) {records[1]['tb_per_s']:.2f} TB/s")
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
