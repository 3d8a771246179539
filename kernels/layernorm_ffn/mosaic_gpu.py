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

`matmul` is kernels/mosaic_gpu_gemm.py's persistent GEMM (its docstring has the design and the
shared memory), with this op's tiles and names.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kernels import mosaic_gpu_gemm
from kernels.layernorm_ffn import common, triton
from kernels.layernorm_ffn.common import check_divides
from kernels.mosaic_gpu_gemm import Tiles
from kernels.warp_specialized import on_sm90

TOKEN_TILES = ("ln_block_t",)   # the GEMMs pad the tokens to their own tiles
NOT_HERE = ("the mosaic_gpu LayerNorm+FFN runs only on an sm90 GPU; use implementation='triton' "
            "to interpret on CPU")


def default_config(d: int) -> dict:
    """The forward's kernels: 64 x 256 output tiles per consumer warpgroup (128 accumulator
    registers per thread; fewer columns where N needs), 3 ring stages (210 KB of shared memory
    with the epilogue buffer); the LN pass is Triton's."""
    return {"ln": triton.default_config(d)["ln"], "up": gemm_defaults(4 * d),
            "down": gemm_defaults(d)}


def gemm_defaults(n: int) -> Tiles:
    """64 rows per consumer warpgroup, the widest of 256, 128, 64 columns that divides N."""
    return Tiles(block_m=64, block_n=next(b for b in (256, 128, 64) if n % b == 0), num_stages=3)


def check_config(config, d: int) -> None:
    check_divides("up_block_n", config.up.block_n, 4 * d)
    check_divides("down_block_n", config.down.block_n, d)


def check_runs_here(interpret: bool, *arrays) -> None:
    if interpret or (jax.default_backend() == "gpu" and not on_sm90()):
        raise NotImplementedError(NOT_HERE)
    for x in arrays:
        if x.ndim == 2 and x.dtype != jnp.bfloat16:
            raise NotImplementedError(f"the mosaic_gpu LayerNorm+FFN takes bfloat16 activations; "
                                      f"got {x.dtype}")


# ------------------------------------------------------------------------------------------------
# The GEMM.

def matmul(a: jax.Array, b: jax.Array, epilogue: Callable, epilogue_inputs: Sequence[jax.Array],
           out_shape: Sequence[jax.ShapeDtypeStruct], *, b_transposed: bool, config: Tiles,
           gemm: str, interpret: bool = False) -> list[jax.Array]:
    """epilogue(A @ B), triton.matmul's contract on kernels/mosaic_gpu_gemm.py's GEMM in the
    tiles of config (gemm names the kernel): a [M, K] bf16; b [K, N], or [N, K] with b_transposed,
    bf16; epilogue inputs [N] (vectors: f32) then at most one [M, N] bf16 tile; outputs [M, N]
    bf16."""
    check_runs_here(interpret, a, *epilogue_inputs, *out_shape)
    return mosaic_gpu_gemm.matmul(a, b, epilogue, epilogue_inputs, out_shape,
                                  b_transposed=b_transposed, tiles=config,
                                  name=f"layernorm_ffn_{gemm}_mgpu")


# ------------------------------------------------------------------------------------------------
# The forward.

def forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, *, eps: float, residual: bool,
            config, save_residuals: bool, interpret: bool):
    """Triton's LN pass and this file's GEMMs (common.forward): x [T, d] bf16 -> (out [T, d],
    Residuals or None). jnp.tanh: Mosaic GPU lowers it to tanh.approx.f32 under approx_math."""
    check_runs_here(interpret, x)
    return common.forward(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, eps=eps,
                          residual=residual, config=config, save_residuals=save_residuals,
                          interpret=False, layernorm=triton.layernorm, matmul=matmul,
                          tanh=jnp.tanh)
