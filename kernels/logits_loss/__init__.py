"""The loss head as one kernel op: the tied logits and the cross-entropy, forward and backward,
without ever holding the [T, V] logits in any dtype.

    loss = sum_t w_t [log sum_v exp(h_t . E_v) - h_t . E_target(t)]      h [T, d], E [V, d]

(w = 1/N on the N tokens whose target is not ignore_index), the math of
microgpt.model.tied_logits_loss (bf16 matmul operands, f32 accumulation and softmax statistics).
Entry point: `logits_loss` (api.py); common.py holds the passes every backend shares.

Cost (T tokens, vocabulary V): differentiated, three GEMMs of 2 T V d FLOPs, all in the forward
(the probabilities of each chunk of tokens, dh and dE; the backward only scales them), and no
pass over a [T, V] array but one bf16 chunk at a time; the loss alone, one (the statistics). At
GPT-2's head (T = 65536, V = 50257, d = 768) that is 15.2 TFLOP and a 0.2 GB chunk, where the
stored float32 logits would be 13.2 GB.

Backends:
  mosaic_gpu.py   Hopper: both GEMMs on kernels/mosaic_gpu_gemm.py's persistent GEMM
  triton.py       any CUDA GPU: both on kernels/triton_gemm.py's tiled GEMM
                  (both GPU heads: dE's onehot term in triton_by_target.py's kernel)
  tpu.py          Mosaic TPU: tiles with the whole d in one MXU product
"""
from kernels.logits_loss.api import IMPLEMENTATIONS, default_implementation, logits_loss

__all__ = ["IMPLEMENTATIONS", "default_implementation", "logits_loss"]
