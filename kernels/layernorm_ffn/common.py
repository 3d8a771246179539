"""Math and checks shared by the LayerNorm+FFN kernels of every backend.

The kernels work on a row tile x [bt, d] whose d axis may arrive as a list of column chunks (Triton
needs power-of-two tensor shapes, and d = 768 is not one); the TPU kernels pass a single chunk.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kernels import config as kernel_config
from kernels import triton_gemm

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


class Residuals(NamedTuple):
    """What the forward kernel saves for the backward, T rows (padded) by d or F = 4d columns.

    xn        [T, d] bf16  LN(x), the first matmul's operand (the weight-gradient kernel reuses it)
    g         [T, F] bf16  gelu(z), the second matmul's operand, z = LN(x) W_fc + b_fc
    gelu_grad [T, F] bf16  gelu'(z): the backward then needs neither z nor a transcendental function
    mean      [T, 1] f32   LayerNorm statistics of x
    rstd      [T, 1] f32
    """
    xn: jax.Array
    g: jax.Array
    gelu_grad: jax.Array
    mean: jax.Array
    rstd: jax.Array


def gelu(z: jax.Array, tanh: Callable = jnp.tanh) -> jax.Array:
    """gelu(z) = z/2 (1 + tanh(c (z + a z^3))), microgpt.model.gelu_tanh with a pluggable tanh."""
    return 0.5 * z * (1.0 + tanh(GELU_C * z * (1.0 + GELU_A * z * z)))


def gelu_and_grad(z: jax.Array, tanh: Callable = jnp.tanh) -> tuple[jax.Array, jax.Array]:
    """(gelu(z), gelu'(z)) sharing one tanh:  gelu'(z) = (1 + t)/2 + z/2 (1 - t^2) c (1 + 3 a z^2)."""
    z2 = z * z
    t = tanh(GELU_C * z * (1.0 + GELU_A * z2))
    half_1pt = 0.5 + 0.5 * t
    grad = half_1pt + 0.5 * z * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * z2)
    return z * half_1pt, grad


# GEMM epilogues: the elementwise work on a matmul's f32 output tile, one definition for every GPU
# backend. Each takes acc [bm, bn] f32 and the tile's inputs (column vectors such as a bias already
# broadcastable against acc, tiles [bm, bn]) and returns the tile's outputs, which the GEMM casts to
# their dtypes.

def up_epilogue(acc, b_fc, *, tanh: Callable, with_grad: bool) -> tuple:
    """z = acc + b_fc -> (gelu(z),) or, for the backward, (gelu(z), gelu'(z))."""
    z = acc + b_fc
    return gelu_and_grad(z, tanh) if with_grad else (gelu(z, tanh),)


def down_epilogue(acc, b_proj, *x) -> tuple:
    """(acc + b_proj [+ x],): the block's output, with the residual x when given."""
    out = acc + b_proj
    return (out + x[0].astype(jnp.float32) if x else out,)


def dz_epilogue(dg, gelu_grad) -> tuple:
    """(dg * gelu'(z),): dL/dz from dL/dg = dy W_proj^T."""
    return (dg * gelu_grad.astype(jnp.float32),)


def store_epilogue(acc) -> tuple:
    return (acc,)


dot, dot_t = triton_gemm.dot, triton_gemm.dot_t   # a @ b and a @ b^T, f32 accumulation


def t_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T @ b, float32 accumulation (a reduction over the rows).  a [k, m], b [k, n] -> [m, n]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def row_sum(chunks: Sequence[jax.Array]) -> jax.Array:
    """sum over the columns of all chunks.  chunks [bt, w_i] -> [bt, 1]."""
    return sum(jnp.sum(c, axis=1, keepdims=True) for c in chunks)


def layernorm_stats(x: Sequence[jax.Array], eps: float) -> tuple[jax.Array, jax.Array]:
    """mean and 1/sqrt(var + eps) of the rows of x (float32 chunks [bt, w_i]) -> [bt, 1] each.

    The variance is the mean of (x - mean)^2, not E[x^2] - mean^2: rows with a large mean
    (x = 50 + 20 randn) would lose every significant bit of the variance to cancellation.
    """
    d = sum(c.shape[1] for c in x)
    mean = row_sum(x) / d
    var = row_sum([jnp.square(c - mean) for c in x]) / d
    return mean, jax.lax.rsqrt(var + eps)


def layernorm_backward(dxn: Sequence[jax.Array], xhat: Sequence[jax.Array], rstd: jax.Array,
                       scale: Sequence[jax.Array]) -> list[jax.Array]:
    """dL/dx for xn = xhat * scale + bias, xhat = (x - mean) * rstd, all float32 chunks [bt, w_i]:

        dxhat = dxn * scale
        dx    = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))     (means over the row)
    """
    d = sum(c.shape[1] for c in dxn)
    dxhat = [g * s for g, s in zip(dxn, scale)]
    mean_dxhat = row_sum(dxhat) / d
    mean_dxhat_xhat = row_sum([g * h for g, h in zip(dxhat, xhat)]) / d
    return [rstd * (g - mean_dxhat - h * mean_dxhat_xhat) for g, h in zip(dxhat, xhat)]


@dataclasses.dataclass(frozen=True)
class Rows(kernel_config.KernelConfig):
    """A row-wise pass's token tile (the LayerNorm, its backward): a power of two."""
    block_t: int = kernel_config.tile(power_of_two=True)


def check_divides(name: str, value: int, extent: int) -> None:
    """Raise a ValueError naming the tuning parameter unless `value` divides `extent` (a
    configuration's own checks run when it is built: kernels/config.py)."""
    if extent % value:
        raise ValueError(f"layernorm_ffn: {name}={value} must divide {extent}")


def flops(tokens: int, d: int) -> int:
    """Forward FLOPs: two matmuls of 2 T d (4d) each = 16 T d^2 (the backward does twice that)."""
    return 16 * tokens * d * d


def forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, *, eps: float, residual: bool,
            config, save_residuals: bool, interpret: bool, layernorm: Callable,
            matmul: Callable, tanh: Callable):
    """The GPU backends' forward, its hidden through HBM (triton.py says why): an LN pass, then
    two GEMMs with fused epilogues, each backend bringing its kernels:

        layernorm(x, ln_scale, ln_bias, eps, config (config.ln), interpret) -> xn bf16 [T, d],
            mean, rstd
        matmul(a, b, epilogue, epilogue inputs, out shapes, b_transposed, config (config.up or
               config.down), gemm (its name), interpret) -> outputs

    x [T, d], T a multiple of every token tile -> (out [T, d] in x's dtype, Residuals or None)."""
    tokens, d = x.shape
    hidden = w_fc.shape[1]
    xn, mean, rstd = layernorm(x, ln_scale, ln_bias, eps=eps, config=config.ln,
                               interpret=interpret)
    hidden_bf16 = jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16)
    g, *gelu_grad = matmul(
        xn, w_fc.astype(jnp.bfloat16),
        functools.partial(up_epilogue, tanh=tanh, with_grad=save_residuals),
        [b_fc.astype(jnp.float32)], [hidden_bf16] * (2 if save_residuals else 1),
        b_transposed=False, config=config.up, gemm="up", interpret=interpret)
    (out,) = matmul(
        g, w_proj.astype(jnp.bfloat16), down_epilogue,
        [b_proj.astype(jnp.float32)] + ([x] if residual else []),
        [jax.ShapeDtypeStruct((tokens, d), x.dtype)],
        b_transposed=False, config=config.down, gemm="down", interpret=interpret)
    return out, (Residuals(xn, g, gelu_grad[0], mean, rstd) if save_residuals else None)
