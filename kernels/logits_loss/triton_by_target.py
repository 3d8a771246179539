"""The loss head's onehot term of dE in one Pallas Triton kernel (any CUDA GPU; the Hopper head
uses it too): acc[target] += scale * row for each token, each target's rows summed in a fixed
order and added to its row of acc once, so bitwise the same run after run.

common.add_by_target computes the same with XLA ops (a gather of the rows in target order, two
batched GEMMs of 0/1 masks whose [n, d] f32 sums go to memory, a scatter of the runs' totals):
six or seven kernels a chunk. Here a program takes BLOCK positions of the sorted order and a
slice of d: it gathers its rows, sums each run (the rows of one target) within the block by the
same two GEMMs of the mask times the scales in two bf16 terms (products exact, f32 sums), and
adds each run that starts and ends in the block to acc in place; the block's last run, if it
starts there and goes on, it follows into the next blocks (their rows of that target summed in
f32) before adding it. A run is the program's where it starts, so no two programs write a row of
acc (one write a chunk per target: no atomics).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.triton_gemm import dot

BLOCK = 64        # sorted positions a program takes
BLOCK_D = 128     # columns of d a program takes (64 where d is an odd multiple of 64)


def _split_bf16(x):
    """f32 x -> (high, low) bf16 with high + low = x to 16 bits."""
    high = x.astype(jnp.bfloat16)
    return high, (x - high.astype(jnp.float32)).astype(jnp.bfloat16)


def _kernel(keys_ref, order_ref, scales_ref, rows_ref, acc_in_ref, acc_ref, *, vocab: int,
            blocks: int, block_d: int):
    del acc_in_ref   # the same buffer as acc_ref (aliased)
    b, c = pl.program_id(0), pl.program_id(1)
    positions = b * BLOCK + lax.iota(jnp.int32, BLOCK)
    columns = c * block_d + lax.iota(jnp.int32, block_d)

    def block_rows(positions):
        """The keys [BLOCK], scales and rows [BLOCK, block_d] at these sorted positions."""
        keys = keys_ref[positions]
        rows = rows_ref[order_ref[positions][:, None], columns[None, :]]
        return keys, scales_ref[positions], rows

    keys, scales, rows = block_rows(positions)
    before = jnp.where(b > 0, keys_ref[jnp.maximum(b * BLOCK - 1, 0)], -1)
    after = keys_ref[b * BLOCK + BLOCK]   # the key past the block (the padding's one at the end)
    # every position's run total within the block: the mask of equal keys times the scales
    high, low = _split_bf16(jnp.where(keys[:, None] == keys[None, :], scales[None, :], 0.0))
    sums = dot(high, rows) + dot(low, rows)
    # the runs that start and end in the block (the same mask and value at each of a run's
    # positions, so that a run's repeated stores agree)
    inside = (keys != before) & (keys != after) & (keys < vocab)
    at = acc_ref.at[keys[:, None], columns[None, :]]
    plgpu.store(at, at[...] + sums, mask=jnp.broadcast_to(inside[:, None], sums.shape))

    # the block's last run, if it starts here and goes on into the next blocks
    last = keys_ref[b * BLOCK + BLOCK - 1]
    is_last = lax.iota(jnp.int32, BLOCK)[:, None] == BLOCK - 1
    total = jnp.sum(jnp.where(is_last, sums, 0.0), axis=0)   # its sum within the block

    def add_block(carry):
        following, total = carry
        keys, scales, rows = block_rows(following * BLOCK + lax.iota(jnp.int32, BLOCK))
        weights = jnp.where(keys == last, scales, 0.0)[:, None]
        return following + 1, total + jnp.sum(weights * rows.astype(jnp.float32), axis=0)

    owned = (last != before) & (last == after) & (last < vocab)
    _, total = lax.while_loop(
        lambda carry: owned & (carry[0] < blocks) & (keys_ref[carry[0] * BLOCK] == last),
        add_block, (b + 1, total))
    row = acc_ref.at[jnp.broadcast_to(last, (1,))[:, None], columns[None, :]]
    plgpu.store(row, row[...] + total[None, :], mask=jnp.broadcast_to(owned, (1, block_d)))


def add_by_target(acc, rows, scales, targets, order, *, interpret: bool = False):
    """acc [R, d] f32 + onehot(targets)^T (scales rows), the math of common.add_by_target (rows
    [n, d] bf16, scales [n] f32, targets [n] in [0, R) or R (dropped), order their stable argsort;
    d a multiple of 64)."""
    (n, d), vocab = rows.shape, acc.shape[0]
    block_d = math.gcd(d, BLOCK_D)
    if block_d < 64:
        raise ValueError(f"add_by_target needs d to be a multiple of 64; got d = {d}")
    blocks = -(-n // BLOCK)
    padded = blocks * BLOCK
    # Past the last position: a key of its own (vocab: dropped) with scale 0, and one more, which
    # the last position reads as its next key.
    pad = lambda x, value, extra=0: jnp.concatenate(
        [x, jnp.full(padded + extra - n, value, x.dtype)])
    keys, scales, order = pad(targets[order], vocab, 1), pad(scales[order], 0.0), pad(order, 0)
    return pl.pallas_call(
        functools.partial(_kernel, vocab=vocab, blocks=blocks, block_d=block_d),
        grid=(blocks, d // block_d),
        out_shape=jax.ShapeDtypeStruct(acc.shape, acc.dtype),
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="logits_loss_add_by_target",
    )(keys.astype(jnp.int32), order.astype(jnp.int32), scales, rows, acc)
