"""What every attention kernel shares: the per-tile math, which tiles a kernel visits, the plan.

Notation: B batch, S sequence length (padded to a multiple of every block), H heads, D head_dim;
a query tile is `block_q` rows of q, a key tile `block_k` rows of k and v.

The kernels work in base 2: with c = sm_scale * log2(e) and raw scores s = q k^T,

    softmax(sm_scale * s)_ij = 2^(c s_ij - lse_i),   lse_i = log2 sum_j 2^(c s_ij)

(exp2 is the GPU's native exponential, and c folds log2(e) into the scale the scores need anyway).
The forward streams key tiles through an online softmax (running max m, running sum l, f32
accumulator) and saves lse; the backward recomputes p from q, k and lse:

    dv  = p^T do               dp = do v^T          delta_i = sum_d do_id o_id
    ds  = p * (dp - delta)     dq = sm_scale ds k    dk = sm_scale ds^T q

Dots take their inputs in the input dtype (bf16: the tensor cores' type) and accumulate in f32;
p and ds are cast back to the input dtype before their dots, as FlashAttention does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import config

LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
# The head dims the kernels tile; any other head_dim up to the largest is zero-padded up to the next
# of these by the api (zero columns of q and k add nothing to q k^T, those of v give output columns
# that are sliced off): 32 runs the 64 kernels, 96 the 128 ones (bench/RESULTS.md has the cost).
KERNEL_HEAD_DIMS = (64, 128, 256)
MIN_BLOCK = 16  # Triton dots need every dimension >= 16; TPU bf16 tiles are 16 rows.


def block(*, minimum: int = MIN_BLOCK):
    """A tile of the sequence (query or key rows): a power of two (fit_blocks pads the sequence to
    the largest, which every other divides)."""
    return config.tile(power_of_two=True, minimum=minimum)


@dataclasses.dataclass(frozen=True)
class Kernels(config.Kernels):
    """An attention backend's three kernels' configurations: the forward, the backward's dK/dV
    kernel (a key tile block_k, streaming query tiles block_q) and its dQ kernel (the other way
    round). Subclasses type the fields with their kernels' classes; every field named block_*
    tiles the sequence."""
    forward: config.KernelConfig
    dkdv: config.KernelConfig
    dq: config.KernelConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one attention call (hashable: the custom_vjp's non-array argument).

    seq_len is the true length; the arrays the kernels see are padded to a multiple of every block.
    forward is the forward kernel's configuration, dkdv and dq the backward kernels' (of the
    backend that differentiates it, which may be another: api.BACKWARDS).
    """
    implementation: str
    causal: bool
    sm_scale: float
    seq_len: int
    forward: config.KernelConfig
    dkdv: config.KernelConfig
    dq: config.KernelConfig
    interpret: bool

    @property
    def scale_log2(self) -> float:
        """c = sm_scale * log2(e): raw scores times c are base-2 logits."""
        return self.sm_scale * LOG2E


def kernel_head_dim(head_dim: int) -> int:
    """The head dim the kernels run for `head_dim`: the next of KERNEL_HEAD_DIMS at or above it."""
    if not 0 < head_dim <= KERNEL_HEAD_DIMS[-1]:
        raise ValueError(f"attention kernels support head_dim up to {KERNEL_HEAD_DIMS[-1]}; got "
                         f"{head_dim} (implementation='reference' computes any)")
    return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


