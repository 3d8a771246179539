"""What the Mosaic GPU kernels (attention, LayerNorm+FFN) share: warp specialization on Hopper.

A CTA runs CONSUMERS (or, for the attention forward, 3) consumer warpgroups and one producer
warpgroup. The producer TMA-copies tiles from HBM into rings of shared-memory slots (`Ring`), each
slot guarded by mbarriers; the consumers wait for a slot, feed it to wgmma, and release it so the
producer can refill it. `tiled_smem` is the 128-byte-swizzled layout that both TMA and wgmma read
at full speed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WGMMA_M = 64       # a warpgroup's wgmma covers 64 rows: query and key tiles are multiples of it
CONSUMERS = 2      # consumer warpgroups per CTA (the attention forward may take 3: REGISTERS)
SWIZZLE = 128      # bytes: a row of 64 bf16, the widest TMA/wgmma swizzle
IO_COLUMNS = 32    # f32 columns per TMA transfer of a 128-byte swizzled row
# Registers per thread after warp specialization (setmaxnreg), (consumer, producer) by the number
# of consumer warpgroups: (2 x 232 + 40) x 128 threads = 64,512 of an SM's 65,536, and with three
# (3 x 160 + 24) x 128 likewise. 240 / 24 cut ptxas's spills in the head_dim-128 attention
# kernels (forward 60 -> 8 bytes, dK/dV 80 -> 8) but moved their times only within +-2% and
# slowed the training shape's forward by 2.5% (bench/RESULTS.md, version 7).
REGISTERS = {2: (232, 40), 3: (160, 24)}
SMEM_BYTES = 227 * 1024   # the shared memory a Hopper CTA may have (sm90's opt-in maximum)
# Pallas Mosaic GPU starts every scratch buffer at a multiple of this, and reserves the default
# reduction scratch of its CompilerParams (cross-warp reductions) beside them.
SMEM_ALIGNMENT = 1024
REDUCTION_SCRATCH = 2048


def num_sms() -> int:
    """A persistent grid's CTAs: one per streaming multiprocessor (132 on an H100 SXM)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def on_sm90() -> bool:
    """True when the default device is a Hopper GPU (compute capability 9.x: wgmma, TMA)."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))  # "9.0" on an H100
    return device.platform == "gpu" and capability.startswith("9")


@dataclasses.dataclass(frozen=True)
class Ring:
    """Tiles the producer warpgroup streams through shared memory: the n-th tile of the stream
    lands in slot n % stages, guarded by a `loaded` barrier (the TMA's completion) and a
    `consumed` barrier (one arrival per consumer warpgroup) that frees the slot for tile n + stages.
    Every consumer waits for and releases every tile, in order, the ones it does not use too
    (`skip`): an early release would count towards the slot's previous tile."""
    source: Callable   # n -> the GMEM ref of the n-th tile
    smem: Any          # [stages, *tile]
    loaded: Any        # barriers [stages], one arrival
    consumed: Any      # barriers [stages], an arrival per consumer warpgroup
    offset: Any = 0    # tiles streamed before tile 0 (a persistent kernel's earlier work units)

    def slot(self, n):
        return lax.rem(self.offset + n, self.smem.shape[0])

    def tile(self, n):
        return self.smem.at[self.slot(n)]

    def wait(self, n):
        plgpu.barrier_wait(self.loaded.at[self.slot(n)])

    def release(self, n):
        plgpu.barrier_arrive(self.consumed.at[self.slot(n)])


def ring_scratch(tile_type, stages: int, consumers: int = CONSUMERS) -> tuple:
    """The shared memory and barriers of a Ring of `stages` slots of tile_type (an SMEM type
    whose leading axis is the slot), for `consumers` consumer warpgroups."""
    return (tile_type, plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=stages))


def skip(rings, n) -> None:
    """Tile n, which this consumer does not need: wait for it (see Ring), then release it."""
    for ring in rings:
        ring.wait(n)
        ring.release(n)


def produce(rings, count, drain: bool = True) -> None:
    """The producer warpgroup: TMA-copies tiles 0..count-1 of every ring, each into a slot both
    consumers have released. With `drain`, `stages` more steps wait for the release of the last
    tiles, so the producer observes every phase of its barriers (the Mosaic GPU interpreter checks
    that); a persistent kernel drains once, after its last work unit."""
    stages = rings[0].smem.shape[0]

    def load(n, _):
        for ring in rings:
            pl.when(ring.offset + n >= stages)(
                lambda: plgpu.barrier_wait(ring.consumed.at[ring.slot(n)]))
            pl.when(n < count)(lambda: plgpu.copy_gmem_to_smem(
                ring.source(n), ring.tile(n), ring.loaded.at[ring.slot(n)]))

    lax.fori_loop(0, count + (stages if drain else 0), load, None)


def produce_units(num_units, work: Callable) -> None:
    """The producer of a CTA that runs num_units work units in turn (a persistent kernel): unit
    n's tiles (work(n, base) -> (..., its tile count, its rings offset by the `base` tiles
    streamed before it)) follow unit n-1's through the same slots, so the next unit's first
    tiles load while the consumers finish the last; one drain at the end."""
    def unit(n, base):
        *_, count, rings = work(n, base)
        produce(rings, count, drain=False)
        return base + count
    produce(work(0, lax.fori_loop(0, num_units, unit, 0))[-1], 0)


