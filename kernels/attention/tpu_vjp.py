"""Flash attention backward in Pallas for TPUs (Mosaic), in the [B, H, S, D] layout of tpu.py.

    delta = rowsum(do * (o + o_lo))                             (XLA)
    dK/dV: grid (B, H, S/bk, S/bq), query tiles sequential; dk, dv [bk, D] f32 in VMEM
           (common.dkdv_step, which wants lse and delta as rows: [B, H, 1, S]).
    dQ:    grid (B, H, S/bq, S/bk), key tiles sequential; dq [bq, D] f32 in VMEM
           (common.dq_step, lse and delta as columns: [B, H, S, 1]).

Tiles that see nothing under causal masking are skipped with pl.when and their block index is
clamped into the range needed, so they are not fetched.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention import common
from kernels.attention.tpu import call, heads_major, when_tile


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc,
                 *, plan, block_q, block_k):
    j, i = pl.program_id(2), pl.program_id(3)
    state = (dk_acc, dv_acc)

    @pl.when(i == 0)
    def _init():
        for ref in state:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    def step(masked):
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                transposed=True)
        carry = common.dkdv_step(tuple(ref[...] for ref in state), q_ref[...], k_ref[...],
                                 v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                                 plan.scale_log2, mask)
        for ref, value in zip(state, carry):
            ref[...] = value

    start, unmasked_from, end = common.q_tiles(j, plan, block_q, block_k)
    when_tile((i >= start) & (i < unmasked_from), step, masked=True)
    when_tile((i >= unmasked_from) & (i < end), step, masked=False)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc, *, plan, block_q,
               block_k):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def step(masked):
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k)
        dq_acc[...] = common.dq_step(dq_acc[...], q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                     lse_ref[...], delta_ref[...], plan.scale_log2, mask)

    masked_from, end = common.kv_tiles(i, plan, block_q, block_k)
    when_tile(j < masked_from, step, masked=False)
    when_tile((j >= masked_from) & (j < end), step, masked=True)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * plan.sm_scale).astype(dq_ref.dtype)


def backward(plan: common.Plan, residuals, do):
    """-> (dq, dk, dv) [B, S, H, D] for the cotangent do [B, S, H, D] of o."""
    q, k, v, o, lse, o_lo = residuals                          # [B, H, S, D], lse [B, H, S, 1]
    do = heads_major(do)
    b, h, s, d = q.shape
    delta = common.output_delta(o, o_lo, do)[..., None]          # [B, H, S, 1]
    as_rows = lambda x: x.reshape(b, h, 1, s)
    cost = functools.partial(common.cost_estimate, q, s, plan)
    rows_spec = lambda n, index: pl.BlockSpec((None, None, n, d), index)

    bq, bk = plan.dkdv.block_q, plan.dkdv.block_k

    def query_tile_index(j, i):  # outside the query tiles needed: stay on the nearest (no fetch)
        start, _, end = common.q_tiles(j, plan, bq, bk)
        return jnp.minimum(jnp.maximum(i, start), end - 1)

    key_tile = rows_spec(bk, lambda b_, h_, j, i: (b_, h_, j, 0))
    query_tile = rows_spec(bq, lambda b_, h_, j, i: (b_, h_, query_tile_index(j, i), 0))
    query_stats = pl.BlockSpec((None, None, 1, bq),
                               lambda b_, h_, j, i: (b_, h_, 0, query_tile_index(j, i)))
    dk, dv = call(
        functools.partial(_dkdv_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(b, h, s // bk, s // bq),
        in_specs=[query_tile, key_tile, key_tile, query_tile, query_stats, query_stats],
        out_specs=[key_tile, key_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch=[(bk, d), (bk, d)], cost=cost(matmuls=4, arrays=6), plan=plan,
        name="flash_attention_dkdv")(q, k, v, do, as_rows(lse), as_rows(delta))

    bq, bk = plan.dq.block_q, plan.dq.block_k

    def kv_index(b_, h_, i, j):  # past the last key tile needed: stay on it (no fetch)
        return b_, h_, jnp.minimum(j, common.kv_tiles(i, plan, bq, bk)[1] - 1), 0

    query_tile = rows_spec(bq, lambda b_, h_, i, j: (b_, h_, i, 0))
    query_stats = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))
    key_tile = rows_spec(bk, kv_index)
    dq = call(
        functools.partial(_dq_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(b, h, s // bq, s // bk),
        in_specs=[query_tile, key_tile, key_tile, query_tile, query_stats, query_stats],
        out_specs=query_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[(bq, d)], cost=cost(matmuls=3, arrays=5), plan=plan,
        name="flash_attention_dq")(q, k, v, do, lse, delta)
    return heads_major(dq), heads_major(dk), heads_major(dv)
