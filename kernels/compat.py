"""The one place where this project branches on the JAX version (0.10.x locally, 0.11.x on the GPU)."""
from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
