"""Flash attention backward in Pallas for GPUs (the Triton backend): two kernels, no atomics.

    delta = rowsum(do * (o + o_lo))                           (XLA: one fused reduction)
    dK/dV: grid (S/bk, B, H), one key tile per program; loops over the query tiles at and below
           the diagonal, accumulating dk, dv [bk, D] in f32 (common.dkdv_step).
    dQ:    grid (S/bq, B, H), one query tile per program; loops over the key tiles up to the
           diagonal, accumulating dq [bq, D] in f32 (common.dq_step).

Probabilities are recomputed from q, k and the forward's lse; nothing of size [S, S] is stored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention import common
from kernels.attention.triton import call, segment_inputs, tile_rows


def _segments(plan, segment_refs):
    """(this tile's ids, the other side's ids ref, its row of common.segment_ranges) or Nones."""
    if not plan.segments:
        return None, None, None
    ids_ref, other_ids_ref, range_ref = segment_refs
    return ids_ref[...], other_ids_ref, common.segment_range(lambda c: range_ref[c])


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan, block_q, block_k):
    segment_refs, (dk_ref, dv_ref) = refs[:-2], refs[-2:]
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_ids, q_ids_ref, span_range = _segments(plan, segment_refs)

    def step(i, carry, masked):
        rows = tile_rows(i, block_q)
        segments = None if q_ids_ref is None else (q_ids_ref[rows], k_ids)
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                transposed=True, segments=segments)
        return common.dkdv_step(carry, q_ref[rows, :], k, v, do_ref[rows, :],
                                lse_ref[rows][None, :], delta_ref[rows][None, :],
                                plan.scale_log2, mask)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = common.visit(step, (zeros, zeros),
                          common.q_tiles(j, plan, block_q, block_k, span_range))
    dk_ref[...] = (dk * plan.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan, block_q,
               block_k, num_q):
    segment_refs, dq_ref = refs[:-1], refs[-1]
    i = common.tile_order(pl.program_id(0), num_q, plan.causal)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_ids, kv_ids_ref, span_range = _segments(plan, segment_refs)

    def step(j, dq, masked):
        rows = tile_rows(j, block_k)
        segments = None if kv_ids_ref is None else (q_ids, kv_ids_ref[rows])
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                segments=segments)
        return common.dq_step(dq, q, k_ref[rows, :], v_ref[rows, :], do, lse, delta,
                              plan.scale_log2, mask)

    dq = common.visit(step, jnp.zeros(q.shape, jnp.float32),
                      common.kv_tiles(i, plan, block_q, block_k, span_range))
    dq_ref[...] = (dq * plan.sm_scale).astype(dq_ref.dtype)


def backward(plan: common.Plan, residuals, do):
    """-> (dq, dk, dv) for the cotangent do [B, S, Hq, D] of o: dq like q, dk and dv like k and v
    (under grouped-query attention each query head's share computed apart in f32 and summed
    over its group: common.sum_over_groups)."""
    q, k, v, o, lse, o_lo, *segments = residuals
    segments = tuple(segments) or None
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    delta = common.output_delta(o, o_lo, do).transpose(0, 2, 1)              # [B, H, S]
    rows_spec = lambda n, index: pl.BlockSpec((None, n, None, d), index)
    stats_spec = lambda n, index: pl.BlockSpec((None, None, n), index)
    whole = lambda t, b_, h_: (b_, 0, h_, 0)
    whole_stats = lambda t, b_, h_: (b_, h_, 0)
    cost = functools.partial(common.cost_estimate, q, s, plan)
    launch = lambda kernel: dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages)

    bq, bk = plan.dkdv.block_q, plan.dkdv.block_k
    key_tile = rows_spec(bk, lambda j, b_, h_: (b_, j, common.div(h_, group), 0))
    per_head_tile = rows_spec(bk, lambda j, b_, h_: (b_, j, h_, 0))
    partial_dtype = k.dtype if group == 1 else jnp.float32
    segment_arrays, segment_specs = segment_inputs(segments, bk, bq, lambda j: j, by_query=False)
    dk, dv = call(
        functools.partial(_dkdv_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(s // bk, b, h),
        in_specs=[rows_spec(s, whole), key_tile, key_tile, rows_spec(s, whole),
                  stats_spec(s, whole_stats), stats_spec(s, whole_stats), *segment_specs],
        out_specs=[per_head_tile, per_head_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, partial_dtype)] * 2,
        cost=cost(matmuls=4, arrays=6), plan=plan, name="flash_attention_dkdv",
        **launch(plan.dkdv))(q, k, v, do, lse, delta, *segment_arrays)

    bq, bk = plan.dq.block_q, plan.dq.block_k
    num_q = s // bq
    tile = lambda i: common.tile_order(i, num_q, plan.causal)
    query_tile = rows_spec(bq, lambda i, b_, h_: (b_, tile(i), h_, 0))
    query_stats = stats_spec(bq, lambda i, b_, h_: (b_, h_, tile(i)))
    kv_whole = rows_spec(s, lambda t, b_, h_: (b_, 0, common.div(h_, group), 0))
    segment_arrays, segment_specs = segment_inputs(segments, bq, bk, tile, by_query=True)
    dq = call(
        functools.partial(_dq_kernel, plan=plan, block_q=bq, block_k=bk, num_q=num_q),
        grid=(num_q, b, h),
        in_specs=[query_tile, kv_whole, kv_whole, query_tile, query_stats, query_stats,
                  *segment_specs],
        out_specs=query_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost=cost(matmuls=3, arrays=5), plan=plan, name="flash_attention_dq",
        **launch(plan.dq))(q, k, v, do, lse, delta, *segment_arrays)
    return (dq, common.sum_over_groups(dk, kv_heads, k.dtype),
            common.sum_over_groups(dv, kv_heads, v.dtype))
