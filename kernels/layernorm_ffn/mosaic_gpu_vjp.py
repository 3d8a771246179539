"""LayerNorm+FFN backward with its GEMMs in Pallas Mosaic GPU: dz and dxn on mosaic_gpu.matmul
(with common.dz_epilogue and common.store_epilogue), the weight gradients on `weight_gradient`
below; the LayerNorm-backward kernel is triton_vjp.py's, whose docstring has the FLOPs and the
save-or-recompute choice.

`weight_gradient(a, b)` = a^T b summed over the T token rows: dW_proj = g^T dy and
dW_fc^T = dz^T xn (with db_fc = dz^T 1), 8 T d^2 FLOPs each. The output is small ([F, d]: 72 tiles
of 256 x 128 at d = 768) and the contraction long (T = 65536 tokens), so whole tiles would leave
most of the 132 SMs idle: the tokens are split into `chunks` and each (chunk, tile) unit is one
persistent CTA's work, chunk-major (the CTAs at work read the same token rows of a and b, from
L2). A unit's f32 sum is added into the output by TMA reduce-add (cp.reduce.async.bulk), into a
zeroed jax.new_ref buffer: f32 all the way, but the order of a tile's `chunks` additions varies from
run to run, so the last bits of the weight gradients do too (as with the atomics of other fused
backward kernels).

Per k-step (64 tokens) the producer TMA-loads a's [64, CONSUMERS * block_m] and b's [64, block_n]
rows; consumer warpgroup w multiplies the transpose of its [64, block_m] half (wgmma reads a
transposed operand straight from shared memory) by b. db_fc rides along on the tiles of the first
column block: a second wgmma against a [64, 64] block whose first column is ones gives dz^T 1.

Shared memory: num_stages (CONSUMERS block_m + block_n) 64 bf16 for the rings, CONSUMERS block_m 32
f32 for the output quarters on their way to the TMA, and CONSUMERS 64 x 64 bf16 for the ones block:
192 KB at 128 x 128 and 3 stages.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import config as kernel_config
from kernels import mosaic_gpu_gemm
from kernels.layernorm_ffn import mosaic_gpu, triton_vjp
from kernels.layernorm_ffn.common import Rows, check_divides
from kernels.mosaic_gpu_gemm import BLOCK_K, Tiles
from kernels.warp_specialized import (CONSUMERS, IO_COLUMNS, Ring, accumulate, launch, pad_rows,
                                      produce, ring_scratch, specialize, tiled_smem)

TOKEN_TILES = ("lnb_block_t",)
SUMS_COLUMNS = 64  # the ones block's width (wgmma's B tile: one 128-byte swizzled bf16 row)
FLUSH_STEPS = 4   # a unit's TMA reduce-add costs about this many k-steps (for choosing chunks)


@dataclasses.dataclass(frozen=True)
class Kernels(kernel_config.Kernels):
    """The Mosaic GPU backend's kernels: the forward's (mosaic_gpu.py) and the backward's, every
    GEMM (dw: the weight-gradient kernel below) in mosaic_gpu_gemm.Tiles; the LayerNorm passes
    are Triton's."""
    ln: Rows
    up: Tiles
    down: Tiles
    lnb: Rows
    dz: Tiles
    dxn: Tiles
    dw: Tiles


def default_config(d: int) -> dict:
    """The backward's kernels: mosaic_gpu.py's GEMM defaults for dz and dxn; 128 x 128 weight
    tiles per consumer warpgroup, 3 stages; triton_vjp's LayerNorm-backward rows."""
    return {"lnb": triton_vjp.default_config(d)["lnb"], "dz": mosaic_gpu.gemm_defaults(4 * d),
            "dxn": mosaic_gpu.gemm_defaults(d),
            "dw": Tiles(block_m=128, block_n=128, num_stages=3)}


def check_config(config: Kernels, d: int) -> None:
    triton_vjp.check_layernorm_rows(config)
    check_divides("dz_block_n", config.dz.block_n, 4 * d)
    check_divides("dxn_block_n", config.dxn.block_n, d)
    check_divides("dw_block_n", config.dw.block_n, d)
    check_divides(f"dw_block_m ({CONSUMERS} warpgroups' rows)", CONSUMERS * config.dw.block_m,
                  4 * d)


