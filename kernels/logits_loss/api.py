"""logits_loss(h, embed, targets): validation, the choice of implementation, and the op
(kernels/op.py) whose backends run common.py's passes around a backend's kernels
(<backend>.statistics, <backend>.probabilities, <backend>.add_by_target) in its configuration
(<backend>.Kernels)."""
from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import jax
import jax.numpy as jnp

from kernels import op
from kernels.config import Kernels
from kernels.logits_loss import common, mosaic_gpu, tpu, triton
from kernels.warp_specialized import on_sm90
from microgpt import model


@dataclasses.dataclass(frozen=True)
class _Static:
    config: Kernels   # the backend's kernels' configurations
    ignore_index: int | None
    interpret: bool


def _backend(module: ModuleType, platform: str) -> op.Backend:
    """common.py's passes around module's kernels: the loss alone (common.forward), or, when
    differentiated, the loss and its gradient at g = 1 (common.forward_with_gradient), which the
    backward scales by g (no gradient for the targets)."""
    def kernel(fn, static: _Static):
        return functools.partial(fn, config=static.config, interpret=static.interpret)

    def forward(static: _Static, h, embed, targets, residuals: bool):
        config = static.config
        if not residuals:
            return common.forward(h, embed, targets, static.ignore_index,
                                  kernel(module.statistics, static), config.multiple), None
        padded = common.padded_vocab(embed.shape[0], config.multiple)
        chunk = common.token_chunk(h.shape[0], padded, config.chunk_rows,
                                   config.probabilities.chunk_mib)
        return common.forward_with_gradient(h, embed, targets, static.ignore_index,
                                            kernel(module.probabilities, static),
                                            kernel(module.add_by_target, static),
                                            config.multiple, chunk)

    def backward(static: _Static, gradient, g):
        return *((g * x).astype(x.dtype) for x in gradient), None
    return op.Backend(forward, backward, platform)


# implementation -> its module (kernels and configuration) and the platform it compiles for.
_MODULES = {"mosaic_gpu": (mosaic_gpu, "gpu"), "triton": (triton, "gpu"), "tpu": (tpu, "tpu")}
OP = op.Op("logits_loss", model.tied_logits_loss,
           {name: _backend(*module) for name, module in _MODULES.items()})
IMPLEMENTATIONS = OP.implementations


def default_implementation(h: jax.Array | None = None) -> str:
    """"mosaic_gpu" on a Hopper GPU, "triton" on another GPU, "tpu" on a TPU, else "reference"
    (the math, which XLA fuses: on a CPU the interpreted kernels would only be slower)."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "mosaic_gpu" if on_sm90() else "triton"
    return "tpu" if backend == "tpu" else "reference"


def logits_loss(h: jax.Array, embed: jax.Array, targets: jax.Array, *,
                ignore_index: int | None = None, implementation: str | None = None,
                block_sizes: dict | None = None, interpret: bool | None = None) -> jax.Array:
    """cross_entropy(h E^T, targets), the math of microgpt.model.tied_logits_loss, without ever
    holding the [T, V] logits (common.py says how).

    h [..., d] (d a multiple of 64), embed E [V, d] (any V), both floating; targets [...] int in
    [0, V) or equal to ignore_index, whose tokens add nothing (the mean is over the others; 0 if
    none) -> scalar float32, differentiable in h and embed (gradients in their dtypes).
    implementation: "reference" (model.tied_logits_loss), "mosaic_gpu" (Hopper only), "triton"
    (Pallas on any CUDA GPU), "tpu" (Pallas Mosaic TPU); h and E are rounded to bf16 for the
    products, as by the reference's matmul. None picks by backend (`default_implementation`).
    block_sizes overrides the tuning table, e.g. {"probabilities_chunk_mib": 64} (flat names of
    <backend>.Kernels: kernels/config.py). interpret: the Triton and TPU kernels in Pallas's
    interpret mode (None: exactly off their platform); mosaic_gpu has none, so True raises and
    False lowers it for its GPU from any host (for jax.export).
    """
    _check_arguments(h, embed, targets, ignore_index)
    implementation = implementation or default_implementation(h)
    if implementation == "reference":
        return model.tied_logits_loss(h, embed, targets, ignore_index)
    backend = OP.backend(implementation)
    config = kernel_config(implementation, h.shape[-1], block_sizes)
    if implementation == "mosaic_gpu":
        if interpret or (interpret is None and jax.default_backend() != "gpu"):
            raise NotImplementedError("the mosaic_gpu loss head runs only on a GPU (it has no "
                                      "interpret mode); use implementation='reference'")
        interpret = False
    return fused(h, embed, targets, ignore_index=ignore_index, implementation=implementation,
                 config=config, interpret=backend.interpret(interpret))


def kernel_config(implementation: str, d: int, overrides: dict | None = None):
    """The kernel configuration at width d: the tuning table's (kernels.tuning) over the
    defaults, under the overrides."""
    defaults = _MODULES[implementation][0].DEFAULTS
    config = type(defaults).from_flat(
        OP.config(implementation, f"d{d}", defaults.flat(), overrides),
        f"logits_loss/{implementation}")
    if implementation == "triton":
        triton.check_config(config, d)
    return config


def fused(h, embed, targets, *, ignore_index: int | None = None, implementation: str, config,
          interpret: bool = False) -> jax.Array:
    """logits_loss by one backend with an explicit config (no dispatch): the tests call this to
    lower the kernels for their chip, and to run them interpreted, on a CPU host."""
    d = h.shape[-1]
    return op.differentiable(OP.backend(implementation), _Static(config, ignore_index, interpret),
                             h.reshape(-1, d), embed, targets.reshape(-1))


def _check_arguments(h: jax.Array, embed: jax.Array, targets: jax.Array, ignore_index) -> None:
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
    if ignore_index is not None and (isinstance(ignore_index, bool)
                                     or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index must be an int or None; got {ignore_index!r}")
