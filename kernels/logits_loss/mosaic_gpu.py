"""The loss head on Hopper (sm90): both of its logits GEMMs on kernels/mosaic_gpu_gemm.py's
persistent GEMM, with common.py's epilogues, so that no [T, V] array is ever written but a bf16
chunk.

    statistics     s = h E^T (64 token rows per consumer warpgroup, block_n vocabulary columns)
                   -> m, l per (row, column tile)           outputs [V' / block_n, T] f32
    probabilities  s = h_c E^T -> p = exp(s - b) [C, V'] bf16, and m, l per (row, column tile);
                   b of each row by TMA beside the tile's matmul

The epilogues run in the accumulator's registers (exp2 on the SFU, 128 values a thread at 64 x
256); the two gradient GEMMs of a chunk (p E, p^T a h_c) are XLA's (cuBLAS), and the onehot term
of dE the Triton kernel's (triton_by_target.py; Triton runs on Hopper too).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import config, mosaic_gpu_gemm
from kernels.logits_loss import common, triton_by_target
from kernels.warp_specialized import CONSUMERS, on_sm90


@dataclasses.dataclass(frozen=True)
class Chunk(config.KernelConfig):
    """The probabilities GEMM: its tiles and the bf16 chunk's budget (common.token_chunk)."""
    block_m: int = config.tile(multiple_of=64)
    block_n: int = config.tile(multiple_of=64)
    num_stages: int = config.stages(minimum=2)
    chunk_mib: int = config.count()

    def __post_init__(self):
        super().__post_init__()
        self.tiles()   # the GEMM's checks (accumulator registers)

    def tiles(self) -> mosaic_gpu_gemm.Tiles:
        return mosaic_gpu_gemm.Tiles(self.block_m, self.block_n, self.num_stages)


@dataclasses.dataclass(frozen=True)
class Kernels(common.Kernels):
    """The statistics GEMM's tiles (flat names block_m, block_n, num_stages) and the
    probabilities GEMM's (probabilities_block_m, ..., probabilities_chunk_mib)."""
    forward: mosaic_gpu_gemm.Tiles
    probabilities: Chunk
    TOKEN_TILES_PER_CHUNK_ROW = CONSUMERS   # a CTA's consumer warpgroups take block_m rows each


# 64 x 256 logits per consumer warpgroup (128 accumulator registers per thread), 3 stages.
DEFAULTS = Kernels(mosaic_gpu_gemm.Tiles(block_m=64, block_n=256, num_stages=3),
                   Chunk(block_m=64, block_n=256, num_stages=3, chunk_mib=256))


def check_runs_here() -> None:
    """On a GPU only Hopper (off the GPU the kernel still traces: jax.export lowers it for CUDA
    and the tests run it in the Mosaic GPU interpreter)."""
    if jax.default_backend() == "gpu" and not on_sm90():
        raise NotImplementedError("the mosaic_gpu loss head runs only on an sm90 GPU; use "
                                  "implementation='reference'")


def statistics(h, e, column_bias, *, config: Kernels, interpret: bool):
    del interpret   # no interpret mode (the tests run the kernels in jax's GPU interpreter)
    check_runs_here()
    tokens = h.shape[0]
    return mosaic_gpu_gemm.matmul(
        h, e, common.tile_statistics, [column_bias],
        [jax.ShapeDtypeStruct((tokens,), jnp.float32)] * 2,
        b_transposed=True, tiles=config.forward, name="logits_loss_statistics_mgpu")


def probabilities(h, e, column_bias, base, *, config: Kernels, interpret: bool):
    del interpret
    check_runs_here()
    tokens = h.shape[0]
    return mosaic_gpu_gemm.matmul(
        h, e, common.tile_probabilities, [column_bias],
        [jax.ShapeDtypeStruct((tokens, e.shape[0]), jnp.bfloat16),
         *[jax.ShapeDtypeStruct((tokens,), jnp.float32)] * 2],
        b_transposed=True, tiles=config.probabilities.tiles(),
        name="logits_loss_probabilities_mgpu", row_inputs=[base])


def add_by_target(acc, rows, scales, targets, order, *, config: Kernels, interpret: bool):
    """common.add_by_target's math in one kernel (triton_by_target.py, compiled: the Mosaic GPU
    interpreter's tests run it interpreted)."""
    del config, interpret
    return triton_by_target.add_by_target(acc, rows, scales, targets, order, interpret=False)