def fit_blocks(kernels: Sequence[config.KernelConfig], seq_len: int) -> tuple[list, int]:
    """Clamp the kernels' blocks to the sequence and pad it: -> (kernels, padded length).

    A block larger than the sequence shrinks to the next power of two above it (>= MIN_BLOCK), and
    the sequence is padded to a multiple of the largest block (all divide it, being powers of two).
    """
    cap = max(MIN_BLOCK, 1 << (seq_len - 1).bit_length())
    fitted = [dataclasses.replace(kernel, **{name: min(size, cap) for name, size in
                                             dataclasses.asdict(kernel).items()
                                             if name.startswith("block_")})
              for kernel in kernels]
    largest = max(size for kernel in fitted for name, size in dataclasses.asdict(kernel).items()
                  if name.startswith("block_"))
    return fitted, -(-seq_len // largest) * largest


# ------------------------------------------------------------------ which tiles a kernel visits

def div(a, b):
    """a // b for a >= 0, on Python ints or traced int32 (lax.div lowers on Triton and Mosaic)."""
    return a // b if isinstance(a, int) else lax.div(a, b)


def cdiv(a, b):
    return div(a + b - 1, b)


def kv_tiles(i, plan: Plan, block_q: int, block_k: int):
    """Key tiles that query tile i attends to -> (masked_from, end).

    Tiles [0, masked_from) need no mask; [masked_from, end) need one: under causal masking the
    tiles crossing the diagonal (tiles wholly above it are never visited), otherwise the tile
    holding the padded end of the sequence. Key tiles wholly in the padding are never visited.
    """
    end = cdiv(plan.seq_len, block_k)
    if not plan.causal:
        return plan.seq_len // block_k, end
    end = jnp.minimum(cdiv((i + 1) * block_q, block_k), end)
    return jnp.minimum(div(i * block_q, block_k), end), end


def q_tiles(j, plan: Plan, block_q: int, block_k: int):
    """Query tiles that see key tile j -> (start, unmasked_from, end).

    Tiles [start, unmasked_from) need a mask, [unmasked_from, end) do not; query tiles wholly in
    the padding are never visited (their do is zero: they add nothing to dk and dv).
    """
    end = cdiv(plan.seq_len, block_q)
    if not plan.causal:  # only the key tile holding the padded end needs a mask, on every row
        ragged = (j + 1) * block_k > plan.seq_len
        # (a product, not jnp.where: Pallas Triton 0.10 lowers a scalar select of constants to i1)
        return 0, ragged.astype(jnp.int32) * end, end
    start = jnp.minimum(div(j * block_k, block_q), end)
    return start, jnp.minimum(cdiv((j + 1) * block_k, block_q), end), end


def tile_order(i, num_tiles: int, causal: bool):
    """Grid index -> query tile: last-first under causal masking (longest rows first)."""
    return num_tiles - 1 - i if causal else i


def visit(step, carry, unmasked, masked):
    """carry after step(t, carry, masked=...) over the tiles t in the ranges `unmasked`, `masked`.

    Two loops rather than one with a per-tile test, so the mask costs nothing off the diagonal.
    """
    carry = lax.fori_loop(*unmasked, functools.partial(step, masked=False), carry)
    return lax.fori_loop(*masked, functools.partial(step, masked=True), carry)


def visible(q_index, k_index, plan: Plan):
    """True where query q_index may attend to key k_index (broadcastable int32 arrays)."""
    if plan.causal:
        return k_index <= q_index
    return k_index < plan.seq_len


def positions(start, shape, axis):
    """start + the index along `axis` of a 2-D tile (2-D iota: Mosaic has no 1-D one)."""
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def tile_mask(masked: bool, plan: Plan, q_start, k_start, block_q: int, block_k: int,
              transposed: bool = False):
    """The mask of the score tile of queries q_start.. and keys k_start..: [block_q, block_k], or
    [block_k, block_q] when `transposed` (the dK/dV orientation); None off the diagonal."""
    if not masked:
        return None
    q_axis = 1 if transposed else 0
    shape = (block_k, block_q) if transposed else (block_q, block_k)
    return visible(positions(q_start, shape, q_axis), positions(k_start, shape, 1 - q_axis), plan)


# ------------------------------------------------------------------ the per-tile math

def _precision(a):
    """f32 operands multiply in full f32 (GPUs would otherwise round them to tf32)."""
    return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def dot(a, b):
    """a @ b, f32 accumulation.  a [m, k], b [k, n] -> [m, n]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a),
                           preferred_element_type=jnp.float32)


def dot_nt(a, b):
    """a @ b^T, f32 accumulation.  a [m, k], b [n, k] -> [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                           preferred_element_type=jnp.float32)


def softmax_init(block_q: int, head_dim: int):
    """(acc, m, l) before the first key tile: acc [bq, D] = 0, m [bq, 1] = -inf, l [bq, 1] = 0."""
    return (jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q, 1), -jnp.inf, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32))


