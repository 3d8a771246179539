"""LayerNorm+FFN backward in Pallas on the Triton backend (GPU).

With dy = dL/dout [T, d] and the forward's residuals (common.Residuals: xn, g, gelu'(z), mean, rstd):

    dz      grid (T / bm, F / bn)         dz = (dy W_proj^T) * gelu'(z) -> bf16 [T, F]     8 T d^2 FLOPs
    dxn     grid (T / bm, d / bn)         dxn = dz W_fc^T -> [T, d] in x's dtype           8 T d^2
    LN      grid (T / lnb_block_t,)       dx = LN'(dxn) (+ dy); per-program column sums of
                                          dxn * xhat, dxn, dy -> d_ln_scale, d_ln_bias, db_proj
    dW      grid (2, F / bf, d / bd)      dW_proj = g^T dy, dW_fc^T = dz^T xn, db_fc = dz^T 1  16 T d^2
                                          (each program loops over all T: f32 sums, no atomics)

32 T d^2 FLOPs in all, the minimum (four matmuls the size of the forward's two).

Save or recompute the hidden activation: the forward saves g = gelu(z) and gelu'(z) in bf16
(16 T d bytes; 1.07 GB = 0.36 ms of writes at 3 TB/s for T = 131072, d = 512, inside a forward whose
matmuls alone take 0.71 ms at 778 TF/s).  Recomputing instead would cost z = LN(x) W_fc again,
8 T d^2 FLOPs = 0.35 ms at peak, plus the GELU's transcendental, and it would be needed twice, by the
dz kernel (for gelu'(z)) and by the weight kernel (for g), so 0.7 ms.  g must reach HBM anyway for
the forward's second GEMM (triton.py), so saving it is free and saving gelu'(z) costs 0.18 ms of
writes; with gelu'(z) saved the backward runs no transcendental function at all.  dz (8 T d bytes)
is likewise written once by the dz kernel and read by the dxn and weight kernels rather than
recomputed (another 8 T d^2 FLOPs).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import config as kernel_config
from kernels.layernorm_ffn import triton
from kernels.layernorm_ffn.common import (Residuals, Rows, check_divides, dz_epilogue,
                                          layernorm_backward, store_epilogue, t_dot)
from kernels.layernorm_ffn.triton import check_gemm, column_chunks, matmul
from kernels.triton_gemm import Gemm, compiler_params

TOKEN_TILES = ("lnb_block_t", "dw_block_t", "dz_block_m", "dxn_block_m")


@dataclasses.dataclass(frozen=True)
class Weights(kernel_config.KernelConfig):
    """The weight-gradient kernel: an output tile [block_f, block_d] summed over steps of block_t
    tokens (Triton block shapes: powers of two >= 16), its warps and stages."""
    block_t: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_f: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_d: int = kernel_config.tile(power_of_two=True, minimum=16)
    num_warps: int = kernel_config.count()
    num_stages: int = kernel_config.stages()


@dataclasses.dataclass(frozen=True)
class Kernels(kernel_config.Kernels):
    """The Triton backend's kernels: the forward's (triton.py) and the backward's."""
    ln: Rows
    up: Gemm
    down: Gemm
    lnb: Rows
    dz: Gemm
    dxn: Gemm
    dw: Weights


def default_config(d: int) -> dict:
    """The backward's kernels: the forward's GEMM tiles for dz and dxn; 128 x 128 weight tiles
    summed over 64-token steps; 256 rows per LayerNorm-backward program (a [T / 256, d] f32
    partial each for d_ln_scale, d_ln_bias, db_proj: 3 MB at T = 131072, d = 512)."""
    gemm = triton.default_config(d)["up"]
    return {"lnb": Rows(256), "dz": gemm, "dxn": gemm,
            "dw": Weights(block_t=64, block_f=128, block_d=128, num_warps=8, num_stages=3)}


def check_layernorm_rows(config) -> None:
    """Each LayerNorm-backward program runs whole LN tiles of the forward's rows."""
    if config.lnb.block_t % config.ln.block_t:
        raise ValueError(f"layernorm_ffn: lnb_block_t={config.lnb.block_t} must be a multiple "
                         f"of ln_block_t={config.ln.block_t}")


