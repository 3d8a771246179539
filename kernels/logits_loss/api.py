"""logits_loss(h, embed, targets): validation, the choice of implementation, and the custom_vjp
that joins a backend's forward(h, embed, targets, config) -> (loss, residuals) to its
backward(residuals, g) -> (dh, dembed)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels import tuning
from kernels.logits_loss import mosaic_gpu
from kernels.warp_specialized import on_sm90
from microgpt import model

_BACKENDS = {"mosaic_gpu": mosaic_gpu}
IMPLEMENTATIONS = ("reference", *_BACKENDS)


def default_implementation(h: jax.Array | None = None) -> str:
    """"mosaic_gpu" on a Hopper GPU, else "reference" (the math, which XLA fuses)."""
    return "mosaic_gpu" if jax.default_backend() == "gpu" and on_sm90() else "reference"


def logits_loss(h: jax.Array, embed: jax.Array, targets: jax.Array, *,
                implementation: str | None = None, block_sizes: dict | None = None,
                interpret: bool | None = None) -> jax.Array:
    """cross_entropy(h E^T, targets), the math of microgpt.model.tied_logits_loss.

    h [..., d] (d a multiple of 64), embed E [V, d], both floating; targets [...] int in [0, V)
    -> scalar float32, differentiable in h and embed (gradients in their dtypes).
    implementation: "reference" (model.tied_logits_loss) or "mosaic_gpu" (Hopper only; h and E
    are rounded to bf16 for the product, as by the reference's matmul); None picks by backend
    (`default_implementation`). block_sizes overrides the tuning table, e.g. {"block_n": 128}
    (names: mosaic_gpu.default_config). interpret: the kernel has no interpret mode, so True
    raises; False lowers it for its GPU from any host (for jax.export); None runs it on a GPU and
    raises elsewhere.
    """
    _check_arguments(h, embed, targets)
    implementation = implementation or default_implementation(h)
    if implementation == "reference":
        return model.tied_logits_loss(h, embed, targets)
    if implementation not in _BACKENDS:
        raise ValueError(f"unknown implementation {implementation!r}; choose one of "
                         f"{IMPLEMENTATIONS} or None")
    config = kernel_config(implementation, h.shape[-1], block_sizes)
    if interpret or (interpret is None and jax.default_backend() != "gpu"):
        raise NotImplementedError(f"the {implementation} loss head runs only on a GPU (it has no "
                                  f"interpret mode); use implementation='reference'")
    return fused(h, embed, targets, implementation=implementation, config=config)


def kernel_config(implementation: str, d: int, overrides: dict | None = None) -> dict:
    """The block sizes at width d: the tuning table's (kernels.tuning) over the defaults."""
    backend = _BACKENDS[implementation]
    config = tuning.block_config("logits_loss", implementation, f"d{d}",
                                 backend.default_config(), overrides)
    backend.check_config(config)
    return config


def fused(h, embed, targets, *, implementation: str, config: dict) -> jax.Array:
    """logits_loss by one backend with an explicit config (no dispatch): the tests call this to
    lower the kernel for CUDA, and to run it in the Mosaic GPU interpreter, on a CPU host."""
    d = h.shape[-1]
    static = _Static(implementation, tuple(sorted(config.items())))
    return _logits_loss(h.reshape(-1, d), embed, targets.reshape(-1), static)


@dataclasses.dataclass(frozen=True)
class _Static:
    implementation: str
    config: tuple


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logits_loss(h, embed, targets, static: _Static):
    return _logits_loss_fwd(h, embed, targets, static)[0]


def _logits_loss_fwd(h, embed, targets, static: _Static):
    backend = _BACKENDS[static.implementation]
    return backend.forward(h, embed, targets, config=dict(static.config))


def _logits_loss_bwd(static: _Static, residuals, g):
    return (*_BACKENDS[static.implementation].backward(residuals, g), None)


_logits_loss.defvjp(_logits_loss_fwd, _logits_loss_bwd)


def _check_arguments(h: jax.Array, embed: jax.Array, targets: jax.Array) -> None:
    """Clear errors, each naming the argument and the shape or dtype it should have."""
    if h.ndim < 1 or not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(f"h must be a floating array [..., d]; got {h.dtype}{list(h.shape)}")
    d = h.shape[-1]
    if d % 64:
        raise ValueError(f"logits_loss needs d = h.shape[-1] to be a multiple of 64 (one bf16 "
                         f"row of the kernel's 128-byte tiles); got d = {d}")
    if embed.ndim != 2 or embed.shape[1] != d or not jnp.issubdtype(embed.dtype, jnp.floating):
        raise ValueError(f"embed must be a floating [V, d] array with d = h.shape[-1] = {d}; got "
                         f"{embed.dtype}{list(embed.shape)}")
    if targets.shape != h.shape[:-1] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integers of shape h.shape[:-1] = {h.shape[:-1]}; got "
                         f"{targets.dtype}{list(targets.shape)}")
