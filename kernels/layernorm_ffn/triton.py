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

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import config as kernel_config
from kernels.layernorm_ffn import common
from kernels.layernorm_ffn.common import Rows, check_divides, dot, dot_t, layernorm_stats

# The parameters that tile the tokens (the token count is padded to a multiple of each).
TOKEN_TILES = ("ln_block_t", "up_block_m", "down_block_m")


@dataclasses.dataclass(frozen=True)
class Gemm(kernel_config.KernelConfig):
    """One GEMM's output tile [block_m, block_n], its K step block_k (Triton block shapes:
    powers of two >= 16), warps and software-pipeline stages."""
    block_m: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_n: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_k: int = kernel_config.tile(power_of_two=True, minimum=16)
    num_warps: int = kernel_config.count()
    num_stages: int = kernel_config.stages()


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


def compiler_params(config) -> plgpu.CompilerParams:
    """A kernel configuration's warps and stages (Gemm, triton_vjp.Weights)."""
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


# ------------------------------------------------------------------------------------------------
# The tiled GEMM every matmul of the op runs.

def _matmul_kernel(a_ref, b_ref, *refs, block_k: int, b_transposed: bool, epilogue: Callable,
                   num_inputs: int):
    def k_step(k, acc):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        a = a_ref[:, ks]
        return acc + (dot_t(a, b_ref[:, ks]) if b_transposed else dot(a, b_ref[ks, :]))

    acc = jnp.zeros((a_ref.shape[0], b_ref.shape[0] if b_transposed else b_ref.shape[1]),
                    jnp.float32)
    acc = jax.lax.fori_loop(0, a_ref.shape[1] // block_k, k_step, acc)
    inputs = [r[...][None, :] if len(r.shape) == 1 else r[...] for r in refs[:num_inputs]]
    for out_ref, out in zip(refs[num_inputs:], epilogue(acc, *inputs)):
        out_ref[...] = out.astype(out_ref.dtype)


def matmul(a: jax.Array, b: jax.Array, epilogue: Callable, epilogue_inputs: Sequence[jax.Array],
           out_shape: Sequence[jax.ShapeDtypeStruct], *, b_transposed: bool, config: Gemm,
           gemm: str, interpret: bool) -> list[jax.Array]:
    """epilogue(A @ B) over output tiles [bm, bn]: grid (M / bm, N / bn), a loop over K / bk
    (the tiles of config; gemm names the kernel).

    a [M, K]; b [K, N], or [N, K] with b_transposed (read as B^T, no copy).  Epilogue inputs are
    [M, N] (tiled like the output) or [N] (column vectors such as a bias), outputs [M, N]; the kernel
    stores epilogue(acc [bm, bn] f32, *input tiles) (common.up_epilogue, ...) into the outputs.
    """
    (m, k), n = a.shape, b.shape[0] if b_transposed else b.shape[1]
    bm, bn = config.block_m, config.block_n

    def tile(shape):
        if len(shape) == 1:
            return pl.BlockSpec((bn,), lambda i, j: (j,))
        return pl.BlockSpec((bm, bn), lambda i, j: (i, j))

    b_spec = (pl.BlockSpec((bn, k), lambda i, j: (j, 0)) if b_transposed
              else pl.BlockSpec((k, bn), lambda i, j: (0, j)))
    return pl.pallas_call(
        functools.partial(_matmul_kernel, block_k=config.block_k,
                          b_transposed=b_transposed, epilogue=epilogue,
                          num_inputs=len(epilogue_inputs)),
        grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), b_spec,
                  *(tile(x.shape) for x in epilogue_inputs)],
        out_specs=[tile(s.shape) for s in out_shape],
        out_shape=list(out_shape),
        compiler_params=compiler_params(config),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=0,
            bytes_accessed=sum(x.size * x.dtype.itemsize for x in (a, b, *epilogue_inputs))
            + sum(s.size * s.dtype.itemsize for s in out_shape)),
        interpret=interpret,
        name=f"layernorm_ffn_{gemm}",
    )(a, b, *epilogue_inputs)


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
