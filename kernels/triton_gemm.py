"""A tiled GEMM in Pallas on the Triton backend (GPU), with an epilogue: the GEMMs of the
LayerNorm+FFN (kernels/layernorm_ffn/triton*.py) and the loss head's logits
(kernels/logits_loss/triton.py), as kernels/mosaic_gpu_gemm.py's matmul is on Hopper.

    grid (M / bm, N / bn), a loop over K / bk:   outputs = epilogue(A @ B, *epilogue inputs)

bf16 operands, an f32 accumulator [bm, bn] of bm bn / (32 num_warps) registers per thread.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import config as kernel_config


@dataclasses.dataclass(frozen=True)
class Gemm(kernel_config.KernelConfig):
    """One GEMM's output tile [block_m, block_n], its K step block_k (Triton block shapes:
    powers of two >= 16), warps and software-pipeline stages."""
    block_m: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_n: int = kernel_config.tile(power_of_two=True, minimum=16)
    block_k: int = kernel_config.tile(power_of_two=True, minimum=16)
    num_warps: int = kernel_config.count()
    num_stages: int = kernel_config.stages()


def compiler_params(config) -> plgpu.CompilerParams:
    """A kernel configuration's warps and stages (Gemm, triton_vjp.Weights)."""
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b, float32 accumulation.  a [m, k], b [k, n] -> [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b^T, float32 accumulation.  a [m, k], b [n, k] -> [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_kernel(a_ref, b_ref, *refs, block_k: int, b_transposed: bool, epilogue: Callable,
                   num_columns: int, num_inputs: int):
    def k_step(k, acc):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        a = a_ref[:, ks]
        return acc + (dot_t(a, b_ref[:, ks]) if b_transposed else dot(a, b_ref[ks, :]))

    acc = jnp.zeros((a_ref.shape[0], b_ref.shape[0] if b_transposed else b_ref.shape[1]),
                    jnp.float32)
    acc = jax.lax.fori_loop(0, a_ref.shape[1] // block_k, k_step, acc)
    inputs = [r[...] if len(r.shape) == 2 else r[...][None, :] if i < num_columns
              else r[...][:, None] for i, r in enumerate(refs[:num_inputs])]
    for out_ref, out in zip(refs[num_inputs:], epilogue(acc, *inputs)):
        out_ref[...] = out.astype(out_ref.dtype)


def matmul(a: jax.Array, b: jax.Array, epilogue: Callable, epilogue_inputs: Sequence[jax.Array],
           out_shape: Sequence[jax.ShapeDtypeStruct], *, b_transposed: bool, config: Gemm,
           name: str, interpret: bool, row_inputs: Sequence[jax.Array] = ()) -> list[jax.Array]:
    """epilogue(A @ B) over output tiles [bm, bn]: grid (M / bm, N / bn), a loop over K / bk
    (the tiles of config; name names the kernel).

    a [M, K]; b [K, N], or [N, K] with b_transposed (read as B^T, no copy).  Epilogue inputs are
    [M, N] (tiled like the output) or [N] (column vectors such as a bias, as [1, bn]); row_inputs
    are [M] vectors (as [bm, 1]).  The kernel stores epilogue(acc [bm, bn] f32, *epilogue inputs,
    *row inputs) into the outputs: tiles (out_shape [M, N]) or per-row statistics of each tile
    (out_shape [M], returned as [N / bn, M]: one row per column tile).
    """
    (m, k), n = a.shape, b.shape[0] if b_transposed else b.shape[1]
    bm, bn = config.block_m, config.block_n

    def tile(shape):
        if len(shape) == 1:
            return pl.BlockSpec((bn,), lambda i, j: (j,))
        return pl.BlockSpec((bm, bn), lambda i, j: (i, j))

    def output(shape):
        if len(shape) == 2:
            return tile(shape), shape
        return pl.BlockSpec((None, bm), lambda i, j: (j, i)), (n // bn, m)

    out_specs, out_types = zip(*[(spec, jax.ShapeDtypeStruct(shape, s.dtype))
                                 for s in out_shape for spec, shape in [output(s.shape)]])
    b_spec = (pl.BlockSpec((bn, k), lambda i, j: (j, 0)) if b_transposed
              else pl.BlockSpec((k, bn), lambda i, j: (0, j)))
    columns = [x for x in epilogue_inputs if x.ndim == 1]
    tiles = [x for x in epilogue_inputs if x.ndim == 2]
    inputs = [*columns, *row_inputs, *tiles]
    return pl.pallas_call(
        functools.partial(_matmul_kernel, block_k=config.block_k, b_transposed=b_transposed,
                          epilogue=epilogue, num_columns=len(columns), num_inputs=len(inputs)),
        grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), b_spec,
                  *(tile(x.shape) for x in columns),
                  *(pl.BlockSpec((bm,), lambda i, j: (i,)) for _ in row_inputs),
                  *(tile(x.shape) for x in tiles)],
        out_specs=list(out_specs),
        out_shape=list(out_types),
        compiler_params=compiler_params(config),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=0,
            bytes_accessed=sum(x.size * x.dtype.itemsize for x in (a, b, *inputs))
            + sum(s.size * s.dtype.itemsize for s in out_types)),
        interpret=interpret,
        name=name,
    )(a, b, *inputs)
