"""LayerNorm+FFN backward in Pallas Mosaic TPU.

With dy = dL/dout [T, d] and the forward's residuals (common.Residuals):

    dx       grid (T / bt, F / bf), (parallel, arbitrary); program (t, f):
               dz[t, f] = (dy[t] W_proj[f, :]^T) * gelu'(z)[t, f] -> bf16, written     8 T d^2 FLOPs
               acc += dz[t, f] W_fc[:, f]^T    (acc = dxn, VMEM scratch [bt, d] f32)   8 T d^2
             f == last: dx = LN'(acc) (+ dy); per-tile column sums of dxn * xhat, dxn, dy
    dW_proj  grid (F / bf, d / bd, T / bt), (parallel, arbitrary, arbitrary):
               acc[bf, bd] += g[t, f]^T dy[t, d]      (VMEM scratch, summed over all T)  4 T d^2
    dW_fc^T  the same kernel on dz and xn, also summing db_fc = dz^T 1 on its first d tile  4 T d^2

The save-or-recompute choice (save g and gelu'(z), write dz once) is the Triton backend's, for the
reasons in triton_vjp.py; here dz is fused into the dx kernel, so only the weight kernels read it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import config as kernel_config
from kernels.layernorm_ffn import tpu
from kernels.layernorm_ffn.common import (Residuals, check_divides, dot_t, layernorm_backward,
                                          t_dot)
from kernels.layernorm_ffn.tpu import interpret_params

TOKEN_TILES = ("bwd_block_t", "dw_block_t")


@dataclasses.dataclass(frozen=True)
class Weights(kernel_config.KernelConfig):
    """The weight-gradient kernel: an output tile [block_f, block_d] f32 in VMEM, summed over
    steps of block_t tokens (a power of two >= 16; the others lanes of 128)."""
    block_t: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_f: int = kernel_config.tile(multiple_of=128)
    block_d: int = kernel_config.tile(multiple_of=128)


@dataclasses.dataclass(frozen=True)
class Kernels(kernel_config.Kernels):
    """The TPU backend's kernels: the fused forward (tpu.py), the dx kernel (bwd) and the weight
    gradients' (dw)."""
    forward: tpu.Tiles
    bwd: tpu.Tiles
    dw: Weights


def default_config(d: int) -> dict:
    """dx tiles as the forward's; weight tiles [512, d] f32 (2 MiB at d = 1024) summed over
    512-token steps, d whole where it is at most 1024 (a multiple of 128 dividing d otherwise)."""
    block_d = d if d <= 1024 else max(b for b in range(128, 1025, 128) if d % b == 0)
    return {"bwd": tpu.Tiles(block_t=256, block_f=512),
            "dw": Weights(block_t=512, block_f=512, block_d=block_d)}


def check_config(config: Kernels, d: int) -> None:
    check_divides("bwd_block_f", config.bwd.block_f, 4 * d)
    check_divides("dw_block_f", config.dw.block_f, 4 * d)
    check_divides("dw_block_d", config.dw.block_d, d)


def _dx_kernel(dy_ref, x_ref, mean_ref, rstd_ref, ln_scale_ref, w_fc_ref, w_proj_ref,
               gelu_grad_ref, dx_ref, dz_ref, d_scale_ref, d_bias_ref, db_proj_ref, acc_ref, *,
               residual):
    f = pl.program_id(1)

    @pl.when(f == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dy = dy_ref[...]
    dz = (dot_t(dy.astype(jnp.bfloat16), w_proj_ref[...]) * gelu_grad_ref[...].astype(jnp.float32)).astype(jnp.bfloat16)
    dz_ref[...] = dz
    acc_ref[...] += dot_t(dz, w_fc_ref[...])

    @pl.when(f == pl.num_programs(1) - 1)
    def _():
        dxn = acc_ref[...]
        xhat = (x_ref[...].astype(jnp.float32) - mean_ref[...]) * rstd_ref[...]
        (dx,) = layernorm_backward([dxn], [xhat], rstd_ref[...], [ln_scale_ref[...]])
        dy32 = dy.astype(jnp.float32)
        dx_ref[...] = (dx + dy32 if residual else dx).astype(dx_ref.dtype)
        d_scale_ref[...] = jnp.sum(dxn * xhat, axis=0, keepdims=True)
        d_bias_ref[...] = jnp.sum(dxn, axis=0, keepdims=True)
        db_proj_ref[...] = jnp.sum(dy32, axis=0, keepdims=True)


def _t_dot_kernel(a_ref, b_ref, out_ref, *refs):
    """out[j, i] = sum over token tiles t of a[t, j]^T b[t, i]; with a column-sum output (refs =
    (colsum_ref, acc_ref, colsum_acc_ref)) also colsum[j] = sum_t a[t, j] on the first i tile."""
    *colsum_refs, acc_ref = refs
    i, t = pl.program_id(1), pl.program_id(2)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    a = a_ref[...]
    acc_ref[...] += t_dot(a, b_ref[...])
    last = t == pl.num_programs(2) - 1

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...]

    if colsum_refs:
        colsum_ref, colsum_acc_ref = colsum_refs

        @pl.when((i == 0) & (t == 0))
        def _():
            colsum_acc_ref[...] = jnp.zeros_like(colsum_acc_ref)

        @pl.when(i == 0)
        def _():
            colsum_acc_ref[...] += jnp.sum(a.astype(jnp.float32), axis=0, keepdims=True)

        # The colsum block (0, j) stays resident while i and t sweep (both "arbitrary"), so the
        # value written on the first i tile is the one copied out when j moves on.
        @pl.when((i == 0) & last)
        def _():
            colsum_ref[...] = colsum_acc_ref[...]


