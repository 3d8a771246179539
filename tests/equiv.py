"""The equivalence criterion shared by every kernel test (the FlashAttention test suite's).

A kernel run in bf16 passes when its error against a float32 computation of the same math is at most
twice the error of the jnp math reference run in bf16, plus a small absolute slack:

    max|kernel_bf16 - ref_f32| <= 2 * max|ref_bf16 - ref_f32| + atol

atol is 1e-3, or for attention FlashAttention-3's (hopper/test_flash_attn.py): twice the largest
rounding error of bf16 at the output's magnitude (`bf16_resolution`), which keeps a tiny case
(two keys, a few hundred outputs), where the bf16 reference can be luckier than an ulp, from
failing a kernel that is one ulp off.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ON_CPU = jax.default_backend() == "cpu"


def f32_precision():
    """Full float32 matmuls for the 'true' answer (GPUs would otherwise use tf32)."""
    return jax.default_matmul_precision("highest")


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def assert_within_twice_reference(name: str, kernel_out, ref_bf16_out, ref_f32_out,
                                  atol: float = 1e-3) -> None:
    """The criterion above, with a message that shows all three errors; NaN never passes."""
    kernel = np.asarray(jnp.asarray(kernel_out, jnp.float32))
    assert np.all(np.isfinite(kernel)), f"{name}: kernel output has NaN/inf"
    kernel_err = max_err(kernel_out, ref_f32_out)
    ref_err = max_err(ref_bf16_out, ref_f32_out)
    assert kernel_err <= 2 * ref_err + atol, (
        f"{name}: kernel error {kernel_err:.3g} > 2 x bf16-reference error {ref_err:.3g} + {atol:g}")


def bf16_resolution(ref_f32_out) -> float:
    """FlashAttention-3's atol: 2 max|(r + 0.3) - 0.3 - r| in bf16 arithmetic, r the exact answer
    rounded to bf16: about twice bf16's half-ulp at |r| + 0.3 (0.0078 for outputs near 1)."""
    r = jnp.asarray(ref_f32_out, jnp.float32).astype(jnp.bfloat16)
    return 2 * max_err(r + 0.3 - 0.3, r)


def lnffn_params(key, d, dtype=jnp.float32):
    """The six parameters at the scales of a trained block (GPT-2 init plus some spread)."""
    k = jax.random.split(key, 6)
    normal = lambda i, shape, scale: scale * jax.random.normal(k[i], shape, jnp.float32)
    return tuple(p.astype(dtype) for p in (
        1.0 + normal(0, (d,), 0.1), normal(1, (d,), 0.1), normal(2, (d, 4 * d), 0.02),
        normal(3, (4 * d,), 0.02), normal(4, (4 * d, d), 0.02), normal(5, (d,), 0.02)))


def upcast(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree)

