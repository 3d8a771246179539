"""Fused flash attention in Pallas, forward and backward: see api.attention (causal, grouped-query
heads, segment ids, windows) and dot_product.dot_product_attention (jax.nn's signature)."""
from kernels.attention.api import IMPLEMENTATIONS, attention
from kernels.attention.dot_product import dot_product_attention

__all__ = ["IMPLEMENTATIONS", "attention", "dot_product_attention"]
