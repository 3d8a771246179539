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
from kernels.attention.triton import call, tile_rows


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan,
                 block_q, block_k):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]

    def step(i, carry, masked):
        rows = tile_rows(i, block_q)
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                transposed=True)
        return common.dkdv_step(carry, q_ref[rows, :], k, v, do_ref[rows, :],
                                lse_ref[rows][None, :], delta_ref[rows][None, :],
                                plan.scale_log2, mask)

    start, unmasked_from, end = common.q_tiles(j, plan, block_q, block_k)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = common.visit(step, (zeros, zeros), unmasked=(unmasked_from, end),
                   masked=(start, unmasked_from))
    dk_ref[...] = (dk * plan.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan, block_q,
               block_k, num_q):
    i = common.tile_order(pl.program_id(0), num_q, plan.causal)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def step(j, dq, masked):
        rows = tile_rows(j, block_k)
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k)
        return common.dq_step(dq, q, k_ref[rows, :], v_ref[rows, :], do, lse, delta,
                              plan.scale_log2, mask)

    masked_from, end = common.kv_tiles(i, plan, block_q, block_k)
    dq = common.visit(step, jnp.zeros(q.shape, jnp.float32), unmasked=(0, masked_from),
               masked=(masked_from, end))
    dq_ref[...] = (dq * plan.sm_scale).astype(dq_ref.dtype)


def backward(plan: common.Plan, residuals, do):
    """-> (dq, dk, dv) [B, S, H, D] for the cotangent do [B, S, H, D] of o."""
    q, k, v, o, lse, o_lo = residuals
    b, s, h, d = q.shape
    delta = common.output_delta(o, o_lo, do).transpose(0, 2, 1)              # [B, H, S]
    rows_spec = lambda n, index: pl.BlockSpec((None, n, None, d), index)
    stats_spec = lambda n, index: pl.BlockSpec((None, None, n), index)
    whole = lambda t, b_, h_: (b_, 0, h_, 0)
    whole_stats = lambda t, b_, h_: (b_, h_, 0)
    cost = functools.partial(common.cost_estimate, q, s, plan)
    launch = lambda kernel: dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages)

    bq, bk = plan.dkdv.block_q, plan.dkdv.block_k
    key_tile = rows_spec(bk, lambda j, b_, h_: (b_, j, h_, 0))
    dk, dv = call(
        functools.partial(_dkdv_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(s // bk, b, h),
        in_specs=[rows_spec(s, whole), key_tile, key_tile, rows_spec(s, whole),
                  stats_spec(s, whole_stats), stats_spec(s, whole_stats)],
        out_specs=[key_tile, key_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cost=cost(matmuls=4, arrays=6), plan=plan, name="flash_attention_dkdv",
        **launch(plan.dkdv))(q, k, v, do, lse, delta)

    bq, bk = plan.dq.block_q, plan.dq.block_k
    num_q = s // bq
    tile = lambda i: common.tile_order(i, num_q, plan.causal)
    query_tile = rows_spec(bq, lambda i, b_, h_: (b_, tile(i), h_, 0))
    query_stats = stats_spec(bq, lambda i, b_, h_: (b_, h_, tile(i)))
    dq = call(
        functools.partial(_dq_kernel, plan=plan, block_q=bq, block_k=bk, num_q=num_q),
        grid=(num_q, b, h),
        in_specs=[query_tile, rows_spec(s, whole), rows_spec(s, whole), query_tile,
                  query_stats, query_stats],
        out_specs=query_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost=cost(matmuls=3, arrays=5), plan=plan, name="flash_attention_dq",
        **launch(plan.dq))(q, k, v, do, lse, delta)
    return dq, dk, dv
