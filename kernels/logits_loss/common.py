"""What the loss head's backends share: the math of one logits tile, and the passes around the
kernels, which never hold the [T, V] logits in any dtype.

A backend (mosaic_gpu.py, triton.py, tpu.py) brings two GEMMs over logits tiles
s = h[rows] E[cols]^T [bt, bv] (bf16 operands, f32 accumulation), each with an epilogue here:

    statistics(h, e, column_bias)          -> m, l [V' / bv, T]         `tile_statistics`
    probabilities(h_c, e, column_bias, b)  -> p [C, V'] bf16, m, l [V' / bv, C]
                                                                        `tile_probabilities`

with E padded to V' columns (zero rows; column_bias puts -inf on their logits, so that they add
nothing to log Z and their p is 0). Around them, XLA:

    the loss alone   log Z = M + log sum_tiles l exp(m - M)   (M: the row's largest m)
                     loss  = sum_t w_t (log Z_t - h_t . E_target(t))      w = model.target_weights
    differentiated   the forward computes the gradient too, for each chunk of C tokens (lax.scan;
                     the last chunk padded with weight-0 rows), since the backward would need the
                     same logits again: three GEMMs of 2 T V d FLOPs (the probabilities, dh, dE)
                     where recomputing them in the backward costs four (Liger's fused linear
                     cross-entropy computes its gradient in the forward for the same reason):
        p = exp(s - b) bf16 [C, V'], and per tile m = row max, l = row sum of p,  b = target logit
        log Z = b + log sum_tiles l
        ds = (softmax - onehot(target)) w = a p - w onehot     a = exp(b - log Z) w
        dh_c = a (p E) - w E_target         dE += p^T (a h_c) - onehot^T (w h_c)
    with XLA's f32 GEMMs, and the onehot terms apart in f32 (rounded to bf16 inside p, the target's
    entry, a row's largest, made dE's error at small logits 2.5 times the bf16 reference's; apart
    it is a thirtieth): a gather for dh, and for dE the chunk's rows sorted by target and summed
    per target by GEMMs of 0/1 masks (`add_by_target`; on GPUs the same sums in one Triton kernel,
    triton_by_target.py), so that each target's row of dE gets one addition per chunk, in a fixed
    order (a scatter-add's atomics add in any order), and the backward multiplies dh and dE by g.

With b the target logit, p's largest value is exp(max s - b) <= exp(the row's loss): bf16 holds it
while max s - b <= GRADIENT_LIMIT. A row beyond (a loss of more than 32 nats, which training
hardly ever meets; its p clamped) adds nothing in the chunks' scan; after it, a loop over the
chunks with such rows does those rows again with b = their row max (p <= 1). (No conditional per
chunk: XLA's GPU runtime reads a conditional's predicate on the host, a wait per chunk; this
loop's trip count is one such read a call.) Ignored tokens' rows of h are zeroed (their logits and
b 0, p 1, a 0). Of the [T, V] array only one chunk [C, V'] in bf16 is held at a time: C is the
largest power of two times the kernel's row tile whose chunk fits `chunk_mib` (256 MiB: C = 2048
at GPT-2's V = 50257). The loss, dh and dE are deterministic.
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


# The largest max(s) - b of a row that the stored p may take: p <= e^32 in bf16, and
# a = e^(b - log Z) w >= e^-43 w in the bf16 product a h_c (both far from bf16's range, e^+-88).
GRADIENT_LIMIT = 32.0
RUN_BLOCK = 128   # rows per block of add_by_target's sums


@dataclasses.dataclass(frozen=True)
class Kernels(config.Kernels):
    """A backend's two GEMMs, `forward` (the statistics) and `probabilities` (with its
    chunk_mib); the subclass names the fields that tile the vocabulary and the tokens."""
    VOCAB_TILE: ClassVar[str] = "block_n"
    TOKEN_TILE: ClassVar[str] = "block_m"
    TOKEN_TILES_PER_CHUNK_ROW: ClassVar[int] = 1   # token tiles a program covers

    @property
    def multiple(self) -> int:
        """V is padded to a multiple of both GEMMs' vocabulary tiles."""
        return math.lcm(getattr(self.forward, self.VOCAB_TILE),
                        getattr(self.probabilities, self.VOCAB_TILE))

    @property
    def chunk_rows(self) -> int:
        """A chunk is a multiple of the probabilities GEMM's token rows."""
        return self.TOKEN_TILES_PER_CHUNK_ROW * getattr(self.probabilities, self.TOKEN_TILE)


def tile_statistics(s, column_bias):
    """A logits tile s [bt, bv] f32 (+ column_bias: 0, or -inf on padded columns) -> (m = row
    max [bt], l = row sum of exp(s - m) [bt]). A tile of padding only (V' pads V to the lcm of
    two tiles) has m = MIN_MAX and l = 0, so it adds nothing to log Z."""
    s = s + column_bias
    m = jnp.maximum(s.max(axis=1), MIN_MAX)
    p = jnp.exp2(s * LOG2E - lax.broadcast_in_dim(m * LOG2E, s.shape, [0]))
    return m, p.sum(axis=1)


