"""logits_loss(h, embed, targets): validation, the choice of implementation, and the op
(kernels/op.py) whose backend joins a forward(h, embed, targets, config) -> (loss, residuals) to
its backward(residuals, g) -> (dh, dembed); config, the static argument, is the backend's kernel
configuration (<backend>.Kernels)."""
from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp

from kernels import op
from kernels.logits_loss import mosaic_gpu
from kernels.warp_specialized import on_sm90
from microgpt import model


def _backend(module: ModuleType) -> op.Backend:
    """module.forward(h, embed, targets, config) joined to module.backward (no gradient for the
    integer targets)."""
    def forward(config, h, embed, targets, residuals: bool):
        loss, saved = module.forward(h, embed, targets, config=config)
        return loss, saved if residuals else None
    return op.Backend(forward, lambda config, saved, g: (*module.backward(saved, g), None), "gpu")


_MODULES = {"mosaic_gpu": mosaic_gpu}   # implementation -> its module (kernels and configuration)
OP = op.Op("logits_loss", model.tied_logits_loss,
           {name: _backend(module) for name, module in _MODULES.items()})
IMPLEMENTATIONS = OP.implementations


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
    (flat names of mosaic_gpu.Kernels: kernels/config.py). interpret: the kernel has no interpret mode, so True
    raises; False lowers it for its GPU from any host (for jax.export); None runs it on a GPU and
    raises elsewhere.
    """
    _check_arguments(h, embed, targets)
    implementation = implementation or default_implementation(h)
    if implementation == "reference":
        return model.tied_logits_loss(h, embed, targets)
    OP.backend(implementation)
    config = kernel_config(implementation, h.shape[-1], block_sizes)
    if interpret or (interpret is None and jax.default_backend() != "gpu"):
        raise NotImplementedError(f"the {implementation} loss head runs only on a GPU (it has no "
                                  f"interpret mode); use implementation='reference'")
    return fused(h, embed, targets, implementation=implementation, config=config)


def kernel_config(implementation: str, d: int, overrides: dict | None = None):
    """The kernel configuration at width d: the tuning table's (kernels.tuning) over the
    defaults, under the overrides."""
    defaults = _MODULES[implementation].DEFAULTS
    return type(defaults).from_flat(OP.config(implementation, f"d{d}", defaults.flat(), overrides),
                                    f"logits_loss/{implementation}")


def fused(h, embed, targets, *, implementation: str, config) -> jax.Array:
    """logits_loss by one backend with an explicit config (no dispatch): the tests call this to
    lower the kernel for CUDA, and to run it in the Mosaic GPU interpreter, on a CPU host."""
    d = h.shape[-1]
    return op.differentiable(OP.backend(implementation), config, h.reshape(-1, d), embed,
                             targets.reshape(-1))


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
