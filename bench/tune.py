"""Sweep candidate block configurations on this device; record the fastest in a tuning table.

    python bench/tune.py                              # every op, every shape key, into your cache
    python bench/tune.py --table kernels/tuning.json  # into the table shipped with the kernels
    python bench/tune.py --op attention --shape-keys d128
    python bench/tune.py --op attention/mosaic_gpu
    python bench/tune.py --op attention --compare-only   # only re-pick the implementation per key

For each op implementation that runs here, shape key and stage, every candidate (a partial
configuration over the best so far) is timed with bench/common.py; candidates that fail to compile
are skipped. The stages run in order, each starting from the previous stage's winner (attention: the
forward's blocks, timed on the forward, then the backward's, timed on forward+backward), and the
final configuration is written with kernels.tuning.record into --table (by default the user's
tuning cache, which the kernels read over the shipped table), where block_config finds it on this
device kind. Where several implementations of one op were tuned at a shape key (or at a wider one:
"d64" applies to "d64_s1024"), their configurations for it are timed on forward+backward and the
fastest is recorded as the op's preferred implementation there (kernels.tuning.record_preferred;
attention's default follows it on Hopper GPUs).

Adding an op: one OPS entry "op/implementation" with the shape each shape key is timed at, its
defaults, its stages as (candidates(shape_key) -> [partial config], time(shape, config) -> ms), the
forward+backward timing and whether it runs on this device.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp

from bench import attention as attention_bench
from bench import ln_ffn as ln_ffn_bench
from bench import loss_head as loss_head_bench
from bench.common import add_full_arg, device_description, smoke_size, time_ms
from kernels import attention, tuning, warp_specialized
from kernels.config import Kernels
from kernels.attention import api as attention_api
from kernels.attention import common as attention_common
from kernels.attention import mosaic_gpu as attention_mosaic_gpu
from kernels.attention import triton as attention_triton
from kernels.layernorm_ffn import api as layernorm_ffn_api
from kernels.logits_loss import api as logits_loss_api
from kernels.logits_loss import mosaic_gpu as logits_loss_mosaic_gpu


class Stage(NamedTuple):
    name: str
    candidates: Callable[[str], list[dict]]          # shape key -> partial configurations
    time: Callable[[tuple, dict, dict], float]       # (shape, config, timing kwargs) -> ms


class AttentionShape(NamedTuple):
    """[B, S, H, D], with packed documents of this mean length (bench/attention.py's Masks)."""
    batch: int
    seq: int
    heads: int
    head_dim: int
    documents: int | None = None


class Op(NamedTuple):
    shapes: dict[str, tuple]                         # shape key -> the shape it is timed at
    defaults: Callable[[str], Kernels]               # shape key -> the op's default configuration
    stages: list[Stage]
    total: Callable[[tuple, dict, dict], float]      # forward+backward ms, to compare implementations
    available: Callable[[], bool] = lambda: True     # whether it runs on this device
    # The backward implementations that can differentiate this (attention) forward: where
    # several, the fastest forward+backward is recorded as the preference (`prefer_backward`).
    backwards: tuple[str, ...] = ()


# ------------------------------------------------------------------ attention (Triton, Mosaic GPU)

def _attention_configs(names: tuple, rows: list[tuple]) -> list[dict]:
    """Each row's values under `names` (a tuple of names: one value for each of them)."""
    return [{name: value for names_, value in zip(names, row)
             for name in (names_ if isinstance(names_, tuple) else (names_,))} for row in rows]


FORWARD = ("block_q", "block_k", "num_warps", "num_stages")
# The dK/dV and dQ kernels' tiles, with one warp count and stage count for both.
BACKWARD = ("dkdv_block_q", "dkdv_block_k", "dq_block_q", "dq_block_k",
            ("dkdv_num_warps", "dq_num_warps"), ("dkdv_num_stages", "dq_num_stages"))
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


# The Mosaic GPU forward's query tile per consumer warpgroup, key tile, ring depth and ping-pong;
# 256-key tiles halve the steps, and with them each row's max and sum across its four threads.
# Persistent CTAs too, for the tiles they suit: the grid stage below tries them only with this
# stage's winner, and the tiles that win without them may not fit them (128-row tiles at
# head_dim 128 spill persistent; 64 x 128 ones ran the S512 forward 15% faster: RESULTS,
# session 30).
MOSAIC_FORWARD = ("block_q", "block_k", "num_stages", "schedule_barrier")
MOSAIC_CANDIDATES = _attention_configs(MOSAIC_FORWARD, [
    (128, 64, 2, True), (128, 64, 2, False), (64, 128, 2, True), (64, 128, 3, True),
    (128, 64, 3, True), (128, 128, 2, True), (64, 64, 3, True), (64, 256, 2, True),
    (64, 128, 2, False)]) + [
    dict(config, persistent=True) for config in _attention_configs(MOSAIC_FORWARD, [
        (64, 128, 2, True), (64, 64, 3, True), (128, 64, 2, True)])]
# Then, at head_dim 64, three consumer warpgroups of 64 query rows (FlashAttention-3's 192-row
# tiles there; without ping-pong, which pairs two), over the best so far.
MOSAIC_CONSUMER_CANDIDATES = [{}] + [
    {"consumers": 3, "schedule_barrier": False, "block_q": 64, "block_k": block_k,
     "num_stages": stages} for block_k, stages in ((128, 2), (64, 3), (128, 3))]
# Its own backward (timed with it, whichever the table prefers; `prefer_backward` then weighs it
# against Triton's): the dK/dV kernel's query tile and ring depth (its key tile is
# mosaic_gpu.DKDV_BLOCK_K).
MOSAIC_BACKWARD = ("dkdv_block_q", "dkdv_num_stages")
MOSAIC_BACKWARD_CANDIDATES = _attention_configs(MOSAIC_BACKWARD, [
    (64, 2), (64, 3), (128, 2), (128, 3)])
# The dQ kernel's own tiles and ring depth (the stage above sets dK/dV's): 64 x 128 tiles keep
# its accumulators in registers where 128 x 64 spill (ptxas), at 3 stages too large at head_dim 128.
MOSAIC_DQ = ("dq_block_q", "dq_block_k", "dq_num_stages")
MOSAIC_DQ_CANDIDATES = _attention_configs(MOSAIC_DQ, [
    (64, 64, 2), (64, 64, 3), (128, 64, 2), (128, 64, 3), (64, 128, 2), (64, 128, 3)])
# Then how many (batch, head)s run together (mosaic_gpu.launch_grid), in MiB of their streamed
# tiles: the fewer, the better their tiles stay in L2; the more, the earlier the longest CTAs of
# the last group start. The forward's (timed on the forward) with or without persistent CTAs, one
# per multiprocessor; then the backward's (timed on forward+backward), likewise.
GROUP_MIBS = (12, 32, 1024)
MOSAIC_GROUP_CANDIDATES = [{"group_mib": mib, "persistent": persistent}
                           for persistent in (False, True) for mib in GROUP_MIBS]
MOSAIC_BACKWARD_GROUP_CANDIDATES = [{"dkdv_group_mib": mib, "dkdv_persistent": persistent}
                                    for persistent in (False, True) for mib in GROUP_MIBS]


def _head_dim(key: str) -> int:
    """An attention shape key, "d<head_dim>" or narrower ("d<head_dim>_s<length>") -> head_dim."""
    return int(key.split("_")[0][1:])


def attention_block_sizes(implementation: str, backward: str | None, shape: AttentionShape,
                          config: dict) -> dict:
    """What of an implementation's configuration goes to `attention` with the given backward
    (None: the one the table picks): all of it with its own backward; with another (Triton's after
    the Mosaic GPU forward), the forward's alone, since that backward takes its own entry (and
    names the two share, e.g. dq_block_q, would set it)."""
    kernel_dim = attention_common.kernel_head_dim(shape.head_dim)
    backward = backward or attention_api.default_backward(implementation, kernel_dim, shape.seq,
                                                          bool(shape.documents))
    if backward == implementation:
        return config
    forward_names = attention_api.DEFAULTS[implementation][kernel_dim].names(("forward",))
    return {name: value for name, value in config.items() if name in forward_names}


def _time_attention(which: int, implementation: str, backward: str | None = None):
    """Timing of the forward (which=1) or forward+backward (which=2) of our attention, with the
    given backward (None: the one the table picks)."""
    def time(shape: AttentionShape, config, timing):
        blocks = attention_block_sizes(implementation, backward, shape, config)
        fn = lambda q, k, v, ids: attention(q, k, v, causal=True, segment_ids=ids,
                                            implementation=implementation,
                                            backward_implementation=backward, block_sizes=blocks)
        (q, k, v, ids, cotangent), *calls = attention_bench.timed_calls(
            fn, shape[:4], jnp.bfloat16, attention_bench.Masks(segments=shape.documents))
        args = (q, k, v, ids) if which == 1 else (q, k, v, ids, cotangent)
        return time_ms(calls[which - 1], *args, **timing)
    return time


# ------------------------------------------------------------------ layernorm_ffn (Triton)

def _wide(*gemms: str, stages: int = 4) -> dict:
    """128 x 256 x 64 tiles, 8 warps: the Pallas Triton GEMM's best shape on the H100 (a plain
    bf16 GEMM at T = 131072, d = 512: 430-540 TF/s against 290-330 for 128 x 128)."""
    return {f"{g}_{name}": value for g in gemms for name, value in
            (("block_m", 128), ("block_n", 256), ("block_k", 64), ("num_warps", 8),
             ("num_stages", stages))}


# {} keeps the defaults (or the table's entry).
LN_FFN_CANDIDATES = {
    "forward": [{}, _wide("up", "down"), _wide("up", "down", stages=3), _wide("down")],
    "backward": [{}, _wide("dz", "dxn"), _wide("dxn"), {"dw_block_f": 256, "dw_block_t": 32}],
}


# ------------------------------------------------------------------ layernorm_ffn (Mosaic GPU)

def _mosaic_tiles(gemms: tuple[str, ...], block_m: int, block_n: int, stages: int) -> dict:
    return {f"{g}_{name}": value for g in gemms for name, value in
            (("block_m", block_m), ("block_n", block_n), ("num_stages", stages))}


# Per consumer warpgroup: 64 x 256 and 128 x 128 (128 accumulator registers a thread) fit 3 ring
# stages beside the epilogue buffer in 227 KB of shared memory; 64 x 128 fits 5. dw_xla: the weight
# gradients by cuBLAS (on the H100 faster at d 768, 3.08 against 3.22 ms, not at d 512: RESULTS).
LN_FFN_MOSAIC_CANDIDATES = {
    "forward": [{}, _mosaic_tiles(("up", "down"), 128, 128, 3),
                _mosaic_tiles(("up", "down"), 64, 128, 5), _mosaic_tiles(("down",), 128, 128, 3)],
    "backward": [{}, _mosaic_tiles(("dz", "dxn"), 128, 128, 3),
                 _mosaic_tiles(("dz", "dxn"), 64, 128, 5), _mosaic_tiles(("dw",), 64, 256, 3),
                 _mosaic_tiles(("dw",), 64, 128, 5), {"dw_xla": True}],
}


def _time_ln_ffn(which: int, implementation: str):
    """Timing of the forward (which=1) or forward+backward (which=2) of our LN+FFN."""
    def time(shape, config, timing):
        fn = lambda *a: layernorm_ffn_api.layernorm_ffn(*a, residual=True,
                                                        implementation=implementation,
                                                        block_sizes=config)
        args, *calls = ln_ffn_bench.timed_calls(fn, *shape, jnp.bfloat16)
        return time_ms(calls[which - 1], *(args[:7] if which == 1 else args), **timing)
    return time


def _ln_ffn_op(implementation: str, candidates: dict, available=lambda: True) -> Op:
    """The LN+FFN by `implementation`: forward tiles first, then the backward's."""
    return Op(
        shapes=LN_FFN_SHAPES,
        defaults=lambda key: layernorm_ffn_api.default_config(implementation, int(key[1:])),
        stages=[Stage(name, lambda key, name=name: candidates[name],
                      _time_ln_ffn(which, implementation))
                for which, name in ((1, "forward"), (2, "backward"))],
        total=_time_ln_ffn(2, implementation), available=available)


# ------------------------------------------------------------------ logits_loss (Mosaic GPU)

# The statistics GEMM's logits tile per consumer warpgroup and ring depth
# (kernels/mosaic_gpu_gemm.py): 64 x 256 and 128 x 128 hold 128 accumulator registers a thread,
# 64 x 128 leaves shared memory for 5 stages; the vocabulary pads to the lcm of both GEMMs'
# block_n (9000: 9216 at 256, 9088 at 128).
LOSS_HEAD_CANDIDATES = [
    {}, {"block_n": 128, "num_stages": 4}, {"block_n": 128, "num_stages": 5},
    {"block_m": 128, "block_n": 128, "num_stages": 3}, {"num_stages": 4}, {"num_stages": 2}]
# The probabilities GEMM (its epilogue writes a bf16 tile beside the row statistics) and the
# chunk it writes.
LOSS_HEAD_PROBABILITIES_CANDIDATES = [
    {}, {"probabilities_block_n": 128, "probabilities_num_stages": 4},
    {"probabilities_block_m": 128, "probabilities_block_n": 128, "probabilities_num_stages": 3},
    {"probabilities_num_stages": 4}, {"probabilities_chunk_mib": 128},
    {"probabilities_chunk_mib": 64}]
# (tokens, vocab, d): micro_gpt_4's head at batch 64 (bench/loss_head.py's first row), GPT-2's
LOSS_HEAD_SHAPES = {"d512": (65536, 9000, 512), "d768": (65536, 50257, 768)}


def _time_loss_head(which: int):
    """Timing of the forward (which=1) or forward+backward (which=2) of our loss head."""
    def time(shape, config, timing):
        fn = lambda *a: logits_loss_api.logits_loss(*a, implementation="mosaic_gpu",
                                                    block_sizes=config)
        args, *calls = loss_head_bench.timed_calls(fn, *shape)
        return time_ms(calls[which - 1], *args, **timing)
    return time


# (tokens, d): the LN+FFN anchor shapes; --batch sets the tokens (do not pass --seq with these ops)
LN_FFN_SHAPES = {"d512": (131072, 512), "d768": (65536, 768), "d1024": (32768, 1024)}
# 16k tokens, model width 2048, at S=2048: the middle of bench/attention.py's sweep
ATTENTION_SHAPES = {"d64": AttentionShape(8, 2048, 32, 64),
                    "d128": AttentionShape(8, 2048, 16, 128)}
# The Mosaic GPU kernels also per length (kernels.attention.api.shape_key): the sweep's lengths
# (16k tokens), at 1024 with head_dim 64 micro_gpt_4's training shape; and with packed documents
# of mean length 512 ("_docs", segment ids: tiles of few keys each), issue 21's case at 8192 and
# micro_gpt_4's training shape.
MOSAIC_ATTENTION_SHAPES = {
    **ATTENTION_SHAPES, "d64_s512": AttentionShape(32, 512, 32, 64),
    "d64_s1024": AttentionShape(128, 1024, 8, 64), "d64_s4096": AttentionShape(4, 4096, 32, 64),
    "d64_s8192": AttentionShape(2, 8192, 32, 64), "d128_s512": AttentionShape(32, 512, 16, 128),
    "d128_s1024": AttentionShape(16, 1024, 16, 128),
    "d128_s4096": AttentionShape(4, 4096, 16, 128),
    "d128_s8192": AttentionShape(2, 8192, 16, 128),
    "d64_s1024_docs": AttentionShape(128, 1024, 8, 64, documents=512),
    "d128_s8192_docs": AttentionShape(2, 8192, 16, 128, documents=512)}
OPS = {
    "attention/triton": Op(
        shapes=ATTENTION_SHAPES,
        defaults=lambda key: attention_triton.DEFAULTS[_head_dim(key)],
        stages=[Stage("forward", lambda key: ATTENTION_CANDIDATES[key]["forward"],
                      _time_attention(1, "triton")),
                Stage("backward", lambda key: ATTENTION_CANDIDATES[key]["backward"],
                      _time_attention(2, "triton"))],
        total=_time_attention(2, "triton")),
    "attention/mosaic_gpu": Op(
        shapes=MOSAIC_ATTENTION_SHAPES,
        defaults=lambda key: attention_mosaic_gpu.DEFAULTS[_head_dim(key)],
        stages=[Stage("forward", lambda key: MOSAIC_CANDIDATES, _time_attention(1, "mosaic_gpu")),
                Stage("consumers",
                      lambda key: MOSAIC_CONSUMER_CANDIDATES if _head_dim(key) == 64 else [],
                      _time_attention(1, "mosaic_gpu")),
                Stage("backward", lambda key: MOSAIC_BACKWARD_CANDIDATES,
                      _time_attention(2, "mosaic_gpu", "mosaic_gpu")),
                Stage("backward_dq", lambda key: MOSAIC_DQ_CANDIDATES,
                      _time_attention(2, "mosaic_gpu", "mosaic_gpu")),
                Stage("grid", lambda key: MOSAIC_GROUP_CANDIDATES,
                      _time_attention(1, "mosaic_gpu")),
                Stage("backward_grid", lambda key: MOSAIC_BACKWARD_GROUP_CANDIDATES,
                      _time_attention(2, "mosaic_gpu", "mosaic_gpu"))],
        total=_time_attention(2, "mosaic_gpu"),
        available=attention_mosaic_gpu.on_sm90, backwards=("mosaic_gpu", "triton")),
    "layernorm_ffn/triton": _ln_ffn_op("triton", LN_FFN_CANDIDATES),
    "layernorm_ffn/mosaic_gpu": _ln_ffn_op("mosaic_gpu", LN_FFN_MOSAIC_CANDIDATES,
                                           available=warp_specialized.on_sm90),
    # The statistics GEMM timed on the loss alone, the probabilities GEMM on forward+backward
    # (the gradient GEMMs are cuBLAS's).
    "logits_loss/mosaic_gpu": Op(
        shapes=LOSS_HEAD_SHAPES,
        defaults=lambda key: logits_loss_mosaic_gpu.DEFAULTS,
        stages=[Stage("tiles", lambda key: LOSS_HEAD_CANDIDATES, _time_loss_head(1)),
                Stage("probabilities", lambda key: LOSS_HEAD_PROBABILITIES_CANDIDATES,
                      _time_loss_head(2))],
        total=_time_loss_head(2), available=warp_specialized.on_sm90),
}


# ------------------------------------------------------------------ the sweep

def sweep(name: str, op: Op, shape_key: str, shape: tuple, timing: dict,
          max_candidates: int | None, stages: list[str] | None = None) -> dict | None:
    """The fastest configuration for one op implementation and shape key, stage by stage; None
    when no candidate of some stage ran (nothing measured, nothing to record)."""
    op_name, implementation = name.split("/")
    defaults = op.defaults(shape_key)
    best = tuning.block_config(op_name, implementation, shape_key, defaults.flat())
    for stage in op.stages:
        if stages and stage.name not in stages:
            continue
        candidates = stage.candidates(shape_key)[:max_candidates]
        if not candidates:   # the stage does not apply at this key
            continue
        best_ms, winner = float("inf"), None
        for n, candidate in enumerate(candidates, 1):
            config = {**best, **candidate}
            label = f"[{name} {shape_key} {stage.name} {n}/{len(candidates)}] {candidate}"
            try:
                ms = stage.time(shape, config, timing)
            except Exception as e:  # noqa: BLE001 - does not compile here (shared memory, ...)
                print(f"{label}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})",
                      flush=True)
                continue
            if ms < best_ms:
                best_ms, winner = ms, config
            print(f"{label}: {ms:.3f} ms (best {best_ms:.3f})", flush=True)
        if winner is None:
            return None
        best = winner
    return type(defaults).from_flat(best, name).flat()   # checked, flags as bools


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default=",".join(OPS), help=f"comma list of {sorted(OPS)}")
    p.add_argument("--shape-keys", help="comma list (default: every key of each op; each op tunes "
                                        "the ones it has)")
    p.add_argument("--seq", type=int, help="time at this sequence length instead")
    p.add_argument("--batch", type=int, help="time at this batch instead")
    p.add_argument("--tokens", type=int, help="time the LayerNorm+FFN and the loss head at this "
                                              "many tokens instead")
    p.add_argument("--max-candidates", type=int, help="try at most this many per stage")
    p.add_argument("--stages", help="comma list of stage names to run (default: all), each "
                                    "starting from the table's entry")
    p.add_argument("--compare-only", action="store_true",
                   help="tune nothing: time each implementation's tuned configuration at the "
                        "shape keys and record the fastest as the preferred one")
    p.add_argument("--table", type=Path, default=tuning.user_table_path(),
                   help="where to record: by default the user's tuning cache, which the kernels "
                        "read over the shipped kernels/tuning.json (kernels.tuning)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=20)
    add_full_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """-> {(op/implementation, shape key): the configuration recorded}."""
    args = parse_args(argv)
    smoke = smoke_size(args.full)
    if smoke:   # the first shape key of each op, small, one candidate a stage, a scratch table
        args.seq, args.batch = min(args.seq or 32, 32), min(args.batch or 1, 1)
        args.tokens = min(args.tokens or 256, 256)
        args.max_candidates, args.warmup, args.repeats, args.calls = 1, 0, 1, 1
        scratch = Path(tempfile.mkdtemp()) / "tuning.json"
        if args.table.exists():
            shutil.copyfile(args.table, scratch)
        print(f"cpu: interpreted times say nothing of a GPU's: recording into {scratch}, "
              f"not {args.table}")
        args.table = scratch
    timing = dict(warmup=args.warmup, repeats=args.repeats, calls=args.calls)
    device = tuning.device_kind()
    print(f"tuning on {device_description()}")
    asked = args.op.split(",")
    names = [n for n in OPS if n in asked or n.split("/")[0] in asked]
    unknown = [a for a in asked if not any(n == a or n.split("/")[0] == a for n in OPS)]
    if unknown:
        raise SystemExit(f"unknown --op {unknown}; known: {sorted(OPS)} or their op names")
    if args.compare_only:
        for op_name in dict.fromkeys(name.split("/")[0] for name in names):
            keys = dict.fromkeys(k for n in names if n.startswith(op_name + "/")
                                 for k in OPS[n].shapes)
            for key in (k for k in keys if not args.shape_keys or k in args.shape_keys.split(",")):
                prefer(op_name, key, args, timing)
        return {}
    recorded = {}
    for name in names:
        op = OPS[name]
        if not op.available():
            print(f"{name}: does not run on this device, not tuned")
            continue
        keys = [k for k in args.shape_keys.split(",") if k in op.shapes] if args.shape_keys \
            else list(op.shapes)[:1 if smoke else None]
        for key in keys:
            best = sweep(name, op, key, _shape(op, key, args), timing, args.max_candidates,
                         args.stages.split(",") if args.stages else None)
            if best is None:
                print(f"{name} {key}: no candidate ran, nothing recorded")
                continue
            tuning.record(device, *name.split("/"), key, best, args.table)
            print(f"recorded {name} {key} for {device}: {best}")
            recorded[name, key] = best
            if len(op.backwards) > 1:
                prefer_backward(name, key, best, args, timing)
    for op_name in sorted({name.split("/")[0] for name, _ in recorded}):
        for key in sorted({key for name, key in recorded if name.startswith(op_name + "/")}):
            prefer(op_name, key, args, timing)
    return recorded


def prefer(op_name: str, key: str, args, timing: dict) -> str | None:
    """Time forward+backward of every implementation of op_name that runs here and has a tuned
    entry for `key` or a wider key in the table (each with its configuration for `key`,
    tuning.layered_entry); record the fastest as the op's preferred implementation there."""
    table = tuning.read_table(args.table).get(tuning.device_kind(), {})
    rivals = {name: {**OPS[name].defaults(key).flat(), **tuning.layered_entry(table[name], key)}
              for name in OPS if name.startswith(op_name + "/") and OPS[name].available()
              and any(k in table.get(name, {}) for k in tuning.shape_key_prefixes(key))}
    if len(rivals) < 2:
        return None
    shape = next(_shape(OPS[name], key, args) for name in rivals if key in OPS[name].shapes)
    times = {name: OPS[name].total(shape, config, timing) for name, config in rivals.items()}
    fastest = min(times, key=times.get)
    print(f"{op_name} {key} forward+backward: "
          + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()) + f" -> {fastest}")
    tuning.record_preferred(tuning.device_kind(), op_name, key, fastest.split("/")[1], args.table)
    return fastest


