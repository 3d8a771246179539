"""LayerNorm+FFN backward with the dz and dxn GEMMs in Pallas Mosaic GPU (mosaic_gpu.matmul, with
common.dz_epilogue and common.store_epilogue); the LayerNorm-backward and weight-gradient kernels
are triton_vjp.py's, whose docstring has the FLOPs and the save-or-recompute choice."""
from __future__ import annotations

from kernels.layernorm_ffn import mosaic_gpu, triton_vjp

GEMMS = ("dz", "dxn")
TOKEN_TILES = ("lnb_block_t", "dw_block_t")


def default_config(d: int) -> dict:
    """mosaic_gpu.py's GEMM defaults for dz and dxn; triton_vjp's LN-backward and weight kernels."""
    config = {name: value for name, value in triton_vjp.default_config(d).items()
              if not name.startswith(GEMMS)}
    return config | mosaic_gpu.gemm_defaults("dz", 4 * d) | mosaic_gpu.gemm_defaults("dxn", d)


def check_config(config: dict, d: int) -> None:
    triton_gemms = {name: value for name, value in triton_vjp.default_config(d).items()
                    if name.startswith(GEMMS)}
    triton_vjp.check_config({**config, **triton_gemms}, d)
    mosaic_gpu.check_gemm_config(config, "dz", 4 * d)
    mosaic_gpu.check_gemm_config(config, "dxn", d)


def backward(dy, x, ln_scale, w_fc, w_proj, residuals, *, residual: bool, config: dict,
             interpret: bool):
    """triton_vjp.backward with the Mosaic GPU GEMMs (same arguments and results)."""
    mosaic_gpu.check_runs_here(interpret, x)
    return triton_vjp.backward(dy, x, ln_scale, w_fc, w_proj, residuals, residual=residual,
                               config=config, interpret=False, matmul_fn=mosaic_gpu.matmul)
