"""What every kernel op shares: its implementations (the math and the backends), a backend's pair of
forward and backward kernels, interpret mode, the tuning lookup, and the one custom_vjp that joins
a backend's forward to its backward.

An op (kernels/<op>/api.py) is an `Op`: its name in the tuning table, its reference math and its
backends. A `Backend` is

    forward(static, *arrays, residuals: bool) -> (out, residuals or None)
    backward(static, residuals, g) -> one gradient per array (None for an integer one)

with `static` the call's hashable configuration (the op's own: shapes, flags, the tuned blocks)
and the platform its kernels compile for; `differentiable(backend, static, *arrays)` is the op.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from kernels import tuning


@dataclasses.dataclass(frozen=True)
class Backend:
    forward: Callable     # (static, *arrays, residuals) -> (out, residuals or None)
    backward: Callable    # (static, residuals, g) -> gradients
    platform: str         # the jax backend its kernels compile for ("gpu", "tpu"); elsewhere
                          # they run in Pallas's interpret mode, or (Mosaic GPU) refuse to

    def interpret(self, asked: bool | None) -> bool:
        """Interpret mode: as asked, or (None) exactly when this host is not the platform."""
        return jax.default_backend() != self.platform if asked is None else bool(asked)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str                      # the tuning table's op name
    reference: Callable            # the math (microgpt/model.py)
    backends: dict[str, Backend]

    @property
    def implementations(self) -> tuple[str, ...]:
        return ("reference", *self.backends)

    def backend(self, implementation: str) -> Backend:
        """The backend of that name; a one-line error naming the known ones otherwise."""
        if implementation not in self.backends:
            raise ValueError(f"unknown {self.name} implementation {implementation!r}; known: "
                             f"{self.implementations} or None")
        return self.backends[implementation]

    def config(self, implementation: str, shape_key: str, defaults: dict,
               overrides: dict | None = None) -> dict:
        """The tuning table's entry for this implementation at shape_key over `defaults`, under
        the caller's overrides (kernels.tuning.block_config)."""
        return tuning.block_config(self.name, implementation, shape_key, defaults, overrides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _differentiable(backend: Backend, static, *arrays):
    return backend.forward(static, *arrays, residuals=False)[0]


def _forward(backend: Backend, static, *arrays):
    return backend.forward(static, *arrays, residuals=True)


def _backward(backend: Backend, static, residuals, g):
    return tuple(backend.backward(static, residuals, g))


_differentiable.defvjp(_forward, _backward)
# backend.forward's output, differentiated by backend.backward. Jitted so that a model calling the
# op once a layer traces and lowers its kernels once, not once a call: Mosaic GPU lowers each
# kernel in Python, seconds apiece on JAX 0.11 (bench/RESULTS.md, session 17).
differentiable = jax.jit(_differentiable, static_argnums=(0, 1))
