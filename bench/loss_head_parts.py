"""Where the loss head's gradient spends its time: each pass of one chunk timed alone.

    python bench/loss_head_parts.py --vocab 50257 --d 768 --chunks 1024,2048,4096

For a chunk of C tokens (kernels/logits_loss/common.py): the probabilities GEMM (the kernel: write
p [C, V'] bf16 and the row statistics), dh_c = a (p E) (XLA's GEMM and the row scale), dE += p^T
(a h_c) (XLA's GEMM and the f32 add); dh on the split-K Mosaic GPU GEMM instead (Hopper); and the
whole forward+backward at that chunk size, T = --tokens, with its temporary memory (XLA's memory
analysis: what it holds beyond the arguments and outputs).
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
    bias = common.column_bias(args.vocab, padded)
    rows = []
    for chunk in args.chunks:
        h = jax.random.normal(keys[0], (chunk, args.d), jnp.bfloat16)
        base = jnp.zeros((chunk,), jnp.float32)
        scale = jnp.full((chunk, 1), 1.0 / args.tokens)
        probabilities = jax.jit(lambda h: module.probabilities(h, e, bias, base, config=config,
                                                               interpret=False)[0])
        p_chunk = probabilities(h)
        dh = jax.jit(lambda p: (scale * jnp.matmul(p, e, preferred_element_type=jnp.float32))
                     .astype(jnp.bfloat16))
        de = jnp.zeros((padded, args.d), jnp.float32)
        d_e = jax.jit(lambda de, p, h: de + jnp.matmul(
            p.T, (scale * h.astype(jnp.float32)).astype(jnp.bfloat16),
            preferred_element_type=jnp.float32), donate_argnums=0)
        timing = dict(warmup=3, repeats=5, calls=10)
        flops = 2 * chunk * padded * args.d
        row = dict(chunk=chunk, probabilities_ms=time_ms(probabilities, h, **timing),
                   dh_ms=time_ms(dh, p_chunk, **timing))
        row["de_ms"] = time_ms(lambda p, h: d_e(jnp.zeros_like(de), p, h), p_chunk, h, **timing)
        parts = ["probabilities", "dh", "de"]
        if args.impl == "mosaic_gpu":   # dh on the split-K Mosaic GPU GEMM instead of XLA's
            dh_split = lambda p: mosaic_gpu_gemm.matmul_split_k(
                p, e, a_transposed=False, b_transposed=False, name="dh_split_k",
                tiles=mosaic_gpu_gemm.Tiles(block_m=128, block_n=128, num_stages=3))[0]
            row["dh_split_k_ms"] = time_ms(dh_split, p_chunk, **timing)
            parts.append("dh_split_k")
        for part in parts:
            row[f"{part}_tflops"] = flops / row[f"{part}_ms"] / 1e9
        fn = lambda *a: api.logits_loss(*a, implementation=args.impl,
                                        block_sizes={"probabilities_chunk_mib": max(1, chunk * padded * 2 >> 20)})
        inputs, _, forward_backward = timed_calls(fn, args.tokens, args.vocab, args.d)
        row["fwd_bwd_ms"] = time_ms(forward_backward, *inputs, warmup=2, repeats=3, calls=3)
        memory = forward_backward.lower(*inputs).compile().memory_analysis()
        row["temp_gib"] = memory.temp_size_in_bytes / 2**30
        rows.append(row)
        print(row, flush=True)
    print(f"loss head gradient parts, T {args.tokens} V {args.vocab} (padded {padded}) d {args.d}, "
          f"{args.impl}, on {device_description()}")
    print(format_table(rows, [("chunk", "C", "d")] + [
        (f"{k}_{u}", f"{k} {u.replace('tflops', 'TF/s')}", ".3f" if u == "ms" else ".0f")
        for k in ("probabilities", "dh", "de", "dh_split_k") for u in ("ms", "tflops")] + [("fwd_bwd_ms", "fwd+bwd ms", ".2f"), ("temp_gib", "temp GiB", ".3f")]))
    return rows


if __name__ == "__main__":
    main()
