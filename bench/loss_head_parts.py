"""Where the loss head's backward spends its time: each pass of one chunk timed alone.

    python bench/loss_head_parts.py --vocab 50257 --d 768 --chunks 1024,2048,4096

For a chunk of C tokens (kernels/logits_loss/common.py): the dlogits GEMM (the kernel: recompute
and write ds [C, V'] bf16), dh_c = ds E (XLA's GEMM), dE += ds^T h_c (XLA's GEMM and the f32 add);
dh on the split-K Mosaic GPU GEMM instead (Hopper); and the whole forward+backward at that chunk size, T = --tokens, with its temporary memory (XLA's
memory analysis: what it holds beyond the arguments and outputs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench.common import device_description, format_table, int_list, time_ms
from bench.loss_head import timed_calls
from kernels import mosaic_gpu_gemm
from kernels.logits_loss import api, common


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--chunks", type=int_list, default=[1024, 2048, 4096])
    p.add_argument("--impl", default="mosaic_gpu")
    args = p.parse_args(argv)
    module = api._MODULES[args.impl][0]
    config = api.kernel_config(args.impl, args.d)
    padded = common.padded_vocab(args.vocab, config.multiple)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    e = (0.02 * jax.random.normal(keys[1], (padded, args.d))).astype(jnp.bfloat16)
    columns = jnp.arange(padded, dtype=jnp.float32)
    rows = []
    for chunk in args.chunks:
        h = jax.random.normal(keys[0], (chunk, args.d), jnp.bfloat16)
        log_z = jnp.full((chunk,), 10.0)
        targets = jnp.zeros((chunk,), jnp.float32)
        scales = jnp.full((chunk,), 1.0 / args.tokens)
        dlogits = jax.jit(lambda h: module.dlogits(h, e, columns, log_z, targets, scales,
                                                   config=config, interpret=False))
        ds = dlogits(h)
        dh = jax.jit(lambda ds: jnp.matmul(ds, e, preferred_element_type=jnp.float32)
                     .astype(jnp.bfloat16))
        de = jnp.zeros((padded, args.d), jnp.float32)
        d_e = jax.jit(lambda de, ds, h: de + jnp.matmul(ds.T, h, preferred_element_type=jnp.float32),
                      donate_argnums=0)
        timing = dict(warmup=3, repeats=5, calls=10)
        flops = 2 * chunk * padded * args.d
        row = dict(chunk=chunk, dlogits_ms=time_ms(dlogits, h, **timing), dh_ms=time_ms(dh, ds, **timing))
        row["de_ms"] = time_ms(lambda ds, h: d_e(jnp.zeros_like(de), ds, h), ds, h, **timing)
        parts = ["dlogits", "dh", "de"]
        if args.impl == "mosaic_gpu":   # dh on the split-K Mosaic GPU GEMM instead of XLA's
            dh_split = lambda ds: mosaic_gpu_gemm.matmul_split_k(
                ds, e, a_transposed=False, b_transposed=False, name="dh_split_k",
                tiles=mosaic_gpu_gemm.Tiles(block_m=128, block_n=128, num_stages=3))[0]
            row["dh_split_k_ms"] = time_ms(dh_split, ds, **timing)
            parts.append("dh_split_k")
        for part in parts:
            row[f"{part}_tflops"] = flops / row[f"{part}_ms"] / 1e9
        fn = lambda *a: api.logits_loss(*a, implementation=args.impl,
                                        block_sizes={"dlogits_chunk_mib": max(1, chunk * padded * 2 >> 20)})
        inputs, _, forward_backward = timed_calls(fn, args.tokens, args.vocab, args.d)
        row["fwd_bwd_ms"] = time_ms(forward_backward, *inputs, warmup=2, repeats=3, calls=3)
        memory = forward_backward.lower(*inputs).compile().memory_analysis()
        row["temp_gib"] = memory.temp_size_in_bytes / 2**30
        rows.append(row)
        print(row, flush=True)
    print(f"loss head backward parts, T {args.tokens} V {args.vocab} (padded {padded}) d {args.d}, "
          f"{args.impl}, on {device_description()}")
    print(format_table(rows, [("chunk", "C", "d")] + [
        (f"{k}_{u}", f"{k} {u.replace('tflops', 'TF/s')}", ".3f" if u == "ms" else ".0f")
        for k in ("dlogits", "dh", "de", "dh_split_k") for u in ("ms", "tflops")] + [("fwd_bwd_ms", "fwd+bwd ms", ".2f"), ("temp_gib", "temp GiB", ".3f")]))
    return rows


if __name__ == "__main__":
    main()
