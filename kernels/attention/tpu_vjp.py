"""Flash attention backward in Pallas for TPUs (Mosaic), in the [B, H, S, D] layout of tpu.py.

    delta = rowsum(do * (o + o_lo))                             (XLA)
    dK/dV: grid (B, H, S/bk, S/bq), query tiles sequential; dk, dv [bk, D] f32 in VMEM
           (common.dkdv_step, which wants lse and delta as rows: [B, H, 1, S]).
    dQ:    grid (B, H, S/bq, S/bk), key tiles sequential; dq [bq, D] f32 in VMEM
           (common.dq_step, lse and delta as columns: [B, H, S, 1]).

Tiles the mask leaves empty are skipped with pl.when and their block index is clamped into the
range needed, so they are not fetched (segment ranges prefetched as in tpu.py). Grouped-query
heads: dk and dv per query head in f32, summed over each group (common.sum_over_groups).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention import common
from kernels.attention.tpu import (call, heads_major, segment_operands, tile_segment_range,
                                   when_tile)


def _split(refs, plan):
    """(the prefetched ranges or None, the arrays, the segment id refs or None, the rest)."""
    ranges_ref, refs = (refs[0], refs[1:]) if plan.segments else (None, refs)
    arrays, refs = refs[:6], refs[6:]
    ids, refs = (refs[:2], refs[2:]) if plan.segments else (None, refs)
    return ranges_ref, arrays, ids, refs


def _dkdv_kernel(*refs, plan, block_q, block_k):
    ranges_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), ids, refs = _split(refs, plan)
    dk_ref, dv_ref, dk_acc, dv_acc = refs
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    state = (dk_acc, dv_acc)

    @pl.when(i == 0)
    def _init():
        for ref in state:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    def step(masked):
        segments = None if ids is None else (ids[1][...], ids[0][...])   # (q row, k column)
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                transposed=True, segments=segments)
        carry = common.dkdv_step(tuple(ref[...] for ref in state), q_ref[...], k_ref[...],
                                 v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                                 plan.scale_log2, mask)
        for ref, value in zip(state, carry):
            ref[...] = value

    span = common.q_tiles(j, plan, block_q, block_k, tile_segment_range(ranges_ref, b, j))
    masked, unmasked = common.in_span(i, span)
    when_tile(masked, step, masked=True)
    when_tile(unmasked, step, masked=False)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, plan, block_q, block_k):
    ranges_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), ids, refs = _split(refs, plan)
    dq_ref, dq_acc = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def step(masked):
        segments = None if ids is None else tuple(ref[...] for ref in ids)
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                segments=segments)
        dq_acc[...] = common.dq_step(dq_acc[...], q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                     lse_ref[...], delta_ref[...], plan.scale_log2, mask)

    span = common.kv_tiles(i, plan, block_q, block_k, tile_segment_range(ranges_ref, b, i))
    masked, unmasked = common.in_span(j, span)
    when_tile(unmasked, step, masked=False)
    when_tile(masked, step, masked=True)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * plan.sm_scale).astype(dq_ref.dtype)


def backward(plan: common.Plan, residuals, do):
    """-> (dq, dk, dv) [B, S, H*, D] for the cotangent do [B, S, Hq, D] of o."""
    q, k, v, o, lse, o_lo, *segments = residuals               # [B, H, S, D], lse [B, H, S, 1]
    segments = tuple(segments) or None
    do = heads_major(do)
    b, h, s, d = q.shape
    kv_heads = k.shape[1]
    group = h // kv_heads
    delta = common.output_delta(o, o_lo, do)[..., None]          # [B, H, S, 1]
    as_rows = lambda x: x.reshape(b, h, 1, s)
    cost = functools.partial(common.cost_estimate, q, s, plan)
    rows_spec = lambda n, index: pl.BlockSpec((None, None, n, d), index)

    bq, bk = plan.dkdv.block_q, plan.dkdv.block_k
    ranges, ids, id_specs = segment_operands(segments, bk, bq, by_query=False)

    def query_tile_index(b_, j, i, prefetched):  # a query tile it needs (the nearest: no fetch)
        span = common.q_tiles(j, plan, bq, bk, tile_segment_range(
            prefetched[0] if prefetched else None, b_, j))
        return common.clamp_to_span(i, span)

    key_tile = rows_spec(bk, lambda b_, h_, j, i, *_: (b_, common.div(h_, group), j, 0))
    per_head_tile = rows_spec(bk, lambda b_, h_, j, i, *_: (b_, h_, j, 0))
    query_tile = rows_spec(bq, lambda b_, h_, j, i, *p: (b_, h_, query_tile_index(b_, j, i, p), 0))
    query_stats = pl.BlockSpec((None, None, 1, bq),
                               lambda b_, h_, j, i, *p: (b_, h_, 0, query_tile_index(b_, j, i, p)))
    partial_dtype = k.dtype if group == 1 else jnp.float32
    dk, dv = call(
        functools.partial(_dkdv_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(b, h, s // bk, s // bq),
        in_specs=[query_tile, key_tile, key_tile, query_tile, query_stats, query_stats,
                  *id_specs],
        out_specs=[per_head_tile, per_head_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, partial_dtype)] * 2,
        scratch=[(bk, d), (bk, d)], cost=cost(matmuls=4, arrays=6), plan=plan,
        name="flash_attention_dkdv", prefetch=() if ranges is None else (ranges,),
        )(q, k, v, do, as_rows(lse), as_rows(delta), *ids)

    bq, bk = plan.dq.block_q, plan.dq.block_k
    ranges, ids, id_specs = segment_operands(segments, bq, bk, by_query=True)

    def kv_index(b_, h_, i, j, *prefetched):  # a key tile it needs (the nearest: no fetch)
        span = common.kv_tiles(i, plan, bq, bk, tile_segment_range(
            prefetched[0] if prefetched else None, b_, i))
        return b_, common.div(h_, group), common.clamp_to_span(j, span), 0

    query_tile = rows_spec(bq, lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    query_stats = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    key_tile = rows_spec(bk, kv_index)
    dq = call(
        functools.partial(_dq_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(b, h, s // bq, s // bk),
        in_specs=[query_tile, key_tile, key_tile, query_tile, query_stats, query_stats,
                  *id_specs],
        out_specs=query_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[(bq, d)], cost=cost(matmuls=3, arrays=5), plan=plan,
        name="flash_attention_dq", prefetch=() if ranges is None else (ranges,),
        )(q, k, v, do, lse, delta, *ids)
    dk, dv = (common.sum_over_groups(x, kv_heads, k.dtype, heads_axis=1) for x in (dk, dv))
    return heads_major(dq), heads_major(dk), heads_major(dv)
