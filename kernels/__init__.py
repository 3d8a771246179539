"""Hand-written Pallas kernels for the two fused ops of a GPT block and for its loss head, forward
and backward.

Each op has one entry point with an `implementation=` switch ("reference", "triton", "tpu", ...),
chosen by backend when None; see kernels/<op>/api.py. dot_product_attention takes
jax.nn.dot_product_attention's arguments.
"""
from kernels.attention import attention, dot_product_attention
from kernels.layernorm_ffn import layernorm_ffn
from kernels.logits_loss import logits_loss

__all__ = ["attention", "dot_product_attention", "layernorm_ffn", "logits_loss"]