def check_config(config: Kernels, d: int) -> None:
    check_gemm(config.dz, "dz", 4 * d, d)
    check_gemm(config.dxn, "dxn", d, 4 * d)
    check_layernorm_rows(config)
    check_divides("dw_block_f", config.dw.block_f, 4 * d)
    check_divides("dw_block_d", config.dw.block_d, d)


def _layernorm_backward_kernel(dxn_ref, x_ref, dy_ref, mean_ref, rstd_ref, scale_ref,
                               dx_ref, d_scale_ref, d_bias_ref, db_proj_ref, *, block_t, residual):
    cols = column_chunks(x_ref.shape[1])
    scale = [scale_ref[c][None, :] for c in cols]

    def row_tile(s, sums):
        rows = pl.ds(pl.multiple_of(s * block_t, block_t), block_t)
        mean, rstd = mean_ref[rows, :], rstd_ref[rows, :]
        dxn = [dxn_ref[rows, c].astype(jnp.float32) for c in cols]
        xhat = [(x_ref[rows, c].astype(jnp.float32) - mean) * rstd for c in cols]
        dy = [dy_ref[rows, c].astype(jnp.float32) for c in cols]
        for dxc, dyc, c in zip(layernorm_backward(dxn, xhat, rstd, scale), dy, cols):
            dx_ref[rows, c] = (dxc + dyc if residual else dxc).astype(dx_ref.dtype)
        terms = [*(g * h for g, h in zip(dxn, xhat)), *dxn, *dy]
        return tuple(s_ + jnp.sum(t, axis=0) for s_, t in zip(sums, terms))

    n = len(cols)
    sums = jax.lax.fori_loop(0, x_ref.shape[0] // block_t, row_tile,
                             tuple(jnp.zeros((c.size,), jnp.float32) for c in cols * 3))
    for out_ref, part in zip((d_scale_ref, d_bias_ref, db_proj_ref), (sums[:n], sums[n:2 * n], sums[2 * n:])):
        for s_, c in zip(part, cols):
            out_ref[c] = s_


