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
mosaic_gpu.Dq: `dq_` the same for dQ): at S8192 D64 dK/dV is fastest with 128-query x 64-key
tiles, dQ with 64 x 128 (bench/RESULTS.md, version 14). Masks only on the tiles crossing the diagonal or the padded end of the sequence; dk, dv, dq
accumulate in f32 registers, p and ds enter the tensor cores in bf16 from registers. Within a
step the products overlap the elementwise work (warp_specialized.matmuls_t): dp is issued right
behind s, so the softmax of s runs while dp is on the tensor cores; in dK/dV, ds is computed
while p^T do runs, and dp^T's product starts from -delta, so the tensor cores subtract it (no
instruction per element, no registers for delta: 8% faster at S8192 D64, RESULTS.md version 14;
the same in the dQ kernel, or for lse, measured no faster).

Both kernels run a CTA per unit (a pair of tiles), or (`dkdv_persistent`) one CTA per
multiprocessor through the folds of mosaic_gpu.Schedule, as the forward does: the producer
streams the next unit's tiles through the same rings, and each consumer loads its next unit's own
tiles (k and v; q, do, lse and delta) into a second buffer. Measured faster at head_dim 128 up to
S1024 and slower from S2048 (bench/RESULTS.md, version 13): a tuning candidate.

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
                                          query_pair_units, schedule_for, tile_visible)
