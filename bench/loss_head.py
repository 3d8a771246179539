"""Loss-head benchmark: the tied logits + cross-entropy, our kernel against XLA's fusion of the math.

    python bench/loss_head.py                          # micro_gpt_4's head at batch 64 and 128
    python bench/loss_head.py --tokens 65536 --vocab 50257 --d 768     # GPT-2's
    python bench/loss_head.py --impl mosaic_gpu,cce --chunk-mib 128   # ours in smaller chunks
    python bench/loss_head.py --tokens 256 --vocab 1000 --d 128 --impl xla   # CPU smoke test

loss = mean cross_entropy(h E^T, targets) on h [T, d] bf16, E [V, d] f32 (as in the model).
Forward FLOPs 2 T V d (the logits' matmul); forward+backward times jit(value_and_grad) with
respect to h and E and counts 6 T V d. "xla" is microgpt.model.tied_logits_loss (the reference
and xla paths of the training step); "mosaic_gpu" and "triton" are kernels.logits_loss (the
pallas path: mosaic_gpu on Hopper); "torch_compile", "liger" (Liger's fused linear
cross-entropy) and "cce" (Cut Cross-Entropy) are PyTorch peers (bench/torch_peers.py, where installed: bench/fetch_wheels.sh carries the two
libraries to a GPU machine). Every row has its peak memory; "x best torch" is against the fastest
PyTorch peer of the run.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench.common import (add_ratios, add_timing_args, device_description, int_list,
                          maybe_profile, peak_bytes, report, smoke_size, time_ms, timed_row)
from bench import torch_peers
from kernels.logits_loss import logits_loss
from microgpt import model

IMPLS = ("xla", "mosaic_gpu", "triton", *torch_peers.LOSS_HEAD)


def implementation(name: str, chunk_mib: int | None = None):
    """name -> fn(h, embed, targets) -> scalar loss; chunk_mib: our heads' chunk budget
    (`probabilities_chunk_mib`) instead of the tuning table's."""
    if name == "xla":
        return model.tied_logits_loss
    block_sizes = None if chunk_mib is None else {"probabilities_chunk_mib": chunk_mib}
    return functools.partial(logits_loss, implementation=name, block_sizes=block_sizes)


def timed_calls(fn, tokens: int, vocab: int, d: int):
    """-> ((h, embed, targets), forward, forward_backward): random h, E at the model's scale,
    random targets, and the two jitted calls (the second: value_and_grad in h and E)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(keys[0], (tokens, d), jnp.bfloat16)
    embed = 0.02 * jax.random.normal(keys[1], (vocab, d), jnp.float32)
    targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
    return (h, embed, targets), jax.jit(fn), jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def measure(fn, tokens: int, vocab: int, d: int, timing: dict) -> tuple[float, float, int]:
    """(forward ms, forward+backward ms, peak bytes); the peak is XLA's memory analysis of the
    compiled forward+backward (common.peak_bytes)."""
    args, forward, forward_backward = timed_calls(fn, tokens, vocab, d)
    peak = peak_bytes(forward_backward.lower(*args).compile())
    return (time_ms(forward, *args, **timing), time_ms(forward_backward, *args, **timing), peak)


COLUMNS = [("impl", "impl", ""), ("tokens", "T", "d"), ("vocab", "V", "d"), ("d", "d", "d"),
           ("fwd_ms", "fwd ms", ".3f"), ("fwd_tflops", "fwd TF/s", ".1f"),
           ("fwd_vs_xla", "x XLA", ".2f"), ("fwd_bwd_ms", "fwd+bwd ms", ".3f"),
           ("fwd_bwd_tflops", "fwd+bwd TF/s", ".1f"), ("fwd_bwd_vs_xla", "x XLA", ".2f"),
           ("fwd_bwd_vs_torch", "x best torch", ".2f"), ("fwd_bwd_torch_impl", "best torch", ""),
           ("peak_gib", "peak GiB", ".2f"),
           ("error", "error", "")]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int_list, default=[65536, 131072], help="token counts T")
    p.add_argument("--vocab", type=int, default=9000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--impl", default="xla,mosaic_gpu,torch_compile,liger,cce",
                   help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--chunk-mib", type=int, help="our heads' bf16 chunk of probabilities at most "
                   "this many MiB (the tuning table's budget otherwise: 256): memory for speed")
    p.add_argument("--json", help="write one record per (impl, T) to this path")
    p.add_argument("--profile", help="write a jax.profiler trace of the sweep to this directory")
    add_timing_args(p)
    args = p.parse_args(argv)
    impls = args.impl.split(",")
    if set(impls) - set(IMPLS):
        raise SystemExit(f"unknown --impl {sorted(set(impls) - set(IMPLS))}; known: {IMPLS}")
    timing = dict(warmup=args.warmup, repeats=args.repeats, calls=args.calls)
    if smoke_size(args.full):   # 256 tokens, a vocabulary of at most 1000, width at most 128
        args.tokens = sorted({min(t, 256) for t in args.tokens})
        args.vocab, args.d = min(args.vocab, 1000), min(args.d, 128)
    print(f"loss head, V {args.vocab}, d {args.d}, on {device_description()}")
    records = []
    with maybe_profile(args.profile):
        for tokens in args.tokens:
            matmul_flops = 2 * tokens * args.vocab * args.d
            rows = [timed_row(dict(impl=impl, tokens=tokens, vocab=args.vocab, d=args.d),
                              lambda: (torch_peers.loss_head(impl, tokens, args.vocab, args.d, timing)
                                       if impl in torch_peers.LOSS_HEAD else
                                       measure(implementation(impl, args.chunk_mib), tokens,
                                               args.vocab, args.d, timing)),
                              matmul_flops, 3 * matmul_flops)
                    for impl in impls]
            add_ratios(rows, ("xla",), "xla")
            add_ratios(rows, torch_peers.LOSS_HEAD, "torch")
            records += rows
    report(records, COLUMNS, args.json, "loss_head.py", argv)
    return records


if __name__ == "__main__":
    main()
