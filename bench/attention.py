"""Attention benchmark: our Pallas kernels against cuDNN (JAX's and PyTorch's), FlashAttention-2,
JAX's Pallas op, XLA and the naive math.

    python bench/attention.py --seq 1024                      # head_dim 64 and 128 at 16k tokens
    python bench/attention.py --seq 512,8192 --head-dim 128 --impl cudnn,triton --json out.json
    python bench/attention.py --impl mosaic_gpu --backward triton   # the Mosaic GPU forward, Triton's backward
    python bench/attention.py --seq 8192 --head-dim 128 --kv-heads 4 --segments 512 --window 1024

"ours" is kernels.attention as a user gets it (implementation=None: the row's "chosen" column
says which implementation and the JSON which tuning entry it took); "triton", "mosaic_gpu" and
"tpu" force one. "cudnn" is jax.nn.dot_product_attention's cuDNN; "torch_cudnn" and "torch_flash"
are PyTorch's SDPA with its cuDNN and FlashAttention-2 backends (bench/torch_peers.py, where
PyTorch is installed). "x cuDNN" is the fastest cuDNN of the run (JAX's or PyTorch's) over the row.

Shapes keep the work per sequence length comparable: batch x seq = 16384 tokens and
heads x head_dim = 2048 unless --batch / --heads are given. Forward FLOPs are 4 B H S^2 D (halved
when causal); forward+backward counts 3.5x that (the backward's 5 matmuls to the forward's 2).
Fwd+bwd times jit(grad(sum(attention(q, k, v) * cotangent))) with respect to q, k and v.
Masks (`Masks`): --kv-heads (grouped-query K/V heads), --segments (packed documents of that mean
length, the same random lengths in every run), --window (keys up to that far back); FLOPs then
count the visible (query, key) pairs only, so TF/s is the useful rate. Peers take what they can
express: jax.nn's GQA and window, the segments as a dense mask (on XLA's path and cuDNN's);
PyTorch's rows run dense multi-head attention only.
An implementation that fails (out of memory, unsupported here) gets an error row; the sweep goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (add_ratios, add_timing_args, device_description, int_list,
                          maybe_profile, report, smoke_size, time_ms, timed_row)
from bench import torch_peers
from kernels.attention import api as attention_api, attention
from microgpt import model

TOKENS, WIDTH = 16384, 2048  # batch x seq and heads x head_dim of the default shapes
# A flag for every tuning parameter of our implementations: their kernel configurations' flat
# names (kernels/config.py; switches as 0 or 1).
BLOCK_OPTIONS = tuple(dict.fromkeys(name for defaults in attention_api.DEFAULTS.values()
                                    for name in defaults[64].names()))


def jax_triton_mha(q, k, v, *, causal):
    """JAX's own Pallas Triton op (jax.experimental.pallas.ops.gpu.attention.mha), [B, S, H, D]."""
    from jax.experimental.pallas.ops.gpu.attention import mha
    return mha(q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal)


@dataclasses.dataclass(frozen=True)
class Masks:
    """What the sweep asks beyond dense multi-head attention: K/V heads (None: as many as q's),
    packed documents' mean length, a left window."""
    kv_heads: int | None = None
    segments: int | None = None
    window: int | None = None

    def segment_ids(self, batch: int, seq: int):
        """[batch, seq] int32 of documents of random lengths around `segments` (seeded), or None."""
        if self.segments is None:
            return None
        rng = np.random.default_rng(0)
        rows = []
        for _ in range(batch):
            lengths = rng.geometric(1 / self.segments, seq)   # mean `segments`
            rows.append(np.repeat(np.arange(seq), lengths)[:seq])
        return jnp.asarray(np.stack(rows), jnp.int32)

    def visible_pairs(self, batch: int, seq: int, causal: bool) -> float | None:
        """(query, key) pairs the masks leave, summed over the batch (None without masks)."""
        if self.segments is None and self.window is None:
            return None
        ids = self.segment_ids(batch, seq)
        mask = model.attention_mask(seq, causal=causal, segment_ids=ids, local_window_size=(
            None if self.window is None else (self.window, 0 if causal else self.window)))
        return float(jnp.sum(jnp.broadcast_to(mask, (batch, 1, seq, seq))))


