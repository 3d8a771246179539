"""attention(q, k, v): validation, the choice of implementation, padding, and the op (kernels/op.py)
whose backends pair each forward(q, k, v, plan, residuals) -> (o, residuals or None) with its
backward(plan, residuals, do) -> (dq, dk, dv)."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kernels import op, tuning
from kernels.attention import (common, mosaic_gpu, mosaic_gpu_vjp, tpu, tpu_vjp, triton,
                               triton_vjp)
from microgpt import model

def _backend(forward, backward, platform: str) -> op.Backend:
    """A backend of kernels taking (q, k, v, plan, residuals) and (plan, residuals, do)."""
    return op.Backend(lambda plan, q, k, v, residuals: forward(q, k, v, plan, residuals),
                      backward, platform)


OP = op.Op("attention", model.attention, {
    "triton": _backend(triton.forward, triton_vjp.backward, "gpu"),
    "tpu": _backend(tpu.forward, tpu_vjp.backward, "tpu"),
    # Hopper only, bf16, no interpret mode (off the GPU it raises); its forward saves Triton's
    # residuals, so either backward can differentiate it (BACKWARDS, default_backward).
    "mosaic_gpu": _backend(mosaic_gpu.forward, mosaic_gpu_vjp.backward, "gpu"),
})
IMPLEMENTATIONS = OP.implementations
# Each backend's default kernel configurations (a common.Kernels), per kernel head_dim.
DEFAULTS = {"triton": triton.DEFAULTS, "tpu": tpu.DEFAULTS, "mosaic_gpu": mosaic_gpu.DEFAULTS}
# The backwards that can differentiate each forward: Mosaic GPU's forward saves Triton's
# residuals, so either GPU backward takes them.
BACKWARDS = {"triton": ("triton",), "tpu": ("tpu",), "mosaic_gpu": ("mosaic_gpu", "triton")}


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


def default_backward(implementation: str, head_dim: int, seq_len: int) -> str:
    """The backward of `implementation`'s forward: mosaic_gpu's takes the Mosaic GPU backward
    where the tuning table says it was measured faster at this head_dim and length (bench/tune.py
    records it under "attention_backward"), else Triton's; every other forward its own."""
    if implementation != "mosaic_gpu":
        return implementation
    preferred = tuning.preferred_implementation("attention_backward",
                                                shape_key(head_dim, seq_len))
    return "mosaic_gpu" if preferred == "mosaic_gpu" else "triton"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              sm_scale: float | None = None, implementation: str | None = None,
              backward_implementation: str | None = None, block_sizes: dict | None = None,
              interpret: bool | None = None) -> jax.Array:
    """softmax(sm_scale q k^T [causal mask]) v per head, differentiable in q, k, v.

    q, k, v [B, S, H, D] (the layout of jax.nn.dot_product_attention), bf16 or f32, one shape;
    D up to 256 for the kernels, which run D = 64, 128 or 256 and zero-pad any other D up to the
    next of those (common.kernel_head_dim). sm_scale defaults to 1/sqrt(D).
    implementation: "reference" (microgpt.model.attention), "triton", "tpu" or "mosaic_gpu"
    (Hopper only, bf16); None picks by backend (`default_implementation`).
    backward_implementation: the gradient's kernels, one that takes the forward's residuals
    (`BACKWARDS`: after "mosaic_gpu" its own, head_dim 64 and 128, or "triton"); None picks by
    the tuning table (`default_backward`). block_sizes overrides the tuning table's entries of
    either (flat names of the backends' kernel configurations, e.g. "block_q", "dkdv_num_stages":
    kernels/config.py). interpret: run the Pallas kernels in
    interpret mode; None interprets exactly when the default backend is not the kernel's platform
    (so the kernels run on CPU).
    -> [B, S, H, D] in the input dtype.
    """
    _validate(q, k, v)
    implementation = implementation or default_implementation(q)
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if implementation == "reference":
        return model.attention(q, k, v, causal=causal, sm_scale=sm_scale)

    backend = OP.backend(implementation)
    seq_len, kernel_dim = q.shape[1], common.kernel_head_dim(head_dim)
    backward = backward_implementation or default_backward(implementation, kernel_dim, seq_len)
    _check_backward(implementation, backward, kernel_dim)
    if backward != implementation:
        backend = dataclasses.replace(backend, backward=OP.backend(backward).backward)
    kernels = _kernels(implementation, backward, shape_key(kernel_dim, seq_len), kernel_dim,
                       block_sizes or {})
    (forward, dkdv, dq), padded = common.fit_blocks(kernels, seq_len)
    plan = common.Plan(implementation, bool(causal), sm_scale, seq_len, forward, dkdv, dq,
                       backend.interpret(interpret))
    if implementation == "mosaic_gpu":   # its tiles' multiple too, so its kernels pad nothing
        rows = mosaic_gpu.sequence_rows(plan)
        padded = -(-padded // rows) * rows
    # Padded keys are masked (causal: they lie above the diagonal of every real row) and padded
    # query rows are sliced off, so their cotangent is zero and they add nothing to dk and dv.
    # Padded head columns are zeros: nothing in q k^T, zero output columns, sliced off.
    pad = ((0, 0), (0, padded - seq_len), (0, 0), (0, kernel_dim - head_dim))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    return op.differentiable(backend, plan, q, k, v)[:, :seq_len, :, :head_dim]


def _check_backward(implementation: str, backward: str, kernel_dim: int) -> None:
    if backward not in BACKWARDS[implementation]:
        raise ValueError(f"backward_implementation={backward!r} cannot differentiate the "
                         f"{implementation} forward; it takes {BACKWARDS[implementation]}")
    if backward == "mosaic_gpu" and kernel_dim not in mosaic_gpu.MOSAIC_BACKWARD_HEAD_DIMS:
        raise ValueError(f"the mosaic_gpu backward runs head_dim "
                         f"{mosaic_gpu.MOSAIC_BACKWARD_HEAD_DIMS} (its dk and dv accumulators "
                         f"would not fit a warpgroup's registers at {kernel_dim}); use "
                         f"backward_implementation='triton'")


def _kernels(implementation: str, backward: str, key: str, kernel_dim: int,
             overrides: dict) -> tuple:
    """(forward, dkdv, dq): the forward kernel's configuration from its backend's tuning entry, the
    backward kernels' from the backward backend's (the same one, or another: BACKWARDS); each
    override goes to the kernel whose flat name it is (kernels.config)."""
    forward_names = DEFAULTS[implementation][kernel_dim].names(("forward",))
    backward_names = DEFAULTS[backward][kernel_dim].names(("dkdv", "dq"))
    unknown = sorted(set(overrides) - {*forward_names, *backward_names})
    if unknown:
        raise ValueError(f"attention/{implementation} has no tuning parameter {unknown[0]!r}; "
                         f"known: {sorted({*forward_names, *backward_names})}")

    def configured(backend: str, names: tuple[str, ...]) -> common.Kernels:
        defaults = DEFAULTS[backend][kernel_dim]
        flat = OP.config(backend, key, defaults.flat(),
                         {n: v for n, v in overrides.items() if n in names})
        return type(defaults).from_flat(flat, f"attention/{backend}")

    if backward == implementation:
        kernels = configured(implementation, (*forward_names, *backward_names))
        return kernels.forward, kernels.dkdv, kernels.dq
    backward_kernels = configured(backward, backward_names)
    return (configured(implementation, forward_names).forward, backward_kernels.dkdv,
            backward_kernels.dq)


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
