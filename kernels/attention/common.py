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
from typing import Any, NamedTuple, Sequence

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
    window: tuple[int, int] | None = None   # (left, right): query i sees keys i - left .. i + right
    segments: bool = False                  # segment ids mask (packed documents), given at run time

    @property
    def scale_log2(self) -> float:
        """c = sm_scale * log2(e): raw scores times c are base-2 logits."""
        return self.sm_scale * LOG2E

    @property
    def left(self) -> int | None:
        """How far left of its own position a query sees (None: no bound)."""
        return None if self.window is None else self.window[0]

    @property
    def right(self) -> int | None:
        """How far right of its own position a query sees (0 when causal; None: no bound)."""
        bounds = [b for b in (0 if self.causal else None,
                              None if self.window is None else self.window[1]) if b is not None]
        return min(bounds) if bounds else None

    @property
    def rows_may_be_empty(self) -> bool:
        """Whether a query row can meet a tile where it sees no key, or see none at all (then its
        output is 0): with a window or segments; under causal masking alone every row sees key 0
        in its first tile."""
        return self.window is not None or self.segments


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


SEGMENT_RANGE = 4   # segment_ranges' values per tile: first, end, pure_first, pure_end


class Span(NamedTuple):
    """The tiles [start, end) a kernel's loop visits: [start, lo) and [hi, end) need the mask,
    [lo, hi) do not. Python ints where static (a static empty range costs no loop)."""
    start: Any
    lo: Any
    hi: Any
    end: Any


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _span(start, lo, hi, end, segment_range) -> Span:
    """start <= lo <= hi <= end; within segment_range (first, end, pure_first, pure_end) when
    given (segment_ranges, known only at run time), where only [pure_first, pure_end) may go
    without the mask."""
    if segment_range is not None:
        first, last, pure_first, pure_end = segment_range
        start, end = _max(start, first), _min(end, last)
        lo, hi = _max(lo, pure_first), _min(hi, pure_end)
        # An empty run leaves every tile masked: lo = hi = end (a product, not a select: see
        # q_tiles).
        some = jnp.asarray(lo < hi).astype(jnp.int32)
        lo, hi = some * lo + (1 - some) * end, some * hi + (1 - some) * end
    # A tile deep in the padding (or outside its segments) may see none: empty at `end`, never
    # start > end (the Mosaic GPU kernels skip the tiles from their stream's first to `start`).
    start = _min(start, end)
    lo = _min(_max(lo, start), end)
    return Span(start, lo, _min(_max(hi, lo), end), end)


def keys_end(i, plan: Plan, block_q: int):
    """The first key that no row of query tile i sees, nor any key after it (rows r = i bq ..
    (i + 1) bq - 1 see keys up to r + right, and none at or past seq_len unless right is 0, as in
    `visible`)."""
    if plan.right is None:
        return plan.seq_len
    end = (i + 1) * block_q + plan.right
    return end if plan.right == 0 else _min(end, plan.seq_len)


