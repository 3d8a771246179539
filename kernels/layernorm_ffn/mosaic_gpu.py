"""LayerNorm+FFN forward with its GEMMs in Pallas Mosaic GPU for Hopper (sm90): TMA, wgmma, and
warp specialization (kernels/warp_specialized.py); the LayerNorm pass is triton.py's.

    LN      triton.layernorm                 xn = LN(x) -> bf16 [T, d], mean, rstd [T, 1] f32
    up      matmul, epilogue bias + GELU      g = gelu(xn W_fc + b_fc) -> bf16 [T, F]  (+ gelu'(z))
    down    matmul, epilogue bias (+ x)       out = g W_proj + b_proj (+ x)

The same decomposition and epilogues (common.up_epilogue, ...) as triton.py, whose docstring says
why the hidden goes through HBM; what changes is the GEMM. Triton's Pallas lowering reached
430-550 TF/s on these shapes, jax's Hopper Mosaic GPU matmul 580-750 and cuBLAS 550-700 (H100,
bench/RESULTS.md): the difference is TMA loads several stages ahead, wgmma issued from shared memory
by two consumer warpgroups while a third only copies, and a persistent grid whose producer keeps
loading the next tile while the consumers run the epilogue.

`matmul`: a persistent GEMM, one CTA per SM, each taking output tiles t = cta, cta + #CTAs, ...
of [CONSUMERS * block_m, block_n] in row-major order (the CTAs at work share rows of A; B, the
weights, stays in L2). The producer streams the A tiles [CONSUMERS * block_m, 64] and B tiles
[64, block_n] of all its output tiles, k-step after k-step, through two rings (`num_stages` slots,
128-byte swizzle: a 64-wide bf16 row). Consumer warpgroup w owns rows w * block_m of each tile: its
wgmma accumulates A[w rows] B into block_m * block_n / 128 f32 registers per thread (128 at 64 x 256
or 128 x 128) and releases the k-step's slots once it is done (while one warpgroup waits for its
wgmma, the other's keeps the tensor cores busy, as in jax's Hopper matmul). Then the
epilogue: the column vectors (bias) and the [block_m, block_n] input tile (residual x, gelu'(z)),
TMA-copied in while the tile's matmul ran, into registers; the outputs out through the same shared
buffer by TMA, one after another.

Shared memory: num_stages (CONSUMERS block_m + block_n) 64 bf16 for the rings, CONSUMERS block_m
block_n bf16 for the epilogue buffer and the vectors: 210 KB at 64 x 256 and 3 stages.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import compat
from kernels.layernorm_ffn import triton
from kernels.layernorm_ffn.common import check_tile
from kernels.warp_specialized import (CONSUMERS, WGMMA_M, Ring, accumulate, launch, on_sm90,
                                      pad_rows, ring_scratch, specialize, tiled_smem)

GEMMS = ("up", "down")
TOKEN_TILES = ("ln_block_t",)   # the GEMMs pad the tokens to their own tiles
BLOCK_K = 64                    # one 128-byte swizzled row of bf16
NOT_HERE = ("the mosaic_gpu LayerNorm+FFN runs only on an sm90 GPU; use implementation='triton' "
            "to interpret on CPU")


def default_config(d: int) -> dict:
    """64 x 256 output tiles per consumer warpgroup (128 accumulator registers per thread; fewer
    columns where N needs), 3 ring stages (210 KB of shared memory with the epilogue buffer); the
    LN pass is Triton's."""
    return {"ln_block_t": triton.default_config(d)["ln_block_t"],
            **gemm_defaults("up", 4 * d), **gemm_defaults("down", d)}


def gemm_defaults(gemm: str, n: int) -> dict:
    """64 rows per consumer warpgroup, the widest of 256, 128, 64 columns that divides N."""
    block_n = next(b for b in (256, 128, 64) if n % b == 0)
    return {f"{gemm}_block_m": 64, f"{gemm}_block_n": block_n, f"{gemm}_num_stages": 3}


def check_gemm_config(config: dict, gemm: str, n: int) -> None:
    check_tile(f"{gemm}_block_m", config[f"{gemm}_block_m"], config[f"{gemm}_block_m"],
               multiple_of=WGMMA_M)
    check_tile(f"{gemm}_block_n", config[f"{gemm}_block_n"], n, multiple_of=64)
    registers = config[f"{gemm}_block_m"] * config[f"{gemm}_block_n"] // 128
    if registers > 128:
        raise ValueError(f"layernorm_ffn: {gemm}_block_m x {gemm}_block_n needs {registers} f32 "
                         f"accumulator registers per thread; at most 128 fit beside the epilogue")
    if config[f"{gemm}_num_stages"] < 2:
        raise ValueError(f"layernorm_ffn: {gemm}_num_stages must be at least 2")


def check_config(config: dict, d: int) -> None:
    triton.check_config({**triton.default_config(d), "ln_block_t": config["ln_block_t"]}, d)
    check_gemm_config(config, "up", 4 * d)
    check_gemm_config(config, "down", d)


