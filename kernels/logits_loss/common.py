"""What the loss head's backends share: the math of one logits tile, and the passes around the
kernels, which never hold the [T, V] logits in any dtype.

A backend (mosaic_gpu.py, triton.py, tpu.py) brings two GEMMs over logits tiles
s = h[rows] E[cols]^T [bt, bv] (bf16 operands, f32 accumulation), each with an epilogue here:

    statistics(h, e, column_bias)          -> m, l [V' / bv, T]     `tile_statistics`
    dlogits(h_c, e, columns, log_z,        -> ds [C, V'] bf16       `tile_dlogits`
            targets, scales)

with E padded to V' columns (zero rows; column_bias puts -inf on their logits, so that they add
nothing to log Z; their ds, which meets E's zero rows in ds E and lands in dE's padding, is
left as it comes). Around them, XLA:

    forward   log Z = M + log sum_tiles l exp(m - M)   (M: the row's largest m)
              loss  = sum_t w_t (log Z_t - h_t . E_target(t))      w = model.target_weights
    backward  for each chunk of C tokens (lax.scan; the last chunk padded with weight-0 rows):
                ds   = (exp(s - log Z) - onehot(target)) w g       bf16 [C, V'], by the kernel
                dh_c = ds E          dE += ds^T h_c                f32 GEMMs (XLA's)

Four GEMMs of 2 T V d FLOPs (the forward, the backward's recompute, dh, dE) against the stored
logits' three, and of the [T, V] array only one chunk [C, V'] in bf16 at a time: C is the largest
power of two times the kernel's row tile whose chunk fits `chunk_mib` (256 MiB: C = 2048 at GPT-2's
V = 50257). Deterministic: every sum runs in a fixed order (the chunks' dE in sequence).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from kernels import config
from kernels.warp_specialized import pad_rows
from microgpt import model

LOG2E = math.log2(math.e)
MIN_MAX = -1e30   # a row maximum's floor: exp(-inf - MIN_MAX) = 0, where -inf - -inf is NaN


@dataclasses.dataclass(frozen=True)
class Kernels(config.Kernels):
    """A backend's two GEMMs, `forward` (the statistics) and `dlogits` (with its chunk_mib); the
    subclass names the fields that tile the vocabulary and the tokens."""
    VOCAB_TILE: ClassVar[str] = "block_n"
    TOKEN_TILE: ClassVar[str] = "block_m"
    TOKEN_TILES_PER_CHUNK_ROW: ClassVar[int] = 1   # token tiles a program covers

    @property
    def multiple(self) -> int:
        """V is padded to a multiple of both GEMMs' vocabulary tiles."""
        return math.lcm(getattr(self.forward, self.VOCAB_TILE),
                        getattr(self.dlogits, self.VOCAB_TILE))

    @property
    def chunk_rows(self) -> int:
        """The backward's chunk is a multiple of the dlogits GEMM's token rows."""
        return self.TOKEN_TILES_PER_CHUNK_ROW * getattr(self.dlogits, self.TOKEN_TILE)


def tile_statistics(s, column_bias):
    """A logits tile s [bt, bv] f32 (+ column_bias: 0, or -inf on padded columns) -> (m = row
    max [bt], l = row sum of exp(s - m) [bt]). A tile of padding only (V' pads V to the lcm of
    two tiles) has m = MIN_MAX and l = 0, so it adds nothing to log Z."""
    s = s + column_bias
    m = jnp.maximum(s.max(axis=1), MIN_MAX)
    p = jnp.exp2(s * LOG2E - lax.broadcast_in_dim(m * LOG2E, s.shape, [0]))
    return m, p.sum(axis=1)


def tile_dlogits(s, columns, log_z, targets, scales):
    """dlogits of a logits tile: (softmax - onehot(target)) * scale, rounded to bf16.
    s [bt, bv] f32; columns (the column's index, f32) per column, log_z, targets (f32) and scales
    (g w) per row, each broadcastable to s. One column vector only: on Hopper a column vector
    takes 64 registers a thread beside the 128 of a 64 x 256 accumulator, and a second one would
    spill."""
    p = jnp.exp2(s * LOG2E - log_z * LOG2E)
    return ((p - (columns == targets).astype(jnp.float32)) * scales).astype(jnp.bfloat16)


def padded_vocab(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def column_bias(vocab: int, padded: int) -> jax.Array:
    """[V'] f32: 0 on the vocabulary, -inf on padding."""
    return jnp.where(jnp.arange(padded) < vocab, 0.0, -jnp.inf)


def token_chunk(tokens: int, padded: int, rows: int, chunk_mib: int) -> int:
    """The backward's chunk C: rows times the largest power of two with C V' bf16 <= chunk_mib
    MiB (at least rows), no larger than the tokens need."""
    chunk = rows
    while 2 * chunk * padded * 2 <= chunk_mib << 20 and chunk < tokens:
        chunk *= 2
    return min(chunk, -(-tokens // rows) * rows)


def forward(h, embed, targets, ignore_index, statistics, multiple: int):
    """h [T, d], embed [V, d], targets [T] -> (loss, residuals); statistics(h, e, column_bias)
    -> (m, l) [V' / bv, T], the backend's kernel, with V' = V padded to `multiple`."""
    vocab = embed.shape[0]
    padded = padded_vocab(vocab, multiple)
    h_bf16 = h.astype(jnp.bfloat16)
    e = pad_rows(embed.astype(jnp.bfloat16), padded, axis=0)
    m, l = statistics(h_bf16, e, column_bias(vocab, padded))
    top = m.max(axis=0)
    log_z = top + jnp.log(jnp.sum(l * jnp.exp(m - top), axis=0))
    targets, weights = model.target_weights(targets, ignore_index)
    target_logit = jnp.sum(h_bf16.astype(jnp.float32) * e[targets].astype(jnp.float32), axis=-1)
    loss = jnp.sum(weights * (log_z - target_logit))
    return loss, (h, embed, targets, weights, log_z)


def backward(residuals, g, dlogits, multiple: int, chunk: int):
    """-> (dh [T, d] in h's dtype, dE [V, d] in embed's dtype); dlogits(h_c, e, columns, log_z,
    targets, scales) -> [C, V'] bf16 is the backend's kernel."""
    h, embed, targets, weights, log_z = residuals
    (tokens, d), vocab = h.shape, embed.shape[0]
    padded = padded_vocab(vocab, multiple)
    # E in bf16 again rather than saved by the forward: a V d pass, where a residual would hold
    # V' d bf16 through the rest of the model's backward.
    e = pad_rows(embed.astype(jnp.bfloat16), padded, axis=0)
    column_index = jnp.arange(padded, dtype=jnp.float32)
    num_chunks = -(-tokens // chunk)
    pad = lambda x: pad_rows(x, num_chunks * chunk, axis=0).reshape(num_chunks, chunk,
                                                                    *x.shape[1:])
    chunks = (pad(h.astype(jnp.bfloat16)), pad(targets.astype(jnp.float32)),
              pad(weights * g), pad(log_z))

    def step(de, chunk_inputs):
        h_c, targets_c, scales_c, log_z_c = chunk_inputs
        ds = dlogits(h_c, e, column_index, log_z_c, targets_c, scales_c)
        dh_c = jnp.matmul(ds, e, preferred_element_type=jnp.float32).astype(h.dtype)
        return de + jnp.matmul(ds.T, h_c, preferred_element_type=jnp.float32), dh_c

    de, dh = lax.scan(step, jnp.zeros((padded, d), jnp.float32), chunks)
    return dh.reshape(-1, d)[:tokens], de[:vocab].astype(embed.dtype)