from kernels.warp_specialized import (CONSUMERS, WGMMA_M, Ring, accumulate, consume_units, launch,
                                      matmuls_t, pad_rows, produce_units, ring_scratch, skip,
                                      specialize, tiled_smem)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, k_smem,
                 v_smem, kv_loaded, q_ring, do_ring, lse_ring, delta_ring, plan, block_q, block_k,
                 schedule):
    num_units, unit_pair = schedule.units()
    buffers = k_smem.shape[0] // CONSUMERS   # a persistent CTA loads its next unit's k, v early
    column = compat.mosaic_gpu_column_layout()

    def work(n, base):
        """This CTA's n-th unit -> (b, h, pair, the first query tile it streams, how many, its
        q, do, lse and delta rings from the CTA's `base`-th tile)."""
        # Pairs of key tiles in order: the first ones are seen by the most query tiles.
        b, h, pair = unit_pair(n)
        q_rows = lambda i: (b, pl.ds(i * block_q, block_q), h)
        q_cols = lambda i: (b, h, pl.ds(i * block_q, block_q))
        # The stream runs from the first query tile the lower key tile sees (the earliest either
        # sees) to the end, which both see.
        span = common.q_tiles(CONSUMERS * pair, plan, block_q, block_k)
        first, stream_end = span.start, span.end
        rings = [Ring(lambda n, x=x, at=at: x.at[at(first + n)], *scratch, offset=base)
                 for scratch, x, at in ((q_ring, q_ref, q_rows), (do_ring, do_ref, q_rows),
                                        (lse_ring, lse_ref, q_cols),
                                        (delta_ring, delta_ref, q_cols))]
        return b, h, pair, first, stream_end - first, rings

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
        q_ring, do_ring, lse_ring, delta_ring = rings
        k_rows = (b, pl.ds(j * block_k, block_k), h)
        k_tile, v_tile = k_smem.at[buffer], v_smem.at[buffer]
        span = common.q_tiles(j, plan, block_q, block_k)

        # Only warpgroup 1 skips tiles: the ones before its first.
        lax.fori_loop(0, span.start - first, lambda n, _: skip(rings, n), None)
        plgpu.barrier_wait(kv_loaded.at[buffer])
        plgpu.barrier_wait(kv_loaded.at[CONSUMERS * buffers + buffer])

        def step(i, carry, masked):
            dk, dv = carry
            n = i - first
            for ring in rings:
                ring.wait(n)
            q_tile, do_tile = q_ring.tile(n), do_ring.tile(n)

            columns = lambda ring: lax.broadcast_in_dim(
                compat.mosaic_gpu_load(ring.tile(n), column), (block_k, block_q), [1])

            def softmax(s_t):
                if masked:
                    visible = tile_visible(plan, j * block_k, i * block_q, s_t.shape,
                                           transposed=True)
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

        zeros = plgpu.layout_cast(jnp.zeros((block_k, k_smem.shape[-1]), jnp.float32),
                                  plgpu.Layout.WGMMA)
        # In stream order (common.visit: the masked tiles on the diagonal, then the others).
        dk, dv = common.visit(step, (zeros, zeros), span)
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


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, q_smem, do_smem,
               lse_smem, delta_smem, q_loaded, k_ring, v_ring, plan, block_q, block_k, schedule):
    num_units, work, _ = query_pair_units(schedule, plan, block_q, block_k,
                                          ((k_ring, k_ref), (v_ring, v_ref)))
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
            consume_unit(wg, b, h, CONSUMERS * pair + wg, first, count, *rings,
                         wg * buffers + lax.rem(n, buffers))
        consume_units(num_units, work, load, run, buffers)

    def consume_unit(wg, b, h, i, first, count, k_ring, v_ring, buffer):
        """Warpgroup wg's query tile i; key tile t is the stream's tile t - first."""
        q_tile, do_tile = q_smem.at[buffer], do_smem.at[buffer]
        for j in range(4):
            plgpu.barrier_wait(loaded(j, buffer))
        lse = compat.mosaic_gpu_load(lse_smem.at[buffer], row)
        delta = compat.mosaic_gpu_load(delta_smem.at[buffer], row)

        def step(t, dq, masked):
            n = t - first
            k_ring.wait(n)
            v_ring.wait(n)

            def softmax(s):
                if masked:
                    s = jnp.where(tile_visible(plan, i * block_q, t * block_k, s.shape), s,
                                  -jnp.inf)
                return jnp.exp2(s * plan.scale_log2 - lax.broadcast_in_dim(lse, s.shape, [0]))

            # dp = do v^T runs on the tensor cores while the softmax of s = q k^T does not.
            p, dp = matmuls_t((q_tile, k_ring.tile(n)), (do_tile, v_ring.tile(n)), softmax)
            v_ring.release(n)
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = accumulate(dq, ds.astype(q_tile.dtype), k_ring.tile(n))
            k_ring.release(n)
            return dq

        span = common.kv_tiles(i, plan, block_q, block_k)
        other = lambda t, _: skip((k_ring, v_ring), t - first)   # a tile only the neighbour needs
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
    do [B, S, H, D] -> (dq, dk, dv) [B, S, H, D] in q's dtype.

    Tiles are raised to 64 rows (wgmma's M) and the sequence padded to a multiple of a CTA's two
    tiles (the largest of either kernel); padded rows have do = 0 and delta = 0, so they add
    nothing."""
    q, k, v, o, lse, o_lo = residuals
    check_runs_here(plan, q.dtype)
    b, s, h, d = q.shape
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
    grad = lambda: jax.ShapeDtypeStruct(q_p.shape, q.dtype)
    vector_ring = lambda: ring_scratch(plgpu.SMEM((stages, bq), jnp.float32), stages)

    # Both kernels stream a (batch, head)'s q and do, or k and v: 2 S D bf16 elements. Persistent
    # CTAs load the next unit's own tiles into a second buffer.
    units = lambda block: schedule_for(b, h, padded // (CONSUMERS * block),
                                       2 * padded * d * q.dtype.itemsize,
                                       plan.dkdv.group_mib, plan.dkdv.persistent)
    dkdv_units, dq_units = units(bk), units(dq_bq)
    buffers = lambda schedule: 2 if schedule.num_ctas else 1
    dk, dv = launch(
        functools.partial(_dkdv_kernel, plan=plan, block_q=bq, block_k=bk, schedule=dkdv_units),
        out_type=[grad(), grad()],
        scratch=dict(k_smem=tiled_smem(q.dtype, CONSUMERS * buffers(dkdv_units), bk, d),
                     v_smem=tiled_smem(q.dtype, CONSUMERS * buffers(dkdv_units), bk, d),
                     kv_loaded=plgpu.Barrier(num_barriers=2 * CONSUMERS * buffers(dkdv_units)),
                     q_ring=ring_scratch(tiled_smem(q.dtype, stages, bq, d), stages),
                     do_ring=ring_scratch(tiled_smem(q.dtype, stages, bq, d), stages),
                     lse_ring=vector_ring(), delta_ring=vector_ring()),
        name="flash_attention_dkdv_mgpu", **dkdv_units.launch_args(),
    )(q_p, k_p, v_p, do_p, lse_p, delta_p)
    dq_buffers = CONSUMERS * buffers(dq_units)
    dq = launch(
        functools.partial(_dq_kernel, plan=plan, block_q=dq_bq, block_k=dq_bk, schedule=dq_units),
        out_type=grad(),
        scratch=dict(q_smem=tiled_smem(q.dtype, dq_buffers, dq_bq, d),
                     do_smem=tiled_smem(q.dtype, dq_buffers, dq_bq, d),
                     lse_smem=plgpu.SMEM((dq_buffers, dq_bq), jnp.float32),
                     delta_smem=plgpu.SMEM((dq_buffers, dq_bq), jnp.float32),
                     q_loaded=plgpu.Barrier(num_barriers=4 * dq_buffers),
                     k_ring=ring_scratch(tiled_smem(q.dtype, dq_stages, dq_bk, d), dq_stages),
                     v_ring=ring_scratch(tiled_smem(q.dtype, dq_stages, dq_bk, d), dq_stages)),
        name="flash_attention_dq_mgpu", **dq_units.launch_args(),
    )(q_p, k_p, v_p, do_p, lse_p, delta_p)
    return dq[:, :s], dk[:, :s], dv[:, :s]