def choose_chunks(num_tiles: int, k_steps: int, num_ctas: int) -> int:
    """How many token chunks to split the k-steps into: the divisor of k_steps whose units
    (chunks x tiles, run in waves of num_ctas) finish first, each unit costing its k-steps plus
    FLUSH_STEPS; the fewest chunks among equals."""
    def finish(chunks):
        return math.ceil(chunks * num_tiles / num_ctas) * (k_steps // chunks + FLUSH_STEPS)
    return min((c for c in range(1, k_steps + 1) if k_steps % c == 0), key=finish)


# ------------------------------------------------------------------------------------------------
# The weight-gradient GEMM.

def _weight_kernel(a_ref, b_ref, out_ref, *sums_ref, a_ring, b_ring, io_smem, ones_smem,
                   block_m: int, block_n: int, tiles_n: int, num_tiles: int, chunk_steps: int,
                   num_units: int, num_ctas: int):
    cta = lax.axis_index("cta")
    my_units = (num_units - cta + num_ctas - 1) // num_ctas   # units cta, cta + num_ctas, ...

    def unit(i):
        """(token chunk, row block, column block) of this CTA's i-th unit."""
        u = cta + i * num_ctas
        tile = lax.rem(u, num_tiles)
        return u // num_tiles, tile // tiles_n, lax.rem(tile, tiles_n)

    def tokens(n):   # n = i * chunk_steps + k: the stream of k-steps of all of this CTA's units
        chunk, _, _ = unit(n // chunk_steps)
        return pl.ds((chunk * chunk_steps + lax.rem(n, chunk_steps)) * BLOCK_K, BLOCK_K)

    def a_tile(n):
        _, row, _ = unit(n // chunk_steps)
        return a_ref.at[tokens(n), pl.ds(row * CONSUMERS * block_m, CONSUMERS * block_m)]

    def b_tile(n):
        _, _, col = unit(n // chunk_steps)
        return b_ref.at[tokens(n), pl.ds(col * block_n, block_n)]

    a_ring, b_ring = Ring(a_tile, *a_ring), Ring(b_tile, *b_ring)

    def consume(wg):
        ones = ones_smem.at[wg] if sums_ref else None
        if ones is not None:
            first_column = plgpu.broadcasted_iota(jnp.int32, ones.shape, 1,
                                                  layout=plgpu.Layout.WGMMA) == 0
            ones[...] = first_column.astype(ones.dtype)
            plgpu.commit_smem()   # visible to wgmma, which reads shared memory asynchronously

        def add_into(dst, acc):
            """dst += acc by TMA reduce-add, IO_COLUMNS at a time through shared memory."""
            for c in range(0, acc.shape[1], IO_COLUMNS):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last add has read it
                io_smem.at[wg][...] = acc[:, c:c + IO_COLUMNS]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io_smem.at[wg], dst.at[:, pl.ds(c, IO_COLUMNS)],
                                        reduction_op="add")

        def run_unit(i, _):
            _, row, col = unit(i)
            rows = pl.ds((row * CONSUMERS + wg) * block_m, block_m)

            def sum_chunk(with_sums: bool):
                def k_step(k, accs):
                    n = i * chunk_steps + k
                    a_ring.wait(n)
                    b_ring.wait(n)
                    a = a_ring.tile(n).at[:, pl.ds(wg * block_m, block_m)].transpose((1, 0))
                    accs = (accumulate(accs[0], a, b_ring.tile(n)),
                            *(accumulate(s, a, ones) for s in accs[1:]))
                    a_ring.release(n)
                    b_ring.release(n)
                    return accs

                zeros = lambda cols: plgpu.layout_cast(jnp.zeros((block_m, cols), jnp.float32),
                                                       plgpu.Layout.WGMMA)
                init = (zeros(block_n), zeros(SUMS_COLUMNS)) if with_sums else (zeros(block_n),)
                accs = lax.fori_loop(0, chunk_steps, k_step, init)
                add_into(out_ref.at[rows, pl.ds(col * block_n, block_n)], accs[0])
                if with_sums:
                    add_into(sums_ref[0].at[rows], accs[1][:, :IO_COLUMNS])

            if sums_ref:
                pl.when(col == 0)(lambda: sum_chunk(True))
                pl.when(col != 0)(lambda: sum_chunk(False))
            else:
                sum_chunk(False)

        lax.fori_loop(0, my_units, run_unit, None)
        plgpu.wait_smem_to_gmem(0)

    specialize(consume, lambda: produce((a_ring, b_ring), my_units * chunk_steps))


def weight_gradient(a: jax.Array, b: jax.Array, *, tiles: Tiles, column_sums: bool = False):
    """a^T b over the token rows, in f32: a [T, M] bf16, b [T, N] bf16 -> [M, N] f32, and with
    column_sums also a^T 1 -> [M] f32 (else None). M a multiple of CONSUMERS * tiles.block_m, N
    of tiles.block_n; T is padded here to a multiple of 64 (zero rows add nothing)."""
    mosaic_gpu.check_runs_here(False, a, b)
    (tokens, m), n = a.shape, b.shape[1]
    block_m, block_n, stages = tiles.block_m, tiles.block_n, tiles.num_stages
    padded = -(-tokens // BLOCK_K) * BLOCK_K
    k_steps, tiles_n = padded // BLOCK_K, n // block_n
    num_tiles = m // (CONSUMERS * block_m) * tiles_n
    chunks = choose_chunks(num_tiles, k_steps, mosaic_gpu_gemm.num_sms())
    num_units = chunks * num_tiles
    num_ctas = min(mosaic_gpu_gemm.num_sms(), num_units)
    out = jax.new_ref(jnp.zeros((m, n), jnp.float32))
    sums = [jax.new_ref(jnp.zeros((m, IO_COLUMNS), jnp.float32))] if column_sums else []
    scratch = dict(
        a_ring=ring_scratch(tiled_smem(a.dtype, stages, BLOCK_K, CONSUMERS * block_m), stages),
        b_ring=ring_scratch(tiled_smem(b.dtype, stages, BLOCK_K, block_n), stages),
        io_smem=tiled_smem(jnp.float32, CONSUMERS, block_m, IO_COLUMNS),
        ones_smem=tiled_smem(jnp.bfloat16, CONSUMERS, BLOCK_K, SUMS_COLUMNS) if column_sums
        else None)
    kernel = functools.partial(
        _weight_kernel, block_m=block_m, block_n=block_n, tiles_n=tiles_n, num_tiles=num_tiles,
        chunk_steps=k_steps // chunks, num_units=num_units, num_ctas=num_ctas)
    launch(kernel, out_type=(), scratch=scratch, grid=(num_ctas,), grid_names=("cta",),
           name="layernorm_ffn_weights_bwd_mgpu",
           )(pad_rows(a, padded, axis=0), pad_rows(b, padded, axis=0), out, *sums)
    return jax.freeze(out), (jax.freeze(sums[0])[:, 0] if column_sums else None)


def _weight_gradients(g, dy, dz, xn, *, config, interpret):
    """triton_vjp._weight_gradients' contract: dW_proj [F, d], dW_fc [d, F], db_fc [F], f32."""
    del interpret   # checked by backward
    dw_proj, _ = weight_gradient(g, dy, tiles=config.dw)
    dw_fc_t, db_fc = weight_gradient(dz, xn, tiles=config.dw, column_sums=True)
    return dw_proj, dw_fc_t.T, db_fc


def backward(dy, x, ln_scale, w_fc, w_proj, residuals, *, residual: bool, config: Kernels,
             interpret: bool):
    """triton_vjp.backward with the Mosaic GPU GEMMs (same arguments and results)."""
    mosaic_gpu.check_runs_here(interpret, x)
    return triton_vjp.backward(dy, x, ln_scale, w_fc, w_proj, residuals, residual=residual,
                               config=config, interpret=False, matmul_fn=mosaic_gpu.matmul,
                               weight_gradients_fn=_weight_gradients)
