"""The loss head on Hopper (sm90): the logits h E^T on kernels/mosaic_gpu_gemm.py's persistent
GEMM, whose epilogue reduces each logits tile to softmax statistics, so that the float32 logits
[T, V] are never written.

Forward. Per output tile s (64 token rows per consumer warpgroup, block_n vocabulary columns):

    m = max_j s_j        p_j = exp(s_j - m)        l = sum_j p_j          (f32 in registers)

p goes out in bfloat16: it lies in [0, 1], so bfloat16 keeps its relative precision however
large the logits are (rounding the logits themselves would not). m and l go out in f32, one value
per (row, column tile): [V / block_n, T]. Then XLA, on those few numbers:

    log Z  = M + log sum_tiles l exp(m - M)                  M = the row's largest m
    loss   = mean_t (log Z - h_t . E_target(t))              the target's logit as a row dot (f32)

Backward: one fused XLA pass over p, and the two gradient GEMMs of model.matmul's rule (cuBLAS):

    dlogits = g (p exp(m - log Z) - onehot(target)) / T      rounded to bfloat16
    dh = dlogits E,   dE = dlogits^T h

Bytes over [T, V] arrays: the GEMM writes 2 T V (XLA's head writes 4 T V of float32 logits); the
forward reads nothing more (XLA's logsumexp reads 4 T V); the backward reads 2 T V and writes
2 T V (XLA's reads 4 T V). The vocabulary is padded to a multiple of block_n with zero rows of E,
whose columns the epilogue sets to -inf (every tile keeps a real column, so m stays finite).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels import config, mosaic_gpu_gemm
from kernels.warp_specialized import on_sm90, pad_rows
from microgpt import model

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Kernels(config.Kernels):
    """The one kernel: the logits GEMM's tiles (flat names block_m, block_n, num_stages)."""
    forward: mosaic_gpu_gemm.Tiles


# 64 x 256 logits per consumer warpgroup (128 accumulator registers per thread), 3 stages.
DEFAULTS = Kernels(mosaic_gpu_gemm.Tiles(block_m=64, block_n=256, num_stages=3))


def check_runs_here() -> None:
    """On a GPU only Hopper (off the GPU the kernel still traces: jax.export lowers it for CUDA
    and the tests run it in the Mosaic GPU interpreter)."""
    if jax.default_backend() == "gpu" and not on_sm90():
        raise NotImplementedError("the mosaic_gpu loss head runs only on an sm90 GPU; use "
                                  "implementation='reference'")


def softmax_statistics(s, column_bias):
    """The GEMM epilogue: a logits tile s [bm, bn] f32 (+ column_bias: 0, or -inf on padded
    columns) -> (p = exp(s - m) [bm, bn], m = row max [bm], l = row sum of p [bm])."""
    s = s + column_bias
    m = s.max(axis=1)
    p = jnp.exp2(s * LOG2E - lax.broadcast_in_dim(m * LOG2E, s.shape, [0]))
    return p, m, p.sum(axis=1)


def forward(h: jax.Array, embed: jax.Array, targets: jax.Array, *, config: Kernels):
    """h [T, d], embed [V, d] (both rounded to bf16 for the product, as by model.matmul),
    targets [T] int -> (loss, residuals for `backward`)."""
    check_runs_here()
    (tokens, _), vocab = h.shape, embed.shape[0]
    tiles = config.forward
    padded = -(-vocab // tiles.block_n) * tiles.block_n
    h_bf16, e = h.astype(jnp.bfloat16), pad_rows(embed, padded, axis=0).astype(jnp.bfloat16)
    column_bias = jnp.where(jnp.arange(padded) < vocab, 0.0, -jnp.inf)
    p, m, l = mosaic_gpu_gemm.matmul(
        h_bf16, e, softmax_statistics, [column_bias],
        [jax.ShapeDtypeStruct((tokens, padded), jnp.bfloat16),
         jax.ShapeDtypeStruct((tokens,), jnp.float32), jax.ShapeDtypeStruct((tokens,), jnp.float32)],
        b_transposed=True, tiles=tiles, name="logits_loss_mgpu")
    top = m.max(axis=0)
    log_z = top + jnp.log(jnp.sum(l * jnp.exp(m - top), axis=0))
    target_logit = jnp.sum(h_bf16.astype(jnp.float32) * e[targets].astype(jnp.float32), axis=-1)
    return jnp.mean(log_z - target_logit), (h, embed, targets, p, m, log_z)


def backward(residuals, g):
    """-> (dh [T, d] in h's dtype, dE [V, d] in embed's dtype)."""
    h, embed, targets, p, m, log_z = residuals
    (tokens, padded), tiles = p.shape, m.shape[0]
    tile_scale = jnp.exp(m - log_z).T[:, :, None]   # exp(m - log Z) per (row, column tile)
    softmax = (p.reshape(tokens, tiles, padded // tiles) * tile_scale).reshape(tokens, padded)
    onehot = targets[:, None] == jnp.arange(padded)
    dlogits = (softmax - onehot) * (g / tokens)   # model.matmul's backward rounds it to bf16
    # Through model.matmul's rule on E padded in its own dtype: dE is summed in f32 and comes
    # back in E's dtype (a bf16 E operand would round the gradient to bf16). The vjp's forward
    # product is unused and XLA drops it (the H100 trace shows only the two gradient GEMMs).
    _, logits_vjp = jax.vjp(lambda h, embed: model.matmul(h, pad_rows(embed, padded, axis=0).T),
                            h, embed)
    return logits_vjp(dlogits)