def softmax_step(carry, q, k, v, scale_log2: float, mask=None):
    """One key tile of the online softmax.  q [bq, D], k, v [bk, D], mask [bq, bk] or None.

        m' = max(m, c max_j s_j)      alpha = 2^(m - m')      p = 2^(c s - m')
        l' = alpha l + sum_j p_j      acc'  = alpha acc + p v

    Masked scores are -inf, so p = 0 there. m' is finite after the first tile, which every row
    sees (it holds key 0), so no -inf - -inf ever happens.
    """
    acc, m, l = carry
    s = dot_nt(q, k)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True) * scale_log2)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * scale_log2 - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot(p.astype(v.dtype), v)
    return acc, m_new, l


def softmax_finish(carry):
    """-> (o [bq, D] f32, lse [bq, 1]): o = acc / l, lse = m + log2 l."""
    acc, m, l = carry
    return acc / l, m + jnp.log2(l)


def low_half(x, dtype):
    """lo = x - x.astype(dtype), in dtype: x = x.astype(dtype) + lo to ~2^-16 (f32 x, bf16 dtype).

    The forward saves o's low half for the backward's delta: rowsum(do * o) from the bf16-rounded
    o alone errs by ~2^-9 |o| |do|, and under peaked softmaxes (large logits) ds = p (dp - delta)
    is a small difference that this error dominates, doubling the error of dk.
    """
    return (x - x.astype(dtype).astype(jnp.float32)).astype(dtype)


def output_delta(o, o_lo, do):
    """delta = rowsum(do * (o + o_lo)) over the last axis in f32 (see `low_half`); XLA fuses it."""
    f32 = lambda x: x.astype(jnp.float32)
    return jnp.sum((f32(o) + f32(o_lo)) * f32(do), axis=-1)


def dq_step(dq, q, k, v, do, lse, delta, scale_log2: float, mask=None):
    """One key tile of dq (without its final sm_scale).  q, do [bq, D], k, v [bk, D],
    lse, delta [bq, 1], mask [bq, bk] or None.  dq += ds k with ds = p (do v^T - delta)."""
    s = dot_nt(q, k)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp2(s * scale_log2 - lse)
    ds = p * (dot_nt(do, v) - delta)
    return dq + dot(ds.astype(k.dtype), k)


def dkdv_step(carry, q, k, v, do, lse, delta, scale_log2: float, mask=None):
    """One query tile of dk, dv (dk without its final sm_scale), in transposed orientation so
    every dot has the key tile as its row dimension (no transposed operand; on sm90 the key tile
    is the wgmma M).  q, do [bq, D], k, v [bk, D], lse, delta [1, bq], mask [bk, bq] or None.

        p^T = 2^(c k q^T - lse)    dv += p^T do    ds^T = p^T (v do^T - delta)    dk += ds^T q
    """
    dk, dv = carry
    s_t = dot_nt(k, q)
    if mask is not None:
        s_t = jnp.where(mask, s_t, -jnp.inf)
    p_t = jnp.exp2(s_t * scale_log2 - lse)
    ds_t = p_t * (dot_nt(v, do) - delta)
    return dk + dot(ds_t.astype(q.dtype), q), dv + dot(p_t.astype(do.dtype), do)


def cost_estimate(q, seq: int, plan: Plan, matmuls: int, arrays: int) -> pl.CostEstimate:
    """What one kernel costs, for XLA's scheduler: `matmuls` products of 2 S^2 D flops per (b, h)
    (halved when causal), one exp2 per score, `arrays` q-sized arrays read or written once.
    q is [B, S, H, D] or [B, H, S, D], seq its (padded) S."""
    rows, head_dim = q.size // q.shape[-1], q.shape[-1]  # B H S rows of D in either layout
    pairs = rows * seq // (2 if plan.causal else 1)
    return pl.CostEstimate(flops=2 * head_dim * pairs * matmuls, transcendentals=pairs,
                           bytes_accessed=arrays * q.size * q.dtype.itemsize)