def _t_dot(a, b, *, with_colsum: bool, config: Weights, interpret: bool):
    """a [T, F], b [T, d] -> a^T b [F, d] f32 (and the column sums of a [F] f32)."""
    (tokens, hidden), d = a.shape, b.shape[1]
    bt, bf, bd = config.block_t, config.block_f, config.block_d
    out_shape = [jax.ShapeDtypeStruct((hidden, d), jnp.float32)]
    out_specs = [pl.BlockSpec((bf, bd), lambda j, i, t: (j, i))]
    scratch = [pltpu.VMEM((bf, bd), jnp.float32)]
    if with_colsum:
        out_shape.append(jax.ShapeDtypeStruct((1, hidden), jnp.float32))
        out_specs.append(pl.BlockSpec((1, bf), lambda j, i, t: (0, j)))
        scratch.insert(0, pltpu.VMEM((1, bf), jnp.float32))
    outs = pl.pallas_call(
        _t_dot_kernel,
        grid=(hidden // bf, d // bd, tokens // bt),
        in_specs=[pl.BlockSpec((bt, bf), lambda j, i, t: (t, j)),
                  pl.BlockSpec((bt, bd), lambda j, i, t: (t, i))],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * tokens * hidden * d, transcendentals=0,
                                      bytes_accessed=2 * tokens * (hidden + d) + 4 * hidden * d),
        interpret=interpret_params(interpret),
        name="layernorm_ffn_weight_bwd",
    )(a, b)
    return outs[0], (outs[1][0] if with_colsum else None)


def backward(dy, x, ln_scale, w_fc, w_proj, residuals: Residuals, *, residual: bool,
             config: Kernels, interpret: bool):
    """dy [T, d] -> (dx [T, d] in x's dtype, d_ln_scale, d_ln_bias, dW_fc, db_fc, dW_proj, db_proj),
    the parameter gradients in f32."""
    tokens, d = x.shape
    hidden = w_fc.shape[1]
    bt, bf = config.bwd.block_t, config.bwd.block_f
    n_t = tokens // bt
    rows = lambda width: pl.BlockSpec((bt, width), lambda t, f: (t, 0))
    hidden_tile = pl.BlockSpec((bt, bf), lambda t, f: (t, f))
    partial = pl.BlockSpec((pl.squeezed, 1, d), lambda t, f: (t, 0, 0))
    partial_shape = jax.ShapeDtypeStruct((n_t, 1, d), jnp.float32)
    dy = dy.astype(x.dtype)
    dx, dz, *partials = pl.pallas_call(
        functools.partial(_dx_kernel, residual=residual),
        grid=(n_t, hidden // bf),
        in_specs=[rows(d), rows(d), rows(1), rows(1), pl.BlockSpec((1, d), lambda t, f: (0, 0)),
                  pl.BlockSpec((d, bf), lambda t, f: (0, f)),
                  pl.BlockSpec((bf, d), lambda t, f: (f, 0)), hidden_tile],
        out_specs=[rows(d), hidden_tile, partial, partial, partial],
        out_shape=[jax.ShapeDtypeStruct((tokens, d), x.dtype),
                   jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16)] + [partial_shape] * 3,
        scratch_shapes=[pltpu.VMEM((bt, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=16 * tokens * d * d, transcendentals=0,
                                      bytes_accessed=4 * tokens * hidden + 8 * tokens * d
                                      + n_t * 4 * d * hidden),
        interpret=interpret_params(interpret),
        name="layernorm_ffn_dx_bwd",
    )(dy, x, residuals.mean, residuals.rstd, ln_scale.astype(jnp.float32).reshape(1, d),
      w_fc.astype(jnp.bfloat16), w_proj.astype(jnp.bfloat16), residuals.gelu_grad)
    d_ln_scale, d_ln_bias, db_proj = (p.sum(axis=(0, 1)) for p in partials)
    dw_proj, _ = _t_dot(residuals.g, dy.astype(jnp.bfloat16), with_colsum=False,
                        config=config.dw, interpret=interpret)
    dw_fc_t, db_fc = _t_dot(dz, residuals.xn, with_colsum=True, config=config.dw,
                            interpret=interpret)
    return dx, d_ln_scale, d_ln_bias, dw_fc_t.T, db_fc, dw_proj, db_proj