def kv_tiles(i, plan: Plan, block_q: int, block_k: int, segment_range=None) -> Span:
    """Key tiles that query tile i attends to (rows r = i bq .. (i + 1) bq - 1 see keys
    r - left .. r + right, and none at or past seq_len): tiles wholly outside are never visited,
    those it sees wholly need no mask. segment_range: the tile's row of segment_ranges (the key
    tiles that hold any of its segments, and those that hold its one segment only)."""
    first, last = i * block_q, (i + 1) * block_q - 1
    left, right, num_k = plan.left, plan.right, cdiv(plan.seq_len, block_k)
    start = 0 if left is None else div(_max(first - left, 0), block_k)
    end = _min(cdiv(keys_end(i, plan, block_q), block_k), num_k)
    lo = 0 if left is None else cdiv(_max(last - left, 0), block_k)
    hi = plan.seq_len // block_k if right is None else div(first + right + 1, block_k)
    if right is not None and right > 0:   # a real row may see past seq_len: mask that tile
        hi = _min(hi, plan.seq_len // block_k)
    return _span(start, lo, hi, end, segment_range)


def q_tiles(j, plan: Plan, block_q: int, block_k: int, segment_range=None) -> Span:
    """Query tiles that see key tile j (keys c = j bk .. (j + 1) bk - 1 are seen by rows
    c - right .. c + left): query tiles wholly in the padding are never visited (their do is
    zero: they add nothing to dk and dv). segment_range as kv_tiles', over query tiles."""
    first, last = j * block_k, (j + 1) * block_k - 1
    left, right, num_q = plan.left, plan.right, cdiv(plan.seq_len, block_q)
    start = 0 if right is None else div(_max(first - right, 0), block_q)
    end = num_q if left is None else _min(div(last + left, block_q) + 1, num_q)
    lo = 0 if right is None else cdiv(_max(last - right, 0), block_q)
    hi = num_q if left is None else div(first + left + 1, block_q)
    if plan.right != 0:   # the key tile holding the padded end needs a mask on every row
        # (a product, not jnp.where: Pallas Triton 0.10 lowers a scalar select of constants to i1)
        ragged = jnp.asarray((j + 1) * block_k > plan.seq_len).astype(jnp.int32)
        hi = ragged * lo + (1 - ragged) * hi
    return _span(start, lo, hi, end, segment_range)


def in_span(t, span: Span):
    """(t in a masked range of span, t in its unmasked range): the grid-step tests of kernels
    whose grid walks every tile (TPU)."""
    masked = ((t >= span.start) & (t < span.lo)) | ((t >= span.hi) & (t < span.end))
    return masked, (t >= span.lo) & (t < span.hi)


def clamp_to_span(t, span: Span):
    """Tile t moved into span (the nearest tile it needs; tile 0 when it needs none): a block
    index that fetches nothing new where the step is skipped."""
    nearest = jnp.maximum(jnp.minimum(t, span.end - 1), jnp.minimum(span.start, span.end - 1))
    return jnp.maximum(nearest, 0)


def sum_over_groups(x, kv_heads: int, dtype, heads_axis: int = 2):
    """x [.., Hq, ..] per query head -> [.., Hkv, ..] in dtype, summed over each group of query
    heads (h // (Hq / Hkv), the heads at heads_axis); as is when Hq = Hkv."""
    h = x.shape[heads_axis]
    if h == kv_heads:
        return x.astype(dtype)
    shape = (*x.shape[:heads_axis], kv_heads, h // kv_heads, *x.shape[heads_axis + 1:])
    return x.reshape(shape).sum(heads_axis + 1).astype(dtype)


def segment_ranges(ids, other_ids, block: int, other_block: int):
    """For segment ids [B, S] of one side (queries or keys) and of the other (S padded to the
    blocks) -> [B, S/block, SEGMENT_RANGE]: for each tile of `block` rows, (first, end) the range
    of the other side's tiles whose ids' [min, max] overlaps its own (so, with ids ascending along
    the sequence as in packed documents, exactly the tiles holding one of its segments; (0, 0) for
    none), and (pure_first, pure_end) a run of those tiles that hold only the tile's one segment
    (where it has one: the tiles inside a document), which need no segment mask; (end, end) for
    none. XLA."""
    b, s = ids.shape
    bounds = lambda x, n: (x.reshape(b, s // n, n).min(-1), x.reshape(b, s // n, n).max(-1))
    (lo, hi), (other_lo, other_hi) = bounds(ids, block), bounds(other_ids, other_block)
    overlap = ((other_lo[:, None, :] <= hi[:, :, None])
               & (other_hi[:, None, :] >= lo[:, :, None]))     # [B, S/block, S/other_block]
    n = overlap.shape[-1]
    first, end = jnp.argmax(overlap, -1), n - jnp.argmax(overlap[..., ::-1], -1)
    first, end = (jnp.where(overlap.any(-1), x, 0) for x in (first, end))
    pure = ((lo == hi)[:, :, None] & (other_lo == other_hi)[:, None, :]
            & (other_lo[:, None, :] == lo[:, :, None]))
    # The first run of pure tiles (ids in any order may hold several; ascending ones one).
    pure_first = jnp.argmax(pure, -1)
    past = ~pure & (jnp.arange(n) >= pure_first[..., None])
    pure_end = jnp.where(past.any(-1), jnp.argmax(past, -1), n)
    pure_first, pure_end = (jnp.where(pure.any(-1), x, end) for x in (pure_first, pure_end))
    return jnp.stack([first, end, pure_first, pure_end], -1).astype(jnp.int32)


def segment_range(field) -> tuple:
    """A tile's row of segment_ranges, (first, end, pure_first, pure_end), from field(c) -> its
    c-th value (a kernel's read of a ref, or an XLA slice)."""
    return tuple(field(c) for c in range(SEGMENT_RANGE))


def tile_segments(segments, block: int, other_block: int, by_query: bool):
    """A kernel's segment operands, for programs that take one tile of `block` rows (query rows
    when by_query, else key rows) and stream the other side's tiles of other_block rows:
    (this side's ids, the other side's ids [B, S], this side's tiles' ranges of the other's
    (segment_ranges))."""
    q_ids, kv_ids = segments
    mine, others = (q_ids, kv_ids) if by_query else (kv_ids, q_ids)
    return mine, others, segment_ranges(mine, others, block, other_block)


def tile_order(i, num_tiles: int, causal: bool):
    """Grid index -> query tile: last-first under causal masking (longest rows first)."""
    return num_tiles - 1 - i if causal else i


def visit(step, carry, span: Span):
    """carry after step(t, carry, masked=...) over the tiles t of span: three loops rather than
    one with a per-tile test, so the mask costs nothing where it is not needed."""
    for begin, stop, masked in ((span.start, span.lo, True), (span.lo, span.hi, False),
                                (span.hi, span.end, True)):
        if not (isinstance(begin, int) and isinstance(stop, int) and begin >= stop):
            carry = lax.fori_loop(begin, stop, functools.partial(step, masked=masked), carry)
    return carry


def visible(q_index, k_index, plan: Plan, q_segment=None, k_segment=None):
    """True where query q_index may attend to key k_index (broadcastable int32 arrays; with
    segments, their segment ids broadcast alike)."""
    conditions = []
    if plan.left is not None:
        conditions.append(k_index >= q_index - plan.left)
    if plan.right is not None:
        conditions.append(k_index <= q_index + plan.right)
    if plan.right != 0:
        conditions.append(k_index < plan.seq_len)
    if q_segment is not None:
        conditions.append(q_segment == k_segment)
    return functools.reduce(jnp.logical_and, conditions)


def positions(start, shape, axis):
    """start + the index along `axis` of a 2-D tile (2-D iota: Mosaic has no 1-D one)."""
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def tile_mask(masked: bool, plan: Plan, q_start, k_start, block_q: int, block_k: int,
              transposed: bool = False, segments=None):
    """The mask of the score tile of queries q_start.. and keys k_start..: [block_q, block_k], or
    [block_k, block_q] when `transposed` (the dK/dV orientation); None where not needed.
    segments: (the query tile's ids, the key tile's): [block_q] and [block_k], or those as a
    column and a row of the tile (a row and a column when transposed)."""
    if not masked:
        return None
    q_axis = 1 if transposed else 0
    shape = (block_k, block_q) if transposed else (block_q, block_k)
    q_segment = k_segment = None
    if segments is not None:   # 1-D, or already 2-D in the tile's orientation
        q_segment, k_segment = segments
        if q_segment.ndim == 1:
            q_segment = q_segment[None, :] if transposed else q_segment[:, None]
            k_segment = k_segment[:, None] if transposed else k_segment[None, :]
    return visible(positions(q_start, shape, q_axis), positions(k_start, shape, 1 - q_axis), plan,
                   q_segment, k_segment)


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


def softmax_step(carry, q, k, v, scale_log2: float, mask=None, rows_may_be_empty=False):
    """One key tile of the online softmax.  q [bq, D], k, v [bk, D], mask [bq, bk] or None.

        m' = max(m, c max_j s_j)      alpha = 2^(m - m')      p = 2^(c s - m')
        l' = alpha l + sum_j p_j      acc'  = alpha acc + p v

    Masked scores are -inf, so p = 0 there. Under causal masking alone m' is finite after the
    first tile, which every row sees (it holds key 0); where a row may have seen no key yet
    (rows_may_be_empty: windows, segments) the exponents take 0 for its m' = -inf, so that no
    -inf - -inf happens.
    """
    acc, m, l = carry
    s = dot_nt(q, k)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True) * scale_log2)
    m_exp = jnp.where(m_new == -jnp.inf, 0.0, m_new) if rows_may_be_empty else m_new
    alpha = jnp.exp2(m - m_exp)
    p = jnp.exp2(s * scale_log2 - m_exp)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot(p.astype(v.dtype), v)
    return acc, m_new, l


def softmax_finish(carry, rows_may_be_empty=False):
    """-> (o [bq, D] f32, lse [bq, 1]): o = acc / l, lse = m + log2 l; a row that saw no key
    (l = 0) gets o = 0 and lse = +inf, so the backward's p = 2^(c s - lse) is 0 on it. One
    division a row, then a multiply a value (a division costs several instructions)."""
    acc, m, l = carry
    if not rows_may_be_empty:
        return acc * (1.0 / l), m + jnp.log2(l)
    empty = l == 0.0
    return acc * (1.0 / jnp.where(empty, 1.0, l)), jnp.where(empty, jnp.inf, m + jnp.log2(l))


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
