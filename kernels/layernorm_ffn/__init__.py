"""Fused LayerNorm + FFN, forward and backward, as Pallas kernels for GPU (Triton) and TPU (Mosaic).

    out = [x +] gelu(LN(x) W_fc + b_fc) W_proj + b_proj        x [T, d], W_fc [d, 4d], W_proj [4d, d]

the math of microgpt.model.layernorm_ffn: LN statistics in f32, bf16 matmul operands, f32
accumulation, output in x's dtype.  Entry point: `layernorm_ffn` (api.py).

Cost (T tokens, F = 4d hidden):
  forward    2 matmuls of 2 T d F = 16 T d^2 FLOPs; HBM at least x in + out (4 T d bytes, bf16) plus
             weights (16 d^2); a training forward also writes the residuals, 16 T d bytes of g and
             gelu'(z) and 2 T d of LN(x).
  backward   4 matmuls = 32 T d^2 FLOPs (dz, dLN(x), dW_fc, dW_proj); forward + backward 48 T d^2.
  Floor on the H100 (bf16 matmul 778 TF/s measured, copy 3.0 TB/s) at T = 131072, d = 512:
             forward 5.5e11 FLOPs = 0.71 ms of matmul vs 0.27 GB = 0.09 ms of x/out traffic, so
             compute-bound; its training residuals (1.2 GB, 0.4 ms) overlap the matmuls.
             Forward + backward 1.65e12 FLOPs = 2.12 ms (XLA: 1.36 ms and 2.93 ms).

Backends (each file's docstring has its kernels and the reasons):
  triton.py / triton_vjp.py  GPU: LN pass + 2 GEMMs with fused epilogues (bias, GELU and gelu',
                             bias + residual); backward dz and dLN(x) GEMMs, an LN-backward pass and
                             one weight-gradient kernel.  The hidden goes through HBM: a [bt, d] f32
                             accumulator streamed over F does not fit an H100's registers.
  mosaic_gpu.py / _vjp.py    Hopper: the same decomposition with the up, down, dz and dxn GEMMs and
                             the weight gradients as persistent warp-specialized Mosaic GPU kernels
                             (TMA + wgmma); the LN passes are Triton's.
  tpu.py / tpu_vjp.py        TPU: one fused forward (hidden streamed through VMEM), a fused dx
                             kernel and two weight-gradient kernels.
  Both save g, gelu'(z) and LN(x) for the backward rather than recompute (triton_vjp.py says why).
"""
from kernels.layernorm_ffn.api import IMPLEMENTATIONS, default_implementation, layernorm_ffn

__all__ = ["IMPLEMENTATIONS", "default_implementation", "layernorm_ffn"]
