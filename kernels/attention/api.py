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
    """A backend of kernels taking (q, k, v, plan, residuals, segments) and (plan, residuals,
    do); the segment ids, when given, follow q, k, v among the op's arrays (no gradient)."""
    return op.Backend(
        lambda plan, q, k, v, *segments, residuals: forward(q, k, v, plan, residuals,
                                                            tuple(segments) or None),
        lambda plan, residuals, do: (*backward(plan, residuals, do), *[None] * (2 * plan.segments)),
        platform)


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


def default_backward(implementation: str, head_dim: int, seq_len: int,
                     documents: bool = False) -> str:
    """The backward of `implementation`'s forward: mosaic_gpu's takes the Mosaic GPU backward
    where the tuning table says it was measured faster at this head_dim and length (bench/tune.py
    records it under "attention_backward"; with grouped-query heads, segment ids and windows it
    was faster still, bench/RESULTS.md session 18), else Triton's; every other forward its own.
    documents: with segment ids (`shape_key`)."""
    if implementation != "mosaic_gpu":
        return implementation
    preferred = tuning.preferred_implementation("attention_backward",
                                                shape_key(head_dim, seq_len, documents))
    return "mosaic_gpu" if preferred == "mosaic_gpu" else "triton"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              sm_scale: float | None = None, segment_ids: jax.Array | None = None,
              local_window_size: int | tuple[int, int] | None = None,
              kv_segment_ids: jax.Array | None = None, implementation: str | None = None,
              backward_implementation: str | None = None, block_sizes: dict | None = None,
              interpret: bool | None = None) -> jax.Array:
    """softmax(sm_scale q k^T, masked) v per head, differentiable in q, k, v.

    q [B, S, Hq, D], k and v [B, S, Hkv, D] (the layout of jax.nn.dot_product_attention), Hkv
    dividing Hq: query head h attends with key/value head h // (Hq / Hkv) (grouped-query; multi-
    query when Hkv = 1), bf16 or f32; D up to 256 for the kernels, which run D = 64, 128 or 256
    and zero-pad any other D up to the next of those (common.kernel_head_dim). sm_scale defaults
    to 1/sqrt(D). Masks, which combine (microgpt.model.attention_mask):
      causal: query i sees keys j <= i;
      segment_ids [B, S] int (packed documents): query i sees keys of its own segment only
        (kv_segment_ids, default segment_ids, gives the keys' ids apart: a query whose id no key
        has outputs 0);
      local_window_size (left, right), or an int for (left, 0): keys i - left .. i + right.
    Tiles wholly masked are never computed.
    implementation: "reference" (microgpt.model.attention), "triton", "tpu" or "mosaic_gpu"
    (Hopper only, bf16; grouped-query heads, windows and segment ids); None picks by backend
    (`default_implementation`).
    backward_implementation: the gradient's kernels, one that takes the forward's residuals
    (`BACKWARDS`: after "mosaic_gpu" its own, head_dim 64 and 128, or "triton"); None picks by
    the tuning table (`default_backward`). block_sizes overrides the tuning table's entries of
    either (flat names of the backends' kernel configurations, e.g. "block_q", "dkdv_num_stages":
    kernels/config.py). interpret: run the Pallas kernels in
    interpret mode; None interprets exactly when the default backend is not the kernel's platform
    (so the kernels run on CPU).
    -> [B, S, Hq, D] in the input dtype.
    """
    window = _validate(q, k, v, segment_ids, kv_segment_ids, local_window_size)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    implementation = implementation or default_implementation(q)
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if implementation == "reference":
        return model.attention(q, k, v, causal=causal, sm_scale=sm_scale, segment_ids=segment_ids,
                               kv_segment_ids=kv_segment_ids, local_window_size=window)

    backend = OP.backend(implementation)
    seq_len, kernel_dim = q.shape[1], common.kernel_head_dim(head_dim)
    documents = segment_ids is not None
    backward = backward_implementation or default_backward(implementation, kernel_dim, seq_len,
                                                           documents)
    _check_backward(implementation, backward, kernel_dim)
    if backward != implementation:
        backend = dataclasses.replace(backend, backward=OP.backend(backward).backward)
    kernels = _kernels(implementation, backward, shape_key(kernel_dim, seq_len, documents),
                       kernel_dim, block_sizes or {})
    (forward, dkdv, dq), padded = common.fit_blocks(kernels, seq_len)
    plan = common.Plan(implementation, bool(causal), sm_scale, seq_len, forward, dkdv, dq,
                       backend.interpret(interpret), window, documents)
    if implementation == "mosaic_gpu":   # its tiles' multiple too, so its kernels pad nothing
        rows = mosaic_gpu.sequence_rows(plan)
        padded = -(-padded // rows) * rows
    # Padded keys are masked (causal: they lie above the diagonal of every real row) and padded
    # query rows are sliced off, so their cotangent is zero and they add nothing to dk and dv.
    # Padded head columns are zeros: nothing in q k^T, zero output columns, sliced off. Padded
    # segment ids repeat the last (no tile's range of segments widens).
    pad = ((0, 0), (0, padded - seq_len), (0, 0), (0, kernel_dim - head_dim))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    segments = ([jnp.pad(ids, ((0, 0), (0, padded - seq_len)), mode="edge")
                 for ids in (segment_ids, kv_segment_ids)] if documents else [])
    return op.differentiable(backend, plan, q, k, v, *segments)[:, :seq_len, :, :head_dim]


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
        raise ValueError(f"attention/{implementation} has no tuning parameter {unknown[0]!r} "
                         f"with the {backward} backward; known: "
                         f"{sorted({*forward_names, *backward_names})}")

    def configured(backend: str, names: tuple[str, ...]) -> common.Kernels:
        defaults = DEFAULTS[backend][kernel_dim]
        flat = OP.config(backend, key, defaults.flat(),
                         {n: v for n, v in overrides.items() if n in names})
        return type(defaults).from_flat(flat, f"attention/{backend}")

    if backward == implementation:
        kernels = configured(implementation, (*forward_names, *backward_names))
        return kernels.forward, kernels.dkdv, kernels.dq
    forward = configured(implementation, forward_names).forward   # first: the entry benches show
    backward_kernels = configured(backward, backward_names)
    return forward, backward_kernels.dkdv, backward_kernels.dq


def shape_key(head_dim: int, seq_len: int, documents: bool = False) -> str:
    """The tuning table's key: "d<head_dim>_s<the power of two at or above seq_len>", which falls
    back to "d<head_dim>" where no length was tuned on its own (kernels.tuning); with segment ids
    (packed documents, whose tiles hold a few keys each) "..._docs", which falls back to the
    dense keys."""
    key = f"d{head_dim}_s{1 << max(seq_len - 1, 1).bit_length()}"
    return f"{key}_docs" if documents else key


def _validate(q, k, v, segment_ids, kv_segment_ids, local_window_size):
    """One-line errors naming the argument -> the window as (left, right) or None."""
    if q.ndim != 4:
        raise ValueError(f"attention expects q, k, v of rank 4 [batch, seq, heads, head_dim]; "
                         f"got q.shape={q.shape}")
    b, s, h, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        raise ValueError(f"attention expects k and v of one shape [batch, seq, kv_heads, "
                         f"head_dim] with q's batch, seq and head_dim (self-attention); got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"attention: k's and v's heads ({k.shape[2]}) must divide q's ({h}) "
                         f"(grouped-query attention)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention expects q, k, v of one dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.dtype not in common.SUPPORTED_DTYPES:
        raise ValueError(f"attention supports dtypes {[str(d) for d in common.SUPPORTED_DTYPES]}; "
                         f"got {q.dtype}")
    for name, ids in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if ids is not None and (ids.shape != (b, s) or not jnp.issubdtype(ids.dtype, jnp.integer)):
            raise ValueError(f"attention: {name} must be integers of shape [batch, seq] = "
                             f"{(b, s)}; got {ids.dtype} {ids.shape}")
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("attention: kv_segment_ids needs segment_ids (the queries' ids)")
    if local_window_size is None:
        return None
    window = ((local_window_size, 0) if isinstance(local_window_size, int)
              else tuple(local_window_size))
    if len(window) != 2 or not all(isinstance(w, int) and w >= 0 for w in window):
        raise ValueError(f"attention: local_window_size must be an int >= 0 or a pair (left, "
                         f"right) of ints >= 0; got {local_window_size!r}")
    return window
