"""A persistent, warp-specialized Mosaic GPU GEMM with a fused epilogue, for Hopper (sm90): the
GEMMs of the LayerNorm+FFN (kernels/layernorm_ffn/mosaic_gpu*.py) and the loss head's logits
(kernels/logits_loss/mosaic_gpu.py).

    outputs = epilogue(A @ B, *epilogue inputs)        A [M, K], B [K, N] or [N, K], bf16

One CTA per SM, each taking output tiles t = cta, cta + #CTAs, ... of [CONSUMERS * block_m,
block_n] in row-major order (the CTAs at work share rows of A; B, the weights, stays in L2). The
producer streams the A tiles [CONSUMERS * block_m, 64] and B tiles [64, block_n] of all its output
tiles, k-step after k-step, through two rings (`num_stages` slots, 128-byte swizzle: a 64-wide bf16
row). Consumer warpgroup w owns rows w * block_m of each tile: its wgmma accumulates A[w rows] B
into block_m * block_n / 128 f32 registers per thread (128 at 64 x 256 or 128 x 128) and releases
the k-step's slots once it is done (while one warpgroup waits for its wgmma, the other's keeps the
tensor cores busy, as in jax's Hopper matmul). Then the epilogue: the column vectors (bias) and the
[block_m, block_n] input tile (residual x, gelu'(z)), TMA-copied in while the tile's matmul ran, into
registers; its outputs go out by TMA, while the producer already loads the next tile's operands:

  * tiles [block_m, block_n], rounded to bf16, one after another through one shared buffer;
  * per-row statistics [block_m] f32 of the tile (a row max, a row sum), one value per row and
    column tile: the output is [N / block_n, M].

Shared memory: num_stages (CONSUMERS block_m + block_n) 64 bf16 for the rings, CONSUMERS block_m
block_n bf16 for the epilogue buffer and the vectors: 210 KB at 64 x 256 and 3 stages.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import compat, config
from kernels.warp_specialized import (CONSUMERS, WGMMA_M, Ring, accumulate, launch, num_sms,
                                      pad_rows, produce, ring_scratch, specialize, tiled_smem)

BLOCK_K = 64    # one 128-byte swizzled row of bf16


@dataclasses.dataclass(frozen=True)
class Tiles(config.KernelConfig):
    """The output tile per consumer warpgroup (block_m x block_n) and the rings' depth. Its f32
    accumulator takes block_m block_n / 128 registers a thread: at most 128 fit beside the
    epilogue."""
    block_m: int = config.tile(multiple_of=WGMMA_M)
    block_n: int = config.tile(multiple_of=64)
    num_stages: int = config.stages(minimum=2)

    def __post_init__(self):
        super().__post_init__()
        if self.block_m * self.block_n // 128 > 128:
            raise ValueError(f"block_m x block_n = {self.block_m} x {self.block_n} needs "
                             f"{self.block_m * self.block_n // 128} f32 accumulator registers a "
                             f"thread; at most 128 fit beside the epilogue")


def _kernel(a_ref, b_ref, *refs, a_ring, b_ring, vec_smem, vec_loaded, io_smem, io_loaded,
            row_smem, epilogue: Callable, num_vectors: int, num_inputs: int, b_transposed: bool,
            block_m: int, block_n: int, tiles_n: int, k_steps: int, num_tiles: int,
            num_ctas: int):
    vectors, tile_inputs = refs[:num_vectors], refs[num_vectors:num_inputs]
    outputs = refs[num_inputs:]
    cta = lax.axis_index("cta")
    my_tiles = (num_tiles - cta + num_ctas - 1) // num_ctas   # tiles cta, cta + num_ctas, ...

    def coords(i):
        """(row block, column block) of this CTA's i-th output tile."""
        t = cta + i * num_ctas
        return t // tiles_n, t % tiles_n

    def a_tile(n):   # n = i * k_steps + k: the stream of k-steps of all of this CTA's tiles
        row, _ = coords(n // k_steps)
        return a_ref.at[pl.ds(row * CONSUMERS * block_m, CONSUMERS * block_m),
                        pl.ds(lax.rem(n, k_steps) * BLOCK_K, BLOCK_K)]

    def b_tile(n):
        _, col = coords(n // k_steps)
        cols, ks = pl.ds(col * block_n, block_n), pl.ds(lax.rem(n, k_steps) * BLOCK_K, BLOCK_K)
        return b_ref.at[cols, ks] if b_transposed else b_ref.at[ks, cols]

    a_ring, b_ring = Ring(a_tile, *a_ring), Ring(b_tile, *b_ring)
    column = compat.mosaic_gpu_column_layout()

    def consume(wg):
        def output_tile(i, _):
            row, col = coords(i)
            rows = pl.ds((row * CONSUMERS + wg) * block_m, block_m)
            cols = pl.ds(col * block_n, block_n)
            # The epilogue's operands travel while the matmul runs (the last tile's stores must
            # have read their buffers before the tile input lands in one).
            if tile_inputs:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for j, vector in enumerate(vectors):
                plgpu.copy_gmem_to_smem(vector.at[cols], vec_smem.at[wg, j],
                                        vec_loaded.at[wg * num_vectors + j])
            for tile_input in tile_inputs:
                plgpu.copy_gmem_to_smem(tile_input.at[rows, cols], io_smem.at[wg], io_loaded.at[wg])

            def k_step(k, acc):
                n = i * k_steps + k
                a_ring.wait(n)
                b_ring.wait(n)
                b = b_ring.tile(n)
                acc = accumulate(acc, a_ring.tile(n).at[pl.ds(wg * block_m, block_m)],
                                 b.transpose((1, 0)) if b_transposed else b)
                a_ring.release(n)
                b_ring.release(n)
                return acc

            acc = lax.fori_loop(0, k_steps, k_step, plgpu.layout_cast(
                jnp.zeros((block_m, block_n), jnp.float32), plgpu.Layout.WGMMA))
            operands = []
            for j in range(num_vectors):
                plgpu.barrier_wait(vec_loaded.at[wg * num_vectors + j])
                vector = compat.mosaic_gpu_load(vec_smem.at[wg, j], column)
                operands.append(lax.broadcast_in_dim(vector, acc.shape, [1]))
            if tile_inputs:
                plgpu.barrier_wait(io_loaded.at[wg])
                operands.append(compat.mosaic_gpu_load(io_smem.at[wg], plgpu.Layout.WGMMA))
            results = list(zip(outputs, epilogue(acc, *operands)))
            tiles = [(ref, out) for ref, out in results if out.ndim == 2]
            row_stats = [(ref, out) for ref, out in results if out.ndim == 1]
            if not tile_inputs:   # the last tile's stores have read their buffers
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for j, (_, out) in enumerate(row_stats):
                row_smem.at[wg, j][...] = out
            for k, (out_ref, out) in enumerate(tiles):
                if k:   # the buffer's last store has read it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                io_smem.at[wg][...] = out.astype(jnp.bfloat16)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io_smem.at[wg], out_ref.at[rows, cols])
                if not k:
                    for j, (stat_ref, _) in enumerate(row_stats):
                        plgpu.copy_smem_to_gmem(row_smem.at[wg, j], stat_ref.at[col, rows])

        lax.fori_loop(0, my_tiles, output_tile, None)
        plgpu.wait_smem_to_gmem(0)

    specialize(consume, lambda: produce((a_ring, b_ring), my_tiles * k_steps))


def matmul(a: jax.Array, b: jax.Array, epilogue: Callable, epilogue_inputs: Sequence[jax.Array],
           out_shape: Sequence[jax.ShapeDtypeStruct], *, b_transposed: bool, tiles: Tiles,
           name: str) -> list[jax.Array]:
    """epilogue(A @ B) on the persistent GEMM above, in `tiles` (the caller checks that it runs
    here).

    a [M, K] bf16 (M padded here to the CTA's rows); b [K, N], or [N, K] with b_transposed, bf16,
    K a multiple of 64 and N of block_n; epilogue inputs [N] (vectors: f32) then at most one
    [M, N] bf16 tile. The epilogue returns the outputs in out_shape's order: tiles [M, N] (out_shape
    [M, N], stored as bf16) and at least one of them first, then per-row statistics (out_shape
    [M] f32, returned as [N / block_n, M], one row per column tile).
    """
    (m, k), n = a.shape, b.shape[0] if b_transposed else b.shape[1]
    block_m, block_n, num_stages = tiles.block_m, tiles.block_n, tiles.num_stages
    vectors = [v.astype(jnp.float32) for v in epilogue_inputs if v.ndim == 1]
    tile_inputs = [x for x in epilogue_inputs if x.ndim == 2]
    ranks = [x.ndim for x in epilogue_inputs]
    out_ranks = [len(s.shape) for s in out_shape]
    if (ranks != sorted(ranks) or len(tile_inputs) > 1 or k % BLOCK_K or n % block_n
            or out_ranks != sorted(out_ranks, reverse=True) or out_ranks[0] != 2):
        raise ValueError(f"matmul: epilogue inputs are vectors, then at most one tile; outputs "
                         f"tiles, then row statistics; K a multiple of {BLOCK_K} and N of "
                         f"block_n = {block_n}; got input ranks {ranks}, output ranks {out_ranks}, "
                         f"K = {k}, N = {n}")
    rows = CONSUMERS * block_m
    padded = -(-m // rows) * rows
    tiles_n = n // block_n
    num_tiles = padded // rows * tiles_n
    num_ctas = min(num_sms(), num_tiles)
    a_tile = (rows, BLOCK_K)
    b_tile = (block_n, BLOCK_K) if b_transposed else (BLOCK_K, block_n)
    num_stats = out_ranks.count(1)
    scratch = dict(
        a_ring=ring_scratch(tiled_smem(a.dtype, num_stages, *a_tile), num_stages),
        b_ring=ring_scratch(tiled_smem(b.dtype, num_stages, *b_tile), num_stages),
        vec_smem=plgpu.SMEM((CONSUMERS, max(1, len(vectors)), block_n), jnp.float32),
        vec_loaded=plgpu.Barrier(num_barriers=CONSUMERS * max(1, len(vectors))),
        io_smem=tiled_smem(jnp.bfloat16, CONSUMERS, block_m, block_n),
        io_loaded=plgpu.Barrier(num_barriers=CONSUMERS),
        row_smem=plgpu.SMEM((CONSUMERS, num_stats, block_m), jnp.float32) if num_stats else None)
    kernel = functools.partial(
        _kernel, epilogue=epilogue, num_vectors=len(vectors),
        num_inputs=len(vectors) + len(tile_inputs), b_transposed=b_transposed, block_m=block_m,
        block_n=block_n, tiles_n=tiles_n, k_steps=k // BLOCK_K, num_tiles=num_tiles,
        num_ctas=num_ctas)
    out_type = [jax.ShapeDtypeStruct((padded, n) if len(s.shape) == 2 else (tiles_n, padded),
                                     s.dtype) for s in out_shape]
    outs = launch(kernel, out_type=out_type, scratch=scratch, grid=(num_ctas,),
                  grid_names=("cta",), name=name,
                  )(pad_rows(a, padded, axis=0), b, *vectors,
                    *(pad_rows(x, padded, axis=0) for x in tile_inputs))
    return [o[:m] if rank == 2 else o[:, :m] for o, rank in zip(outs, out_ranks)]
