"""Flash attention forward in Pallas for TPUs (Mosaic).

Mosaic blocks must tile the last two dimensions by (8, 128) or span them, so the wrapper
transposes to [B, H, S, D] and every block is (rows, D). The key tiles are the last grid axis,
"arbitrary" (sequential), and the online softmax state lives in VMEM scratch across it:

    grid (B, H, S/bq, S/bk);  m, l [bq, 1] and acc [bq, D] f32 in VMEM;  lse [B, H, S, 1] f32.

Tiles the mask leaves empty (above the diagonal, outside the window, of other segments) are
skipped with pl.when, and their k/v block index is clamped into the tiles needed, so the pipeline
does not fetch them either. With segment ids, each tile's range of the other side's tiles
(common.segment_ranges) is prefetched into SMEM (scalar prefetch), where the block indices read
it. Grouped-query heads: query head h's blocks of k and v are head h // (Hq / Hkv)'s.
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


def call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, cost, plan, name,
         prefetch=()):
    """pl.pallas_call over a grid whose last axis is sequential (it carries the VMEM scratch);
    `prefetch` arrays go to SMEM before the grid runs, as the first operands of the kernel and
    the last arguments of every index map."""
    scratch_shapes = [pltpu.VMEM(shape, jnp.float32) for shape in scratch]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch_shapes)
    return functools.partial(pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=pltpu.InterpretParams() if plan.interpret else False,
        name=name), *prefetch)


def when_tile(condition, step, masked: bool):
    """Run step(masked) on the grid steps where `condition` holds."""
    pl.when(condition)(functools.partial(step, masked))


def segment_operands(segments, block: int, other_block: int, by_query: bool):
    """With segment ids (q ids, kv ids) [B, S]: (the prefetched ranges [B, S/block, 4] of the
    tiles each tile needs, the ids as operands: this side's as a column [B, S, 1], the other's as
    a row [B, 1, S] (or, transposed, the other way round), their BlockSpecs over grid
    (b, h, this tile, other tile)); Nones and () without."""
    if segments is None:
        return None, (), ()
    mine, others, ranges = common.tile_segments(segments, block, other_block, by_query)
    specs = [pl.BlockSpec((None, block, 1), lambda b_, h_, t, u, *_: (b_, t, 0)),
             pl.BlockSpec((None, 1, other_block), lambda b_, h_, t, u, *_: (b_, 0, u))]
    return ranges, (mine[..., None], others[:, None, :]), specs


def tile_segment_range(ranges_ref, b, t):
    """Tile t's row of common.segment_ranges, from the prefetched ranges."""
    return None if ranges_ref is None else common.segment_range(lambda c: ranges_ref[b, t, c])


def _forward_kernel(*refs, plan, block_q, block_k):
    ranges_ref, refs = (refs[0], refs[1:]) if plan.segments else (None, refs)
    q_ref, k_ref, v_ref, *refs = refs
    segments = None
    if plan.segments:
        q_ids_ref, kv_ids_ref, *refs = refs
        segments = (q_ids_ref, kv_ids_ref)
    o_ref, *residual_refs, acc_ref, m_ref, l_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    state = (acc_ref, m_ref, l_ref)

    @pl.when(j == 0)
    def _init():
        for ref, value in zip(state, common.softmax_init(block_q, acc_ref.shape[-1])):
            ref[...] = value

    def step(masked):
        ids = None if segments is None else tuple(ref[...] for ref in segments)
        mask = common.tile_mask(masked, plan, i * block_q, j * block_k, block_q, block_k,
                                segments=ids)
        carry = common.softmax_step(tuple(ref[...] for ref in state), q_ref[...], k_ref[...],
                                    v_ref[...], plan.scale_log2, mask, plan.rows_may_be_empty)
        for ref, value in zip(state, carry):
            ref[...] = value

    span = common.kv_tiles(i, plan, block_q, block_k, tile_segment_range(ranges_ref, b, i))
    masked, unmasked = common.in_span(j, span)
    when_tile(unmasked, step, masked=False)
    when_tile(masked, step, masked=True)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o, lse = common.softmax_finish(tuple(ref[...] for ref in state), plan.rows_may_be_empty)
        o_ref[...] = o.astype(o_ref.dtype)
        if residual_refs:
            lse_ref, o_lo_ref = residual_refs
            lse_ref[...] = lse
            o_lo_ref[...] = common.low_half(o, o_lo_ref.dtype)


def forward(q, k, v, plan: common.Plan, residuals: bool, segments=None):
    """q [B, S, Hq, D], k, v [B, S, Hkv, D] (S padded to the blocks; Hkv dividing Hq), segments
    (q ids, kv ids) [B, S] int32 or None -> (o [B, S, Hq, D], residuals or None).

    The residuals, all [B, H, S, ...]: q, k, v, o, lse [B, H, S, 1] f32, o's low half
    (common.low_half), then the segment ids.
    """
    q, k, v = (heads_major(x) for x in (q, k, v))
    b, h, s, d = q.shape
    group = h // k.shape[1]
    bq, bk = plan.forward.block_q, plan.forward.block_k
    ranges, ids, id_specs = segment_operands(segments, bq, bk, by_query=True)

    def kv_index(b_, h_, i, j, *prefetched):  # a tile it needs (the nearest: no fetch)
        span = common.kv_tiles(i, plan, bq, bk, tile_segment_range(
            prefetched[0] if prefetched else None, b_, i))
        return b_, common.div(h_, group), common.clamp_to_span(j, span), 0

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_index)
    lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    o_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32)
    o, *saved = call(
        functools.partial(_forward_kernel, plan=plan, block_q=bq, block_k=bk),
        grid=(b, h, s // bq, s // bk), in_specs=[q_spec, kv_spec, kv_spec, *id_specs],
        out_specs=[q_spec, lse_spec, q_spec] if residuals else [q_spec],
        out_shape=[o_shape, lse_shape, o_shape] if residuals else [o_shape],
        scratch=[(bq, d), (bq, 1), (bq, 1)],
        cost=common.cost_estimate(q, s, plan, matmuls=2, arrays=6 if residuals else 4), plan=plan,
        name="flash_attention_fwd", prefetch=() if ranges is None else (ranges,))(q, k, v, *ids)
    return heads_major(o), ((q, k, v, o, *saved, *(segments or ())) if residuals else None)
