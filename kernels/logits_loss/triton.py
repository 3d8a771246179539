"""The loss head in Pallas on the Triton backend (any CUDA GPU): both logits GEMMs on
kernels/triton_gemm.py's tiled GEMM with common.py's epilogues (grid (T / bm, V' / bn), a loop
over d / bk), so no [T, V] array is written but a bf16 chunk.

    statistics     -> m, l per (row, column tile)                 [V' / bn, T] f32
    probabilities  -> p [C, V'] bf16, m, l per (row, column tile)  (row bases as [bm, 1] blocks)
    add_by_target  the onehot term of dE (triton_by_target.py)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import config, triton_gemm
from kernels.logits_loss import common, triton_by_target
from kernels.warp_specialized import pad_rows


@dataclasses.dataclass(frozen=True)
class Chunk(config.KernelConfig):
    """The probabilities GEMM (triton_gemm.Gemm's fields) and the bf16 chunk's budget."""
    block_m: int = config.tile(power_of_two=True, minimum=16)
    block_n: int = config.tile(power_of_two=True, minimum=16)
    block_k: int = config.tile(power_of_two=True, minimum=16)
    num_warps: int = config.count()
    num_stages: int = config.stages()
    chunk_mib: int = config.count()

    def gemm(self) -> triton_gemm.Gemm:
        return triton_gemm.Gemm(self.block_m, self.block_n, self.block_k, self.num_warps,
                                self.num_stages)


@dataclasses.dataclass(frozen=True)
class Kernels(common.Kernels):
    """The statistics GEMM (flat names block_m, ...) and the probabilities GEMM
    (probabilities_block_m, ...)."""
    forward: triton_gemm.Gemm
    probabilities: Chunk


# 64 x 128 x 64 tiles, 4 warps, 3 stages: 64 accumulator registers a thread.
_GEMM = dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
DEFAULTS = Kernels(triton_gemm.Gemm(**_GEMM), Chunk(**_GEMM, chunk_mib=256))


def check_config(config: Kernels, d: int) -> None:
    for name, kernel in (("block_k", config.forward),
                         ("probabilities_block_k", config.probabilities)):
        if d % kernel.block_k:
            raise ValueError(f"logits_loss/triton: {name}={kernel.block_k} must divide d = {d}")


def statistics(h, e, column_bias, *, config: Kernels, interpret: bool):
    tokens = h.shape[0]
    padded = -(-tokens // config.forward.block_m) * config.forward.block_m
    m, l = triton_gemm.matmul(
        pad_rows(h, padded, axis=0), e, common.tile_statistics, [column_bias],
        [jax.ShapeDtypeStruct((padded,), jnp.float32)] * 2, b_transposed=True,
        config=config.forward, name="logits_loss_statistics", interpret=interpret)
    return m[:, :tokens], l[:, :tokens]


def probabilities(h, e, column_bias, base, *, config: Kernels, interpret: bool):
    tokens = h.shape[0]
    block_m = config.probabilities.block_m
    padded = -(-tokens // block_m) * block_m
    p, m, l = triton_gemm.matmul(
        pad_rows(h, padded, axis=0), e, common.tile_probabilities, [column_bias],
        [jax.ShapeDtypeStruct((padded, e.shape[0]), jnp.bfloat16),
         *[jax.ShapeDtypeStruct((padded,), jnp.float32)] * 2], b_transposed=True,
        config=config.probabilities.gemm(), name="logits_loss_probabilities",
        interpret=interpret, row_inputs=[pad_rows(base, padded, axis=0)])
    return p[:tokens], m[:, :tokens], l[:, :tokens]


def add_by_target(acc, rows, scales, targets, order, *, config: Kernels, interpret: bool):
    """common.add_by_target's math in one kernel (triton_by_target.py)."""
    del config
    return triton_by_target.add_by_target(acc, rows, scales, targets, order, interpret=interpret)
