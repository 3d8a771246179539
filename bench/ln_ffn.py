"""LayerNorm+FFN benchmark: our Pallas kernels against XLA's fusion of the same math.

    python bench/ln_ffn.py                                   # the three anchor shapes
    python bench/ln_ffn.py --tokens 65536 --d 768 --impl xla,triton --json out.json
    python bench/ln_ffn.py --tokens 256 --d 128 --impl reference,xla,triton   # CPU smoke test

out = x + gelu(LN(x) W_fc + b_fc) W_proj + b_proj on x [T, d] bf16 with f32 parameters (as in the
model; --no-residual drops the x +).  Forward FLOPs 16 T d^2; forward+backward times
jit(grad(sum(out * cotangent))) with respect to x and all six parameters and counts 48 T d^2.

"reference" and "xla" are one program: jax.jit of microgpt.model.layernorm_ffn, which XLA fuses as
it likes (there is no separate XLA op to compare with), so "reference" is accepted as another name
for "xla" and timed once.  "triton" and "tpu" are ours (kernels.layernorm_ffn); "x XLA" is XLA's
time over ours.  An implementation that fails gets an error row; the sweep goes on.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench.common import (add_ratios, add_timing_args, device_description, int_list,
                          maybe_profile, report, smoke_size, time_ms, timed_row)
from kernels import warp_specialized
from kernels.layernorm_ffn import layernorm_ffn
from microgpt import model

# The anchor shapes of ../shared/anchors/h100-peers.md: (tokens, d).
ANCHOR_SHAPES = [(131072, 512), (65536, 768), (32768, 1024)]
IMPLS = ("xla", "triton", "mosaic_gpu", "tpu")
ALIASES = {"reference": "xla"}


def implementation(name: str, residual: bool, block_sizes: dict | None):
    """name -> fn(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj)."""
    if name == "xla":
        return functools.partial(model.layernorm_ffn, residual=residual)
    return functools.partial(layernorm_ffn, residual=residual, implementation=name,
                             block_sizes=block_sizes)


def default_impls() -> str:
    if warp_specialized.on_sm90():
        return "xla,triton,mosaic_gpu"
    return {"gpu": "xla,triton", "tpu": "xla,tpu"}.get(jax.default_backend(), "xla,triton")


def flops(tokens: int, d: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs."""
    return 16 * tokens * d * d, 48 * tokens * d * d


