"""Flash attention backward in Pallas Mosaic GPU for Hopper (sm90): two warp-specialized kernels.

The math is common.dq_step's and common.dkdv_step's (base 2, c = sm_scale log2 e; p recomputed from
q, k and the forward's lse; delta = rowsum(do * (o + o_lo)) by XLA beforehand):

    dK/dV  a CTA per pair of key tiles (mosaic_gpu.launch_grid): each consumer warpgroup owns
           a key tile [bk, D] and streams the query tiles that see it, in transposed orientation
           so every product has the key tile as wgmma's M (as in dkdv_step):
               s^T = k q^T     p^T = 2^(c s^T - lse)     dv += p^T do
               dp^T = v do^T   ds^T = p^T (dp^T - delta) dk += ds^T q        (dk *= sm_scale)
    dQ     a CTA per pair of query tiles: each consumer warpgroup owns a query tile [bq, D] (with
           do, lse, delta) and streams the key tiles it sees:
               s = q k^T       p = 2^(c s - lse)         dp = do v^T
               ds = p (dp - delta)                       dq += ds k          (dq *= sm_scale)

As in the forward (mosaic_gpu.py), a producer warpgroup TMA-copies the streamed tiles into rings
(warp_specialized.Ring) and the two consumers share them: the dK/dV kernel streams q, do [bq, D]
and lse, delta [bq] from the first query tile the lower key tile needs, and the upper key tile's
warpgroup skips the ones before its own first; the dQ kernel streams k, v up to the last key tile
the upper query tile needs, and the lower one skips the rest. Each kernel has its own tiles and
ring depth (mosaic_gpu.DkDv: `dkdv_block_q` and `dkdv_num_stages`, its key tile `DKDV_BLOCK_K`;
mosaic_gpu.Dq: `dq_` the same for dQ): at S8192 D64 dK/dV is fastest with 128-query x 64-key tiles,
dQ with 64 x 128 (bench/RESULTS.md, version 14). Masks only on the tiles crossing the diagonal or
the padded end of the sequence; dk, dv, dq accumulate in f32 registers, p and ds enter the tensor
cores in bf16 from registers. Within a step the products overlap the elementwise work
(warp_specialized.matmuls_t): dp is issued right behind s, so the softmax of s runs while dp is on
the tensor cores; in dK/dV, ds is computed while p^T do runs, and dp^T's product starts from
-delta, so the tensor cores subtract it (no instruction per element, no registers for delta: 8%
faster at S8192 D64, RESULTS.md version 14; the same in the dQ kernel, or for lse, measured no
faster).

Both kernels run a CTA per unit (a pair of tiles), or (`dkdv_persistent`) one CTA per
multiprocessor through the folds of mosaic_gpu.Schedule, as the forward does: the producer
streams the next unit's tiles through the same rings, and each consumer loads its next unit's own
tiles (k and v; q, do, lse and delta) into a second buffer. Measured faster at head_dim 128 up to
S1024 and slower from S2048 (bench/RESULTS.md, version 13): a tuning candidate. With segment
ids both run a CTA per unit, as the forward (mosaic_gpu.schedule_for: folds do not balance
documents).

Masks, as in the forward: with grouped-query heads a dK/dV unit is a pair of key tiles of one
K/V head, streaming the query tiles of each query head of its group in turn and summing dk and
dv over them in registers (no per-query-head copy, no reduction afterwards); a dQ unit reads its
query head's K/V head. A local window streams only the tiles within it: a pair's stream runs from
the lower tile's first to the upper one's last (mosaic_gpu.pair_stream), each warpgroup skipping
the ones only its neighbour needs. With segment ids a pair streams the union of its two tiles'
ranges (common.segment_ranges), the streamed tiles' ids on a ring beside them, each consumer's
own tile's ids loaded once, every visited tile masked but those inside its own tile's one
document.

FLOPs per (batch, head): dK/dV four products (s^T, dv, dp^T, dk) of 2 S^2 D, dQ three (s, dp, dq),
14 S^2 D against the forward's 4 (s is recomputed in both kernels); halved when causal.

A one-pass variant (the dK/dV kernel also summing dq by TMA reduce-add, 5 products instead of 7)
measured slower than the two kernels (ptxas spills at head_dim 128) and was removed;
bench/RESULTS.md (version 6) keeps its record.

The Mosaic GPU forward saves Triton's residuals, so triton_vjp differentiates it too: the api
picks which backward runs (api.backward_implementation), by the tuning table's measurement.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import compat
from kernels.attention import common
from kernels.attention.mosaic_gpu import (DKDV_BLOCK_K, backward_rows, check_runs_here,
                                          load_tile_ids, pair_stream, query_pair_units,
                                          schedule_for, segment_tile, tile_visible)
from kernels.warp_specialized import (CONSUMERS, WGMMA_M, Ring, accumulate, consume_units, launch,
                                      matmuls_t, pad_rows, produce_units, ring_scratch, skip,
                                      specialize, tiled_smem)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, k_smem, v_smem,
                 kv_loaded, q_ring, do_ring, lse_ring, delta_ring, ids_ring, own_ids_smem,
                 own_ids_loaded, plan, block_q, block_k, schedule):
    segment_refs, (dk_ref, dv_ref) = refs[:3 * plan.segments], refs[3 * plan.segments:]
    k_ids_ref, q_ids_ref, ranges_ref = segment_refs or (None, None, None)
    num_units, unit_pair = schedule.units()
    buffers = k_smem.shape[0] // CONSUMERS   # a persistent CTA loads its next unit's k, v early
    column = compat.mosaic_gpu_column_layout()
    group = q_ref.shape[2] // k_ref.shape[2]   # the query heads of a K/V head (grouped-query)

    def span(b, j):   # key tile j's query tiles, within its segments' when given
        ranges = (None if ranges_ref is None
                  else common.segment_range(lambda c: ranges_ref[b, j, c]))
        return common.q_tiles(j, plan, block_q, block_k, ranges)

    def work(n, base):
        """This CTA's n-th unit -> (b, its K/V head, pair, the first query tile it streams, how
        many tiles, its q, do, lse and delta rings (and the queries' ids') from the CTA's
        `base`-th tile)."""
        # Pairs of key tiles in order: the first ones are seen by the most query tiles.
        b, h, pair = unit_pair(n)
        # The pair's query tiles (pair_stream: to the end of the sequence but under a left
        # window or segments), once per query head of the group, head after head.
        first, end = pair_stream(span(b, CONSUMERS * pair),
                                 span(b, CONSUMERS * pair + CONSUMERS - 1), plan.segments)
        per_head = end - first
        if group == 1:
            tile = lambda n: (h, first + n)
        else:   # the stream's n-th tile: query head h group + n // per_head
            tile = lambda n: (h * group + lax.div(n, per_head), first + lax.rem(n, per_head))
        q_rows = lambda head, i: (b, pl.ds(i * block_q, block_q), head)
        q_cols = lambda head, i: (b, head, pl.ds(i * block_q, block_q))
        streams = [(q_ring, q_ref, q_rows), (do_ring, do_ref, q_rows),
                   (lse_ring, lse_ref, q_cols), (delta_ring, delta_ref, q_cols)]
        if plan.segments:
            streams.append((ids_ring, q_ids_ref, lambda head, i: (b, pl.ds(i * block_q, block_q))))
        rings = [Ring(lambda n, x=x, at=at: x.at[at(*tile(n))], *scratch, offset=base)
                 for scratch, x, at in streams]
        return b, h, pair, first, group * per_head, rings

    def consume(wg):
        def load_kv(n):   # the n-th unit's key and value tiles into buffer n % buffers
            b, h, pair, *_ = work(n, 0)
            rows = (b, pl.ds((CONSUMERS * pair + wg) * block_k, block_k), h)
            buffer = wg * buffers + lax.rem(n, buffers)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[buffer], kv_loaded.at[buffer])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[buffer],
                                    kv_loaded.at[CONSUMERS * buffers + buffer])

        def run(n, b, h, pair, first, count, rings):
            consume_unit(wg, b, h, CONSUMERS * pair + wg, first, count, rings,
                         wg * buffers + lax.rem(n, buffers))
        consume_units(num_units, work, load_kv, run, buffers)

    def consume_unit(wg, b, h, j, first, count, rings, buffer):
        q_ring, do_ring, lse_ring, delta_ring, q_ids_ring = (*rings, None)[:5]
        k_rows = (b, pl.ds(j * block_k, block_k), h)
        k_tile, v_tile = k_smem.at[buffer], v_smem.at[buffer]
        per_head = count if group == 1 else lax.div(count, group)
        tiles = span(b, j)
        k_segment = None
        if plan.segments:   # its tiles within the pair's; the keys' ids (load_tile_ids: when)
            load_tile_ids(k_ids_ref, b, j * block_k, own_ids_smem.at[wg], own_ids_loaded.at[wg])
            tiles, k_segment = segment_tile(tiles, first, first + per_head, own_ids_smem.at[wg],
                                            own_ids_loaded.at[wg])
        plgpu.barrier_wait(kv_loaded.at[buffer])
        plgpu.barrier_wait(kv_loaded.at[CONSUMERS * buffers + buffer])

        def step(i, carry, masked, offset):
            dk, dv = carry
            n = offset + i   # query tile i's place in the stream
            for ring in rings:
                ring.wait(n)
            q_tile, do_tile = q_ring.tile(n), do_ring.tile(n)

            columns = lambda ring: lax.broadcast_in_dim(
                compat.mosaic_gpu_load(ring.tile(n), column), (block_k, block_q), [1])

            def softmax(s_t):
                if masked:
                    segments = None if q_ids_ring is None else (
                        columns(q_ids_ring), lax.broadcast_in_dim(k_segment, s_t.shape, [0]))
                    visible = tile_visible(plan, j * block_k, i * block_q, s_t.shape,
                                           transposed=True, segments=segments)
                    s_t = jnp.where(visible, s_t, -jnp.inf)
                return jnp.exp2(s_t * plan.scale_log2 - columns(lse_ring))

            # dp^T - delta = v do^T - delta runs on the tensor cores (from -delta) while the
            # softmax of s^T = k q^T does not.
            p_t, dp_t = matmuls_t((k_tile, q_tile), (v_tile, do_tile), softmax,
                                  second_start=-columns(delta_ring))

            def update(accs):
                dk_ref, dv_ref = accs
                plgpu.wgmma(dv_ref, p_t.astype(k_tile.dtype), do_tile)
                ds_t = (p_t * dp_t).astype(k_tile.dtype)   # while p^T do is on the tensor cores
                plgpu.wgmma(dk_ref, ds_t, q_tile)
            dk, dv = pl.run_state(update)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))
            for ring in rings:   # the products that read the slots are complete
                ring.release(n)
            return dk, dv

        def head(g, carry):
            """dk, dv after the g-th query head of the group: its tiles from the stream's
            g per_head-th on, query tile i at offset + i."""
            offset = g * per_head - first
            skip_tile = lambda i, _: skip(rings, offset + i)   # one only the neighbour needs
            # Only warpgroup 1 skips tiles before its first; under a left window only
            # warpgroup 0 those after its last; with segments either, both.
            lax.fori_loop(first, tiles.start, skip_tile, None)
            # In stream order (common.visit: the masked tiles on the diagonal, then the others).
            carry = common.visit(functools.partial(step, offset=offset), carry, tiles)
            if plan.left is not None or plan.segments:
                lax.fori_loop(tiles.end, first + per_head, skip_tile, None)
            return carry

        zeros = plgpu.layout_cast(jnp.zeros((block_k, k_smem.shape[-1]), jnp.float32),
                                  plgpu.Layout.WGMMA)
        dk, dv = (head(0, (zeros, zeros)) if group == 1
                  else lax.fori_loop(0, group, head, (zeros, zeros)))
        # Both products that read k_tile and v_tile are complete: they stage dk and dv.
        k_tile[...] = (dk * plan.sm_scale).astype(k_tile.dtype)
        v_tile[...] = dv.astype(v_tile.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[k_rows])
        plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[k_rows])
        # Only until the TMA has read the tiles (for the next load into them): the writes land
        # before the kernel ends, and the multiprocessor goes on meanwhile (as CUTLASS's
        # epilogues wait).
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    specialize(consume, lambda: produce_units(num_units, work))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, q_smem, do_smem,
               lse_smem, delta_smem, q_loaded, k_ring, v_ring, ids_ring, own_ids_smem,
               own_ids_loaded, plan, block_q, block_k, schedule):
    segment_refs, (dq_ref,) = refs[:3 * plan.segments], refs[3 * plan.segments:]
    q_ids_ref = segment_refs[0] if segment_refs else None
    num_units, work, tile_span = query_pair_units(schedule, plan, block_q, block_k, q_ref,
                                                  (k_ring, k_ref), (v_ring, v_ref), ids_ring,
                                                  segment_refs)
    buffers = q_smem.shape[0] // CONSUMERS   # a persistent CTA loads its next unit's tiles early
    row = compat.mosaic_gpu_row_layout()

    def loaded(j, buffer):   # the barrier of the buffer's j-th tile (q, do, lse, delta)
        return q_loaded.at[j * CONSUMERS * buffers + buffer]

    def consume(wg):
        def load(n):   # the n-th unit's q, do, lse and delta into buffer n % buffers
            b, h, pair, *_ = work(n, 0)
            i = CONSUMERS * pair + wg
            rows, cols = (b, pl.ds(i * block_q, block_q), h), (b, h, pl.ds(i * block_q, block_q))
            buffer = wg * buffers + lax.rem(n, buffers)
            for j, (src, dst) in enumerate(((q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
                                            (lse_ref.at[cols], lse_smem),
                                            (delta_ref.at[cols], delta_smem))):
                plgpu.copy_gmem_to_smem(src, dst.at[buffer], loaded(j, buffer))

        def run(n, b, h, pair, first, count, rings):
            consume_unit(wg, b, h, CONSUMERS * pair + wg, first, count, rings,
                         wg * buffers + lax.rem(n, buffers))
        consume_units(num_units, work, load, run, buffers)

    def consume_unit(wg, b, h, i, first, count, rings, buffer):
        """Warpgroup wg's query tile i; key tile t is the stream's tile t - first."""
        k_ring, v_ring, kv_ids_ring = (*rings, None)[:3]
        q_tile, do_tile = q_smem.at[buffer], do_smem.at[buffer]
        span = tile_span(b, i)
        q_segment = None
        if plan.segments:   # its tiles within the pair's; the queries' ids (load_tile_ids: when)
            load_tile_ids(q_ids_ref, b, i * block_q, own_ids_smem.at[wg], own_ids_loaded.at[wg])
            span, q_segment = segment_tile(span, first, first + count, own_ids_smem.at[wg],
                                           own_ids_loaded.at[wg])
        for j in range(4):
            plgpu.barrier_wait(loaded(j, buffer))
        lse = compat.mosaic_gpu_load(lse_smem.at[buffer], row)
        delta = compat.mosaic_gpu_load(delta_smem.at[buffer], row)

        def step(t, dq, masked):
            n = t - first
            for ring in rings:
                ring.wait(n)

            def softmax(s):
                if masked:
                    segments = None
                    if kv_ids_ring is not None:   # the keys' ids, streamed beside K
                        k_segment = compat.mosaic_gpu_load(kv_ids_ring.tile(n),
                                                           compat.mosaic_gpu_column_layout())
                        segments = (lax.broadcast_in_dim(q_segment, s.shape, [0]),
                                    lax.broadcast_in_dim(k_segment, s.shape, [1]))
                    s = jnp.where(tile_visible(plan, i * block_q, t * block_k, s.shape,
                                               segments=segments), s, -jnp.inf)
                return jnp.exp2(s * plan.scale_log2 - lax.broadcast_in_dim(lse, s.shape, [0]))

            # dp = do v^T runs on the tensor cores while the softmax of s = q k^T does not.
            p, dp = matmuls_t((q_tile, k_ring.tile(n)), (do_tile, v_ring.tile(n)), softmax)
            v_ring.release(n)
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = accumulate(dq, ds.astype(q_tile.dtype), k_ring.tile(n))
            k_ring.release(n)
            if kv_ids_ring is not None:
                kv_ids_ring.release(n)
            return dq

        other = lambda t, _: skip(rings, t - first)   # a tile only the neighbour needs
        lax.fori_loop(first, span.start, other, None)
        dq = plgpu.layout_cast(jnp.zeros((block_q, q_smem.shape[-1]), jnp.float32),
                               plgpu.Layout.WGMMA)
        dq = common.visit(step, dq, span)
        lax.fori_loop(span.end, first + count, other, None)
        q_tile[...] = (dq * plan.sm_scale).astype(q_tile.dtype)  # q's products are complete
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[b, pl.ds(i * block_q, block_q), h])
        # Only until the TMA has read the buffer (the next load into it, or the kernel's end).
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    specialize(consume, lambda: produce_units(num_units, work))


def backward(plan: common.Plan, residuals, do):
    """The forward's residuals (q, k, v, o [B, S, H, D], lse [B, H, S] f32, o's low half) and
    do [B, S, H, D] -> (dq, dk, dv) in q's dtype, dq [B, S, H, D], dk and dv k's shape: k and v
    may have fewer heads Hkv, dividing H (grouped-query: a dK/dV unit streams the query tiles of
    every query head of its K/V head, head after head, and sums over them in registers); a local
    window (plan.window) streams only the tiles within it; segment ids (q ids, kv ids [B, S]
    int32, the residuals' last two, as the forward saves them): a unit streams only the tiles
    that hold one of its segments (common.segment_ranges), each masked by the ids, whose tiles
    ride a ring beside the streamed ones, and each consumer loads its own tile's ids once.

    Tiles are raised to 64 rows (wgmma's M) and the sequence padded to a multiple of a CTA's two
    tiles (the largest of either kernel); padded rows have do = 0 and delta = 0, so they add
    nothing."""
    q, k, v, o, lse, o_lo, *segments = residuals
    check_runs_here(plan, q.dtype)
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    # Each kernel's query and key tiles: dK/dV's, then dQ's.
    bq, dq_bq, dq_bk = (max(rows, WGMMA_M)
                        for rows in (plan.dkdv.block_q, plan.dq.block_q, plan.dq.block_k))
    bk = DKDV_BLOCK_K
    stages, dq_stages = plan.dkdv.num_stages, plan.dq.num_stages
    rows = backward_rows(plan.dkdv, plan.dq)
    padded = -(-s // rows) * rows   # s itself, from the api
    delta = common.output_delta(o, o_lo, do).transpose(0, 2, 1)                  # [B, H, S]
    q_p, k_p, v_p, do_p = (pad_rows(x, padded) for x in (q, k, v, do))
    lse_p, delta_p = (pad_rows(x, padded, axis=2) for x in (lse, delta))
    grad = lambda x: jax.ShapeDtypeStruct(x.shape, q.dtype)
    vector_ring = lambda dtype=jnp.float32: ring_scratch(plgpu.SMEM((stages, bq), dtype), stages)
    # Each kernel's segment operands: its own tiles' ids, the streamed ones', and its own tiles'
    # ranges of the streamed ones; the ids' ring, its own tiles' ids and their barrier.
    ids = [jnp.pad(x, ((0, 0), (0, padded - s)), mode="edge") for x in segments]
    dkdv_ids = list(common.tile_segments(ids, bk, bq, by_query=False)) if ids else []
    dq_ids = list(common.tile_segments(ids, dq_bq, dq_bk, by_query=True)) if ids else []
    ids_scratch = lambda ring, own_rows: dict(
        ids_ring=ring if ids else None,
        own_ids_smem=plgpu.SMEM((CONSUMERS, own_rows), jnp.int32) if ids else None,
        own_ids_loaded=plgpu.Barrier(num_barriers=CONSUMERS) if ids else None)

    # A dK/dV unit streams q and do of its group's query heads, a dQ unit k and v: 2 S D bf16
    # elements a head. Persistent CTAs load the next unit's own tiles into a second buffer.
    units = lambda heads, block, streamed: schedule_for(
        b, heads, padded // (CONSUMERS * block), streamed * 2 * padded * d * q.dtype.itemsize,
        plan.dkdv.group_mib, plan.dkdv.persistent, plan.segments)
    dkdv_units, dq_units = units(kv_heads, bk, h // kv_heads), units(h, dq_bq, 1)
    buffers = lambda schedule: 2 if schedule.num_ctas else 1
    dk, dv = launch(
        functools.partial(_dkdv_kernel, plan=plan, block_q=bq, block_k=bk, schedule=dkdv_units),
        out_type=[grad(k_p), grad(k_p)],
        scratch=dict(k_smem=tiled_smem(q.dtype, CONSUMERS * buffers(dkdv_units), bk, d),
                     v_smem=tiled_smem(q.dtype, CONSUMERS * buffers(dkdv_units), bk, d),
                     kv_loaded=plgpu.Barrier(num_barriers=2 * CONSUMERS * buffers(dkdv_units)),
                     q_ring=ring_scratch(tiled_smem(q.dtype, stages, bq, d), stages),
                     do_ring=ring_scratch(tiled_smem(q.dtype, stages, bq, d), stages),
                     lse_ring=vector_ring(), delta_ring=vector_ring(),
                     **ids_scratch(vector_ring(jnp.int32), bk)),
        name="flash_attention_dkdv_mgpu", **dkdv_units.launch_args(),
    )(q_p, k_p, v_p, do_p, lse_p, delta_p, *dkdv_ids)
    dq_buffers = CONSUMERS * buffers(dq_units)
    dq = launch(
        functools.partial(_dq_kernel, plan=plan, block_q=dq_bq, block_k=dq_bk, schedule=dq_units),
        out_type=grad(q_p),
        scratch=dict(q_smem=tiled_smem(q.dtype, dq_buffers, dq_bq, d),
                     do_smem=tiled_smem(q.dtype, dq_buffers, dq_bq, d),
                     lse_smem=plgpu.SMEM((dq_buffers, dq_bq), jnp.float32),
                     delta_smem=plgpu.SMEM((dq_buffers, dq_bq), jnp.float32),
                     q_loaded=plgpu.Barrier(num_barriers=4 * dq_buffers),
                     k_ring=ring_scratch(tiled_smem(q.dtype, dq_stages, dq_bk, d), dq_stages),
                     v_ring=ring_scratch(tiled_smem(q.dtype, dq_stages, dq_bk, d), dq_stages),
                     **ids_scratch(ring_scratch(plgpu.SMEM((dq_stages, dq_bk), jnp.int32),
                                                dq_stages), dq_bq)),
        name="flash_attention_dq_mgpu", **dq_units.launch_args(),
    )(q_p, k_p, v_p, do_p, lse_p, delta_p, *dq_ids)
    return dq[:, :s], dk[:, :s], dv[:, :s]
