"""Which unit bounds the Mosaic GPU attention forward: the kernel timed as shipped and with part of
its work removed or moved, at the shapes of bench/attention.py.

    python bench/attention_bounds.py --seq 1024,4096 --head-dim 64
    python bench/attention_bounds.py --batch 128 --seq 1024 --heads 8 --head-dim 64 --json out.json

Variants, each compiled with one function replaced while the kernel traces (their outputs are
meaningless except fma_exp's; only the times count):

  kernel     as shipped: every exp2 an ex2.approx on the special-function units (MUFU)
  no_exp     exp2(x) -> x: what the exponentials cost
  fma_exp    every exp2 computed on the FMA pipes instead (`exp2_on_fma`: FlashAttention-4's
             software exponential): what moving all of them would give
  no_matmul  the wgmmas removed (their accumulators read as they are): what the tensor cores cost

The count at head_dim 64, per 64 x 128 score tile: two matmuls of 2 x 64 x 128 x 64 FLOP at about
4096 dense bf16 FLOP a clock per SM (989 TF/s over 132 SMs at 1.83 GHz) take 512 clocks, and its
8192 exponentials at 16 a clock per SM take 512 too; at head_dim 128 the matmuls take twice that.
So at head_dim 64 the exponentials can bound the kernel unless they overlap the matmuls perfectly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from bench import attention as attention_bench
from bench.common import add_timing_args, device_description, int_list, report, time_ms, tflops
from kernels.attention import attention

ROUNDING = 12582912.0   # 1.5 x 2^23: x + ROUNDING rounds x to an integer in the low mantissa bits
# 2^f on [-1/2, 1/2], degree 3, least squares in relative error on Chebyshev nodes: at most
# 7.8e-5 (bf16 rounds p to 2^-9 = 2e-3)
POLYNOMIAL = (0.99992894, 0.69327624, 0.24260405, 0.05508868)


def exp2_on_fma(x):
    """2^x for f32 x <= 0 with adds, multiplies and an integer add only: x = n + f, n = round(x)
    (by adding and subtracting 1.5 x 2^23), f in [-1/2, 1/2]; 2^f by a polynomial; n added into
    the exponent bits. x below -125 gives 2^-125 (not 0: masked scores weigh 1e-38)."""
    x = jnp.maximum(x, -125.0)
    shifted = x + ROUNDING
    f = x - (shifted - ROUNDING)
    c0, c1, c2, c3 = POLYNOMIAL
    p = ((c3 * f + c2) * f + c1) * f + c0
    # bits(shifted) = bits(1.5 x 2^23) + n, whose low 9 bits are n's: << 23 leaves n << 23 alone.
    exponent = lax.shift_left(lax.bitcast_convert_type(shifted, jnp.int32), jnp.int32(23))
    return lax.bitcast_convert_type(lax.bitcast_convert_type(p, jnp.int32) + exponent, jnp.float32)


def _no_matmul(*args, **kwargs):
    return None


VARIANTS = {
    "kernel": None,
    "no_exp": (jnp, "exp2", lambda x: x),
    "fma_exp": (jnp, "exp2", exp2_on_fma),
    "no_matmul": (plgpu, "wgmma", _no_matmul),
}


def time_variant(variant: str, shape: tuple, timing: dict) -> float:
    """Forward ms of the mosaic_gpu attention with VARIANTS[variant]'s function replaced."""
    jax.clear_caches()   # every variant traces the kernel afresh
    fn = lambda q, k, v, _: attention(q, k, v, causal=True, implementation="mosaic_gpu")
    (q, k, v, ids, _), forward, _ = attention_bench.timed_calls(fn, shape, jnp.bfloat16)
    patch = VARIANTS[variant]
    if patch is None:
        return time_ms(forward, q, k, v, ids, **timing)
    with mock.patch.object(*patch):
        jax.block_until_ready(forward(q, k, v, ids))   # traced and compiled with the replacement
    return time_ms(forward, q, k, v, ids, **timing)


COLUMNS = [("variant", "variant", ""), ("batch", "B", "d"), ("seq", "S", "d"), ("heads", "H", "d"),
           ("head_dim", "D", "d"), ("fwd_ms", "fwd ms", ".3f"), ("fwd_tflops", "TF/s", ".1f"),
           ("vs_kernel", "x kernel", ".2f"), ("error", "error", "")]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int_list, default=[1024, 4096])
    p.add_argument("--head-dim", type=int_list, default=[64, 128])
    p.add_argument("--batch", type=int, help="default: 16384 tokens / seq")
    p.add_argument("--heads", type=int, help="default: 2048 / head_dim")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--json")
    add_timing_args(p)
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("attention_bounds times the Mosaic GPU kernel: it needs a Hopper GPU")
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown --variants {sorted(set(variants) - set(VARIANTS))}")
    timing = dict(warmup=args.warmup, repeats=args.repeats, calls=args.calls)
    print(f"attention forward bounds on {device_description()}")
    records = []
    for d in args.head_dim:
        for s in args.seq:
            shape = (args.batch or attention_bench.TOKENS // s, s,
                     args.heads or attention_bench.WIDTH // d, d)
            flops = attention_bench.flops(*shape, causal=True)[0]
            rows = []
            for variant in variants:
                row = dict(variant=variant, batch=shape[0], seq=s, heads=shape[2], head_dim=d)
                try:
                    row["fwd_ms"] = time_variant(variant, shape, timing)
                    row["fwd_tflops"] = tflops(flops, row["fwd_ms"])
                except Exception as e:  # noqa: BLE001 - a variant that does not lower here
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                rows.append(row)
            base = next((r.get("fwd_ms") for r in rows if r["variant"] == "kernel"), None)
            for row in rows:
                if base and row.get("fwd_ms"):
                    row["vs_kernel"] = base / row["fwd_ms"]
            records += rows
    report(records, COLUMNS, args.json, "attention_bounds.py", argv)
    return records


if __name__ == "__main__":
    main()
