"""The public entry point: argument checks, the choice of implementation, token padding, and the
op (kernels/op.py) whose backends join a forward module (<backend>.py) to a backward module
(<backend>_vjp.py)."""
from __future__ import annotations

import dataclasses
from types import ModuleType

import jax
import jax.numpy as jnp

from kernels import op, tuning, warp_specialized
from kernels.config import Kernels
from kernels.layernorm_ffn import mosaic_gpu, mosaic_gpu_vjp, tpu, tpu_vjp, triton, triton_vjp
from microgpt import model



@dataclasses.dataclass(frozen=True)
class _Static:
    eps: float
    residual: bool
    implementation: str
    config: Kernels   # the backend's kernels' configurations (<backend>_vjp.Kernels)
    interpret: bool

    def kwargs(self) -> dict:
        return dict(residual=self.residual, config=self.config, interpret=self.interpret)


def _backend(forward_module: ModuleType, backward_module: ModuleType, platform: str) -> op.Backend:
    """forward_module.forward (x and the six parameters) joined to backward_module.backward."""
    def forward(static: _Static, x, *params, residuals: bool):
        out, saved = forward_module.forward(x, *params, eps=static.eps, save_residuals=residuals,
                                            **static.kwargs())
        return out, (x, params, saved) if residuals else None

    def backward(static: _Static, saved, dy):
        x, params, residuals = saved
        ln_scale, _, w_fc, _, w_proj, _ = params
        dx, *grads = backward_module.backward(dy, x, ln_scale, w_fc, w_proj, residuals,
                                              **static.kwargs())
        return (dx, *(g.astype(p.dtype) for g, p in zip(grads, params)))
    return op.Backend(forward, backward, platform)


# implementation -> its forward and backward modules (which own its configuration, the backward
# module its Kernels) and the platform they compile for (mosaic_gpu: Hopper, no interpret mode).
_MODULES = {"triton": (triton, triton_vjp, "gpu"), "mosaic_gpu": (mosaic_gpu, mosaic_gpu_vjp, "gpu"),
            "tpu": (tpu, tpu_vjp, "tpu")}
OP = op.Op("layernorm_ffn", model.layernorm_ffn,
           {name: _backend(*modules) for name, modules in _MODULES.items()})
IMPLEMENTATIONS = OP.implementations


