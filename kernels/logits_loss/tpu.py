"""The loss head in Pallas Mosaic TPU: the two logits passes as kernels over tiles
s = h[rows] E[cols]^T [bt, bv] (the whole d in one MXU product: VMEM holds h [bt, d] and E [bv, d]
at any d of the model), with common.py's epilogues.

    statistics     grid (T / bt, V' / bv), (parallel, arbitrary): m, l of the row, carried across
                   the vocabulary tiles in VMEM (one tile of statistics, [1, T])
    probabilities  grid (C / bt, V' / bv), (parallel, arbitrary): p [C, V'] bf16, and m, l of the
                   row carried the same way

Vectors travel as [1, V'] rows and [T, 1] columns (blocks respect the (8, 128) tiling).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import config
from kernels.layernorm_ffn.common import dot_t
from kernels.layernorm_ffn.tpu import interpret_params
from kernels.logits_loss import common
from kernels.warp_specialized import pad_rows


@dataclasses.dataclass(frozen=True)
class Tiles(config.KernelConfig):
    """Token rows (a multiple of 16: bf16 packs two rows a sublane) and vocabulary columns
    (lanes of 128) of a tile."""
    block_t: int = config.tile(multiple_of=16)
    block_v: int = config.tile(multiple_of=128)


@dataclasses.dataclass(frozen=True)
class Chunk(config.KernelConfig):
    block_t: int = config.tile(multiple_of=16)
    block_v: int = config.tile(multiple_of=128)
    chunk_mib: int = config.count()


@dataclasses.dataclass(frozen=True)
class Kernels(common.Kernels):
    """The statistics tiles (flat names block_t, block_v) and the probabilities ones
    (probabilities_...)."""
    forward: Tiles
    probabilities: Chunk
    VOCAB_TILE, TOKEN_TILE = "block_v", "block_t"


DEFAULTS = Kernels(Tiles(block_t=256, block_v=512), Chunk(block_t=256, block_v=512, chunk_mib=256))


def _statistics_kernel(h_ref, e_ref, bias_ref, m_ref, l_ref):
    m, l = common.tile_statistics(dot_t(h_ref[...], e_ref[...]), bias_ref[...])
    m, l = m[:, None], l[:, None]

    @pl.when(pl.program_id(1) == 0)
    def _():
        m_ref[...], l_ref[...] = m, l

    @pl.when(pl.program_id(1) > 0)
    def _():
        top = jnp.maximum(m_ref[...], m)
        l_ref[...] = l_ref[...] * jnp.exp(m_ref[...] - top) + l * jnp.exp(m - top)
        m_ref[...] = top


def statistics(h, e, column_bias, *, config: Kernels, interpret: bool):
    (tokens, d), padded_v = h.shape, e.shape[0]
    bt, bv = config.forward.block_t, config.forward.block_v
    padded = -(-tokens // bt) * bt
    rows = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    m, l = pl.pallas_call(
        _statistics_kernel, grid=(padded // bt, padded_v // bv),
        in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((bv, d), lambda i, j: (j, 0)),
                  pl.BlockSpec((1, bv), lambda i, j: (0, j))],
        out_specs=[rows, rows],
        out_shape=[jax.ShapeDtypeStruct((padded, 1), jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret_params(interpret), name="logits_loss_statistics",
    )(pad_rows(h, padded, axis=0), e, column_bias[None, :])
    return m[:tokens].T, l[:tokens].T


def _probabilities_kernel(h_ref, e_ref, bias_ref, base_ref, p_ref, m_ref, l_ref):
    p, m, l = common.tile_probabilities(dot_t(h_ref[...], e_ref[...]), bias_ref[...],
                                        base_ref[...])
    p_ref[...] = p
    m, l = m[:, None], l[:, None]

    @pl.when(pl.program_id(1) == 0)
    def _():
        m_ref[...], l_ref[...] = m, l

    @pl.when(pl.program_id(1) > 0)
    def _():   # l is relative to the row's base in every tile: the sums add
        m_ref[...], l_ref[...] = jnp.maximum(m_ref[...], m), l_ref[...] + l


def probabilities(h, e, column_bias, base, *, config: Kernels, interpret: bool):
    (tokens, d), padded_v = h.shape, e.shape[0]
    bt, bv = config.probabilities.block_t, config.probabilities.block_v
    padded = -(-tokens // bt) * bt
    rows = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    p, m, l = pl.pallas_call(
        _probabilities_kernel, grid=(padded // bt, padded_v // bv),
        in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((bv, d), lambda i, j: (j, 0)),
                  pl.BlockSpec((1, bv), lambda i, j: (0, j)), rows],
        out_specs=[pl.BlockSpec((bt, bv), lambda i, j: (i, j)), rows, rows],
        out_shape=[jax.ShapeDtypeStruct((padded, padded_v), jnp.bfloat16),
                   *[jax.ShapeDtypeStruct((padded, 1), jnp.float32)] * 2],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret_params(interpret), name="logits_loss_probabilities",
    )(pad_rows(h, padded, axis=0), e, column_bias[None, :], pad_rows(base, padded, axis=0)[:, None])
    return p[:tokens], m[:tokens].T, l[:tokens].T


def add_by_target(acc, rows, scales, targets, order, *, config: Kernels, interpret: bool):
    """common.add_by_target: XLA's sorted sums (no kernel of its own on TPU)."""
    del config, interpret
    return common.add_by_target(acc, rows, scales, targets, order)
