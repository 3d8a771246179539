"""Flash attention forward in Pallas Mosaic GPU for Hopper (sm90): TMA, mbarriers and wgmma.

Proven on the H100 by the equivalence suite, measured by bench/attention.py (bench/RESULTS.md has
the versions tried); on CPU the tests prove that it lowers for CUDA and run it in jax's Mosaic GPU
interpreter, which simulates the warpgroups, TMA copies and barriers (wgmma emulated there).
The producer/consumer machinery (Ring, produce, specialize, launch) is kernels/warp_specialized.py,
shared with the backward (mosaic_gpu_vjp.py) and the LayerNorm+FFN GEMMs.

The math is triton.py's (common.softmax_step, in base 2 with c = sm_scale log2 e). For each query
row and each key tile, with raw scores s = q k^T:

    m' = max(m, c max_j s_j)    alpha = 2^(m - m')    p = 2^(c s - m')
    l' = alpha l + sum_j p_j     acc' = alpha acc + p v
    o  = acc / l                 lse = m + log2 l      (m, l, acc, lse in f32)

Shapes: q, k, v, o [B, S, H, D] in HBM (S padded to the blocks), bf16, D in (64, 128);
residuals lse [B, H, S] f32 and o's low half [B, S, H, D] (common.low_half), the Triton
backward's format, so triton_vjp.backward differentiates this forward.

Design (FlashAttention-3's warp specialization and ping-pong schedule):
a work unit per pair of query tiles of one (batch, head), in launch_grid's order (groups of
(batch, head)s whose K and V fit in L2, pair by pair within a group), three warpgroups a CTA.
A CTA runs one unit, or (`persistent`=1) one CTA per multiprocessor runs the folds c, c + #SMs,
... in turn, a fold the pairs p and P - 1 - p of one (batch, head) (for P pairs, P even; odd P
runs a CTA per unit), which under causal masking make the same work for every p, so a static
assignment balances; its producer streams the next unit's K and V while the consumers finish the
last, and each consumer loads its next q tile into a second buffer (and, where shared memory
holds a third, waits for its o store to leave a buffer only a unit after issuing it).
  * warpgroups 0 and 1 consume: each TMA-copies its own q tile [bq, D] into shared memory once,
    then for every key tile t it needs computes s = q K_t^T by wgmma into an f32 accumulator
    [bq, bk] (registers), releases K_t, runs the online softmax in registers (the mask only on the
    tiles crossing the diagonal or the padded end), waits for V_t, adds p V_t by wgmma (p from
    registers in bf16, acc [bq, D] f32 in registers), waits for K_t+1 while that runs, and
    releases V_t.
  * ping-pong (`schedule_barrier`=1): a barrier both consumers pass twice per key tile, once after
    issuing q K^T and once before p V, with warpgroup 1 one pass behind, so that one
    warpgroup's softmax (exp2 on the special-function units) runs while the other's two matmuls
    hold the tensor cores, instead of both contending for the same unit at once.
  * three consumers (`consumers`=3, without ping-pong; FlashAttention-3's 192-row tiles at head_dim
    64): a unit is three query tiles, and where their count is no multiple of three the last
    unit holds fewer, its other warpgroups only waiting for and releasing its stream's tiles
    (no padding of S1024 to 1152 rows).
  * the last warpgroup produces: it TMA-copies K and V tiles [bk, D] into a ring of `num_stages`
    slots in shared memory, each slot guarded by a "loaded" barrier (TMA completion) and a
    "consumed" barrier (one arrival per consumer), and refills a slot once every consumer
    released it.
Causal: key tiles above the diagonal are never loaded, and a masked 128-key tile whose second
half no row of the query tile sees (under causal masking the diagonal tile of every other query
tile when key tiles have twice its rows; or the padded end) takes a step of half its keys (s, p
and p V half as wide; common.keys_end). The lower query tile of a pair needs fewer key tiles than
the upper one, so once done it keeps waiting for and releasing the tiles its neighbour still
needs (it must wait for the load before releasing: an early arrival would count towards the
slot's previous tile and let the producer overwrite it while the neighbour reads it). Query
tiles run last-first under causal masking (common.tile_order): the longest rows go first.

Segment ids (packed documents): a pair streams the union of its two query tiles' key tiles
within their documents (common.segment_ranges, read from GMEM), maybe none; the keys' ids ride a
third ring beside K's, each consumer loads its query tile's ids once, and every visited tile is
masked by them but those inside its query tile's one document (common.segment_ranges). A pair's
work then follows its documents, not its position, so the units run a CTA each (schedule_for),
not in persistent folds.

Shared memory (warp_specialized.smem_bytes): q 2 bq D (persistent: 4 or 6 bq D), K and V
2 num_stages bk D elements (bf16) plus 2 bq f32 for lse (segments: num_stages bk + 2 bq int32
more); the q buffers are reused to stage o and its low half on the way out.

FLOPs: two matmuls of 2 S^2 D per (batch, head), 4 B H S^2 D in all, half of that when causal.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import compat, config
from kernels.attention import common
from kernels.warp_specialized import (CONSUMERS, REGISTERS, SMEM_BYTES, WGMMA_M, Ring,
                                      consume_units, launch, num_sms, on_sm90, pad_rows,
                                      produce_units, ring_scratch, skip, smem_bytes, specialize,
                                      tiled_smem)



@dataclasses.dataclass(frozen=True)
class Forward(config.KernelConfig):
    """The forward: the query tile per consumer warpgroup (block_q) and the key tile (block_k),
    both raised to wgmma's 64 rows; the K/V ring's depth; the ping-pong barrier; the MiB of
    streamed tiles whose (batch, head)s run together (launch_grid); persistent CTAs; the consumer
    warpgroups a CTA (2, or 3 without ping-pong, which pairs two)."""
    block_q: int = common.block()
    block_k: int = common.block()
    num_stages: int = config.stages()
    schedule_barrier: bool = config.flag()
    group_mib: int = config.count(minimum=0)
    persistent: bool = config.flag()
    consumers: int = config.count(minimum=CONSUMERS)

    def __post_init__(self):
        super().__post_init__()
        if self.consumers not in REGISTERS:
            raise ValueError(f"consumers={self.consumers} must be one of {sorted(REGISTERS)}")
        if self.consumers > CONSUMERS and self.schedule_barrier:
            raise ValueError(f"consumers={self.consumers} runs without the ping-pong barrier "
                             f"(schedule_barrier=0): it pairs two warpgroups")


@dataclasses.dataclass(frozen=True)
class DkDv(config.KernelConfig):
    """The backward's dK/dV kernel (mosaic_gpu_vjp.py): the streamed query tile and its ring's
    depth (its key tile is DKDV_BLOCK_K); the group MiB and persistent CTAs of both backward
    kernels (the dQ kernel launches as this one does: bench/tune.py's backward_grid stage times
    them together)."""
    block_q: int = common.block()
    num_stages: int = config.stages()
    group_mib: int = config.count(minimum=0)
    persistent: bool = config.flag()


@dataclasses.dataclass(frozen=True)
class Dq(config.KernelConfig):
    """The backward's dQ kernel: its query tile, the streamed key tile and their ring's depth."""
    block_q: int = common.block()
    block_k: int = common.block()
    num_stages: int = config.stages()


@dataclasses.dataclass(frozen=True)
class Kernels(common.Kernels):
    forward: Forward
    dkdv: DkDv
    dq: Dq


# Per head_dim, the best of a first sweep on the H100 (bench/RESULTS.md); the tuning table's
# entries override them. The Mosaic GPU backward runs where the table measured it faster (else
# the forward's backward is Triton's, with Triton's parameters: api.default_backward). At
# head_dim 256 a warpgroup's accumulator [64, 256] f32 already takes 128 registers a thread:
# 64-row query tiles, and only the Triton backward (the Mosaic GPU one would hold two such
# accumulators, dk and dv).
DEFAULTS = {
    d: Kernels(Forward(block_q=128 if d < 256 else 64, block_k=64, num_stages=2,
                       schedule_barrier=True, group_mib=12, persistent=False, consumers=2),
               DkDv(block_q=64, num_stages=2, group_mib=12, persistent=False),
               Dq(block_q=64, block_k=64, num_stages=2))
    for d in common.KERNEL_HEAD_DIMS
}
MOSAIC_BACKWARD_HEAD_DIMS = (64, 128)
NOT_HERE = "mosaic_gpu runs only on an sm90 GPU; use implementation='triton' to interpret on CPU"


GRID_NAMES = ("group", "pair", "member")


def launch_grid(batch: int, heads: int, num_pairs: int, head_bytes: int,
                group_mib: int) -> tuple[int, int, int]:
    """The grid (groups, pairs, members) of a CTA per pair of tiles of one (batch, head).

    Pallas Mosaic GPU launches a grid row-major, the last axis fastest: the CTAs go out group by
    group of `members` (batch, head)s, and within a group pair by pair (the longest first), one for
    each member. A group's streamed tiles (K and V; in the backward q and do: head_bytes per
    (batch, head)) stay in L2 while its CTAs run, and the longest CTAs of the last group start
    well before the end. members: the most (batch, head)s, dividing batch x heads, whose tiles fit
    in group_mib MiB.
    """
    units = batch * heads
    fit = max(1, group_mib * 2**20 // head_bytes)
    members = max(g for g in range(1, min(units, fit) + 1) if units % g == 0)
    return units // members, num_pairs, members


def launch_index(grid: tuple[int, int, int]):
    """This CTA's position in a launch_grid's order."""
    _, num_pairs, members = grid
    return ((lax.axis_index("group") * num_pairs + lax.axis_index("pair")) * members
            + lax.axis_index("member"))


def unit_coords(unit, grid: tuple[int, int, int], heads: int):
    """Position `unit` in a launch_grid's order -> (batch, head, pair index)."""
    _, num_pairs, members = grid
    member, rest = lax.rem(unit, members), lax.div(unit, members)
    batch_head = lax.div(rest, num_pairs) * members + member
    return lax.div(batch_head, heads), lax.rem(batch_head, heads), lax.rem(rest, num_pairs)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which CTA runs which work unit (a pair of tiles of one (batch, head)): a CTA per unit in
    launch_grid's order, or `num_ctas` persistent CTAs, one per multiprocessor, CTA c running the
    folds c, c + num_ctas, ... of that order. A fold is the pairs p and num_pairs - 1 - p of one
    (batch, head), the same work for every p under causal masking, so the static assignment
    balances."""
    grid: tuple[int, int, int]   # launch_grid's, over pairs (persistent: over folds)
    heads: int
    num_pairs: int
    num_ctas: int | None         # None: a CTA per unit

    def launch_args(self) -> dict:
        """The grid and its axis names for warp_specialized.launch."""
        if self.num_ctas:
            return dict(grid=(self.num_ctas,), grid_names=("cta",))
        return dict(grid=self.grid, grid_names=GRID_NAMES)

    def units(self):
        """In the kernel: (how many units this CTA runs, n -> (batch, head, pair) of its n-th)."""
        if not self.num_ctas:
            return 1, lambda n: unit_coords(launch_index(self.grid), self.grid, self.heads)
        first = lax.axis_index("cta")
        num_units = 2 * lax.div(math.prod(self.grid) - first + self.num_ctas - 1, self.num_ctas)

        def unit_pair(n):   # a fold's two units: its pair p, then the pair num_pairs - 1 - p
            b, h, fold = unit_coords(first + lax.div(n, 2) * self.num_ctas, self.grid, self.heads)
            return b, h, fold + lax.rem(n, 2) * (self.num_pairs - 1 - 2 * fold)
        return num_units, unit_pair


def schedule_for(batch: int, heads: int, num_pairs: int, head_bytes: int, group_mib: int,
                 persistent: bool, segments: bool = False) -> Schedule:
    """The Schedule of num_pairs units per (batch, head) (launch_grid's arguments). Persistent
    CTAs take the pairs fold by fold, which balances where a pair's work follows its position
    (causal masks, windows): an odd number of pairs, or segment ids (a pair's work follows its
    documents, which folds do not even out), run a CTA per unit, which the hardware hands out
    as CTAs finish (packed documents, H100: 0.268 ms forward against 0.356 in folds, and 0.292
    in a run-time order of the most work first: bench/RESULTS.md, session 19)."""
    persistent = persistent and num_pairs % 2 == 0 and not segments
    grid = launch_grid(batch, heads, num_pairs // 2 if persistent else num_pairs, head_bytes,
                       group_mib)
    return Schedule(grid, heads, num_pairs,
                    min(num_sms(), math.prod(grid)) if persistent else None)


def query_pair_units(schedule: Schedule, plan: common.Plan, block_q: int, block_k: int, q_ref,
                     k_stream, v_stream, ids_ring=None, segment_refs=(),
                     consumers: int = CONSUMERS):
    """For kernels whose unit is a pair of query tiles streaming the key tiles they see (the
    forward, the backward's dQ), in the kernel: (how many units this CTA runs, work, span), where
    work(n, base) -> (batch, head, pair, the first key tile the n-th unit streams, how many, its
    rings): from the first tile the lower query tile sees (0 but under a window) to the last the
    upper one sees; span(b, i) -> query tile i's key tiles (common.kv_tiles), within its
    segments' when given, whose tiles need not grow with the query tile: the pair streams the
    union of its two (maybe none). k_stream, v_stream: (ring scratch, GMEM ref [B, S, Hkv, D])
    pairs, each made a Ring streaming that ref's key tiles from the CTA's `base`-th tile: query
    head h's are head h // (H / Hkv)'s (grouped-query, q_ref [B, S, H, D]). segment_refs: the
    queries' and the keys' ids [B, S] and the query tiles' ranges of key tiles [B, S / block_q,
    4] (common.tile_segments), or none; the keys' ids then ride ids_ring. Pairs run longest
    first (common.tile_order). With 3 consumers a unit is three query tiles (the first and the
    last bound its stream), the last unit maybe fewer (its upper tile: the sequence's last)."""
    num_units, unit_pair = schedule.units()
    group = q_ref.shape[2] // k_stream[1].shape[2]
    segment_ranges = segment_refs[2] if segment_refs else None
    rings = (k_stream, v_stream) + (((ids_ring, segment_refs[1]),) if segment_refs else ())

    def span(b, i):
        ranges = (None if segment_ranges is None
                  else common.segment_range(lambda c: segment_ranges[b, i, c]))
        return common.kv_tiles(i, plan, block_q, block_k, ranges)

    num_tiles = q_ref.shape[1] // block_q

    def work(n, base):
        b, h, pair = unit_pair(n)
        pair = common.tile_order(pair, schedule.num_pairs, plan.causal)
        upper = consumers * pair + consumers - 1
        if num_tiles % consumers:   # ragged units
            upper = jnp.minimum(upper, num_tiles - 1)
        first, end = pair_stream(span(b, consumers * pair), span(b, upper),
                                 segment_ranges is not None)
        kv_head = h if group == 1 else lax.div(h, group)
        # A ref's key tile: [block_k, D] of (b, kv_head), or [block_k] segment ids of b.
        rows = lambda t, x: (b, pl.ds((first + t) * block_k, block_k), kv_head)[:x.ndim]
        streamed = [Ring(lambda t, x=x: x.at[rows(t, x)], *scratch, offset=base)
                    for scratch, x in rings]
        return b, h, pair, first, end - first, streamed
    return num_units, work, span


def pair_stream(lower: common.Span, upper: common.Span, segments: bool):
    """(first, end) of the tiles a pair streams for its lower and upper tile's spans: the lower
    one's first to the upper one's last (both grow with the tile under causal masks and
    windows), or with segments, whose tiles need not grow, their union (maybe empty).
    (A unit's tiles between its lower and upper one stream within that.)"""
    if not segments:
        return lower.start, upper.end
    first = jnp.minimum(lower.start, upper.start)
    return first, jnp.maximum(jnp.maximum(lower.end, upper.end), first)


def load_tile_ids(ids_ref, b, row_start, smem, loaded) -> None:
    """With segment ids, for a consumer warpgroup: start the copy of its own tile's ids (ids_ref
    [B, S] from row_start) into smem [rows], arriving on the barrier `loaded`. The forward issues
    it beside the unit's q tile, before the unit reads its ranges (waited for where it was issued,
    the copy held every unit's start: the longest wait of a packed-documents unit under Nsight
    Compute); the backward kernels issue it where they wait for it, since issuing it beside
    their own tiles ran forward+backward 3% slower (bench/RESULTS.md, sessions 31 and 32). One
    buffer: segment ids run a CTA per unit (schedule_for), so no next unit loads into it early."""
    plgpu.copy_gmem_to_smem(ids_ref.at[b, pl.ds(row_start, smem.shape[0])], smem, loaded)


def segment_tile(span: common.Span, first, end, smem, loaded):
    """With segment ids, for a consumer warpgroup: its tile's span within its pair's stream
    [first, end) (maybe empty; masked but the tiles of its one segment, common.segment_ranges),
    and its own tile's ids (as load_tile_ids copied them into smem) in the accumulator's row
    layout."""
    clip = lambda t, low: jnp.maximum(jnp.minimum(t, end), low)
    start = clip(span.start, first)
    stop = clip(span.end, start)
    lo = jnp.minimum(clip(span.lo, start), stop)
    plgpu.barrier_wait(loaded)
    return (common.Span(start, lo, jnp.minimum(clip(span.hi, lo), stop), stop),
            compat.mosaic_gpu_load(smem, compat.mosaic_gpu_row_layout()))


def forward_rows(forward: Forward) -> int:
    """The forward pads the sequence to a multiple of this: a CTA's two query tiles and a key tile
    (tiles raised to wgmma's 64 rows; powers of two, so the larger is a multiple of the other).
    Three consumers' units are ragged instead (S1024 in 192-row units would pad to 1152)."""
    bq, bk = max(forward.block_q, WGMMA_M), max(forward.block_k, WGMMA_M)
    return max(bq if forward.consumers > CONSUMERS else CONSUMERS * bq, bk)


# The Mosaic GPU dK/dV kernel's key tile per consumer warpgroup: 64 rows in every entry tuned on
# the H100 and the H200 (bench/tune.py tried 128; it never won).
DKDV_BLOCK_K = 64


def backward_rows(dkdv: DkDv, dq: Dq) -> int:
    """The Mosaic GPU backward pads the sequence to a multiple of this: a CTA's two tiles, the
    largest of its dK/dV and dQ kernels' (raised to wgmma's 64 rows)."""
    return CONSUMERS * max(DKDV_BLOCK_K, *(max(rows, WGMMA_M)
                                           for rows in (dkdv.block_q, dq.block_q, dq.block_k)))


def sequence_rows(plan: common.Plan) -> int:
    """What the api pads the sequence to a multiple of, once, so that neither the forward nor its
    backward (the Mosaic GPU one, or Triton's) pads again."""
    mosaic_backward = isinstance(plan.dkdv, DkDv)
    return max(forward_rows(plan.forward),
               backward_rows(plan.dkdv, plan.dq) if mosaic_backward else 1)


def check_runs_here(plan: common.Plan, dtype) -> None:
    """No interpret mode, no GPU but Hopper, bf16 only. (Off the GPU, uninterpreted, the kernels
    still trace: jax.export lowers them for CUDA, and the tests run them in the Mosaic GPU
    interpreter.)"""
    if plan.interpret or (jax.default_backend() == "gpu" and not on_sm90()):
        raise NotImplementedError(NOT_HERE)
    if dtype != jnp.bfloat16:
        raise NotImplementedError(f"mosaic_gpu attention takes bfloat16 inputs (wgmma on f32 "
                                  f"would round them to tf32); got {dtype}")


# ------------------------------------------------------------------ the forward

def _kernel(q_ref, k_ref, v_ref, *refs, q_smem, lse_smem, q_loaded, k_ring, v_ring, ids_ring,
            q_ids_smem, q_ids_loaded, ping_pong, plan, block_q, block_k, schedule, consumers):
    segment_refs, (o_ref, *residual_refs) = refs[:3 * plan.segments], refs[3 * plan.segments:]
    lse_ref, o_lo_ref = residual_refs or (None, None)
    q_ids_ref = segment_refs[0] if segment_refs else None
    num_units, work, tile_span = query_pair_units(schedule, plan, block_q, block_k, q_ref,
                                                  (k_ring, k_ref), (v_ring, v_ref), ids_ring,
                                                  segment_refs, consumers)
    buffers = q_smem.shape[0] // consumers   # q tiles per warpgroup: the next unit's loads early
    num_tiles = q_ref.shape[1] // block_q
    ragged = num_tiles % consumers != 0      # the last unit holds fewer tiles than warpgroups

    def pass_schedule():
        """Both consumers meet here (no-op without ping-pong)."""
        if ping_pong is not None:
            plgpu.barrier_arrive(ping_pong)
            plgpu.barrier_wait(ping_pong)

    def if_tile_exists(i, then: Callable, otherwise: Callable = lambda: None) -> None:
        if ragged:
            pl.when(i < num_tiles)(then)
            pl.when(i >= num_tiles)(otherwise)
        else:
            then()

    def consume(wg):
        def load_q(n):   # the n-th unit's query tile into buffer n % buffers
            b, h, pair, *_ = work(n, 0)
            i = consumers * pair + wg
            buffer = wg * buffers + lax.rem(n, buffers)

            def copy():
                if buffers > 1:   # the buffer's last o store has read it (see the epilogue)
                    plgpu.wait_smem_to_gmem(buffers - 2, wait_read_only=True)
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(i * block_q, block_q), h],
                                        q_smem.at[buffer], q_loaded.at[buffer])
                if plan.segments:
                    load_tile_ids(q_ids_ref, b, i * block_q, q_ids_smem.at[wg],
                                  q_ids_loaded.at[wg])
            if_tile_exists(i, copy)

        def run(n, b, h, pair, first, count, rings):
            buffer = wg * buffers + lax.rem(n, buffers)
            i = consumers * pair + wg
            # A ragged unit's missing tile: its warpgroup only passes the unit's stream along.
            if_tile_exists(i, lambda: consume_unit(wg, b, h, i, first, count, rings,
                                                   q_smem.at[buffer], q_loaded.at[buffer]),
                           lambda: lax.fori_loop(0, count, lambda t, _: skip(rings, t), None))
        consume_units(num_units, work, load_q, run, buffers)
        plgpu.wait_smem_to_gmem(0)

    def consume_unit(wg, b, h, i, first, count, rings, q_tile, q_ready):
        """Warpgroup wg's query tile i of the unit; key tile t is the stream's tile t - first."""
        k_ring, v_ring, ids_ring = (*rings, None)[:3]   # the keys' ids' ring with segments
        q_rows = (b, pl.ds(i * block_q, block_q), h)
        span = tile_span(b, i)
        q_segment = None
        if plan.segments:   # its tiles within the pair's; the queries' ids
            span, q_segment = segment_tile(span, first, first + count, q_ids_smem.at[wg],
                                           q_ids_loaded.at[wg])
        plgpu.barrier_wait(q_ready)
        pl.when(wg == 1)(pass_schedule)        # warpgroup 1 runs one pass behind

        def release(t, _):
            """A tile only the neighbour needs (K_end was not waited for during the last p V)."""
            skip(rings, t - first)
            pass_schedule()   # the two passes a step makes, to stay paired with the neighbour
            pass_schedule()

        lax.fori_loop(first, span.start, release, None)   # (a window's tiles left of this row's)
        # Each later K_t is waited for during p V_t-1. Segments, or a window over a sequence
        # padded past the keys' last tile, can leave a tile no key tile at all.
        if plan.segments or plan.window is not None:
            pl.when(span.start < span.end)(lambda: k_ring.wait(span.start - first))
        else:
            k_ring.wait(span.start - first)

        def step(t, carry, masked, width=block_k):
            """Key tile t, or (width < block_k) its first `width` keys, where the rest are
            seen by no row of the query tile."""
            acc, m, l = carry
            n = t - first
            keys = (lambda x: x) if width == block_k else (lambda x: x.at[pl.ds(0, width)])

            def scores(s_ref):
                plgpu.wgmma(s_ref, q_tile, keys(k_ring.tile(n)).transpose((1, 0)))
                pass_schedule()
                return s_ref[...]  # reading the accumulator waits for the wgmma
            s = pl.run_scoped(scores, plgpu.ACC((block_q, width), jnp.float32))
            k_ring.release(n)
            segments = None
            if ids_ring is not None:   # the keys' segment ids, streamed beside K
                ids_ring.wait(n)
                if masked:   # (a tile inside the query tile's document needs none)
                    k_segment = compat.mosaic_gpu_load(keys(ids_ring.tile(n)),
                                                       compat.mosaic_gpu_column_layout())
                    segments = (lax.broadcast_in_dim(q_segment, s.shape, [0]),
                                lax.broadcast_in_dim(k_segment, s.shape, [1]))
                ids_ring.release(n)
            if masked:
                visible = tile_visible(plan, i * block_q, t * block_k, s.shape, segments=segments)
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1) * plan.scale_log2)
            # A window can leave a row nothing in its first tiles (common.softmax_step).
            m_exp = jnp.where(m_new == -jnp.inf, 0.0, m_new) if plan.rows_may_be_empty else m_new
            alpha = jnp.exp2(m - m_exp)
            p = jnp.exp2(s * plan.scale_log2 - lax.broadcast_in_dim(m_exp, s.shape, [0]))
            l = alpha * l + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p = p.astype(q_tile.dtype)
            # The softmax must be done before this warpgroup lets the other one compute.
            acc, m_new, l, p = lax.optimization_barrier((acc, m_new, l, p))
            if ping_pong is not None:
                plgpu.barrier_arrive(ping_pong)
            v_ring.wait(n)
            if ping_pong is not None:
                plgpu.barrier_wait(ping_pong)   # the other warpgroup's matmuls are issued

            def add_pv(acc_ref):
                plgpu.wgmma(acc_ref, p, keys(v_ring.tile(n)))
                pl.when(t + 1 < span.end)(lambda: k_ring.wait(n + 1))
            acc = pl.run_state(add_pv)(plgpu.ACC.init(acc))
            v_ring.release(n)
            return acc, m_new, l

        def tile_step(t, carry, masked):
            """A masked 128-key tile whose second half no row sees (the diagonal's under causal
            masking when the key tile is twice the query tile, as often as not) takes half the
            work. Halves of 64 keys only: K/V's swizzled tiles take no fewer, and with 256-key
            tiles the two widths of s left ptxas too few registers to keep the wgmmas in flight
            (it serialized them in the whole kernel: the forward 30% slower on the H100,
            bench/RESULTS.md session 33; bench/ptxas.py shows such notes)."""
            half = block_k // 2
            if not masked or half != 64:
                return step(t, carry, masked)
            return lax.cond(t * block_k + half >= common.keys_end(i, plan, block_q),
                            functools.partial(step, masked=True, width=half),
                            functools.partial(step, masked=True), t, carry)

        row = compat.mosaic_gpu_row_layout()
        carry = (plgpu.layout_cast(jnp.zeros((block_q, q_smem.shape[-1]), jnp.float32),
                                   plgpu.Layout.WGMMA),
                 plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row),
                 plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), row))
        carry = common.visit(tile_step, carry, span)
        lax.fori_loop(span.end, first + count, release, None)
        pl.when(wg == 0)(pass_schedule)        # warpgroup 0's last pass pairs with 1's first

        acc, m, l = carry
        lse = m + jnp.log(l) * common.LOG2E    # log2 l: Mosaic GPU has no log2
        if plan.rows_may_be_empty:             # a row that saw no key: o = 0, lse = +inf
            lse = jnp.where(l == 0.0, jnp.inf, lse)
            l = jnp.where(l == 0.0, 1.0, l)
        # One division a row and a multiply a value: a division per value (IEEE div.rn.f32, some
        # eight instructions) costs a unit of a few key tiles about one tile step more.
        o = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
        q_tile[...] = o.astype(q_tile.dtype)
        if lse_ref is not None:
            lse_smem.at[wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[q_rows])
        if lse_ref is not None:
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(i * block_q, block_q)])
            # The low half goes out through the same buffer once the TMA has read o from it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            q_tile[...] = common.low_half(o, q_tile.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_lo_ref.at[q_rows])
        # No wait here for the store to read q_tile: the load of a later unit's q tile into this
        # buffer waits (load_q), with three buffers a whole unit later (waiting here took
        # 4.7-6.9% of the consumers' warp samples, bench/RESULTS.md session 31). Each unit
        # leaves one store in flight (o, or its low half), so that wait lets the latest fly.

    specialize(consume, lambda: produce_units(num_units, work), consumers)


