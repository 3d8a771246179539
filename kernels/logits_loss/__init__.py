"""The loss head as one kernel op: the tied logits and the cross-entropy, forward and backward,
without ever holding the [T, V] logits in any dtype.

    loss = sum_t w_t [log sum_v exp(h_t . E_v) - h_t . E_target(t)]      h [T, d], E [V, d]

(w = 1/N on the N tokens whose target is not ignore_index), the math of
microgpt.model.tied_logits_loss (bf16 matmul operands, f32 accumulation and softmax statistics).
Entry point: `logits_loss` (api.py); common.py holds the passes every backend shares.

Cost (T tokens, vocabulary V): four GEMMs of 2 T V d FLOPs, the forward's logits, the backward's
recompute of them, dh and dE; and no pass over a [T, V] array but the backward's bf16 chunk, one
at a time. At GPT-2's head (T = 65536, V = 50257, d = 768) that is 20.2 TFLOP and 0.2 GB of
chunk, where the stored float32 logits would be 13.2 GB.

Backends:
  mosaic_gpu.py   Hopper: both GEMMs on kernels/mosaic_gpu_gemm.py's persistent GEMM
  triton.py       any CUDA GPU: both on kernels/triton_gemm.py's tiled GEMM
  tpu.py          Mosaic TPU: tiles with the whole d in one MXU product
"""
from kernels.logits_loss.api import IMPLEMENTATIONS, default_implementation, logits_loss

__all__ = ["IMPLEMENTATIONS", "default_implementation", "logits_loss"]