def implementations(causal: bool, block_sizes: dict, backward: str | None = None,
                    masks: Masks = Masks()) -> dict:
    """name -> attention(q, k, v, segment_ids) for every implementation the benchmark knows (the
    mosaic_gpu row's gradient by `backward`'s kernels; None: the table's choice)."""
    window = None if masks.window is None else (masks.window, 0 if causal else masks.window)

    def nn_attention(impl):
        def fn(q, k, v, segment_ids):
            mask = None if segment_ids is None else model.attention_mask(
                q.shape[1], causal=False, segment_ids=segment_ids)
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                local_window_size=window, implementation=impl)
        return fn

    def ours(impl, backward=None):
        return lambda q, k, v, segment_ids: attention(
            q, k, v, causal=causal, segment_ids=segment_ids, local_window_size=window,
            implementation=impl, backward_implementation=backward,
            block_sizes=block_sizes or None)

    dense = lambda fn: lambda q, k, v, segment_ids: fn(q, k, v)
    return {
        "reference": lambda q, k, v, segment_ids: model.attention(
            q, k, v, causal=causal, segment_ids=segment_ids, local_window_size=window),
        "xla": nn_attention("xla"),
        "cudnn": nn_attention("cudnn"),
        "jax_triton": dense(functools.partial(jax_triton_mha, causal=causal)),
        "triton": ours("triton"),
        "mosaic_gpu": ours("mosaic_gpu", backward),
        "tpu": ours("tpu"),
        "ours": ours(None),
        **{name: None for name in torch_peers.ATTENTION},   # timed in PyTorch (bench/torch_peers.py)
    }


def default_impls() -> str:
    return {"gpu": "cudnn,torch_cudnn,torch_flash,jax_triton,ours",
            "tpu": "reference,xla,ours"}.get(jax.default_backend(), "reference,xla,ours")


def flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs."""
    forward = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return forward, 3.5 * forward


def timed_calls(fn, shape, dtype, masks: Masks = Masks()):
    """-> ((q, k, v, segment ids), forward, forward_backward): random inputs of `shape` (k, v
    with masks.kv_heads heads) and the two jitted calls the benchmark times (the second: grad of
    sum(fn(q, k, v, segment_ids) * random cotangent) in q, k, v)."""
    batch, seq, heads, head_dim = shape
    kv_shape = (batch, seq, masks.kv_heads or heads, head_dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, cotangent = (jax.random.normal(key, shape, dtype) for key in keys[:2])
    k, v = (jax.random.normal(key, kv_shape, dtype) for key in keys[2:])
    ids = masks.segment_ids(batch, seq)
    # The cotangent and the ids are arguments, not closed-over constants, which XLA would fold.
    loss = lambda q, k, v, ids, ct: jnp.sum(fn(q, k, v, ids).astype(jnp.float32) * ct)
    return (q, k, v, ids, cotangent), jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(fn, shape, dtype, timing: dict, masks: Masks = Masks()) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of fn on random inputs of `shape`."""
    (q, k, v, ids, cotangent), forward, forward_backward = timed_calls(fn, shape, dtype, masks)
    return (time_ms(forward, q, k, v, ids, **timing),
            time_ms(forward_backward, q, k, v, ids, cotangent, **timing))


def _dense_only():
    raise NotImplementedError("the PyTorch rows take grouped-query heads, not segment ids or a window")


def run(impls: list[str], shapes: list[tuple[int, int, int, int]], causal: bool, dtype,
        block_sizes: dict, timing: dict, backward: str | None = None,
        masks: Masks = Masks()) -> list[dict]:
    """One record per (impl, shape); cuDNN ratios filled in when cuDNN was measured."""
    fns = implementations(causal, block_sizes, backward, masks)
    records = []
    for batch, seq, heads, head_dim in shapes:
        fwd_flops, fwd_bwd_flops = flops(batch, seq, heads, head_dim, causal)
        pairs = masks.visible_pairs(batch, seq, causal)
        if pairs is not None:   # the work the masks leave: 4 D flops per visible pair and head
            fwd_flops = 4 * heads * head_dim * pairs
            fwd_bwd_flops = 3.5 * fwd_flops
        rows = []
        for impl in impls:
            row = dict(impl=impl, batch=batch, seq=seq, heads=heads, head_dim=head_dim,
                       causal=causal, dtype=jnp.dtype(dtype).name,
                       **{k: v for k, v in dataclasses.asdict(masks).items() if v is not None})
            shape = (batch, seq, heads, head_dim)
            if impl in torch_peers.ATTENTION and masks != Masks(kv_heads=masks.kv_heads):
                timed = _dense_only
            elif impl in torch_peers.ATTENTION:
                timed = lambda: torch_peers.attention(impl, shape, causal, row["dtype"], timing,
                                                      masks.kv_heads)
            else:
                timed = lambda: measure(fns[impl], shape, dtype, timing, masks)
            timed_row(row, timed, fwd_flops, fwd_bwd_flops)
            if impl == "ours" and "tuning" in row:
                row["chosen"] = row["tuning"][0]["implementation"]
            rows.append(row)
            print(f"  {impl:<10} B{batch} S{seq} H{heads} D{head_dim}: "
                  + (row.get("error") or f"{row['fwd_ms']:.3f} ms fwd, {row['fwd_bwd_ms']:.3f} ms fwd+bwd"),
                  flush=True)
        add_ratios(rows, ("cudnn", "torch_cudnn"), "cudnn")
        records += rows
    return records


