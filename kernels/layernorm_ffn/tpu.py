"""LayerNorm+FFN forward in Pallas Mosaic TPU: one fused kernel, the hidden never leaves VMEM.

    grid (T / bt, F / bf), semantics (parallel, arbitrary); program (t, f):
      f == 0      xn = LN(x[t]) -> VMEM scratch [bt, d] bf16 (stats f32);  acc = b_proj (+ x[t])
      every f     z = xn @ W_fc[:, f] + b_fc[f]               [bt, bf] f32 (bf16 operands, MXU)
                  acc += gelu(z) -> bf16 @ W_proj[f, :]        acc: VMEM scratch [bt, d] f32
      f == last   out[t] = acc

Unlike a GPU's register file, VMEM holds the [bt, d] f32 accumulator at any d (1 MiB at bt = 256,
d = 1024), so the hidden [bt, bf] tiles stream straight into the second matmul.  VMEM at the default
bt = 256, bf = 512, d = 1024 (double-buffered blocks + scratch): about 10 MiB, inside the 16 MiB
default scoped limit.  Blocks respect the (8, 128) tiling: bt is a multiple of 16 (bf16 packs two
rows per sublane), bf a multiple of 128, d is whole; vectors travel as [1, n] rows.

With save_residuals the kernel also writes common.Residuals (xn, g, gelu'(z), mean, rstd).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import config as kernel_config
from kernels.layernorm_ffn.common import (Residuals, check_divides, dot, flops, gelu,
                                          gelu_and_grad, layernorm_stats)

TOKEN_TILES = ("block_t",)


@dataclasses.dataclass(frozen=True)
class Tiles(kernel_config.KernelConfig):
    """A program's token rows (block_t, a power of two >= 16: bf16 tiles are 16 rows) and its
    slice of the hidden width (block_f, lanes of 128): the forward's and the dx kernel's."""
    block_t: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_f: int = kernel_config.tile(multiple_of=128)


def default_config(d: int) -> dict:
    return {"forward": Tiles(block_t=256, block_f=512)}


def check_config(config, d: int) -> None:
    check_divides("block_f", config.forward.block_f, 4 * d)


def interpret_params(interpret: bool):
    """Mosaic TPU's interpret mode runs these kernels on any backend (CPU in the tests)."""
    return pltpu.InterpretParams() if interpret else False


def _forward_kernel(x_ref, ln_scale_ref, ln_bias_ref, w_fc_ref, b_fc_ref, w_proj_ref, b_proj_ref,
                    out_ref, *refs, eps, residual):
    *residual_refs, xn_ref, acc_ref = refs
    f = pl.program_id(1)

    @pl.when(f == 0)
    def _():
        x = x_ref[...].astype(jnp.float32)
        mean, rstd = layernorm_stats([x], eps)
        xn = ((x - mean) * rstd * ln_scale_ref[...] + ln_bias_ref[...]).astype(jnp.bfloat16)
        xn_ref[...] = xn
        acc_ref[...] = jnp.broadcast_to(b_proj_ref[...], acc_ref.shape) + (x if residual else 0.0)
        if residual_refs:
            saved_xn_ref, _, _, mean_ref, rstd_ref = residual_refs
            saved_xn_ref[...] = xn
            mean_ref[...] = mean
            rstd_ref[...] = rstd

    z = dot(xn_ref[...], w_fc_ref[...]) + b_fc_ref[...]
    if residual_refs:
        g, grad = gelu_and_grad(z)
        g = g.astype(jnp.bfloat16)
        residual_refs[1][...] = g
        residual_refs[2][...] = grad.astype(jnp.bfloat16)
    else:
        g = gelu(z).astype(jnp.bfloat16)
    acc_ref[...] += dot(g, w_proj_ref[...])

    @pl.when(f == pl.num_programs(1) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, *, eps: float, residual: bool,
            config, save_residuals: bool, interpret: bool):
    """x [T, d], T a multiple of block_t -> (out [T, d] in x's dtype, Residuals or None)."""
    tokens, d = x.shape
    hidden = w_fc.shape[1]
    bt, bf = config.forward.block_t, config.forward.block_f
    rows = lambda width: pl.BlockSpec((bt, width), lambda t, f: (t, 0))
    hidden_tile = pl.BlockSpec((bt, bf), lambda t, f: (t, f))
    row_vector = pl.BlockSpec((1, d), lambda t, f: (0, 0))
    out_shape = [jax.ShapeDtypeStruct((tokens, d), x.dtype)]
    out_specs = [rows(d)]
    if save_residuals:
        out_shape += [jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16),
                      jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16),
                      jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16),
                      jax.ShapeDtypeStruct((tokens, 1), jnp.float32),
                      jax.ShapeDtypeStruct((tokens, 1), jnp.float32)]
        out_specs += [rows(d), hidden_tile, hidden_tile, rows(1), rows(1)]
    f32 = jnp.float32
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps, residual=residual),
        grid=(tokens // bt, hidden // bf),
        in_specs=[rows(d), row_vector, row_vector,
                  pl.BlockSpec((d, bf), lambda t, f: (0, f)),
                  pl.BlockSpec((1, bf), lambda t, f: (0, f)),
                  pl.BlockSpec((bf, d), lambda t, f: (f, 0)),
                  row_vector],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bt, d), jnp.bfloat16), pltpu.VMEM((bt, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=flops(tokens, d), transcendentals=tokens * hidden,
            bytes_accessed=sum(s.size * s.dtype.itemsize for s in out_shape)
            + x.size * x.dtype.itemsize + (tokens // bt) * 2 * d * hidden * 2),
        interpret=interpret_params(interpret),
        name="layernorm_ffn_fwd",
    )(x, ln_scale.astype(f32).reshape(1, d), ln_bias.astype(f32).reshape(1, d),
      w_fc.astype(jnp.bfloat16), b_fc.astype(f32).reshape(1, hidden), w_proj.astype(jnp.bfloat16),
      b_proj.astype(f32).reshape(1, d))
    return outs[0], (Residuals(*outs[1:]) if save_residuals else None)