def timed_calls(fn, tokens: int, d: int, dtype):
    """-> (args, forward, forward_backward): random x [T, d], the model's parameter scales, a random
    cotangent, and the two jitted calls (the second: grad of sum(fn(x, *params) * cotangent) with
    respect to x and the six parameters)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    x = jax.random.normal(keys[0], (tokens, d), dtype)
    normal = lambda key, shape: 0.02 * jax.random.normal(key, shape, jnp.float32)
    params = (jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32),
              normal(keys[1], (d, 4 * d)), normal(keys[2], (4 * d,)),
              normal(keys[3], (4 * d, d)), normal(keys[4], (d,)))
    cotangent = jax.random.normal(keys[5], (tokens, d), dtype)
    # The cotangent is an argument, not a closed-over constant, which XLA would try to fold.
    loss = lambda *a: jnp.sum(fn(*a[:7]).astype(jnp.float32) * a[7])
    return ((x, *params, cotangent), jax.jit(fn),
            jax.jit(jax.grad(loss, argnums=tuple(range(7)))))


def measure(fn, tokens: int, d: int, dtype, timing: dict) -> tuple[float, float]:
    """(forward ms, forward+backward ms)."""
    args, forward, forward_backward = timed_calls(fn, tokens, d, dtype)
    return time_ms(forward, *args[:7], **timing), time_ms(forward_backward, *args, **timing)


def run(impls: list[str], shapes: list[tuple[int, int]], residual: bool, dtype,
        block_sizes: dict | None, timing: dict) -> list[dict]:
    """One record per (impl, shape); XLA ratios filled in when XLA was measured."""
    records = []
    for tokens, d in shapes:
        fwd_flops, fwd_bwd_flops = flops(tokens, d)
        rows = []
        for impl in impls:
            row = dict(impl=impl, tokens=tokens, d=d, residual=residual,
                       dtype=jnp.dtype(dtype).name)
            timed_row(row, lambda: measure(implementation(impl, residual, block_sizes), tokens, d,
                                           dtype, timing), fwd_flops, fwd_bwd_flops)
            rows.append(row)
            print(f"  {impl:<7} T{tokens} d{d}: " + (
                row.get("error") or f"{row['fwd_ms']:.3f} ms fwd, {row['fwd_bwd_ms']:.3f} ms fwd+bwd"),
                flush=True)
        add_ratios(rows, ("xla",), "xla")
        records += rows
    return records


COLUMNS = [("impl", "impl", ""), ("tokens", "T", "d"), ("d", "d", "d"),
           ("fwd_ms", "fwd ms", ".3f"), ("fwd_tflops", "fwd TF/s", ".1f"),
           ("fwd_vs_xla", "x XLA", ".2f"), ("fwd_peak_pct", "% peak", ".1f"),
           ("fwd_bwd_ms", "fwd+bwd ms", ".3f"), ("fwd_bwd_tflops", "fwd+bwd TF/s", ".1f"),
           ("fwd_bwd_vs_xla", "x XLA", ".2f"), ("fwd_bwd_peak_pct", "% peak", ".1f"),
           ("error", "error", "")]


def shapes_of(tokens: list[int] | None, widths: list[int] | None) -> list[tuple[int, int]]:
    """--tokens and --d zipped (a single value repeats); neither given: the anchor shapes."""
    if tokens is None and widths is None:
        return ANCHOR_SHAPES
    tokens = tokens or [t for t, _ in ANCHOR_SHAPES]
    widths = widths or [d for _, d in ANCHOR_SHAPES]
    if len(tokens) != len(widths) and 1 not in (len(tokens), len(widths)):
        raise SystemExit(f"--tokens ({len(tokens)} values) and --d ({len(widths)}) must have "
                         "equal lengths, or one of them a single value")
    n = max(len(tokens), len(widths))
    return [(tokens[i % len(tokens)], widths[i % len(widths)]) for i in range(n)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int_list, help="token counts T, comma-separated")
    p.add_argument("--d", type=int_list, help="model widths d, comma-separated (hidden 4d)")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--impl", default=None,
                   help="comma list of reference (= xla), xla, triton, tpu "
                        f"(default here: {default_impls()})")
    p.add_argument("--block-sizes", type=json.loads,
                   help='JSON overrides of the tuning table, e.g. \'{"up_block_n": 256}\'')
    p.add_argument("--json", help="write one record per (impl, shape) to this path")
    p.add_argument("--profile", help="write a jax.profiler trace of the sweep to this directory")
    add_timing_args(p)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    requested = (args.impl or default_impls()).split(",")
    unknown = sorted(set(requested) - set(IMPLS) - set(ALIASES))
    if unknown:
        raise SystemExit(f"unknown --impl {unknown}; known: {sorted(IMPLS + tuple(ALIASES))}")
    impls = list(dict.fromkeys(ALIASES.get(name, name) for name in requested))
    shapes = shapes_of(args.tokens, args.d)
    if smoke_size(args.full):   # at most 256 tokens of width 256
        shapes = list(dict.fromkeys((min(t, 256), min(d, 256)) for t, d in shapes))
    print(f"layernorm_ffn{' + residual' if args.residual else ''}, {args.dtype} on "
          f"{device_description()}")
    with maybe_profile(args.profile):
        records = run(impls, shapes, args.residual, jnp.dtype(args.dtype), args.block_sizes,
                      dict(warmup=args.warmup, repeats=args.repeats, calls=args.calls))
    report(records, COLUMNS, args.json, "ln_ffn.py", argv)
    return records


if __name__ == "__main__":
    main()
