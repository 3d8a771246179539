"""Flash attention forward in Pallas for TPUs (Mosaic).

Mosaic blocks must tile the last two dimensions by (8, 128) or span them, so the wrapper
transposes to [B, H, S, D] and every block is (rows, D). The key tiles are the last grid axis,
"arbitrary" (sequential), and the online softmax state lives in VMEM scratch across it:

    grid (B, H, S/bq, S/bk);  m, l [bq, 1] and acc [bq, D] f32 in VMEM;  lse [B, H, S, 1] f32.

Under causal masking the tiles above the diagonal are skipped with pl.when, and their k/v block
index is clamped to the last tile needed, so the pipeline does not fetch them either.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import config
from kernels.attention import common


@dataclasses.dataclass(frozen=True)
class Tiles(config.KernelConfig):
    """A kernel's query tile (block_q) and key tile (block_k): the forward, dK/dV and dQ kernels
    each have their own."""
    block_q: int = common.block()
    block_k: int = common.block()


@dataclasses.dataclass(frozen=True)
class Kernels(common.Kernels):
    forward: Tiles
    dkdv: Tiles
    dq: Tiles


# Per head_dim: 128-row tiles everywhere (the MXU is 128 or 256 wide; tiles under 128 waste it).
# Measured entries in kernels/tuning.json override these.
DEFAULTS = {d: Kernels(Tiles(128, 128), Tiles(128, 128), Tiles(128, 128))
            for d in common.KERNEL_HEAD_DIMS}


def heads_major(x):
    """[B, S, H, D] <-> [B, H, S, D]."""
    return x.transpose(0, 2, 1, 3)


def call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, cost, plan, name):
    """pl.pallas_call over a grid whose last axis is sequential (it carries the VMEM scratch)."""
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=pltpu.InterpretParams() if plan.interpret else False,
        name=name)


def when_tile(condition, step, masked: bool):
    """Run step(masked) on the grid steps where `condition` holds."""
    pl.when(condition)(functools.partial(step, masked))


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *refs, plan, block_q, block_k):
    *residual_refs, acc_ref, m_ref, l_ref = refs
    i, j = pl.program_id(2), pl.program_id(3)
    state = (acc_ref, m_ref, l_ref)

    @pl.when(j == 0)
    def _init():
        for ref, value in zip(state, common.softmax_init(block_q, acc_ref.shape[-1])):
            ref[...] = value

    def step(masked):
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k)
        carry = common.softmax_step(tuple(ref[...] for ref in state), q_ref[...], k_ref[...],
                                    v_ref[...], plan.scale_log2, mask)
        for ref, value in zip(state, carry):
            ref[...] = value

    masked_from, end = common.kv_tiles(i, plan, block_q, block_k)
    when_tile(j < masked_from, step, masked=False)
    when_tile((j >= masked_from) & (j < end), step, masked=True)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o, lse = common.softmax_finish(tuple(ref[...] for ref in state))
        o_ref[...] = o.astype(o_ref.dtype)
        if residual_refs:
            lse_ref, o_lo_ref = residual_refs
            lse_ref[...] = lse
            o_lo_ref[...] = common.low_half(o, o_lo_ref.dtype)


def forward(q, k, v, plan: common.Plan, residuals: bool):
    """q, k, v [B, S, H, D] (S padded to the blocks) -> (o [B, S, H, D], residuals or None).

    The residuals, all [B, H, S, ...]: q, k, v, o, lse [B, H, S, 1] f32, o's low half
    (common.low_half).
    """
    q, k, v = (heads_major(x) for x in (q, k, v))
    b, h, s, d = q.shape
    bq, bk = plan.forward.block_q, plan.forward.block_k

    def kv_index(b_, h_, i, j):  # past the last tile needed: stay on it (no fetch)
        return b_, h_, jnp.minimum(j, common.kv_tiles(i, plan, bq, bk)[1] - 1), 0

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_index)
    lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))
    o_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32)
    o, *saved = call(
        functools.partial(_forward_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(b, h, s // bq, s // bk), in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, lse_spec, q_spec] if residuals else [q_spec],
        out_shape=[o_shape, lse_shape, o_shape] if residuals else [o_shape],
        scratch=[(bq, d), (bq, 1), (bq, 1)],
        cost=common.cost_estimate(q, s, plan, matmuls=2, arrays=6 if residuals else 4), plan=plan,
        name="flash_attention_fwd")(q, k, v)
    return heads_major(o), ((q, k, v, o, *saved) if residuals else None)
