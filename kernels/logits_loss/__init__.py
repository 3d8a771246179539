"""The loss head as one kernel op: the tied logits and the cross-entropy, forward and backward,
without ever writing the float32 logits.

    loss = mean_t [log sum_v exp(h_t . E_v) - h_t . E_target(t)]      h [T, d], E [V, d]

the math of microgpt.model.tied_logits_loss (bf16 matmul operands, f32 accumulation and softmax
statistics).  Entry point: `logits_loss` (api.py).

Cost (T tokens, vocabulary V): the logits' matmul 2 T V d FLOPs forward, twice that backward
(dh and dE).  At T = 65536, V = 9000, d = 512 that is 0.6 TFLOP per product, 0.8 ms at the H100's
778 TF/s, while every pass over the [T, V] float32 logits moves 2.4 GB, 0.8 ms at 3 TB/s.  The
XLA head makes four such passes (the GEMM writes the logits, the logsumexp and the backward read
them, the backward writes bfloat16 dlogits): more time than its matmul.

Backends:
  mosaic_gpu.py   Hopper: kernels/mosaic_gpu_gemm.py's GEMM with an epilogue that turns each logits
                  tile into softmax statistics and a bfloat16 tile of exp(logit - tile max); the
                  backward is one XLA pass plus the two gradient GEMMs (the file says why).
Elsewhere `logits_loss` runs the math (XLA).
"""
from kernels.logits_loss.api import IMPLEMENTATIONS, default_implementation, logits_loss

__all__ = ["IMPLEMENTATIONS", "default_implementation", "logits_loss"]