def tile_visible(plan: common.Plan, row_start, col_start, shape, transposed: bool = False,
                 segments=None):
    """common.visible over a wgmma accumulator tile whose rows are queries from row_start and
    columns keys from col_start (or the other way round when `transposed`); segments: the
    queries' and the keys' ids, broadcast to the tile."""
    iota = lambda axis: plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)
    rows, cols = row_start + iota(0), col_start + iota(1)
    if transposed:
        return common.visible(cols, rows, plan, *(segments or ()))
    return common.visible(rows, cols, plan, *(segments or ()))


def forward(q, k, v, plan: common.Plan, residuals: bool, segments=None):
    """q, k, v [B, S, H, D] bf16 (S padded to the blocks) -> (o [B, S, H, D], residuals or None).
    k, v may have fewer heads Hkv, dividing H (grouped-query: query head h attends with K/V head
    h // (H / Hkv)); a local window (plan.window) skips the tiles outside it; segments (q ids,
    kv ids) [B, S] int32 or None: a query sees keys of its own segment only, and a pair of query
    tiles streams only the key tiles that hold one of its segments (common.segment_ranges), each
    masked by the ids, whose tiles ride a third ring beside K's.

    The residuals are triton.forward's: q, k, v, o, lse [B, H, S] f32, o's low half, then the
    segment ids. Tiles below 64 rows (fit_blocks shrinks them for short sequences) are raised to
    64, wgmma's M, and the sequence is padded to a multiple of a CTA's 2 block_q rows (with 3
    consumers one block_q) and of block_k (the api has done so already: `sequence_rows`); padded
    keys are masked like the api's (common.visible) and padded rows sliced off.
    """
    check_runs_here(plan, q.dtype)
    b, s, h, d = q.shape
    config = plan.forward
    bq, bk = (max(rows, WGMMA_M) for rows in (config.block_q, config.block_k))
    padded = -(-s // forward_rows(config)) * forward_rows(config)   # s itself, from the api
    stages = config.num_stages
    consumers = config.consumers
    units = schedule_for(b, h, -(-padded // (consumers * bq)), 2 * padded * d * q.dtype.itemsize,
                         config.group_mib, config.persistent, segments is not None)
    segment_inputs = []
    if segments is not None:   # padded ids repeat the last (api.attention's rule)
        ids = [jnp.pad(x, ((0, 0), (0, padded - s)), mode="edge") for x in segments]
        segment_inputs = [*ids, common.segment_ranges(*ids, bq, bk)]

    def scratch_for(buffers):   # query tiles per consumer warpgroup
        return dict(
            q_smem=tiled_smem(q.dtype, consumers * buffers, bq, d),
            lse_smem=plgpu.SMEM((consumers, bq), jnp.float32) if residuals else None,
            q_loaded=plgpu.Barrier(num_barriers=consumers * buffers),
            k_ring=ring_scratch(tiled_smem(q.dtype, stages, bk, d), stages, consumers),
            v_ring=ring_scratch(tiled_smem(q.dtype, stages, bk, d), stages, consumers),
            ids_ring=(ring_scratch(plgpu.SMEM((stages, bk), jnp.int32), stages, consumers)
                      if segments is not None else None),
            q_ids_smem=plgpu.SMEM((consumers, bq), jnp.int32) if segments is not None else None,
            q_ids_loaded=plgpu.Barrier(num_barriers=consumers) if segments is not None else None,
            ping_pong=plgpu.Barrier(num_arrivals=CONSUMERS) if config.schedule_barrier else None)
    # A persistent CTA loads its next query tiles early, into a second buffer, and with a third,
    # where it fits and every unit stores (not ragged), waits for a unit's o store a unit later.
    buffers = 1
    if units.num_ctas:
        ragged = padded // bq % consumers != 0
        buffers = 3 if not ragged and smem_bytes(scratch_for(3)) <= SMEM_BYTES else 2
    scratch = scratch_for(buffers)
    if smem_bytes(scratch) > SMEM_BYTES:
        raise ValueError(f"mosaic_gpu attention: block_q={bq}, block_k={bk}, num_stages={stages}"
                         f"{', persistent=1' if units.num_ctas else ''} need "
                         f"{smem_bytes(scratch) // 1024} KiB of shared memory at head_dim {d}; a "
                         f"CTA has {SMEM_BYTES // 1024}")
    o_type = jax.ShapeDtypeStruct((b, padded, h, d), q.dtype)
    lse_type = jax.ShapeDtypeStruct((b, h, padded), jnp.float32)
    outs = launch(
        functools.partial(_kernel, plan=plan, block_q=bq, block_k=bk, schedule=units,
                          consumers=consumers),
        out_type=[o_type, lse_type, o_type] if residuals else [o_type], scratch=scratch,
        name="flash_attention_fwd_mgpu", consumers=consumers, **units.launch_args(),
    )(*(pad_rows(x, padded) for x in (q, k, v)), *segment_inputs)
    o = outs[0][:, :s]
    if not residuals:
        return o, None
    lse, o_lo = outs[1][:, :, :s], outs[2][:, :s]
    return o, (q, k, v, o, lse, o_lo, *(segments or ()))
