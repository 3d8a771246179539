"""Flash attention forward in Pallas for GPUs (the Triton backend).

One program computes one query tile o[b, i*bq:(i+1)*bq, h, :] for one (batch, head), streaming the
key/value tiles of that head through the online softmax (common.softmax_step) and saving lse:

    grid (S/bq, B, H);  q, o tiles [bq, D];  k, v [S, D] read tile by tile;  lse [B, H, S] f32.

The BlockSpecs index the [B, S, H, D] arrays in place (block (None, bq, None, D)): no transposes.
Query tiles are the fastest grid axis, so the programs resident together share one head's K/V in
L2. Under causal masking the loop stops at the diagonal, only the tiles crossing it are masked,
and the query tiles run last-first: the longest rows start first, the short ones fill the tail.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import config
from kernels.attention import common


@dataclasses.dataclass(frozen=True)
class Launch(config.KernelConfig):
    """A kernel's tiles (query rows block_q, key rows block_k), warps and software-pipeline
    stages: the forward, dK/dV and dQ kernels each have their own."""
    block_q: int = common.block()
    block_k: int = common.block()
    num_warps: int = config.count()
    num_stages: int = config.stages()


@dataclasses.dataclass(frozen=True)
class Kernels(common.Kernels):
    forward: Launch
    dkdv: Launch
    dq: Launch


def _kernels(forward: tuple, dkdv: tuple, dq: tuple) -> Kernels:
    return Kernels(Launch(*forward), Launch(*dkdv), Launch(*dq))


# Per head_dim; measured entries in kernels/tuning.json override these (bench/tune.py).
DEFAULTS = {
    64: _kernels(forward=(128, 64, 4, 3), dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3)),
    128: _kernels(forward=(128, 64, 8, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),
    # Half the rows of 128's, so an accumulator [rows, 256] f32 takes as many registers a thread;
    # 8 warps in the backward for the two [32, 256] accumulators dk and dv.
    256: _kernels(forward=(64, 32, 8, 2), dkdv=(32, 32, 8, 2), dq=(32, 32, 8, 2)),
}


def tile_rows(t, size: int):
    """The slice of rows of tile t, aligned (the hint lets Triton vectorize the loads)."""
    return pl.ds(pl.multiple_of(t * size, size), size)


def call(kernel, *, grid, in_specs, out_specs, out_shape, num_warps, num_stages, cost, plan, name):
    """pl.pallas_call with Triton's compiler parameters (interpreted off the GPU)."""
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=cost, interpret=plan.interpret, name=name)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, plan, block_q, block_k, num_q):
    segment_refs, (o_ref, *residual_refs) = refs[:3 * plan.segments], refs[3 * plan.segments:]
    i = common.tile_order(pl.program_id(0), num_q, plan.causal)
    q = q_ref[...]
    span_range = q_ids = kv_ids_ref = None
    if plan.segments:
        q_ids_ref, kv_ids_ref, range_ref = segment_refs
        q_ids, span_range = q_ids_ref[...], common.segment_range(lambda c: range_ref[c])

    def step(j, carry, masked):
        rows = tile_rows(j, block_k)
        segments = None if kv_ids_ref is None or not masked else (q_ids, kv_ids_ref[rows])
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                segments=segments)
        return common.softmax_step(carry, q, k_ref[rows, :], v_ref[rows, :], plan.scale_log2, mask,
                                   plan.rows_may_be_empty)

    span = common.kv_tiles(i, plan, block_q, block_k, span_range)
    carry = common.visit(step, common.softmax_init(block_q, q.shape[-1]), span)
    o, lse = common.softmax_finish(carry, plan.rows_may_be_empty)
    o_ref[...] = o.astype(o_ref.dtype)
    if residual_refs:
        lse_ref, o_lo_ref = residual_refs
        lse_ref[...] = lse[:, 0]
        o_lo_ref[...] = common.low_half(o, o_lo_ref.dtype)


def segment_inputs(segments, block: int, other_block: int, tile, by_query: bool):
    """The segment operands of a kernel whose programs take one tile of `block` rows (query rows
    when by_query, else key rows), with the other side's tiles of other_block rows streamed:
    (arrays, BlockSpecs) for (this tile's ids, the other side's ids, this tile's row of
    common.segment_ranges), or ((), ()) without segments. tile maps the grid index to the tile."""
    if segments is None:
        return (), ()
    mine, others, ranges = common.tile_segments(segments, block, other_block, by_query)
    specs = [pl.BlockSpec((None, block), lambda t, b_, h_: (b_, tile(t))),
             pl.BlockSpec((None, mine.shape[1]), lambda t, b_, h_: (b_, 0)),
             pl.BlockSpec((None, None, common.SEGMENT_RANGE), lambda t, b_, h_: (b_, tile(t), 0))]
    return (mine, others, ranges), specs


def forward(q, k, v, plan: common.Plan, residuals: bool, segments=None):
    """q [B, S, Hq, D], k, v [B, S, Hkv, D] (S padded to the blocks; Hkv dividing Hq: query head h
    reads key/value head h // (Hq / Hkv)), segments (q ids, kv ids) [B, S] int32 or None ->
    (o [B, S, Hq, D], residuals or None).

    The residuals for the backward: q, k, v, o, lse [B, Hq, S] f32, o's low half
    (common.low_half), then the segment ids.
    """
    b, s, h, d = q.shape
    group = h // k.shape[2]
    bq, bk = plan.forward.block_q, plan.forward.block_k
    num_q = s // bq
    tile = lambda i: common.tile_order(i, num_q, plan.causal)
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, tile(i), h_, 0))
    seq_spec = pl.BlockSpec((None, s, None, d), lambda i, b_, h_: (b_, 0, common.div(h_, group), 0))
    lse_spec = pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, tile(i)))
    segment_arrays, segment_specs = segment_inputs(segments, bq, bk, tile, by_query=True)
    o_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
    o, *saved = call(
        functools.partial(_forward_kernel, plan=plan, block_q=bq, block_k=bk, num_q=num_q),
        grid=(num_q, b, h), in_specs=[q_spec, seq_spec, seq_spec, *segment_specs],
        out_specs=[q_spec, lse_spec, q_spec] if residuals else [q_spec],
        out_shape=[o_shape, lse_shape, o_shape] if residuals else [o_shape],
        num_warps=plan.forward.num_warps, num_stages=plan.forward.num_stages,
        cost=common.cost_estimate(q, s, plan, matmuls=2, arrays=6 if residuals else 4), plan=plan,
        name="flash_attention_fwd")(q, k, v, *segment_arrays)
    return o, ((q, k, v, o, *saved, *(segments or ())) if residuals else None)