def num_sms() -> int:
    """The persistent grid: one CTA per streaming multiprocessor (132 on an H100 SXM)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def check_runs_here(interpret: bool, *arrays) -> None:
    if interpret or (jax.default_backend() == "gpu" and not on_sm90()):
        raise NotImplementedError(NOT_HERE)
    for x in arrays:
        if x.ndim == 2 and x.dtype != jnp.bfloat16:
            raise NotImplementedError(f"the mosaic_gpu LayerNorm+FFN takes bfloat16 activations; "
                                      f"got {x.dtype}")


# ------------------------------------------------------------------------------------------------
# The GEMM.

def _kernel(a_ref, b_ref, *refs, a_ring, b_ring, vec_smem, vec_loaded, io_smem, io_loaded,
            epilogue: Callable, num_vectors: int, num_inputs: int, b_transposed: bool,
            block_m: int, block_n: int, tiles_n: int, k_steps: int, num_tiles: int, num_ctas: int):
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
            # have read the buffer before the tile input lands in it).
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
                                 plgpu.transpose_ref(b, (1, 0)) if b_transposed else b)
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
            for k, (out_ref, out) in enumerate(zip(outputs, epilogue(acc, *operands))):
                if k or not tile_inputs:   # the buffer's last store has read it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                io_smem.at[wg][...] = out.astype(jnp.bfloat16)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io_smem.at[wg], out_ref.at[rows, cols])

        lax.fori_loop(0, my_tiles, output_tile, None)
        plgpu.wait_smem_to_gmem(0)

    specialize(consume, (a_ring, b_ring), my_tiles * k_steps)


def matmul(a: jax.Array, b: jax.Array, epilogue: Callable, epilogue_inputs: Sequence[jax.Array],
           out_shape: Sequence[jax.ShapeDtypeStruct], *, b_transposed: bool, config: dict,
           gemm: str, interpret: bool = False) -> list[jax.Array]:
    """epilogue(A @ B), triton.matmul's contract on the Mosaic GPU GEMM above.

    a [M, K] bf16 (M padded here to the CTA's rows); b [K, N], or [N, K] with b_transposed, bf16,
    K a multiple of 64; epilogue inputs [N] (vectors: f32) then at most one [M, N] bf16 tile;
    outputs [M, N] bf16.
    """
    check_runs_here(interpret, a, *epilogue_inputs, *out_shape)
    (m, k), n = a.shape, b.shape[0] if b_transposed else b.shape[1]
    block_m, block_n = config[f"{gemm}_block_m"], config[f"{gemm}_block_n"]
    stages = config[f"{gemm}_num_stages"]
    vectors = [v.astype(jnp.float32) for v in epilogue_inputs if v.ndim == 1]
    tile_inputs = [x for x in epilogue_inputs if x.ndim == 2]
    ranks = [x.ndim for x in epilogue_inputs]
    if ranks != sorted(ranks) or len(tile_inputs) > 1 or k % BLOCK_K:
        raise ValueError(f"matmul: epilogue inputs are vectors, then at most one tile, and K is a "
                         f"multiple of {BLOCK_K}; got ranks {ranks} and K = {k}")
    rows = CONSUMERS * block_m
    padded = -(-m // rows) * rows
    tiles_n = n // block_n
    num_tiles = padded // rows * tiles_n
    num_ctas = min(num_sms(), num_tiles)
    a_tile = (rows, BLOCK_K)
    b_tile = (block_n, BLOCK_K) if b_transposed else (BLOCK_K, block_n)
    scratch = dict(
        a_ring=ring_scratch(tiled_smem(a.dtype, stages, *a_tile), stages),
        b_ring=ring_scratch(tiled_smem(b.dtype, stages, *b_tile), stages),
        vec_smem=plgpu.SMEM((CONSUMERS, max(1, len(vectors)), block_n), jnp.float32),
        vec_loaded=plgpu.Barrier(num_barriers=CONSUMERS * max(1, len(vectors))),
        io_smem=tiled_smem(jnp.bfloat16, CONSUMERS, block_m, block_n),
        io_loaded=plgpu.Barrier(num_barriers=CONSUMERS))
    kernel = functools.partial(
        _kernel, epilogue=epilogue, num_vectors=len(vectors),
        num_inputs=len(vectors) + len(tile_inputs), b_transposed=b_transposed, block_m=block_m,
        block_n=block_n, tiles_n=tiles_n, k_steps=k // BLOCK_K, num_tiles=num_tiles,
        num_ctas=num_ctas)
    outs = launch(kernel, out_type=[jax.ShapeDtypeStruct((padded, n), s.dtype) for s in out_shape],
                  scratch=scratch, grid=(num_ctas,), grid_names=("cta",),
                  name=f"layernorm_ffn_{gemm}_mgpu",
                  )(pad_rows(a, padded, axis=0), b, *vectors,
                    *(pad_rows(x, padded, axis=0) for x in tile_inputs))
    return [o[:m] for o in outs]


# ------------------------------------------------------------------------------------------------
# The forward.

def forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, *, eps: float, residual: bool,
            config: dict, save_residuals: bool, interpret: bool):
    """triton.forward with the Mosaic GPU GEMMs: x [T, d] bf16 -> (out [T, d], Residuals or None)."""
    check_runs_here(interpret, x)
    return triton.forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, eps=eps,
                          residual=residual, config=config, save_residuals=save_residuals,
                          interpret=False, matmul_fn=matmul, tanh=jnp.tanh)
