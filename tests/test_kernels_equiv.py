"""The bf16 equivalence suite: every kernel implementation available on this backend, forward and
gradients, against the math in microgpt/model.py (criterion in tests/equiv.py).

On CPU the kernels run in interpret mode at small sizes; on a GPU the same tests run compiled at
larger sizes (the `LARGE` cases).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.equiv import ON_CPU, assert_within_twice_reference, f32_precision, upcast

# ------------------------------------------------------------------ attention

# ------------------------------------------------------------------ layernorm_ffn