def _layernorm_backward(dxn, x, dy, mean, rstd, scale, *, residual, config, interpret):
    """-> dx [T, d] in x's dtype and d_ln_scale, d_ln_bias, db_proj [d] f32."""
    (tokens, d), rows = x.shape, config.lnb.block_t
    tiles = lambda width: pl.BlockSpec((rows, width), lambda i: (i, 0))
    partial = pl.BlockSpec((pl.squeezed, d), lambda i: (i, 0))
    partial_shape = jax.ShapeDtypeStruct((tokens // rows, d), jnp.float32)
    dx, *partials = pl.pallas_call(
        functools.partial(_layernorm_backward_kernel, block_t=config.ln.block_t,
                          residual=residual),
        grid=(tokens // rows,),
        in_specs=[tiles(d), tiles(d), tiles(d), tiles(1), tiles(1),
                  pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[tiles(d), partial, partial, partial],
        out_shape=[jax.ShapeDtypeStruct((tokens, d), x.dtype)] + [partial_shape] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
        interpret=interpret,
        name="layernorm_ffn_layernorm_bwd",
    )(dxn, x, dy, mean, rstd, scale.astype(jnp.float32))
    return dx, *(p.sum(axis=0) for p in partials)


def _weight_kernel(g_ref, dy_ref, dz_ref, xn_ref, dw_ref, db_fc_ref, *, block_t):
    """Program (w, j, i) sums one [bf, bd] tile over all tokens: w = 0 gives W_proj's gradient
    g^T dy, w = 1 gives W_fc's (transposed) dz^T xn and, from the same dz tiles, db_fc = dz^T 1."""
    num_t = g_ref.shape[0] // block_t
    which, first_d_tile = pl.program_id(0), pl.program_id(2) == 0  # read at top level (interpret mode)

    def rows(t):
        return pl.ds(pl.multiple_of(t * block_t, block_t), block_t)

    @pl.when(which == 0)
    def _():
        def step(t, acc):
            return acc + t_dot(g_ref[rows(t), :], dy_ref[rows(t), :])
        dw_ref[...] = jax.lax.fori_loop(0, num_t, step, jnp.zeros(dw_ref.shape, jnp.float32))

    @pl.when(which == 1)
    def _():
        # Column sums on the tensor cores: dz^T @ e_0, with e_0 a [bt, 16] block whose first
        # column is ones (16 is the narrowest dot), reuses the dz tile already staged for dz^T xn.
        e0 = (jax.lax.broadcasted_iota(jnp.int32, (block_t, 16), 1) == 0).astype(jnp.bfloat16)

        def step(t, carry):
            acc, sums = carry
            dz = dz_ref[rows(t), :]
            return acc + t_dot(dz, xn_ref[rows(t), :]), sums + t_dot(dz, e0)
        acc, sums = jax.lax.fori_loop(0, num_t, step, (jnp.zeros(dw_ref.shape, jnp.float32),
                                                       jnp.zeros((dw_ref.shape[0], 16), jnp.float32)))
        dw_ref[...] = acc

        @pl.when(first_d_tile)
        def _():
            db_fc_ref[...] = jnp.sum(sums, axis=1)


def _weight_gradients(g, dy, dz, xn, *, config, interpret):
    """-> dW_proj [F, d], dW_fc [d, F], db_fc [F], all f32, summed over the T rows."""
    (tokens, hidden), d = g.shape, dy.shape[1]
    bt, bf, bd = config.dw.block_t, config.dw.block_f, config.dw.block_d
    f_cols = pl.BlockSpec((tokens, bf), lambda w, j, i: (0, j))
    d_cols = pl.BlockSpec((tokens, bd), lambda w, j, i: (0, i))
    dw, db_fc = pl.pallas_call(
        functools.partial(_weight_kernel, block_t=bt),
        grid=(2, hidden // bf, d // bd),
        in_specs=[f_cols, d_cols, f_cols, d_cols],
        out_specs=[pl.BlockSpec((pl.squeezed, bf, bd), lambda w, j, i: (w, j, i)),
                   pl.BlockSpec((bf,), lambda w, j, i: (j,))],
        out_shape=[jax.ShapeDtypeStruct((2, hidden, d), jnp.float32),
                   jax.ShapeDtypeStruct((hidden,), jnp.float32)],
        compiler_params=compiler_params(config.dw),
        cost_estimate=pl.CostEstimate(flops=4 * tokens * hidden * d, transcendentals=0,
                                      bytes_accessed=4 * tokens * (hidden + d) + 8 * hidden * d),
        interpret=interpret,
        name="layernorm_ffn_weights_bwd",
    )(g, dy, dz, xn)
    return dw[0], dw[1].T, db_fc


def backward(dy, x, ln_scale, w_fc, w_proj, residuals: Residuals, *, residual: bool, config,
             interpret: bool, matmul_fn: Callable = matmul,
             weight_gradients_fn: Callable | None = None):
    """dy [T, d] -> (dx [T, d] in x's dtype, d_ln_scale, d_ln_bias, dW_fc, db_fc, dW_proj, db_proj),
    the parameter gradients in f32.  matmul_fn runs the dz and dxn GEMMs (triton.matmul's
    contract), weight_gradients_fn the weight gradients (_weight_gradients' contract);
    mosaic_gpu_vjp.py passes the Mosaic GPU ones."""
    weight_gradients_fn = weight_gradients_fn or _weight_gradients
    dy = dy.astype(x.dtype)
    dy_bf16 = dy.astype(jnp.bfloat16)
    (dz,) = matmul_fn(dy_bf16, w_proj.astype(jnp.bfloat16), dz_epilogue, [residuals.gelu_grad],
                   [jax.ShapeDtypeStruct(residuals.g.shape, jnp.bfloat16)],
                   b_transposed=True, config=config.dz, gemm="dz", interpret=interpret)
    (dxn,) = matmul_fn(dz, w_fc.astype(jnp.bfloat16), store_epilogue, [],
                    [jax.ShapeDtypeStruct(x.shape, x.dtype)],
                    b_transposed=True, config=config.dxn, gemm="dxn", interpret=interpret)
    dx, d_ln_scale, d_ln_bias, db_proj = _layernorm_backward(
        dxn, x, dy, residuals.mean, residuals.rstd, ln_scale, residual=residual, config=config,
        interpret=interpret)
    dw_proj, dw_fc, db_fc = weight_gradients_fn(residuals.g, dy_bf16, dz, residuals.xn,
                                                config=config, interpret=interpret)
    return dx, d_ln_scale, d_ln_bias, dw_fc, db_fc, dw_proj, db_proj