def prefer_backward(name: str, key: str, config: dict, args, timing: dict) -> str:
    """Time forward+backward of the attention forward `name` (its configuration for `key`) with
    each backward that can differentiate it (the other backends' parameters from their tuning
    entries); record the fastest as "attention_backward"'s preference there (the api's
    default_backward follows it)."""
    op_name, implementation = name.split("/")
    shape = _shape(OPS[name], key, args)
    forward = {n: v for n, v in config.items() if n in OPS[name].defaults(key).names(("forward",))}
    times = {backward: _time_attention(2, implementation, backward)(
                 shape, config if backward == implementation else forward, timing)
             for backward in OPS[name].backwards}
    fastest = min(times, key=times.get)
    print(f"{name} {key} backward: " + ", ".join(f"{b} {ms:.3f} ms" for b, ms in times.items())
          + f" -> {fastest}")
    tuning.record_preferred(tuning.device_kind(), f"{op_name}_backward", key, fastest, args.table)
    return fastest


def _shape(op: Op, key: str, args) -> tuple:
    """The shape a key is timed at: attention's [B, S, H, D] with --batch/--seq applied, the
    others' (tokens, ...) with --tokens."""
    shape = op.shapes[key]
    if isinstance(shape, AttentionShape):
        return shape._replace(batch=args.batch or shape.batch, seq=args.seq or shape.seq)
    return (args.tokens or shape[0], *shape[1:])

if __name__ == "__main__":
    main()