def consume_units(num_units, work: Callable, load: Callable, run: Callable,
                  buffers: int) -> None:
    """A consumer warpgroup of a CTA that runs num_units work units in turn: load(n) puts unit
    n's own tiles into buffer n % buffers, run(n, *work(n, base)) consumes it (work as in
    produce_units). With two buffers or more the next unit's tiles load while this one runs; a
    buffer that run stores from must have been read by the TMA before load fills it again (run
    waits at its end, or load before its copy)."""
    load(0)

    def unit(n, base):
        *args, count, rings = work(n, base)
        if buffers > 1:
            pl.when(n + 1 < num_units)(lambda: load(n + 1))
        run(n, *args, count, rings)
        return base + count
    lax.fori_loop(0, num_units, unit, 0)


def specialize(consume: Callable, producer: Callable, consumers: int = CONSUMERS) -> None:
    """Warp specialization: warpgroups 0..consumers-1 run consume(wg) with most registers, the
    last one runs producer() (streaming the rings, `produce`) with few."""
    wg = lax.axis_index("wg")
    consumer_registers, producer_registers = REGISTERS[consumers]

    @pl.when(wg < consumers)
    def _consume():
        plgpu.set_max_registers(consumer_registers, action="increase")
        consume(wg)

    @pl.when(wg == consumers)
    def _produce():
        plgpu.set_max_registers(producer_registers, action="decrease")
        producer()


def matmuls_t(first, second, between: Callable, second_start=None):
    """(between(a b^T), y0 + c d^T) for first = (a, b), second = (c, d); a [m, k], b [n, k], c, d
    likewise, in shared memory; the products in f32 registers (WGMMA layout), the second added
    onto second_start (y0, zeros when None): the tensor cores then apply a broadcast term that
    would take an instruction per element, and registers to hold it, afterwards. The two wgmmas
    are issued back to back and `between` runs on a b^T while c d^T is still on the tensor cores
    (wgmma.wait_group 1), as FlashAttention-3 overlaps its softmax with the next product."""
    (a, b), (c, d) = first, second
    zeros = lambda m, n: plgpu.layout_cast(jnp.zeros((m, n), jnp.float32), plgpu.Layout.WGMMA)
    x0 = zeros(a.shape[0], b.shape[0])
    y0 = zeros(c.shape[0], d.shape[0]) if second_start is None else second_start

    def products(refs):
        x_ref, y_ref, between_ref = refs
        plgpu.wgmma(x_ref, a, b.transpose((1, 0)))
        plgpu.wgmma(y_ref, c, d.transpose((1, 0)))
        between_ref[...] = between(plgpu.wgmma_accumulator_load(x_ref, wait_n=1))
    # between's result leaves through a ref (x0 stands in for its initial value).
    _, y, x = pl.run_state(products)((plgpu.ACC.init(x0), plgpu.ACC.init(y0), x0))
    return x, y


def accumulate(acc, a, b):
    """acc + a b by wgmma, returned once done.  acc [m, n] f32 in registers, a [m, k] (registers
    or shared memory), b [k, n] in shared memory (or the .transpose of one)."""
    def add(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(add)(plgpu.ACC.init(acc))


def tiled_smem(dtype, *shape):
    """Shared memory in the layout TMA writes and wgmma reads: 128-byte swizzled rows."""
    dtype = jnp.dtype(dtype)
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, SWIZZLE // dtype.itemsize)), plgpu.SwizzleTransform(SWIZZLE)))


def smem_bytes(scratch) -> int:
    """The shared memory that `launch` takes for `scratch` (its dict of plgpu.SMEM types and
    Barriers, None for none), laid out as Pallas Mosaic GPU lays it out: each buffer aligned,
    the reduction scratch, 8 bytes a barrier (tests/test_lowering.py checks it against the
    lowering's own count)."""
    leaves = jax.tree.leaves(scratch, is_leaf=lambda x: isinstance(x, plgpu.Barrier))
    aligned = lambda n: -(-n // SMEM_ALIGNMENT) * SMEM_ALIGNMENT
    return REDUCTION_SCRATCH + sum(
        8 * math.prod(x.num_barriers) if isinstance(x, plgpu.Barrier)
        else aligned(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize) for x in leaves)


def launch(kernel, *, out_type, scratch, grid, grid_names, name, consumers: int = CONSUMERS):
    """A Pallas kernel over `grid` (axes named grid_names) with consumers + 1 warpgroups; the
    scratch is allocated once per CTA, shared by its warpgroups.  Like plgpu.kernel, but its
    operands may be mutable refs (jax.new_ref) that the kernel updates in place (plgpu.kernel's
    batching wrapper does not take refs)."""
    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=consumers + 1,
                      thread_name="wg", kernel_name=name)

    def body(*refs):
        pl.run_scoped(functools.partial(kernel, *refs), collective_axes="wg", **scratch)

    return pl.kernel(body, out_type=out_type, mesh=mesh, name=name,
                     compiler_params=plgpu.CompilerParams(approx_math=True))


def pad_rows(x, rows: int, axis: int = 1):
    """x with zeros appended along `axis` up to `rows`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rows - x.shape[axis])
    return jnp.pad(x, pad)
