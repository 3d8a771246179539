"""attention(q, k, v): validation, the choice of implementation, and the custom_vjp every kernel
implementation shares: forward(q, k, v, plan, residuals) -> (o, residuals or None) and
backward(plan, residuals, do) -> (dq, dk, dv)."""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kernels import tuning
from kernels.attention import (common, mosaic_gpu, mosaic_gpu_vjp, tpu, tpu_vjp, triton,
                               triton_vjp)
from microgpt import model

class Backend(NamedTuple):
    defaults: dict[int, dict]   # head_dim -> tuning configuration
    forward: Callable           # (q, k, v, plan, residuals) -> (o, residuals or None)
    backward: Callable          # (plan, residuals, do) -> (dq, dk, dv)
    platform: str               # the jax backend it compiles for; interpreted elsewhere


BACKENDS = {
    "triton": Backend(triton.DEFAULTS, triton.forward, triton_vjp.backward, "gpu"),
    "tpu": Backend(tpu.DEFAULTS, tpu.forward, tpu_vjp.backward, "tpu"),
    # Hopper only, bf16, no interpret mode (off the GPU it raises); its forward saves Triton's
    # residuals, so either backward can differentiate it (mosaic_gpu_vjp picks by the tuning).
    "mosaic_gpu": Backend(mosaic_gpu.DEFAULTS, mosaic_gpu.forward, mosaic_gpu_vjp.backward, "gpu"),
}
IMPLEMENTATIONS = ("reference", *BACKENDS)


def default_implementation(q: jax.Array | None = None) -> str:
    """tpu -> "tpu"; gpu -> "mosaic_gpu" for bf16 q on a Hopper GPU where the tuning table says it
    was measured faster at q's head_dim and length (bench/tune.py; `shape_key`), else "triton";
    anything else -> "triton" (interpreted)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if (backend == "gpu" and q is not None and q.dtype == jnp.bfloat16 and mosaic_gpu.on_sm90()
            and tuning.preferred_implementation(
                "attention", shape_key(common.kernel_head_dim(q.shape[-1]), q.shape[1]))
            == "mosaic_gpu"):
        return "mosaic_gpu"
    return "triton"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              sm_scale: float | None = None, implementation: str | None = None,
              block_sizes: dict | None = None, interpret: bool | None = None) -> jax.Array:
    """softmax(sm_scale q k^T [causal mask]) v per head, differentiable in q, k, v.

    q, k, v [B, S, H, D] (the layout of jax.nn.dot_product_attention), bf16 or f32, one shape;
    D up to 256 for the kernels, which run D = 64, 128 or 256 and zero-pad any other D up to the
    next of those (common.kernel_head_dim). sm_scale defaults to 1/sqrt(D).
    implementation: "reference" (microgpt.model.attention), "triton", "tpu" or "mosaic_gpu"
    (Hopper only, bf16); None picks by backend (`default_implementation`). block_sizes overrides
    the tuning table's entries (names: the keys of the backend's DEFAULTS). interpret: run the
    Pallas kernel in interpret mode; None interprets
    exactly when the default backend is not the kernel's platform (so the kernels run on CPU).
    -> [B, S, H, D] in the input dtype.
    """
    _validate(q, k, v)
    implementation = implementation or default_implementation(q)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"known: {IMPLEMENTATIONS}")
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if implementation == "reference":
        return model.attention(q, k, v, causal=causal, sm_scale=sm_scale)

    backend = BACKENDS[implementation]
    seq_len, kernel_dim = q.shape[1], common.kernel_head_dim(head_dim)
    config = tuning.block_config("attention", implementation, shape_key(kernel_dim, seq_len),
                                 backend.defaults[kernel_dim], block_sizes)
    config, padded = common.fit_blocks(config, common.BLOCKS, seq_len)
    if interpret is None:
        interpret = jax.default_backend() != backend.platform
    plan = common.Plan(implementation, bool(causal), sm_scale, seq_len,
                       tuple(sorted(config.items())), bool(interpret))
    # Padded keys are masked (causal: they lie above the diagonal of every real row) and padded
    # query rows are sliced off, so their cotangent is zero and they add nothing to dk and dv.
    # Padded head columns are zeros: nothing in q k^T, zero output columns, sliced off.
    pad = ((0, 0), (0, padded - seq_len), (0, 0), (0, kernel_dim - head_dim))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    return _attention(q, k, v, plan)[:, :seq_len, :, :head_dim]


def shape_key(head_dim: int, seq_len: int) -> str:
    """The tuning table's key: "d<head_dim>_s<the power of two at or above seq_len>", which falls
    back to "d<head_dim>" where no length was tuned on its own (kernels.tuning)."""
    return f"d{head_dim}_s{1 << max(seq_len - 1, 1).bit_length()}"


def _validate(q, k, v) -> None:
    if q.ndim != 4:
        raise ValueError(f"attention expects q, k, v of rank 4 [batch, seq, heads, head_dim]; "
                         f"got q.shape={q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of one shape [batch, seq, heads, head_dim] "
                         f"(self-attention: the same seq); got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention expects q, k, v of one dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.dtype not in common.SUPPORTED_DTYPES:
        raise ValueError(f"attention supports dtypes {[str(d) for d in common.SUPPORTED_DTYPES]}; "
                         f"got {q.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, plan: common.Plan):
    return BACKENDS[plan.implementation].forward(q, k, v, plan, residuals=False)[0]


def _forward(q, k, v, plan):
    return BACKENDS[plan.implementation].forward(q, k, v, plan, residuals=True)


def _backward(plan, residuals, do):
    return BACKENDS[plan.implementation].backward(plan, residuals, do)


_attention.defvjp(_forward, _backward)
