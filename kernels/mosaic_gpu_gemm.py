"""A persistent, warp-specialized Mosaic GPU GEMM for Hopper (sm90), with two epilogues: the
GEMMs of the LayerNorm+FFN (kernels/layernorm_ffn/mosaic_gpu*.py) and the loss head's logits
(kernels/logits_loss/mosaic_gpu.py).

    matmul:          outputs = epilogue(A @ B, *epilogue inputs)   bf16 tiles, per-row statistics
    matmul_split_k:  out += A @ B in f32 by TMA reduce-add         K split over the CTAs

A [M, K] (or stored [K, M]), B [K, N] (or stored [N, K]), bf16. One CTA per SM, each taking work
units u = cta, cta + #CTAs, ...: unit u is output tile u % #tiles (of [CONSUMERS * block_m,
block_n]) over the u // #tiles-th chunk of the k-steps (one chunk, all of K, for matmul). matmul
visits the tiles row by row, or, when B outgrows L2, in groups of rows, column by column within a
group (`_Units.position`), so that the CTAs at work share a few columns of B and the group's rows
of A, both held in L2: B (the loss head's E, 77 MB at GPT-2's vocabulary, beyond the 50 MB L2)
comes from HBM once a group rather than once a row of tiles. The producer streams the A
tiles [CONSUMERS * block_m, 64] and B tiles [64, block_n] of all its units, k-step after k-step,
through two rings (`num_stages` slots, 128-byte swizzle: a 64-wide bf16 row). Consumer warpgroup w
owns rows w * block_m of each tile: its wgmma accumulates A[w rows] B into block_m * block_n / 128
f32 registers per thread (128 at 64 x 256 or 128 x 128; a stored-transposed operand is read
transposed from shared memory) and releases the k-step's slots once it is done (while one
warpgroup waits for its wgmma, the other's keeps the tensor cores busy, as in jax's Hopper
matmul). Then the epilogue, while the producer already loads the next unit's operands. (Both
warpgroups reach the epilogue together; a ping-pong schedule, each warpgroup on units of its own
and its epilogue beside the other's matmul, ran 3-28% slower on the H100: bench/RESULTS.md,
session 21.)

* matmul: the column vectors (bias) and the [block_m, block_n] input tile (residual x, gelu'(z)),
  TMA-copied in while the tile's matmul ran, into registers; its outputs go out by TMA:
  tiles [block_m, block_n], rounded to bf16, one after another through one shared buffer, and
  per-row statistics [block_m] f32 of the tile (a row max, a row sum), one value per row and
  column tile: the output is [N / block_n, M]. Shared memory: num_stages (CONSUMERS block_m +
  block_n) 64 bf16 for the rings, CONSUMERS block_m block_n bf16 for the epilogue buffer and the
  vectors: 210 KB at 64 x 256 and 3 stages.
* matmul_split_k, for a small output over a long contraction (the weight gradients: [F, d] is 72
  tiles of 256 x 128 at d = 768, over T = 65536 tokens), where whole tiles would leave most SMs
  idle: the unit's f32 sum goes to HBM by TMA reduce-add (cp.reduce.async.bulk), 32 columns at a
  time through shared memory, into a zeroed jax.new_ref buffer. f32 all the way, but the order of
  a tile's additions varies from run to run, so its last bits do too (as with the atomics of other
  fused backward kernels). With row_sums, the units of the first column block also sum A's rows
  (A 1: db_fc = dz^T 1) by a second wgmma against a [64, 64] block whose first column is ones.
  Shared memory: the rings, CONSUMERS block_m 32 f32 for the outputs on their way to the TMA and
  CONSUMERS 64 x 64 bf16 for the ones block: 192 KB at 128 x 128 and 3 stages.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import compat, config
from kernels.warp_specialized import (CONSUMERS, IO_COLUMNS, WGMMA_M, Ring, accumulate, launch,
                                      num_sms, pad_rows, produce, ring_scratch, specialize,
                                      tiled_smem)

BLOCK_K = 64       # one 128-byte swizzled row of bf16
SUMS_COLUMNS = 64  # the ones block's width (wgmma's B tile: one 128-byte swizzled bf16 row)
FLUSH_STEPS = 4    # a split-K unit's TMA reduce-add costs about this many k-steps (choose_chunks)
# A group's rows of A stay in L2 (a third of Hopper's 50 MB); a B of fewer bytes does too, and
# the plain row-major order serves it best (bench/RESULTS.md, session 16).
GROUP_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class Tiles(config.KernelConfig):
    """The output tile per consumer warpgroup (block_m x block_n) and the rings' depth. Its f32
    accumulator takes block_m block_n / 128 registers a thread: at most 128 fit beside the
    epilogue."""
    block_m: int = config.tile(multiple_of=WGMMA_M)
    block_n: int = config.tile(multiple_of=64)
    num_stages: int = config.stages(minimum=2)

    def __post_init__(self):
        super().__post_init__()
        if self.block_m * self.block_n // 128 > 128:
            raise ValueError(f"block_m x block_n = {self.block_m} x {self.block_n} needs "
                             f"{self.block_m * self.block_n // 128} f32 accumulator registers a "
                             f"thread; at most 128 fit beside the epilogue")


@dataclasses.dataclass(frozen=True)
class _Units:
    """The static split of the work: output tiles of [CONSUMERS * block_m, block_n], tiles_n to a
    row, each over `chunks` chunks of chunk_steps k-steps, visited group_rows rows of tiles at a
    time; operands stored transposed or not."""
    block_m: int
    block_n: int
    tiles_n: int
    num_tiles: int
    chunks: int
    chunk_steps: int
    a_transposed: bool
    b_transposed: bool
    group_rows: int = 1

    def position(self, tile):
        """(row, column) of the tile-th tile: groups of group_rows rows (the last one shorter),
        column-major within a group; row-major when group_rows is 1."""
        if self.group_rows == 1:
            return tile // self.tiles_n, lax.rem(tile, self.tiles_n)
        per_group = self.group_rows * self.tiles_n
        first = tile // per_group * self.group_rows
        rows = jnp.minimum(self.group_rows, self.num_tiles // self.tiles_n - first)
        within = lax.rem(tile, per_group)
        return first + lax.rem(within, rows), within // rows

    @property
    def count(self) -> int:
        return self.chunks * self.num_tiles

    def ctas(self) -> int:
        return min(num_sms(), self.count)

    def rings(self, num_stages: int) -> dict:
        rows = CONSUMERS * self.block_m
        a_tile = (BLOCK_K, rows) if self.a_transposed else (rows, BLOCK_K)
        b_tile = (self.block_n, BLOCK_K) if self.b_transposed else (BLOCK_K, self.block_n)
        return dict(a_ring=ring_scratch(tiled_smem(jnp.bfloat16, num_stages, *a_tile), num_stages),
                    b_ring=ring_scratch(tiled_smem(jnp.bfloat16, num_stages, *b_tile), num_stages))


class _Stream:
    """The GEMM's loop, which both epilogues share: this CTA's work units, the rings that stream
    their A and B tiles k-step after k-step (the n-th k-step of the CTA is step n % chunk_steps of
    its unit n // chunk_steps), and each unit's product on the tensor cores."""

    def __init__(self, a_ref, b_ref, a_ring, b_ring, units: _Units):
        self.units = units
        self.cta, num_ctas = lax.axis_index("cta"), units.ctas()
        self.count = (units.count - self.cta + num_ctas - 1) // num_ctas  # units cta, cta + #CTAs..
        self.num_ctas = num_ctas
        rows = CONSUMERS * units.block_m

        def k_slice(n):
            step = lax.rem(n, units.chunk_steps)
            if units.chunks > 1:
                chunk, _, _ = self.unit(n // units.chunk_steps)
                step = chunk * units.chunk_steps + step
            return pl.ds(step * BLOCK_K, BLOCK_K)

        def a_tile(n):
            _, row, _ = self.unit(n // units.chunk_steps)
            ms, ks = pl.ds(row * CONSUMERS * units.block_m, rows), k_slice(n)
            return a_ref.at[ks, ms] if units.a_transposed else a_ref.at[ms, ks]

        def b_tile(n):
            _, _, col = self.unit(n // units.chunk_steps)
            ns, ks = pl.ds(col * units.block_n, units.block_n), k_slice(n)
            return b_ref.at[ns, ks] if units.b_transposed else b_ref.at[ks, ns]

        self.a_ring, self.b_ring = Ring(a_tile, *a_ring), Ring(b_tile, *b_ring)

    def unit(self, i):
        """(K chunk, row block, column block) of this CTA's i-th unit."""
        u, units = self.cta + i * self.num_ctas, self.units
        if units.chunks == 1:
            return 0, *units.position(u)
        return u // units.num_tiles, *units.position(lax.rem(u, units.num_tiles))

    def product(self, i, wg, ones=None):
        """Unit i's A B over its chunk, warpgroup wg's block_m rows ([block_m, block_n] f32 in
        registers), and with `ones` (a [BLOCK_K, SUMS_COLUMNS] block, first column 1) the rows'
        sums of A in column 0 of a second accumulator."""
        units, a_ring, b_ring = self.units, self.a_ring, self.b_ring

        def k_step(k, accs):
            n = i * units.chunk_steps + k
            a_ring.wait(n)
            b_ring.wait(n)
            b = b_ring.tile(n)
            b = b.transpose((1, 0)) if units.b_transposed else b
            a, ms = a_ring.tile(n), pl.ds(wg * units.block_m, units.block_m)
            a = a.at[:, ms].transpose((1, 0)) if units.a_transposed else a.at[ms]
            accs = (accumulate(accs[0], a, b), *(accumulate(s, a, ones) for s in accs[1:]))
            a_ring.release(n)
            b_ring.release(n)
            return accs

        zeros = lambda cols: plgpu.layout_cast(jnp.zeros((units.block_m, cols), jnp.float32),
                                               plgpu.Layout.WGMMA)
        init = (zeros(units.block_n),) + (() if ones is None else (zeros(SUMS_COLUMNS),))
        return lax.fori_loop(0, units.chunk_steps, k_step, init)

    def run(self, consume) -> None:
        """consume(wg) on the consumer warpgroups, the producer streaming every unit's k-steps."""
        specialize(consume, lambda: produce((self.a_ring, self.b_ring),
                                            self.count * self.units.chunk_steps))


def _epilogue_kernel(a_ref, b_ref, *refs, a_ring, b_ring, vec_smem, vec_loaded, io_smem,
                     io_loaded, row_smem, row_in_smem, row_loaded, epilogue: Callable,
                     num_vectors: int, num_rows: int, num_inputs: int, units: _Units):
    vectors = refs[:num_vectors]
    row_inputs = refs[num_vectors:num_vectors + num_rows]
    tile_inputs = refs[num_vectors + num_rows:num_inputs]
    outputs = refs[num_inputs:]
    stream = _Stream(a_ref, b_ref, a_ring, b_ring, units)
    column, row_layout = compat.mosaic_gpu_column_layout(), compat.mosaic_gpu_row_layout()

    def consume(wg):
        def output_tile(i, _):
            _, row, col = stream.unit(i)
            rows = pl.ds((row * CONSUMERS + wg) * units.block_m, units.block_m)
            cols = pl.ds(col * units.block_n, units.block_n)
            # The epilogue's operands travel while the matmul runs (the last tile's stores must
            # have read their buffers before the tile input lands in one).
            if tile_inputs:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for j, vector in enumerate(vectors):
                plgpu.copy_gmem_to_smem(vector.at[cols], vec_smem.at[wg, j],
                                        vec_loaded.at[wg * num_vectors + j])
            for j, row_input in enumerate(row_inputs):
                plgpu.copy_gmem_to_smem(row_input.at[rows], row_in_smem.at[wg, j],
                                        row_loaded.at[wg * num_rows + j])
            for tile_input in tile_inputs:
                plgpu.copy_gmem_to_smem(tile_input.at[rows, cols], io_smem.at[wg], io_loaded.at[wg])

            acc, = stream.product(i, wg)
            operands = []
            for j in range(num_vectors):
                plgpu.barrier_wait(vec_loaded.at[wg * num_vectors + j])
                vector = compat.mosaic_gpu_load(vec_smem.at[wg, j], column)
                operands.append(lax.broadcast_in_dim(vector, acc.shape, [1]))
            for j in range(num_rows):
                plgpu.barrier_wait(row_loaded.at[wg * num_rows + j])
                vector = compat.mosaic_gpu_load(row_in_smem.at[wg, j], row_layout)
                operands.append(lax.broadcast_in_dim(vector, acc.shape, [0]))
            if tile_inputs:
                plgpu.barrier_wait(io_loaded.at[wg])
                operands.append(compat.mosaic_gpu_load(io_smem.at[wg], plgpu.Layout.WGMMA))
            results = list(zip(outputs, epilogue(acc, *operands)))
            tiles = [(ref, out) for ref, out in results if out.ndim == 2]
            row_stats = [(ref, out) for ref, out in results if out.ndim == 1]
            if not tile_inputs:   # the last tile's stores have read their buffers
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for j, (_, out) in enumerate(row_stats):
                row_smem.at[wg, j][...] = out
            if not tiles:
                plgpu.commit_smem()
                for j, (stat_ref, _) in enumerate(row_stats):
                    plgpu.copy_smem_to_gmem(row_smem.at[wg, j], stat_ref.at[col, rows])
            for k, (out_ref, out) in enumerate(tiles):
                if k:   # the buffer's last store has read it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                io_smem.at[wg][...] = out.astype(jnp.bfloat16)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io_smem.at[wg], out_ref.at[rows, cols])
                if not k:
                    for j, (stat_ref, _) in enumerate(row_stats):
                        plgpu.copy_smem_to_gmem(row_smem.at[wg, j], stat_ref.at[col, rows])

        lax.fori_loop(0, stream.count, output_tile, None)
        plgpu.wait_smem_to_gmem(0)

    stream.run(consume)


def _split_k_kernel(a_ref, b_ref, out_ref, *sums_ref, a_ring, b_ring, io_smem, ones_smem,
                    units: _Units):
    stream = _Stream(a_ref, b_ref, a_ring, b_ring, units)

    def consume(wg):
        ones = ones_smem.at[wg] if sums_ref else None
        if ones is not None:
            first_column = plgpu.broadcasted_iota(jnp.int32, ones.shape, 1,
                                                  layout=plgpu.Layout.WGMMA) == 0
            ones[...] = first_column.astype(ones.dtype)
            plgpu.commit_smem()   # visible to wgmma, which reads shared memory asynchronously

        def add_into(dst, acc):
            """dst += acc by TMA reduce-add, IO_COLUMNS at a time through shared memory."""
            for c in range(0, acc.shape[1], IO_COLUMNS):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last add has read it
                io_smem.at[wg][...] = acc[:, c:c + IO_COLUMNS]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io_smem.at[wg], dst.at[:, pl.ds(c, IO_COLUMNS)],
                                        reduction_op="add")

        def run_unit(i, _):
            _, row, col = stream.unit(i)
            rows = pl.ds((row * CONSUMERS + wg) * units.block_m, units.block_m)

            def sum_chunk(with_sums: bool):
                accs = stream.product(i, wg, ones if with_sums else None)
                add_into(out_ref.at[rows, pl.ds(col * units.block_n, units.block_n)], accs[0])
                if with_sums:
                    add_into(sums_ref[0].at[rows], accs[1][:, :IO_COLUMNS])

            if sums_ref:
                pl.when(col == 0)(lambda: sum_chunk(True))
                pl.when(col != 0)(lambda: sum_chunk(False))
            else:
                sum_chunk(False)

        lax.fori_loop(0, stream.count, run_unit, None)
        plgpu.wait_smem_to_gmem(0)

    stream.run(consume)


def matmul(a: jax.Array, b: jax.Array, epilogue: Callable, epilogue_inputs: Sequence[jax.Array],
           out_shape: Sequence[jax.ShapeDtypeStruct], *, b_transposed: bool, tiles: Tiles,
           name: str, row_inputs: Sequence[jax.Array] = ()) -> list[jax.Array]:
    """epilogue(A @ B) on the persistent GEMM above, in `tiles` (the caller checks that it runs
    here).

    a [M, K] bf16 (M padded here to the CTA's rows); b [K, N], or [N, K] with b_transposed, bf16,
    K a multiple of 64 and N of block_n; epilogue inputs [N] (column vectors: f32) then at most
    one [M, N] bf16 tile; row_inputs [M] (f32). The epilogue takes the accumulator tile, then the
    column vectors, the row vectors (each broadcast to the tile) and the input tile, and returns
    the outputs in out_shape's order: tiles [M, N] (out_shape [M, N], stored as bf16), then
    per-row statistics (out_shape [M] f32, returned as [N / block_n, M], one row per column tile).
    """
    (m, k), n = a.shape, b.shape[0] if b_transposed else b.shape[1]
    block_m, block_n = tiles.block_m, tiles.block_n
    vectors = [v.astype(jnp.float32) for v in epilogue_inputs if v.ndim == 1]
    tile_inputs = [x for x in epilogue_inputs if x.ndim == 2]
    ranks = [x.ndim for x in epilogue_inputs]
    out_ranks = [len(s.shape) for s in out_shape]
    if (ranks != sorted(ranks) or len(tile_inputs) > 1 or k % BLOCK_K or n % block_n
            or out_ranks != sorted(out_ranks, reverse=True)):
        raise ValueError(f"matmul: epilogue inputs are vectors, then at most one tile; outputs "
                         f"tiles, then row statistics; K a multiple of {BLOCK_K} and N of "
                         f"block_n = {block_n}; got input ranks {ranks}, output ranks {out_ranks}, "
                         f"K = {k}, N = {n}")
    rows = CONSUMERS * block_m
    padded = -(-m // rows) * rows
    tiles_n = n // block_n
    group_rows = (1 if n * k * 2 <= GROUP_BYTES else
                  max(1, min(padded // rows, GROUP_BYTES // (rows * k * 2))))
    units = _Units(block_m, block_n, tiles_n, num_tiles=padded // rows * tiles_n, chunks=1,
                   chunk_steps=k // BLOCK_K, a_transposed=False, b_transposed=b_transposed,
                   group_rows=group_rows)
    num_stats, num_rows = out_ranks.count(1), len(row_inputs)
    row_inputs = [pad_rows(v.astype(jnp.float32), padded, axis=0) for v in row_inputs]
    scratch = dict(
        **units.rings(tiles.num_stages),
        vec_smem=plgpu.SMEM((CONSUMERS, max(1, len(vectors)), block_n), jnp.float32),
        vec_loaded=plgpu.Barrier(num_barriers=CONSUMERS * max(1, len(vectors))),
        io_smem=(tiled_smem(jnp.bfloat16, CONSUMERS, block_m, block_n)
                 if tile_inputs or 2 in out_ranks else None),
        io_loaded=plgpu.Barrier(num_barriers=CONSUMERS),
        row_smem=plgpu.SMEM((CONSUMERS, num_stats, block_m), jnp.float32) if num_stats else None,
        row_in_smem=plgpu.SMEM((CONSUMERS, num_rows, block_m), jnp.float32) if num_rows else None,
        row_loaded=plgpu.Barrier(num_barriers=CONSUMERS * num_rows) if num_rows else None)
    kernel = functools.partial(
        _epilogue_kernel, epilogue=epilogue, num_vectors=len(vectors), num_rows=num_rows,
        num_inputs=len(vectors) + num_rows + len(tile_inputs), units=units)
    out_type = [jax.ShapeDtypeStruct((padded, n) if len(s.shape) == 2 else (tiles_n, padded),
                                     s.dtype) for s in out_shape]
    outs = launch(kernel, out_type=out_type, scratch=scratch, grid=(units.ctas(),),
                  grid_names=("cta",), name=name,
                  )(pad_rows(a, padded, axis=0), b, *vectors, *row_inputs,
                    *(pad_rows(x, padded, axis=0) for x in tile_inputs))
    return [o[:m] if rank == 2 else o[:, :m] for o, rank in zip(outs, out_ranks)]


def choose_chunks(num_tiles: int, k_steps: int, num_ctas: int) -> int:
    """How many chunks to split the k-steps into: the divisor of k_steps whose units (chunks x
    tiles, run in waves of num_ctas) finish first, each unit costing its k-steps plus FLUSH_STEPS;
    the fewest chunks among equals."""
    def finish(chunks):
        return math.ceil(chunks * num_tiles / num_ctas) * (k_steps // chunks + FLUSH_STEPS)
    return min((c for c in range(1, k_steps + 1) if k_steps % c == 0), key=finish)


# jit: the zeroed outputs are refs in GMEM, which jax makes only inside a jit.
@functools.partial(jax.jit, static_argnames=("a_transposed", "b_transposed", "tiles", "name",
                                             "row_sums"))
def matmul_split_k(a: jax.Array, b: jax.Array, *, a_transposed: bool, b_transposed: bool,
                   tiles: Tiles, name: str, row_sums: bool = False):
    """A @ B in f32 on the persistent GEMM above with K split over the CTAs (choose_chunks), and
    with row_sums also A 1 -> [M] f32 (else None); the caller checks that it runs here.

    a [M, K], or [K, M] with a_transposed; b [K, N], or [N, K] with b_transposed; bf16. M is
    padded here to the CTA's rows and K to a multiple of 64 (zeros add nothing); N a multiple of
    tiles.block_n. The weight gradient x^T dy is a_transposed with a = x [T, M].
    """
    (m, k) = a.shape[::-1] if a_transposed else a.shape
    n = b.shape[0] if b_transposed else b.shape[1]
    block_m, block_n, stages = tiles.block_m, tiles.block_n, tiles.num_stages
    if n % block_n:
        raise ValueError(f"matmul_split_k: N = {n} must be a multiple of block_n = {block_n}")
    rows = CONSUMERS * block_m
    padded_m, padded_k = -(-m // rows) * rows, -(-k // BLOCK_K) * BLOCK_K
    k_steps, tiles_n = padded_k // BLOCK_K, n // block_n
    num_tiles = padded_m // rows * tiles_n
    chunks = choose_chunks(num_tiles, k_steps, num_sms())
    units = _Units(block_m, block_n, tiles_n, num_tiles, chunks, chunk_steps=k_steps // chunks,
                   a_transposed=a_transposed, b_transposed=b_transposed)
    zeros = lambda cols: jax.new_ref(jnp.zeros((padded_m, cols), jnp.float32),
                                     memory_space=plgpu.GMEM)
    out, sums = zeros(n), [zeros(IO_COLUMNS)] if row_sums else []
    scratch = dict(
        **units.rings(stages),
        io_smem=tiled_smem(jnp.float32, CONSUMERS, block_m, IO_COLUMNS),
        ones_smem=tiled_smem(jnp.bfloat16, CONSUMERS, BLOCK_K, SUMS_COLUMNS) if row_sums
        else None)
    a = pad_rows(pad_rows(a, padded_k if a_transposed else padded_m, axis=0),
                 padded_m if a_transposed else padded_k, axis=1)
    b = pad_rows(b, padded_k, axis=1 if b_transposed else 0)
    launch(functools.partial(_split_k_kernel, units=units), out_type=(), scratch=scratch,
           grid=(units.ctas(),), grid_names=("cta",), name=name)(a, b, out, *sums)
    return jax.freeze(out)[:m], (jax.freeze(sums[0])[:m, 0] if row_sums else None)