def default_implementation(x: jax.Array | None = None) -> str:
    """tpu -> "tpu"; gpu -> "mosaic_gpu" for bf16 x on a Hopper GPU where the tuning table says it
    was measured faster at x's width (bench/tune.py), else "triton"; anything else (cpu) ->
    "triton" in interpret mode."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if (backend == "gpu" and x is not None and x.dtype == jnp.bfloat16
            and warp_specialized.on_sm90()
            and tuning.preferred_implementation("layernorm_ffn", f"d{x.shape[-1]}") == "mosaic_gpu"):
        return "mosaic_gpu"
    return "triton"


def layernorm_ffn(x: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array, w_fc: jax.Array,
                  b_fc: jax.Array, w_proj: jax.Array, b_proj: jax.Array, *, eps: float = model.LN_EPS,
                  residual: bool = False, implementation: str | None = None,
                  block_sizes: dict | None = None, interpret: bool | None = None) -> jax.Array:
    """[x +] gelu(LN(x) W_fc + b_fc) W_proj + b_proj, the math of microgpt.model.layernorm_ffn.

    x [..., d] (d a multiple of 128); ln_scale, ln_bias, b_proj [d]; w_fc [d, 4d]; b_fc [4d];
    w_proj [4d, d], the six parameters of one floating dtype.  LN statistics in float32, bfloat16
    matmul operands, float32 accumulation.  -> [..., d] in x's dtype, differentiable in x and all
    six parameters (gradients in their dtypes).

    implementation: "reference" (the jnp math), "triton" (Pallas on GPU via Triton), "mosaic_gpu"
    (Pallas Mosaic GPU GEMMs, Hopper only, bf16 x), "tpu" (Pallas Mosaic TPU); None picks by
    backend (`default_implementation`).  Off their own hardware the Triton and TPU kernels run in
    Pallas's interpret mode.  block_sizes overrides the tuning table (kernels.tuning), e.g.
    {"up_block_n": 256} (the flat names of <backend>_vjp.Kernels: kernels/config.py).
    interpret: run the Pallas kernels in interpret mode; None interprets exactly when the default
    backend is not the kernel's platform (False on a CPU host lowers them for their chip, for
    jax.export; mosaic_gpu has no interpret mode).
    """
    params = (ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj)
    _check_arguments(x, params)
    implementation = implementation or default_implementation(x)
    if implementation == "reference":
        return model.layernorm_ffn(x, *params, eps=eps, residual=residual)
    interpret = OP.backend(implementation).interpret(interpret)
    return fused(x, *params, eps=eps, residual=residual, implementation=implementation,
                 config=kernel_config(implementation, x.shape[-1], tokens=x.size // x.shape[-1],
                                      overrides=block_sizes),
                 interpret=interpret)


def default_config(implementation: str, d: int) -> Kernels:
    """The default configuration of every kernel of `implementation` (forward and backward) at
    width d."""
    forward_module, backward_module, _ = _MODULES[implementation]
    return backward_module.Kernels(**forward_module.default_config(d),
                                   **backward_module.default_config(d))


def kernel_config(implementation: str, d: int, tokens: int,
                  overrides: dict | None = None) -> Kernels:
    """The configuration of every kernel of `implementation` at width d, from kernels.tuning's
    table, token tiles shrunk (to powers of two >= 16) when there are fewer tokens than a tile."""
    forward_module, backward_module, _ = _MODULES[implementation]
    defaults = default_config(implementation, d)
    flat = OP.config(implementation, f"d{d}", defaults.flat(), overrides)
    cap = max(16, 1 << (tokens - 1).bit_length())
    for name in forward_module.TOKEN_TILES + backward_module.TOKEN_TILES:
        flat[name] = min(flat[name], cap)
    kernels = type(defaults).from_flat(flat, f"layernorm_ffn/{implementation}")
    forward_module.check_config(kernels, d)
    backward_module.check_config(kernels, d)
    return kernels


def fused(x, ln_scale, ln_bias, w_fc, b_fc, w_proj, b_proj, *, eps: float, residual: bool,
          implementation: str, config: Kernels, interpret: bool) -> jax.Array:
    """layernorm_ffn by one backend with explicit config and interpret flag (no dispatch): the
    lowering tests call this with interpret=False to lower GPU and TPU kernels on a CPU host."""
    forward_module, backward_module, _ = _MODULES[implementation]
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    tokens = x2.shape[0]
    flat = config.flat()
    tile = max(flat[name] for name in forward_module.TOKEN_TILES + backward_module.TOKEN_TILES)
    padded = -(-tokens // tile) * tile  # every token tile is a power of two, so divides `tile`
    static = _Static(eps, residual, implementation, config, interpret)
    # Padded rows are zeros: their LayerNorm is finite (rstd = 1/sqrt(eps)) and their cotangent,
    # the transpose of the slice below, is zero, so they add nothing to any parameter gradient.
    out = op.differentiable(OP.backend(implementation), static,
                            jnp.pad(x2, ((0, padded - tokens), (0, 0))), ln_scale, ln_bias, w_fc,
                            b_fc, w_proj, b_proj)
    return out[:tokens].reshape(x.shape)


def _check_arguments(x: jax.Array, params: tuple) -> None:
    """Clear errors, each naming the argument and the shape or dtype it should have."""
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array [..., d]; got {x.dtype}{list(x.shape)}")
    d = x.shape[-1]
    if d % 128:
        raise ValueError(f"layernorm_ffn needs d = x.shape[-1] to be a multiple of 128 (the lane "
                         f"width of the kernels' tiles); got d = {d}")
    names = ("ln_scale", "ln_bias", "w_fc", "b_fc", "w_proj", "b_proj")
    shapes = (((d,), "(d,)"), ((d,), "(d,)"), ((d, 4 * d), "(d, 4d)"), ((4 * d,), "(4d,)"),
              ((4 * d, d), "(4d, d)"), ((d,), "(d,)"))
    for name, p, (shape, formula) in zip(names, params, shapes):
        if tuple(p.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(p.shape)}; expected {formula} = {shape} "
                             f"for d = x.shape[-1] = {d} (the hidden width is 4d)")
    for name, p in zip(names, params):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            raise ValueError(f"{name} has dtype {p.dtype}; parameters must be floating point")
        if p.dtype != params[0].dtype:
            raise ValueError(f"{name} has dtype {p.dtype} but ln_scale has {params[0].dtype}; "
                             f"the six parameters must share one dtype")
