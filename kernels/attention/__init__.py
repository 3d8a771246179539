"""Fused causal flash attention in Pallas, forward and backward: see api.attention."""
from kernels.attention.api import IMPLEMENTATIONS, attention

__all__ = ["IMPLEMENTATIONS", "attention"]
