"""Sweep candidate block configurations on this device; record the fastest in kernels/tuning.json.

    python bench/tune.py                              # every op, every shape key (~3 min on an H100)
    python bench/tune.py --op attention --shape-keys d128

For each op, shape key and stage, every candidate (a partial configuration over the best so far)
is timed with bench/common.py; candidates that fail to compile are skipped. The stages run in
order, each starting from the previous stage's winner (attention: the forward's blocks, timed on
the forward, then the backward's, timed on forward+backward), and the final configuration is
written with kernels.tuning.record, where block_config finds it on this device kind.

Adding an op: one OPS entry naming its implementation, the shape each shape key is timed at, its
defaults, and its stages as (candidates(shape_key) -> [partial config], time(shape, config) -> ms).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp

from bench import attention as attention_bench
from bench import ln_ffn as ln_ffn_bench
from bench.common import device_description, time_ms
from kernels import attention, tuning
from kernels.attention import triton as attention_triton
from kernels.layernorm_ffn import api as layernorm_ffn_api


class Stage(NamedTuple):
    name: str
    candidates: Callable[[str], list[dict]]          # shape key -> partial configurations
    time: Callable[[tuple, dict, dict], float]       # (shape, config, timing kwargs) -> ms


class Op(NamedTuple):
    implementation: str
    shapes: dict[str, tuple]                         # shape key -> the shape it is timed at
    defaults: Callable[[str], dict]                  # shape key -> the op's default configuration
    stages: list[Stage]


# ------------------------------------------------------------------ attention (Triton)

def _attention_configs(names: tuple[str, ...], rows: list[tuple]) -> list[dict]:
    return [dict(zip(names, row)) for row in rows]


FORWARD = ("block_q", "block_k", "num_warps", "num_stages")
BACKWARD = ("block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq", "num_warps_bwd",
            "num_stages_bwd")
ATTENTION_CANDIDATES = {
    "d64": {
        "forward": _attention_configs(FORWARD, [
            (128, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 4), (128, 128, 8, 3), (128, 128, 4, 2),
            (64, 64, 4, 3)]),
        "backward": _attention_configs(BACKWARD, [
            (32, 128, 128, 32, 4, 3), (32, 128, 128, 32, 8, 3), (64, 128, 128, 64, 8, 2),
            (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 4, 3), (16, 128, 128, 16, 4, 4)]),
    },
    "d128": {
        "forward": _attention_configs(FORWARD, [
            (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 4),
            (64, 64, 4, 3)]),
        "backward": _attention_configs(BACKWARD, [
            (32, 64, 64, 32, 4, 3), (32, 64, 64, 32, 4, 2), (32, 128, 128, 32, 8, 2),
            (64, 64, 64, 64, 8, 2), (64, 128, 128, 64, 8, 2), (16, 64, 64, 16, 4, 3)]),
    },
}


def _time_attention(which: int):
    """Timing of the forward (which=1) or forward+backward (which=2) of our Triton attention."""
    def time(shape, config, timing):
        fn = lambda q, k, v: attention(q, k, v, causal=True, implementation="triton",
                                       block_sizes=config)
        (q, k, v, cotangent), *calls = attention_bench.timed_calls(fn, shape, jnp.bfloat16)
        args = (q, k, v) if which == 1 else (q, k, v, cotangent)
        return time_ms(calls[which - 1], *args, **timing)
    return time


# ------------------------------------------------------------------ layernorm_ffn (Triton)

# Each compiles spill-free for sm_90a (ptxas) at d = 512 and 768; {} keeps the defaults.
LN_FFN_CANDIDATES = {
    "forward": [{}, {"down_block_n": 256}, {"up_num_stages": 4, "down_num_stages": 4},
                {"up_block_k": 128}, {"up_block_m": 64, "up_num_warps": 4}],
    "backward": [{}, {"dxn_block_n": 256}, {"dz_num_stages": 4, "dxn_num_stages": 4},
                 {"dw_block_f": 256, "dw_block_t": 32}, {"dw_block_t": 128, "dw_num_stages": 2}],
}


def _time_ln_ffn(which: int):
    """Timing of the forward (which=1) or forward+backward (which=2) of our Triton LN+FFN."""
    def time(shape, config, timing):
        fn = lambda *a: layernorm_ffn_api.layernorm_ffn(*a, residual=True, implementation="triton",
                                                        block_sizes=config)
        args, *calls = ln_ffn_bench.timed_calls(fn, *shape, jnp.bfloat16)
        return time_ms(calls[which - 1], *(args[:7] if which == 1 else args), **timing)
    return time


OPS = {
    "attention": Op(
        implementation="triton",
        # 16k tokens, model width 2048, at S=2048: the middle of bench/attention.py's sweep
        shapes={"d64": (8, 2048, 32, 64), "d128": (8, 2048, 16, 128)},
        defaults=lambda key: attention_triton.DEFAULTS[int(key[1:])],
        stages=[Stage("forward", lambda key: ATTENTION_CANDIDATES[key]["forward"], _time_attention(1)),
                Stage("backward", lambda key: ATTENTION_CANDIDATES[key]["backward"],
                      _time_attention(2))]),
    "layernorm_ffn": Op(
        implementation="triton",
        # (tokens, d): the anchor shapes; --batch sets the tokens (do not pass --seq with this op)
        shapes={"d512": (131072, 512), "d768": (65536, 768), "d1024": (32768, 1024)},
        defaults=lambda key: layernorm_ffn_api.default_config("triton", int(key[1:])),
        stages=[Stage("forward", lambda key: LN_FFN_CANDIDATES["forward"], _time_ln_ffn(1)),
                Stage("backward", lambda key: LN_FFN_CANDIDATES["backward"], _time_ln_ffn(2))]),
}


# ------------------------------------------------------------------ the sweep

def sweep(op_name: str, op: Op, shape_key: str, shape: tuple, timing: dict,
          max_candidates: int | None) -> dict:
    """The fastest configuration for one op and shape key, stage by stage."""
    best = tuning.block_config(op_name, op.implementation, shape_key, op.defaults(shape_key))
    for stage in op.stages:
        candidates = stage.candidates(shape_key)[:max_candidates]
        best_ms, winner = float("inf"), best
        for n, candidate in enumerate(candidates, 1):
            config = {**best, **candidate}
            label = f"[{op_name} {shape_key} {stage.name} {n}/{len(candidates)}] {candidate}"
            try:
                ms = stage.time(shape, config, timing)
            except Exception as e:  # noqa: BLE001 - does not compile here (shared memory, ...)
                print(f"{label}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})",
                      flush=True)
                continue
            if ms < best_ms:
                best_ms, winner = ms, config
            print(f"{label}: {ms:.3f} ms (best {best_ms:.3f})", flush=True)
        best = winner
    return best


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default=",".join(OPS), help=f"comma list of {sorted(OPS)}")
    p.add_argument("--shape-keys", help="comma list (default: every key of each op)")
    p.add_argument("--seq", type=int, help="time at this sequence length instead")
    p.add_argument("--batch", type=int, help="time at this batch instead")
    p.add_argument("--max-candidates", type=int, help="try at most this many per stage")
    p.add_argument("--table", type=Path, default=tuning.TABLE_PATH, help="where to record")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=20)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """-> {(op, shape key): the configuration recorded}."""
    args = parse_args(argv)
    timing = dict(warmup=args.warmup, repeats=args.repeats, calls=args.calls)
    print(f"tuning on {device_description()}")
    recorded = {}
    for op_name in args.op.split(","):
        op = OPS[op_name]
        keys = args.shape_keys.split(",") if args.shape_keys else list(op.shapes)
        for key in keys:
            batch, seq, *rest = op.shapes[key]
            shape = (args.batch or batch, args.seq or seq, *rest)
            best = sweep(op_name, op, key, shape, timing, args.max_candidates)
            tuning.record(tuning.device_kind(), op_name, op.implementation, key, best, args.table)
            print(f"recorded {op_name}/{op.implementation} {key} for {tuning.device_kind()}: {best}")
            recorded[op_name, key] = best
    return recorded


if __name__ == "__main__":
    main()
