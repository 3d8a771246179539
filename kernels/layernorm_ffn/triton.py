"""LayerNorm+FFN forward in Pallas on the Triton backend (GPU).

    LN      grid (T / ln_block_t,)       xn = LN(x) -> bf16 [T, d], mean, rstd [T, 1] f32
    up      grid (T / bm, F / bn)        z = xn W_fc + b_fc;  g = gelu(z) -> bf16 [T, F]   (+ gelu'(z))
    down    grid (T / bm, d / bn)        out = g W_proj + b_proj (+ x)

Every matmul is one tiled GEMM (`matmul`) whose epilogue holds the elementwise work, with bf16
operands and an f32 accumulator [bm, bn] of bm bn / (32 num_warps) registers per thread.

Why the hidden goes through HBM instead of streaming [bt, F] tiles into a [bt, d] accumulator:
the streamed kernel needs that f32 accumulator live across the whole F loop, bt d / (32 num_warps)
registers per thread, 128 at bt = 64, d = 512, 8 warps, plus the LN(x) operand and the GELU tile.
Compiled for sm_90a (pip Triton 3.9 + ptxas, from the TTIR Pallas emits, bt = 64) that kernel
spilled 0.3 KiB per thread at d = 512, 0.7 KiB at d = 768 and 3.7 KiB at d = 1024 for every
block_f in {16, 32, 64}, 8 or 16 warps, 2 or 3 stages, and ptxas serialized its wgmma; even with
LN(x) read from HBM (wgmma then takes it from shared memory) d = 768 spilled 0.4 KiB and d = 1024
2 KiB.  The GEMMs below compile without spills at every d.  The price is writing g (8 T d bytes) and
reading it back, 0.36 ms at T = 131072, d = 512 against 0.71 ms of matmul at 778 TF/s, overlapped
with the compute-bound GEMMs; and g is written anyway when the backward needs it (triton_vjp.py).
LayerNorm is its own memory-bound pass (4 T d bytes, 0.09 ms there): normalizing inside the up
GEMM would redo it for each of the F / bn column tiles.  FLOPs, bytes and floors: __init__.py.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import triton_gemm
from kernels.layernorm_ffn import common
from kernels.layernorm_ffn.common import Rows, check_divides, layernorm_stats
from kernels.triton_gemm import Gemm

# The parameters that tile the tokens (the token count is padded to a multiple of each).
TOKEN_TILES = ("ln_block_t", "up_block_m", "down_block_m")


def default_config(d: int) -> dict:
    """The forward's kernels: 128 x 128 x 64 GEMM tiles, 8 warps, 3 stages (32 KiB of shared
    memory per stage, 64 accumulator registers per thread), checked spill-free with ptxas for
    sm_90a; LN programs of about 4096 / d rows, a power of two (memory-bound: small tiles, many
    programs)."""
    gemm = Gemm(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return {"ln": Rows(1 << max(3, (4096 // d).bit_length() - 1)), "up": gemm, "down": gemm}


def check_gemm(gemm: Gemm, name: str, n: int, k: int) -> None:
    """The GEMM's tiles against its N and K."""
    check_divides(f"{name}_block_n", gemm.block_n, n)
    check_divides(f"{name}_block_k", gemm.block_k, k)


def check_config(config, d: int) -> None:
    check_gemm(config.up, "up", 4 * d, d)
    check_gemm(config.down, "down", d, 4 * d)


def column_chunks(d: int) -> list[pl.Slice]:
    """d split into slices of the largest power of two dividing d (d = 768 -> 3 x 256): Triton
    tensors must have power-of-two sizes."""
    width = d & -d
    return [pl.ds(start, width) for start in range(0, d, width)]


def tanh_for(interpret: bool):
    """The GPU's tanh.approx.f32 (one MUFU op, error 2^-11, below bf16's 2^-8 rounding of g), or
    jnp.tanh in interpret mode, which cannot run inline PTX."""
    return jnp.tanh if interpret else plgpu.approx_tanh


def matmul(a: jax.Array, b: jax.Array, epilogue: Callable, epilogue_inputs: Sequence[jax.Array],
           out_shape: Sequence[jax.ShapeDtypeStruct], *, b_transposed: bool, config: Gemm,
           gemm: str, interpret: bool) -> list[jax.Array]:
    """epilogue(A @ B) on kernels/triton_gemm.py's tiled GEMM (its contract), the kernel named
    after the op's GEMM (gemm: "up", "down", ...)."""
    return triton_gemm.matmul(a, b, epilogue, epilogue_inputs, out_shape,
                              b_transposed=b_transposed, config=config,
                              name=f"layernorm_ffn_{gemm}", interpret=interpret)


# ------------------------------------------------------------------------------------------------
# The forward.

def _layernorm_kernel(x_ref, scale_ref, bias_ref, xn_ref, mean_ref, rstd_ref, *, eps: float):
    cols = column_chunks(x_ref.shape[1])
    x = [x_ref[:, c].astype(jnp.float32) for c in cols]
    mean, rstd = layernorm_stats(x, eps)
    for xc, c in zip(x, cols):
        xn_ref[:, c] = ((xc - mean) * rstd * scale_ref[c][None, :]
                        + bias_ref[c][None, :]).astype(xn_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def layernorm(x, scale, bias, *, eps: float, config: Rows, interpret: bool):
    """x [T, d] -> LN(x) bf16 [T, d], mean [T, 1] f32, rstd [T, 1] f32, in tiles of config."""
    (tokens, d), bt = x.shape, config.block_t
    rows = lambda width: pl.BlockSpec((bt, width), lambda i: (i, 0))
    vector = pl.BlockSpec((d,), lambda i: (0,))
    stat = jax.ShapeDtypeStruct((tokens, 1), jnp.float32)
    return pl.pallas_call(
        functools.partial(_layernorm_kernel, eps=eps),
        grid=(tokens // bt,),
        in_specs=[rows(d), vector, vector],
        out_specs=[rows(d), rows(1), rows(1)],
        out_shape=[jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16), stat, stat],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="layernorm_ffn_layernorm",
    )(x, scale.astype(jnp.float32), bias.astype(jnp.float32))


def forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, *, eps: float, residual: bool,
            config, save_residuals: bool, interpret: bool):
    """x [T, d], T a multiple of every token tile -> (out [T, d] in x's dtype, Residuals or None):
    the LN pass and this file's two GEMMs (common.forward), config a triton_vjp.Kernels."""
    return common.forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, eps=eps,
                          residual=residual, config=config, save_residuals=save_residuals,
                          interpret=interpret, layernorm=layernorm, matmul=matmul,
                          tanh=tanh_for(interpret))