COLUMNS = [("impl", "impl", ""), ("chosen", "chosen", ""), ("batch", "B", "d"), ("seq", "S", "d"), ("heads", "H", "d"),
           ("head_dim", "D", "d"), ("kv_heads", "Hkv", "d"),
           ("fwd_ms", "fwd ms", ".3f"), ("fwd_tflops", "fwd TF/s", ".1f"),
           ("fwd_vs_cudnn", "x cuDNN", ".2f"), ("fwd_peak_pct", "% peak", ".1f"),
           ("fwd_bwd_ms", "fwd+bwd ms", ".3f"), ("fwd_bwd_tflops", "fwd+bwd TF/s", ".1f"),
           ("fwd_bwd_vs_cudnn", "x cuDNN", ".2f"), ("fwd_bwd_peak_pct", "% peak", ".1f"),
           ("error", "error", "")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int_list, default=[512, 1024, 2048, 4096, 8192],
                   help="sequence lengths, comma-separated")
    p.add_argument("--head-dim", type=int_list, default=[64, 128], help="head dims, comma-separated")
    p.add_argument("--batch", type=int, help=f"default {TOKENS} // seq")
    p.add_argument("--heads", type=int, help=f"default {WIDTH} // head_dim")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kv-heads", type=int, help="K/V heads (grouped-query; default: --heads)")
    p.add_argument("--segments", type=int, help="packed documents of this mean length")
    p.add_argument("--window", type=int, help="each query sees keys up to this far back")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--impl", default=None,
                   help="comma list of reference, xla, cudnn, torch_cudnn, torch_flash, "
                        "jax_triton, triton, mosaic_gpu, tpu, ours "
                        f"(default here: {default_impls()})")
    p.add_argument("--json", help="write one record per (impl, shape) to this path")
    p.add_argument("--profile", help="write a jax.profiler trace of the sweep to this directory")
    p.add_argument("--backward", choices=["mosaic_gpu", "triton"],
                   help="the mosaic_gpu row's backward kernels (default: the tuning table's)")
    add_timing_args(p)
    for name in BLOCK_OPTIONS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name,
                       help="override the tuning table for our kernels")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    impls = (args.impl or default_impls()).split(",")
    unknown = sorted(set(impls) - set(implementations(True, {})))
    if unknown:
        raise SystemExit(f"unknown --impl {unknown}; known: {sorted(implementations(True, {}))}")
    shapes = [(args.batch or max(1, TOKENS // seq), seq, args.heads or max(1, WIDTH // d), d)
              for d in args.head_dim for seq in args.seq]
    if smoke_size(args.full):   # one sequence of at most 128 tokens and 2 heads per shape
        shapes = list(dict.fromkeys((1, min(s, 128), min(h, 2), d) for _, s, h, d in shapes))
    block_sizes = {name: getattr(args, name) for name in BLOCK_OPTIONS
                   if getattr(args, name) is not None}
    masks = Masks(args.kv_heads, args.segments, args.window)
    if smoke_size(args.full) and masks.kv_heads:   # its 2 heads share one K/V head
        masks = dataclasses.replace(masks, kv_heads=1)
    for _, _, heads, _ in shapes:
        if masks.kv_heads and heads % masks.kv_heads:
            raise SystemExit(f"--kv-heads {masks.kv_heads} must divide the heads ({heads})")
    print(f"attention, {'causal' if args.causal else 'not causal'}, {args.dtype}"
          + "".join(f", {k} {v}" for k, v in dataclasses.asdict(masks).items() if v is not None)
          + f" on {device_description()}")
    with maybe_profile(args.profile):
        records = run(impls, shapes, args.causal, jnp.dtype(args.dtype), block_sizes,
                      dict(warmup=args.warmup, repeats=args.repeats, calls=args.calls),
                      args.backward, masks)
    report(records, COLUMNS, args.json, "attention.py", argv)
    return records


if __name__ == "__main__":
    main()
