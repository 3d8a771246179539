"""LayerNorm+FFN backward with its GEMMs in Pallas Mosaic GPU: dz and dxn on mosaic_gpu.matmul
(with common.dz_epilogue and common.store_epilogue), the weight gradients on
mosaic_gpu_gemm.matmul_split_k; the LayerNorm-backward kernel is triton_vjp.py's, whose docstring
has the FLOPs and the save-or-recompute choice.

The weight gradients are sums over the T token rows, 8 T d^2 FLOPs each: dW_proj = g^T dy, and
dW_fc^T = dz^T xn with db_fc = dz^T 1 (the split-K GEMM's row sums). The output is small and the
contraction long, so the GEMM splits the tokens into chunks and adds each chunk's f32 tile into
the output by TMA reduce-add: the last bits of the weight gradients vary from run to run
(mosaic_gpu_gemm.py's docstring says why). With `dw_xla` the three come from XLA's GEMMs
(cuBLAS) instead, a tuning choice: which is faster depends on the device and d.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from kernels import config as kernel_config
from kernels import mosaic_gpu_gemm
from kernels.layernorm_ffn import mosaic_gpu, triton_vjp
from kernels.layernorm_ffn.common import Rows, check_divides
from kernels.mosaic_gpu_gemm import Tiles
from kernels.warp_specialized import CONSUMERS

TOKEN_TILES = ("lnb_block_t",)


@dataclasses.dataclass(frozen=True)
class WeightTiles(Tiles):
    """The split-K weight-gradient GEMM's tiles; xla: XLA's GEMMs in its place."""
    xla: bool = kernel_config.flag()


@dataclasses.dataclass(frozen=True)
class Kernels(kernel_config.Kernels):
    """The Mosaic GPU backend's kernels: the forward's (mosaic_gpu.py) and the backward's, every
    GEMM (dw: the split-K weight gradients) in mosaic_gpu_gemm.Tiles; the LayerNorm passes
    are Triton's."""
    ln: Rows
    up: Tiles
    down: Tiles
    lnb: Rows
    dz: Tiles
    dxn: Tiles
    dw: WeightTiles


def default_config(d: int) -> dict:
    """The backward's kernels: mosaic_gpu.py's GEMM defaults for dz and dxn; 128 x 128 weight
    tiles per consumer warpgroup, 3 stages, by the Pallas kernel; triton_vjp's LayerNorm-backward
    rows."""
    return {"lnb": triton_vjp.default_config(d)["lnb"], "dz": mosaic_gpu.gemm_defaults(4 * d),
            "dxn": mosaic_gpu.gemm_defaults(d),
            "dw": WeightTiles(block_m=128, block_n=128, num_stages=3, xla=False)}


def check_config(config: Kernels, d: int) -> None:
    triton_vjp.check_layernorm_rows(config)
    check_divides("dz_block_n", config.dz.block_n, 4 * d)
    check_divides("dxn_block_n", config.dxn.block_n, d)
    check_divides("dw_block_n", config.dw.block_n, d)
    check_divides(f"dw_block_m ({CONSUMERS} warpgroups' rows)", CONSUMERS * config.dw.block_m,
                  4 * d)


def _weight_gradients(g, dy, dz, xn, *, config, interpret):
    """triton_vjp._weight_gradients' contract: dW_proj [F, d], dW_fc [d, F], db_fc [F], f32."""
    del interpret   # checked by backward
    if config.dw.xla:
        f32 = jnp.float32
        return (jnp.einsum("tf,td->fd", g, dy, preferred_element_type=f32),
                jnp.einsum("td,tf->df", xn, dz, preferred_element_type=f32),
                jnp.sum(dz, axis=0, dtype=f32))
    gradient = functools.partial(mosaic_gpu_gemm.matmul_split_k, a_transposed=True,
                                 b_transposed=False, tiles=config.dw,
                                 name="layernorm_ffn_weights_bwd_mgpu")
    dw_proj, _ = gradient(g, dy)
    dw_fc_t, db_fc = gradient(dz, xn, row_sums=True)
    return dw_proj, dw_fc_t.T, db_fc


def backward(dy, x, ln_scale, w_fc, w_proj, residuals, *, residual: bool, config: Kernels,
             interpret: bool):
    """triton_vjp.backward with the Mosaic GPU GEMMs (same arguments and results)."""
    mosaic_gpu.check_runs_here(interpret, x)
    return triton_vjp.backward(dy, x, ln_scale, w_fc, w_proj, residuals, residual=residual,
                               config=config, interpret=False, matmul_fn=mosaic_gpu.matmul,
                               weight_gradients_fn=_weight_gradients)