def tile_probabilities(s, column_bias, base):
    """A logits tile s [bt, bv] f32 (+ column_bias), base b per row (broadcastable to s) -> (p =
    exp(s - b) in bf16 [bt, bv], m = row max [bt], l = row sum of exp(s - b) in f32 [bt]), with
    s - b clamped at GRADIENT_LIMIT (so that p stays finite in a row beyond it, which
    `forward_with_gradient` does again). Padded columns: p = 0, m = -inf."""
    s = s + column_bias
    p = jnp.exp2(jnp.minimum(s - base, GRADIENT_LIMIT) * LOG2E)
    return p.astype(jnp.bfloat16), s.max(axis=1), p.sum(axis=1)


def padded_vocab(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def column_bias(vocab: int, padded: int) -> jax.Array:
    """[V'] f32: 0 on the vocabulary, -inf on padding."""
    return jnp.where(jnp.arange(padded) < vocab, 0.0, -jnp.inf)


def token_chunk(tokens: int, padded: int, rows: int, chunk_mib: int) -> int:
    """The chunk C: rows times the largest power of two with C V' bf16 <= chunk_mib MiB (at
    least rows), no larger than the tokens need."""
    chunk = rows
    while 2 * chunk * padded * 2 <= chunk_mib << 20 and chunk < tokens:
        chunk *= 2
    return min(chunk, -(-tokens // rows) * rows)


def forward(h, embed, targets, ignore_index, statistics, multiple: int):
    """The loss alone: h [T, d], embed [V, d], targets [T] -> scalar; statistics(h, e,
    column_bias) -> (m, l) [V' / bv, T], the backend's kernel, with V' = V padded to
    `multiple`."""
    vocab = embed.shape[0]
    padded = padded_vocab(vocab, multiple)
    h_bf16 = h.astype(jnp.bfloat16)
    e = pad_rows(embed.astype(jnp.bfloat16), padded, axis=0)
    m, l = statistics(h_bf16, e, column_bias(vocab, padded))
    top = m.max(axis=0)
    log_z = top + jnp.log(jnp.sum(l * jnp.exp(m - top), axis=0))
    targets, weights = model.target_weights(targets, ignore_index)
    return jnp.sum(weights * (log_z - _target_logits(h_bf16, e, targets)))


def _target_logits(h_bf16, e, targets):
    """[T] f32: h_t . E_target(t) of the bf16 operands."""
    return jnp.sum(h_bf16.astype(jnp.float32) * e[targets].astype(jnp.float32), axis=-1)


def _run_sums(values, keys, scales=None):
    """values [n, d] of rows sorted by keys [n] -> [n, d] f32: each row's sum over its run (the
    rows of its key, contiguous) up to and including itself, each row times its scale where
    `scales` [n] is given. Within blocks of RUN_BLOCK rows, GEMMs of a 0/1 mask: with scales, of
    bf16 rows and the mask times the scales in two bf16 terms, so that the tensor cores' products
    are exact and add in f32; without, in f32. A run that crosses blocks adds what it summed in the
    blocks before: the same sums one level up, over the blocks' last rows. Every sum in a fixed
    order."""
    n, d = values.shape
    if n <= RUN_BLOCK:
        row = jnp.arange(n)
        mask = ((keys[:, None] == keys[None, :])
                & (row[:, None] >= row[None, :])).astype(jnp.float32)
        if scales is None:
            return jnp.matmul(mask, values, precision=lax.Precision.HIGHEST)
        weights = mask * scales
        # bf16's rounding as an f32 op: XLA's GPU compiler drops an f32 -> bf16 -> f32 pair of
        # converts (excess precision allowed), which would make the low term 0
        high = lax.reduce_precision(weights, exponent_bits=8, mantissa_bits=7)
        low = (weights - high).astype(jnp.bfloat16)
        return (jnp.matmul(high.astype(jnp.bfloat16), values, preferred_element_type=jnp.float32)
                + jnp.matmul(low, values, preferred_element_type=jnp.float32))
    blocks = -(-n // RUN_BLOCK)
    # Padding rows of zeros continue the last run: they add nothing.
    keys = jnp.concatenate([keys, jnp.full(blocks * RUN_BLOCK - n, keys[-1])])
    keys = keys.reshape(blocks, RUN_BLOCK)
    to_blocks = lambda x: pad_rows(x, blocks * RUN_BLOCK, axis=0).reshape(blocks, RUN_BLOCK,
                                                                          *x.shape[1:])
    within = jax.vmap(_run_sums, in_axes=(0, 0, None if scales is None else 0))(
        to_blocks(values), keys, None if scales is None else to_blocks(scales))
    # through each block's end: the sums of the runs that reach it
    through = _run_sums(within[:, -1], keys[:, -1])
    continued = ((keys == jnp.roll(keys[:, -1], 1)[:, None])
                 & (jnp.arange(blocks) > 0)[:, None])[..., None]
    sums = within + jnp.where(continued, jnp.roll(through, 1, axis=0)[:, None, :], 0.0)
    return sums.reshape(blocks * RUN_BLOCK, d)[:n]


def add_by_target(acc, rows, scales, targets, order):
    """acc [R, d] f32 + onehot(targets)^T (scales rows) (rows [n, d] bf16, scales [n] f32,
    targets [n], order = their stable argsort) in a fixed order, so bitwise the same run after
    run: the rows sorted by target, summed per target (`_run_sums`), and each target's sum added
    to its row once (where a scatter-add's atomics would add a repeated target's rows in any
    order)."""
    keys = targets[order]
    sums = _run_sums(rows[order], keys, scales[order])
    last = jnp.append(keys[1:] != keys[:-1], True)
    return acc.at[jnp.where(last, keys, acc.shape[0])].add(sums, mode="drop")


def forward_with_gradient(h, embed, targets, ignore_index, probabilities, by_target,
                          multiple: int, chunk: int):
    """-> (loss, (dh [T, d] in h's dtype, dE [V, d] in embed's dtype) at g = 1), chunk by chunk
    (the module docstring says how); probabilities(h_c, e, column_bias, base) -> (p [C, V'] bf16,
    m, l [V' / bv, C]) is the backend's kernel, by_target the backend's `add_by_target` (this
    module's, or a kernel of the same math)."""
    (tokens, d), vocab = h.shape, embed.shape[0]
    padded = padded_vocab(vocab, multiple)
    targets, weights = model.target_weights(targets, ignore_index)
    h_bf16 = h.astype(jnp.bfloat16)
    e = pad_rows(embed.astype(jnp.bfloat16), padded, axis=0)
    bias = column_bias(vocab, padded)
    target_logits = jnp.where(weights > 0, _target_logits(h_bf16, e, targets), 0.0)
    num_chunks = -(-tokens // chunk)
    pad = lambda x: pad_rows(x, num_chunks * chunk, axis=0).reshape(num_chunks, chunk,
                                                                    *x.shape[1:])
    chunks = [pad(x) for x in (h_bf16, targets, weights, target_logits)]
    # each chunk's rows in the order of their targets (add_by_target), all sorted at once
    chunks.append(jnp.argsort(chunks[1], axis=1, stable=True))

    def rows_of(i):
        """Chunk i's rows (h_c, targets_c, weights_c, target logits, their order by target), an
        ignored token's row of h as zeros (within the chunk: no copy of h): its logits and base 0,
        p 1."""
        h_c, targets_c, weights_c, base, order_c = (x[i] for x in chunks)
        return jnp.where((weights_c > 0)[:, None], h_c, 0), targets_c, weights_c, base, order_c

    def gradient(de, h_c, targets_c, weights_c, base, order_c):
        """dE += p^T (a h_c) - onehot^T (w h_c) and (dh_c, log Z, row max) of rows with p
        relative to base; a row whose logits reach beyond base by more than GRADIENT_LIMIT (its p
        clamped) adds nothing."""
        p, m, l = probabilities(h_c, e, bias, base)
        top = m.max(axis=0)
        weights_c = jnp.where(top - base <= GRADIENT_LIMIT, weights_c, 0.0)
        log_z = base + jnp.log(l.sum(axis=0))
        scale = (jnp.exp(base - log_z) * weights_c)[:, None]
        dh_c = (scale * jnp.matmul(p, e, preferred_element_type=jnp.float32)
                - weights_c[:, None] * e[targets_c].astype(jnp.float32))
        a_h = (scale * h_c.astype(jnp.float32)).astype(jnp.bfloat16)
        de = de + jnp.matmul(p.T, a_h, preferred_element_type=jnp.float32)
        de = by_target(de, h_c, -weights_c, targets_c, order_c)
        return de, (dh_c.astype(h.dtype), log_z, top)

    def again(n, carry):
        """The n-th chunk with rows beyond the limit, those rows again with b = their row max
        (p <= 1), the others left out."""
        de, dh, log_z = carry
        i = redo_order[n]
        h_c, targets_c, weights_c, _, order_c = rows_of(i)
        redone = beyond[i]
        de, (dh_c, log_z_c, _) = gradient(de, h_c, targets_c, jnp.where(redone, weights_c, 0.0),
                                          top[i], order_c)
        return (de, dh.at[i].set(jnp.where(redone[:, None], dh_c, dh[i])),
                log_z.at[i].set(jnp.where(redone, log_z_c, log_z[i])))

    de, (dh, log_z, top) = lax.scan(lambda de, i: gradient(de, *rows_of(i)),
                                    jnp.zeros((padded, d), jnp.float32), jnp.arange(num_chunks))
    beyond = top - chunks[3] > GRADIENT_LIMIT
    redo = beyond.any(axis=1)
    # chunks with such rows first: a loop of as many steps as there are (none: a loop of none)
    redo_order = jnp.argsort(~redo, stable=True)
    de, dh, log_z = lax.fori_loop(0, redo.sum(), again, (de, dh, log_z))
    loss = jnp.sum(weights * (log_z.reshape(-1)[:tokens] - target_logits))
    return loss, (dh.reshape(-1, d)[:tokens], de[:vocab].astype(embed.dtype))
