"""The bf16 equivalence suite: every kernel implementation available on this backend, forward and
gradients, against the math in microgpt/model.py (criterion in tests/equiv.py).

On CPU the kernels run in interpret mode at small sizes (the Mosaic GPU ones in jax's Mosaic GPU
interpreter, tests/mosaic_gpu_interpreter.py); on a GPU the same tests run compiled at larger
sizes (the `LARGE` cases). Their lowering for chips the host lacks is tests/test_lowering.py's,
their argument errors tests/test_kernel_arguments.py's, their tuning tests/test_tuning.py's.
"""
from __future__ import annotations

import functools
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels import mosaic_gpu_gemm
from kernels.attention import attention, dot_product_attention, mosaic_gpu
from kernels.attention import common
from kernels.attention.common import LOG2E, Plan, kernel_head_dim
from kernels.layernorm_ffn import common as lnffn_common
from kernels.layernorm_ffn import layernorm_ffn
from kernels.layernorm_ffn import mosaic_gpu as lnffn_mosaic_gpu
from kernels.layernorm_ffn import mosaic_gpu_vjp as lnffn_mosaic_gpu_vjp
from kernels.layernorm_ffn import triton_vjp as lnffn_triton_vjp
from kernels.logits_loss import api as logits_loss_api, logits_loss
from kernels.logits_loss import common as logits_loss_common
from kernels.logits_loss import mosaic_gpu as logits_loss_mosaic_gpu
from kernels.logits_loss import triton_by_target as logits_loss_triton_by_target
from microgpt import model
from tests.equiv import (ON_CPU, assert_within_twice_reference, bf16_resolution, f32_precision,
                         lnffn_params, max_err, upcast)
from tests.mosaic_gpu_interpreter import run_in_the_gpu_interpreter

# ------------------------------------------------------------------ attention

# The implementations this backend runs: both Pallas backends interpreted on CPU, compiled natively;
# on a Hopper GPU also the Mosaic GPU forward (no interpret mode of its own: on CPU its lowering is
# tested, and it runs in jax's Mosaic GPU interpreter with wgmma emulated, below).
ATTENTION_IMPLS = {"cpu": ["triton", "tpu"], "gpu": ["triton"], "tpu": ["tpu"]}[jax.default_backend()]
ATTENTION_IMPLS += ["mosaic_gpu"] if mosaic_gpu.on_sm90() else []
# Small tiles on CPU so a few-dozen-row sequence still spans several tiles, with block_q != block_k
# (diagonal tiles split unevenly) and the backward's tiles different from the forward's.
SMALL_BLOCKS = dict(block_q=32, block_k=16, dkdv_block_q=16, dkdv_block_k=32, dq_block_q=32,
                    dq_block_k=16)
LARGE = pytest.mark.skipif(ON_CPU, reason="large shapes need an accelerator (interpret mode is slow)")
# The Mosaic GPU kernels run in jax's Mosaic GPU interpreter on CPU, compiled on a Hopper GPU.
ON_CPU_OR_SM90 = pytest.mark.skipif(not (ON_CPU or mosaic_gpu.on_sm90()),
                                    reason="the Mosaic GPU kernels run on a Hopper GPU, or on CPU "
                                           "in the interpreter")

# (batch, seq, heads, head_dim, causal, q_scale, small blocks); q_scale ~30 makes logits of tens to
# a hundred, which overflow a softmax that does not subtract its max.
ATTENTION_CASES = [
    pytest.param(1, 40, 2, 64, True, 1.0, True, id="ragged40-causal-d64"),
    pytest.param(2, 200, 2, 64, False, 1.0, False, id="ragged200-noncausal-d64-default-blocks"),
    pytest.param(1, 56, 3, 128, True, 1.0, True, id="ragged56-causal-d128"),
    pytest.param(1, 64, 2, 128, False, 1.0, True, id="noncausal-d128"),
    pytest.param(1, 48, 2, 64, True, 30.0, True, id="large-logits-causal"),
    # Head dims the kernels pad (32 -> 64, 96 -> 128) or run with their own tiles (256).
    pytest.param(1, 40, 2, 32, True, 1.0, True, id="ragged40-causal-d32"),
    pytest.param(1, 48, 2, 96, False, 1.0, True, id="noncausal-d96"),
    pytest.param(1, 40, 1, 256, True, 1.0, True, id="ragged40-causal-d256"),
    # Padded past a whole tile of every kernel (the Mosaic GPU backward's 256 rows on the H200's
    # d64 entry): tiles that see no key or query at all.
    pytest.param(1, 70, 2, 64, True, 1.0, False, id="ragged70-causal-d64-default-blocks",
                 marks=LARGE),
    pytest.param(2, 4096, 4, 64, True, 1.0, False, id="s4096-causal-d64", marks=LARGE),
    pytest.param(4, 1024, 8, 128, True, 1.0, False, id="s1024-causal-d128", marks=LARGE),
    pytest.param(1, 4096, 4, 128, True, 1.0, False, id="s4096-causal-d128", marks=LARGE),
    pytest.param(2, 2048, 8, 64, False, 1.0, False, id="s2048-noncausal-d64", marks=LARGE),
    pytest.param(3, 1000, 4, 128, True, 1.0, False, id="ragged1000-causal-d128", marks=LARGE),
    pytest.param(2, 384, 4, 64, False, 1.0, False, id="s384-noncausal-d64", marks=LARGE),
    pytest.param(2, 1024, 4, 64, True, 30.0, False, id="large-logits-s1024", marks=LARGE),
    pytest.param(4, 1024, 8, 32, True, 1.0, False, id="s1024-causal-d32", marks=LARGE),
    pytest.param(2, 2048, 4, 96, True, 1.0, False, id="s2048-causal-d96", marks=LARGE),
    pytest.param(1, 1000, 4, 96, False, 1.0, False, id="ragged1000-noncausal-d96", marks=LARGE),
    pytest.param(2, 2048, 4, 256, True, 1.0, False, id="s2048-causal-d256", marks=LARGE),
    pytest.param(2, 1000, 2, 256, False, 1.0, False, id="ragged1000-noncausal-d256", marks=LARGE),
]


def _value_and_grads(f, args, cotangent):
    """(f(*args), *grads) for the cotangent, as one jitted program (op-by-op is slow on GPUs)."""
    def run(args, cotangent):
        out, vjp = jax.vjp(f, *args)
        return (out, *vjp(cotangent))
    return jax.jit(run)(args, cotangent)


def _check_attention(impl, batch, seq, heads, head_dim, causal, q_scale=1.0, blocks=None,
                     seed_blocks=None, backward=None, kv_heads=None, interpret=None, **masks):
    """o, dq, dk, dv of the kernel (bf16; its gradient by `backward`'s kernels, None: the table's
    choice) vs the math in f32, within twice the bf16 math's error, on fresh random inputs drawn
    from a seed of the case and the block configuration (or seed_blocks, another configuration's,
    to face its inputs); kv_heads (default heads), interpret and masks (segment_ids,
    kv_segment_ids, local_window_size) as attention takes them."""
    seed_blocks = blocks if seed_blocks is None else seed_blocks
    kv_heads = kv_heads or heads
    seed = zlib.crc32(f"{impl}{batch}{seq}{heads}{kv_heads}{head_dim}{causal}{q_scale}"
                      f"{seed_blocks}{masks}".encode())
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, do = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16)
             for key in keys[:2])
    k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), jnp.bfloat16)
            for key in keys[2:])
    q = (q * q_scale).astype(jnp.bfloat16)
    kernel = lambda q, k, v: attention(q, k, v, causal=causal, implementation=impl,
                                       backward_implementation=backward, block_sizes=blocks,
                                       interpret=interpret, **masks)
    reference = lambda q, k, v: attention(q, k, v, causal=causal, implementation="reference",
                                          **masks)

    got = _value_and_grads(kernel, (q, k, v), do)
    ref_bf16 = _value_and_grads(reference, (q, k, v), do)
    with f32_precision():
        ref_f32 = _value_and_grads(reference, upcast((q, k, v)), upcast(do))
    for name, *outs in zip(("o", "dq", "dk", "dv"), got, ref_bf16, ref_f32):
        assert outs[0].dtype == jnp.bfloat16 and outs[0].shape == outs[1].shape, name
        # The floor: at seq 1 dq and dk are exactly 0 (the one key's probability is 1, so
        # ds = p (dp - delta) = 0), and the kernel's dp - delta cancels to f32 rounding residue.
        atol = max(bf16_resolution(outs[2]), 1e-5)
        assert_within_twice_reference(f"{impl} {name}", *outs, atol=atol)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("batch, seq, heads, head_dim, causal, q_scale, small", ATTENTION_CASES)
def test_attention_matches_reference(impl, batch, seq, heads, head_dim, causal, q_scale, small):
    # mosaic_gpu: with its own backward, whatever the tuning table picked (Triton's is tested
    # above), where it runs.
    backward = "mosaic_gpu" if impl == "mosaic_gpu" and _mosaic_backward_runs(head_dim) else None
    _check_attention(impl, batch, seq, heads, head_dim, causal, q_scale,
                     SMALL_BLOCKS if small and ON_CPU else None, backward=backward)


def _mosaic_backward_runs(head_dim: int) -> bool:
    return kernel_head_dim(head_dim) in mosaic_gpu.MOSAIC_BACKWARD_HEAD_DIMS


def _skip_unless_mosaic_backward_runs(head_dim: int) -> None:
    if not _mosaic_backward_runs(head_dim):
        pytest.skip(f"the Mosaic GPU backward runs head_dim {mosaic_gpu.MOSAIC_BACKWARD_HEAD_DIMS}"
                    f" (at {head_dim} the table's backward is Triton's, tested above)")


@pytest.mark.skipif(not mosaic_gpu.on_sm90(), reason="mosaic_gpu runs on a Hopper GPU; on CPU "
                    "test_attention_mosaic_gpu_in_the_gpu_interpreter runs it")
@pytest.mark.parametrize("batch, seq, heads, head_dim, causal, q_scale, small", ATTENTION_CASES)
def test_attention_mosaic_gpu_persistent_matches_reference(batch, seq, heads, head_dim, causal,
                                                           q_scale, small):
    """The persistent forward and backward (a CTA per multiprocessor, through the work units in
    turn), on the inputs of the case above."""
    _skip_unless_mosaic_backward_runs(head_dim)
    _check_attention("mosaic_gpu", batch, seq, heads, head_dim, causal, q_scale,
                     {"persistent": True, "dkdv_persistent": True}, seed_blocks=None, backward="mosaic_gpu")


@settings(max_examples=6 if ON_CPU else 12, deadline=None, derandomize=True)
@given(batch=st.integers(1, 2), seq=st.integers(1, 80 if ON_CPU else 2500),
       heads=st.integers(1, 3), head_dim=st.sampled_from((32, 64, 96, 128, 256)),
       causal=st.booleans())
def test_attention_matches_reference_at_any_shape(batch, seq, heads, head_dim, causal):
    """Shapes hypothesis picks (any length, including 1 and lengths just past a tile) on the
    backend's native implementation (CPU: Triton-style kernels interpreted, with small tiles)."""
    _check_attention(ATTENTION_IMPLS[0], batch, seq, heads, head_dim, causal,
                     blocks=SMALL_BLOCKS if ON_CPU else None)


@pytest.mark.skipif(not mosaic_gpu.on_sm90(), reason="the Mosaic GPU kernels compiled on a "
                    "Hopper GPU (on CPU: the interpreter tests and the tile spans' test)")
@settings(max_examples=10, deadline=None, derandomize=True)
@given(batch=st.integers(1, 2), seq=st.integers(1, 2500), kv_heads=st.sampled_from((1, 2)),
       group=st.sampled_from((1, 2, 4)), head_dim=st.sampled_from((64, 128)),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(0, 300)),
       documents=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
def test_attention_mosaic_gpu_at_any_shape(batch, seq, kv_heads, group, head_dim, causal, window,
                                           documents, seed):
    """Lengths and masks hypothesis picks on the Mosaic GPU forward and its own backward with
    the tuning table's tiles: sequences padded past whole tiles of either kernel, grouped
    heads, windows, and up to 5 document cuts at random places."""
    masks = {} if window is None else {"local_window_size": window}
    if documents:
        cuts = np.random.default_rng(seed).integers(0, seq, (batch, documents))
        masks["segment_ids"] = jnp.asarray(
            (np.arange(seq)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)
    _check_attention("mosaic_gpu", batch, seq, kv_heads * group, head_dim, causal,
                     kv_heads=kv_heads, backward="mosaic_gpu", **masks)


def _segments(batch: int, lengths) -> jax.Array:
    """Segment ids [batch, sum(lengths)] of consecutive documents of those lengths (each row's
    documents rotated by its index, so rows differ)."""
    rows = [np.repeat(np.arange(len(lengths)), np.roll(lengths, b)) for b in range(batch)]
    return jnp.asarray(np.stack(rows), jnp.int32)


# Documents of lengths 1, 17, 5, 30, 17 (boundaries inside and across 16- and 32-row tiles, a
# document of one token): 70 tokens.
DOCS = (1, 17, 5, 30, 17)
# The kernels' masks beyond dense MHA (batch, seq, heads, kv_heads, head_dim, causal, masks):
# grouped-query heads (groups of 2 and 8, multi-query), packed documents, windows narrower and
# wider than a tile, all of them combined. On CPU with SMALL_BLOCKS.
MASK_CASES = [
    pytest.param(1, 40, 4, 2, 64, True, {}, id="gqa2-causal"),
    pytest.param(1, 40, 8, 1, 64, False, {}, id="mqa8-noncausal"),
    pytest.param(2, 70, 2, 2, 64, True, {"segment_ids": _segments(2, DOCS)}, id="docs-causal"),
    pytest.param(1, 70, 2, 2, 128, False, {"segment_ids": _segments(1, DOCS)},
                 id="docs-noncausal-d128"),
    # A document of 66 holds whole tiles of either side: tiles inside it go unmasked.
    pytest.param(1, 70, 2, 2, 64, True, {"segment_ids": _segments(1, (2, 66, 2))},
                 id="long-doc-causal"),
    pytest.param(1, 70, 2, 2, 64, True, {"local_window_size": 10}, id="window10-causal"),
    pytest.param(1, 70, 2, 2, 64, False, {"local_window_size": (40, 20)},
                 id="window40-20-noncausal"),
    pytest.param(2, 70, 4, 2, 64, True, {"segment_ids": _segments(2, DOCS),
                                         "local_window_size": 12}, id="gqa-docs-window-causal"),
    pytest.param(2, 2048, 16, 4, 64, True, {}, id="s2048-gqa4-d64", marks=LARGE),
    pytest.param(1, 4096, 8, 8, 128, True,
                 {"segment_ids": _segments(1, (300, 700, 512, 1, 2083, 500))},
                 id="s4096-docs-d128", marks=LARGE),
    pytest.param(2, 4096, 8, 2, 64, True, {"local_window_size": 1024}, id="s4096-window1024-gqa",
                 marks=LARGE),
]

@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("batch, seq, heads, kv_heads, head_dim, causal, masks", MASK_CASES)
def test_attention_masks_match_reference(impl, batch, seq, heads, kv_heads, head_dim, causal,
                                         masks):
    _check_attention(impl, batch, seq, heads, head_dim, causal,
                     blocks=SMALL_BLOCKS if ON_CPU else None, kv_heads=kv_heads, **masks)


@pytest.mark.skipif(not mosaic_gpu.on_sm90(), reason="on a Hopper GPU; on CPU the Mosaic GPU "
                    "interpreter runs it (test_attention_mosaic_gpu_backward_in_the_gpu_interpreter)")
@pytest.mark.parametrize("batch, seq, heads, kv_heads, head_dim, causal, masks", MASK_CASES)
def test_attention_masks_match_reference_with_the_mosaic_gpu_backward(batch, seq, heads, kv_heads,
                                                                      head_dim, causal, masks):
    """The mask cases through the Mosaic GPU forward and its own backward, whatever the tuning
    table picks (api.default_backward: Triton's at some short lengths), where that backward
    runs."""
    if not _mosaic_backward_runs(head_dim):
        pytest.skip(f"the Mosaic GPU backward runs head_dim {mosaic_gpu.MOSAIC_BACKWARD_HEAD_DIMS}")
    _check_attention("mosaic_gpu", batch, seq, heads, head_dim, causal, kv_heads=kv_heads,
                     backward="mosaic_gpu", **masks)


@pytest.mark.parametrize("impl, backward", [(impl, None) for impl in ATTENTION_IMPLS]
                         + ([("mosaic_gpu", "mosaic_gpu")] if mosaic_gpu.on_sm90() else []))
def test_attention_rows_that_see_no_key(impl, backward):
    """Padding: the last 6 queries' id is no key's (kv_segment_ids mark the padded keys apart),
    so they see nothing: output exactly 0, no NaN, zero gradients; the other rows match the
    math. (On a Hopper GPU the Mosaic GPU forward with its own backward too.)"""
    seq = 40
    ids = _segments(1, (20, 14, 6))
    kv_ids = ids.at[:, -6:].set(-1)
    q, k, v, do = jax.random.normal(jax.random.PRNGKey(11), (4, 1, seq, 2, 64), jnp.bfloat16)
    masks = dict(segment_ids=ids, kv_segment_ids=kv_ids)
    kernel = lambda q, k, v: attention(q, k, v, implementation=impl,
                                       backward_implementation=backward,
                                       block_sizes=SMALL_BLOCKS if ON_CPU else None, **masks)
    o, dq, dk, dv = _value_and_grads(kernel, (q, k, v), do)
    assert not any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in (o, dq, dk, dv))
    assert bool((o[:, -6:] == 0).all()) and bool((dq[:, -6:] == 0).all())
    assert bool((dk[:, -6:] == 0).all()) and bool((dv[:, -6:] == 0).all())
    with f32_precision():
        want = model.attention(*upcast((q, k, v)), **masks)
    assert max_err(o[:, :-6], want[:, :-6]) < 0.05


def _tile_visibility(plan, block_q, block_k):
    """[query tiles, key tiles] of (any pair visible, every pair visible) from the dense mask."""
    s = plan.seq_len
    mask = model.attention_mask(s, causal=plan.causal, local_window_size=plan.window)
    mask = np.ones((s, s), bool) if mask is None else np.asarray(mask[0, 0])
    nq, nk = -(-s // block_q), -(-s // block_k)
    padded = np.zeros((nq * block_q, nk * block_k), bool)
    padded[:s, :s] = mask
    tiles = padded.reshape(nq, block_q, nk, block_k).transpose(0, 2, 1, 3)
    # Padded query rows see anything (their results are sliced off); padded keys nothing.
    real_rows = (np.arange(nq * block_q) < s).reshape(nq, block_q)[:, None, :, None]
    return tiles.any((2, 3)), (tiles | ~real_rows).all((2, 3))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seq=st.integers(1, 300), blocks=st.sampled_from([(16, 16), (32, 16), (16, 64), (64, 32)]),
       causal=st.booleans(), left=st.one_of(st.none(), st.integers(0, 200)),
       right=st.integers(0, 200))
def test_attention_tile_spans_are_exact(seq, blocks, causal, left, right):
    """kv_tiles and q_tiles against the dense mask: every tile outside a span sees nothing, every
    tile in its unmasked range sees everything, and the span ends at the first and last tiles
    that see something (no work on empty tiles)."""
    block_q, block_k = blocks
    window = None if left is None else (left, right)
    plan = Plan("triton", causal, 1.0, seq, None, None, None, True, window)
    any_, all_ = _tile_visibility(plan, block_q, block_k)
    for i in range(any_.shape[0]):
        span = [int(x) for x in common.kv_tiles(i, plan, block_q, block_k)]
        seen = np.flatnonzero(any_[i])
        assert (span[0], span[3]) == (seen[0], seen[-1] + 1), (i, span)
        assert all_[i, span[1]:span[2]].all(), (i, span)
    for j in range(any_.shape[1]):
        span = [int(x) for x in common.q_tiles(j, plan, block_q, block_k)]
        seen = np.flatnonzero(any_[:, j])
        if not seen.size:   # a key tile wholly in the padding
            assert span[0] >= span[3], (j, span)
            continue
        assert (span[0], span[3]) == (seen[0], seen[-1] + 1), (j, span)
        assert all_[span[1]:span[2], j].all(), (j, span)


@pytest.mark.parametrize("documents", [6, 2], ids=["short", "long"])
def test_attention_segment_ranges_cover_every_visible_tile(documents):
    """common.segment_ranges: a tile pair outside the ranges holds no query and key of one
    segment (ids in any order: the ranges are where the ids' [min, max] overlap), and every pair
    in the pure run [pure_first, pure_end) holds one segment only (no mask needed); with ids
    ascending, that run is every such pair (long documents leave tiles inside one)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, documents, (2, 96)), jnp.int32)
    ids = ids.at[0].set(jnp.sort(ids[0]))   # one row ascending (packed documents), one not
    kv_range = common.segment_ranges(ids, ids, 32, 16)   # each query tile's key tiles
    q_range = common.segment_ranges(ids, ids, 16, 32)    # each key tile's query tiles
    pairs = np.asarray(ids[:, :, None] == ids[:, None, :]).reshape(2, 3, 32, 6, 16)
    same, only = pairs.any((2, 4)), pairs.all((2, 4))   # [B, query tile, key tile]
    pure_runs = 0
    for b in range(2):
        for ranges, tiles, others, seen, alone in ((kv_range, 3, 6, same[b], only[b]),
                                                    (q_range, 6, 3, same[b].T, only[b].T)):
            for i in range(tiles):
                first, end, pure_first, pure_end = np.asarray(ranges[b, i])
                assert not seen[i, :first].any() and not seen[i, end:].any()
                assert first <= pure_first <= pure_end <= end
                assert alone[i, pure_first:pure_end].all()
                if b == 0:   # ascending: the run is every tile of its one segment
                    assert pure_end - pure_first == alone[i].sum()
                pure_runs += pure_end > pure_first
    assert all(np.asarray(kv_range[0, i, 1] - kv_range[0, i, 0]) == same[0, i].sum()
               for i in range(3))   # ascending ids: exactly the tiles that share a segment
    assert (pure_runs > 0) == (documents == 2)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seq_len=st.integers(1, 600), extra_pairs=st.integers(0, 3),
       block_q=st.sampled_from((64, 128)), block_k=st.sampled_from((64, 128)),
       causal=st.booleans(), window=st.one_of(st.none(), st.tuples(st.integers(0, 300),
                                                                    st.integers(0, 300))))
def test_attention_tile_spans_fit_their_pair_streams(seq_len, extra_pairs, block_q, block_k,
                                                     causal, window):
    """common.kv_tiles / q_tiles over a sequence padded past its last tile, by up to three more
    pairs of the larger tile (the api pads for the largest kernel): every span is ordered,
    start <= lo <= hi <= end, and lies within the stream its Mosaic GPU pair shares
    (mosaic_gpu.pair_stream), so the tiles a consumer skips before and after its own add up to
    the stream; a tile that sees nothing is empty. (A span past its end had a consumer wait for
    a tile never streamed: the GPU hung.)"""
    pair = 2 * max(block_q, block_k)
    padded = (-(-seq_len // pair) + extra_pairs) * pair
    plan = Plan("mosaic_gpu", causal, 0.125, seq_len, None, None, None, False, window, False)
    for tiles, rows in ((common.kv_tiles, block_q), (common.q_tiles, block_k)):
        spans = [tiles(i, plan, block_q, block_k) for i in range(padded // rows)]
        for span in spans:
            assert span.start <= span.lo <= span.hi <= span.end, (tiles.__name__, span)
            # Without a window every query tile sees a key tile (the forward waits for its
            # first unconditionally; with a window or segments only where there is one).
            assert window is not None or tiles is common.q_tiles or span.start < span.end
        for lower, upper in zip(spans[::2], spans[1::2]):
            first, end = mosaic_gpu.pair_stream(lower, upper, segments=False)
            assert all(first <= span.start and span.end <= end for span in (lower, upper))


def test_attention_segment_ids_run_a_cta_per_unit():
    """Persistent CTAs take folds (pairs p and P - 1 - p), which balance causal work; with
    segment ids a pair's work follows its documents, so the Mosaic GPU kernels run a CTA per
    unit, whatever `persistent` says (measured faster, bench/RESULTS.md session 19)."""
    schedule = functools.partial(mosaic_gpu.schedule_for, 2, 16, 64, 1 << 20, 12, True)
    assert schedule().num_ctas and schedule(segments=True).num_ctas is None


@settings(max_examples=4 if ON_CPU else 16, deadline=None, derandomize=True)
@given(batch=st.integers(1, 2), seq=st.integers(1, 70 if ON_CPU else 1500),
       kv_heads=st.sampled_from((1, 2)), group=st.sampled_from((1, 2, 4)),
       head_dim=st.sampled_from((64, 128)), is_causal=st.booleans(),
       lengths=st.booleans(), window=st.one_of(st.none(), st.integers(0, 40),
                                               st.tuples(st.integers(0, 40), st.integers(0, 40))),
       seed=st.integers(0, 2 ** 16))
def test_dot_product_attention_matches_jax_nn(batch, seq, kv_heads, group, head_dim, is_causal,
                                              lengths, window, seed):
    """kernels.dot_product_attention against jax.nn.dot_product_attention itself (f32, XLA) on
    random cases: grouped heads, causal, sequence lengths, windows (an int is jax.nn's symmetric
    window). Rows that see no key (where jax.nn averages every value) are 0 in ours."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (batch, seq, kv_heads * group, head_dim), jnp.float32)
    k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), jnp.float32)
            for key in keys[1:3])
    masks = dict(is_causal=is_causal, local_window_size=window)
    if lengths:
        masks.update(query_seq_lengths=jax.random.randint(keys[3], (batch,), 1, seq + 1),
                     key_value_seq_lengths=jax.random.randint(keys[4], (batch,), 1, seq + 1))
    got = dot_product_attention(q, k, v, implementation=ATTENTION_IMPLS[0], **masks)
    with f32_precision():
        want = jax.nn.dot_product_attention(q, k, v, **masks)
    # Which rows see some key: jax.nn's masks on a query of ones (its own _apply_masks).
    logits = jax.nn.dot_product_attention(jnp.ones_like(q[..., :1, :]), k[..., :1, :],
                                          k[..., :1, :], **masks, return_residual=True)[1]
    seen = np.broadcast_to(np.asarray(logits > -1e30)[..., None], got.shape)  # [B, T, N, H]
    np.testing.assert_allclose(np.where(seen, got, 0), np.where(seen, want, 0), atol=2e-5,
                               rtol=2e-5)
    assert bool((np.asarray(got)[~seen] == 0).all())


def test_dot_product_attention_falls_back_with_a_notice():
    """A bias (which the kernels do not serve) runs jax.nn's XLA implementation, saying so."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(5), (3, 1, 16, 2, 64), jnp.float32)
    bias = jax.random.normal(jax.random.PRNGKey(6), (1, 2, 16, 16), jnp.float32)
    with pytest.warns(UserWarning, match="a bias was given"):
        got = dot_product_attention(q, k, v, bias, is_causal=True)
    np.testing.assert_array_equal(got, jax.nn.dot_product_attention(q, k, v, bias, is_causal=True))


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_attention_f32_and_explicit_scale(impl):
    """f32 inputs give f32 outputs close to the math; sm_scale is honoured. (mosaic_gpu takes
    bf16 only: wgmma would round f32 to tf32, so it refuses f32 rather than lose precision.)"""
    q, k, v = jax.random.normal(jax.random.PRNGKey(7), (3, 1, 24, 2, 64), jnp.float32)
    if impl == "mosaic_gpu":
        with pytest.raises(NotImplementedError, match="takes bfloat16 inputs"):
            attention(q, k, v, implementation=impl)
        return
    got = attention(q, k, v, causal=True, sm_scale=0.3, implementation=impl,
                    block_sizes=SMALL_BLOCKS if ON_CPU else None)
    with f32_precision():
        want = model.attention(q, k, v, causal=True, sm_scale=0.3)
    assert got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want))) < 1e-4


def test_attention_reference_is_the_model_math():
    q, k, v = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 16, 2, 32), jnp.float32)
    got = attention(q, k, v, causal=False, implementation="reference")
    assert jnp.array_equal(got, model.attention(q, k, v, causal=False))


@pytest.mark.parametrize("seq, head_dim, causal, schedule_barrier, group_mib, persistent, kv_heads, "
                         "window, consumers, block_k", [
                             (256, 64, True, 1, 0, 0, 2, None, 2, 64),
                             (200, 128, False, 0, 12, 0, 2, (70, 30), 2, 64),
                             (256, 64, True, 1, 0, 1, 1, None, 2, 128),
                             (200, 128, False, 0, 12, 1, 2, None, 2, 64),
                             (128, 256, True, 1, 12, 0, 2, None, 2, 64),
                             (256, 64, True, 1, 0, 0, 2, (40, 0), 2, 64),
                             (256, 64, True, 0, 0, 1, 1, None, 3, 64),
                             (200, 64, False, 0, 12, 0, 2, None, 3, 64)])
@ON_CPU_OR_SM90
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_attention_mosaic_gpu_in_the_gpu_interpreter(seq, head_dim, causal, schedule_barrier,
                                                     group_mib, persistent, kv_heads, window,
                                                     consumers, block_k, monkeypatch):
    """The Mosaic GPU forward run by jax's Mosaic GPU interpreter on CPU, which simulates its
    warpgroups, TMA copies and barriers (a wrong protocol deadlocks or leaves a barrier phase
    unobserved, which it reports), with wgmma emulated: o, lse and o's low half vs the math.
    Tiles of 64 and 2 stages, so the ring wraps and (causal) the lower query tile of a pair
    releases the tiles only its neighbour needs (in step with it through the ping-pong barrier);
    200 rows leave a ragged, masked last key tile; 128 rows at head_dim 256 one pair whose q and
    K/V tiles span four swizzled column tiles. Two heads: a group per (batch, head) (group_mib 0)
    or one group of both (launch_grid), a CTA per pair of query tiles; or, with two batches of two
    heads, 3 persistent CTAs through the 4 folds (each both pairs of a (batch, head)), the first
    CTA two folds, so its rings and q buffers carry over from fold to fold; there the two query
    heads share one K/V head (grouped-query), and key tiles of 128 rows leave the even query
    tiles' diagonal tile a second half that no row sees (a step of half the keys). Windows:
    (70, 30) streams a pair from a first tile past 0 and masks both ends; (40, 0) with causal
    masking leaves rows nothing in their first tile, with ping-pong. Three consumer warpgroups:
    units of three query tiles over four, so the last unit holds one (its other warpgroups pass
    the stream along), through persistent folds (causal) and a CTA per unit (not causal, 200
    rows). On a Hopper GPU the same cases run compiled."""
    if ON_CPU:
        run_in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu, "num_sms", lambda: 3)
    kernels = mosaic_gpu.DEFAULTS[head_dim].replace(forward=dict(
        block_q=64, block_k=block_k, num_stages=2, schedule_barrier=bool(schedule_barrier),
        group_mib=group_mib, persistent=bool(persistent), consumers=consumers))
    sm_scale = head_dim ** -0.5
    plan = Plan("mosaic_gpu", causal, sm_scale, seq, kernels.forward, kernels.dkdv, kernels.dq,
                False, window)
    keys = jax.random.split(jax.random.PRNGKey(seq), 3)
    q = jax.random.normal(keys[0], (1 + persistent, seq, 2, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1 + persistent, seq, kv_heads, head_dim), jnp.bfloat16)
            for key in keys[1:])
    o, (*_, lse, o_lo) = mosaic_gpu.forward(q, k, v, plan, residuals=True)

    ref_bf16 = model.attention(q, k, v, causal=causal, local_window_size=window)
    with f32_precision():
        ref_f32 = model.attention(*upcast((q, k, v)), causal=causal, local_window_size=window)
        s = jnp.einsum("bqhd,bkhd->bhqk", *upcast((q, jnp.repeat(k, 2 // kv_heads, 2)))) * sm_scale
    mask = model.attention_mask(seq, causal=causal, local_window_size=window)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    assert_within_twice_reference("mosaic_gpu o", o, ref_bf16, ref_f32)
    assert jnp.all(jnp.abs(upcast(o_lo)) <= jnp.abs(upcast(o)) * 2.0 ** -8)  # half a bf16 ulp
    assert max_err(upcast(o) + upcast(o_lo), ref_f32) <= max_err(o, ref_f32)
    assert max_err(lse, jax.nn.logsumexp(s, axis=-1) * LOG2E) < 1e-4


# Documents of 37, 63, 1 and 89 tokens and the rest (batch 0), of 5, 125 and the rest (batch 1).
DOCUMENT_CUTS = ([37, 100, 101, 190], [5, 130])


@pytest.mark.parametrize("seq, causal, persistent, window, keyless_rows, consumers, block_k", [
    (256, True, 0, None, True, 2, 64), (256, False, 1, None, False, 3, 64),
    (200, True, 0, (70, 0), False, 2, 128)])
@ON_CPU_OR_SM90
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_attention_mosaic_gpu_segments_in_the_gpu_interpreter(seq, causal, persistent, window,
                                                              keyless_rows, consumers,
                                                              block_k, monkeypatch):
    """The Mosaic GPU forward with segment ids (packed documents) in jax's Mosaic GPU
    interpreter: boundaries inside and across 64-row tiles, a document of one token, each pair of
    query tiles streaming only the key tiles of its documents with their ids on a third ring;
    with keyless_rows the keys' ids differ from the queries' from row 150 on, so those rows see
    no key (output 0, no NaN) and the upper tiles' pairs stream nothing; two batches with
    persistent CTAs asked for (segment ids run a CTA per unit all the same: schedule_for); a
    window combined with causal masking on a ragged 200 rows, with key tiles of 128 rows (the
    diagonal tiles of even query tiles in half a step, their keys' ids halved too); three
    consumer warpgroups (no ping-pong) over four query tiles, the last unit ragged. o, lse and
    o's low half vs the math. On a Hopper GPU the same cases run compiled."""
    if ON_CPU:
        run_in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu, "num_sms", lambda: 3)
    kernels = mosaic_gpu.DEFAULTS[64].replace(forward=dict(
        block_q=64, block_k=block_k, num_stages=2, schedule_barrier=consumers == 2, group_mib=0,
        persistent=bool(persistent), consumers=consumers))
    sm_scale, batch = 0.125, 1 + persistent
    plan = Plan("mosaic_gpu", causal, sm_scale, seq, kernels.forward, kernels.dkdv, kernels.dq,
                False, window, True)
    keys = jax.random.split(jax.random.PRNGKey(seq), 3)
    q, k, v = (jax.random.normal(key, (batch, seq, 2, 64), jnp.bfloat16) for key in keys)
    position = jnp.arange(seq)
    ids = jnp.stack([sum((position >= cut).astype(jnp.int32) for cut in cuts)
                     for cuts in DOCUMENT_CUTS[:batch]])
    kv_ids = jnp.where(position >= 150, ids + 10, ids) if keyless_rows else ids
    o, (*_, lse, o_lo, saved_q_ids, saved_kv_ids) = mosaic_gpu.forward(
        q, k, v, plan, residuals=True, segments=(ids, kv_ids))
    assert saved_q_ids is ids and saved_kv_ids is kv_ids   # for the Triton backward

    masks = dict(causal=causal, local_window_size=window, segment_ids=ids, kv_segment_ids=kv_ids)
    ref_bf16 = model.attention(q, k, v, sm_scale=sm_scale, **masks)
    with f32_precision():
        ref_f32 = model.attention(*upcast((q, k, v)), sm_scale=sm_scale, **masks)
        s = jnp.einsum("bqhd,bkhd->bhqk", *upcast((q, k))) * sm_scale
    s = jnp.where(model.attention_mask(seq, **masks), s, -jnp.inf)
    assert not jnp.any(jnp.isnan(upcast(o)))
    assert_within_twice_reference("mosaic_gpu o", o, ref_bf16, ref_f32)
    assert jnp.all(jnp.abs(upcast(o_lo)) <= jnp.abs(upcast(o)) * 2.0 ** -8)
    want_lse = jax.nn.logsumexp(s, axis=-1) * LOG2E
    seen = jnp.isfinite(want_lse)
    assert bool(jnp.all(seen)) != keyless_rows   # the keyless rows: lse +inf, o 0
    assert max_err(jnp.where(seen, lse, 0.0), jnp.where(seen, want_lse, 0.0)) < 1e-4
    assert bool(jnp.all(jnp.where(seen, True, (lse == jnp.inf) & jnp.all(o == 0, axis=-1)
                                  .transpose(0, 2, 1))))


@pytest.mark.parametrize("seq, head_dim, causal, persistent, dq_tiles, kv_heads, window, documents", [
    (256, 64, True, 0, (64, 128, 2), None, None, None),
    (200, 128, False, 0, (128, 64, 3), None, None, None),
    (256, 64, True, 1, (64, 64, 2), None, None, None),
    (200, 128, False, 1, (64, 64, 2), None, None, None),
    (256, 64, True, 1, (64, 64, 2), 1, (40, 0), None),
    (200, 128, False, 0, (64, 64, 2), None, (70, 30), None),
    (256, 64, True, 0, (64, 128, 2), None, None, "documents"),
    (256, 64, False, 1, (64, 64, 2), 1, None, "keyless rows")])
@pytest.mark.skipif(not ON_CPU, reason="on the GPU the kernels themselves run")
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_attention_mosaic_gpu_backward_in_the_gpu_interpreter(seq, head_dim, causal, persistent,
                                                              dq_tiles, kv_heads, window,
                                                              documents, monkeypatch):
    """The Mosaic GPU backward in jax's Mosaic GPU interpreter (wgmma emulated), on the
    reference's residuals: dq, dk, dv vs the math; its dK/dV and dQ kernels. Tiles of 64 and 2
    stages over 256 rows: the rings wrap, and (causal) the upper key tile of a dK/dV pair skips
    the query tiles only its neighbour needs, the lower query tile of a dQ pair the key tiles;
    200 rows leave a ragged, masked last tile (and padded rows whose do is zero). The dQ
    kernel's own tiles (query rows, key rows, stages) differ from dK/dV's 64 x 64 in the first
    two cases: the sequence is padded for the larger. One (batch, head); persistent: two batches
    of two heads, 3 CTAs through the 4 folds of each kernel (both pairs of a (batch, head)), the
    first CTA two folds, so its rings and second buffers carry over from fold to fold.
    kv_heads 1: two query heads share one K/V head (grouped-query: a dK/dV unit streams both
    heads' query tiles, summing in registers), with persistent dK/dV CTAs through 2 folds and a
    causal window of 40 that leaves rows nothing in their first tile; the window (70, 30)
    streams from a first tile past 0 and ends before the last, so the lower tile of a dK/dV pair
    skips the tiles only the upper one sees. documents: segment ids (DOCUMENT_CUTS), each unit
    streaming only the tiles of its documents with their ids on a ring (the dQ kernel's tiles,
    64 x 128, cut the ranges apart from dK/dV's; a CTA per unit whatever `persistent` says);
    with keyless rows the keys' ids differ from the queries' from row 150 on, so those rows see
    no key (lse +inf, as the forward saves it: no NaN, zero gradients) and some units stream
    nothing."""
    from kernels.attention import common, mosaic_gpu_vjp
    run_in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu, "num_sms", lambda: 3)
    kernels = mosaic_gpu.DEFAULTS[head_dim].replace(
        dkdv=dict(block_q=64, num_stages=2, persistent=bool(persistent)),
        dq=dict(zip(("block_q", "block_k", "num_stages"), dq_tiles)))
    sm_scale = head_dim ** -0.5
    plan = Plan("mosaic_gpu", causal, sm_scale, seq, kernels.forward, kernels.dkdv, kernels.dq,
                False, window, documents is not None)
    batch = heads = 1 + persistent if kv_heads is None else 2
    keys = jax.random.split(jax.random.PRNGKey(seq), 4)
    q, do = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16)
             for key in keys[::3])
    k, v = (jax.random.normal(key, (batch, seq, kv_heads or heads, head_dim), jnp.bfloat16)
            for key in keys[1:3])
    masks, segments = dict(causal=causal, local_window_size=window), ()
    if documents:
        position = jnp.arange(seq)
        ids = jnp.stack([sum((position >= cut).astype(jnp.int32) for cut in cuts)
                         for cuts in DOCUMENT_CUTS[:batch]])
        kv_ids = jnp.where(position >= 150, ids + 10, ids) if documents == "keyless rows" else ids
        masks.update(segment_ids=ids, kv_segment_ids=kv_ids)
        segments = (ids, kv_ids)
    with f32_precision():
        o32 = model.attention(*upcast((q, k, v)), **masks)
        s = jnp.einsum("bqhd,bkhd->bhqk", *upcast((q, jnp.repeat(k, heads // k.shape[2], 2))))
    mask = model.attention_mask(seq, **masks)
    s = jnp.where(mask, s * sm_scale, -jnp.inf) if mask is not None else s * sm_scale
    lse = jax.nn.logsumexp(s, axis=-1) * LOG2E                          # [B, H, S], base 2
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)   # a row that sees no key, as the forward saves
    assert bool(jnp.any(jnp.isinf(lse))) == (documents == "keyless rows")
    o = o32.astype(jnp.bfloat16)
    grads = mosaic_gpu_vjp.backward(
        plan, (q, k, v, o, lse, common.low_half(o32, o.dtype), *segments), do)

    math = lambda q, k, v: model.attention(q, k, v, **masks)
    ref_bf16 = jax.vjp(math, q, k, v)[1](do)
    with f32_precision():
        ref_f32 = jax.vjp(math, *upcast((q, k, v)))[1](upcast(do))
    for name, got, x, want_bf16, want_f32 in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_bf16,
                                                 ref_f32):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_within_twice_reference(f"mosaic_gpu {name}", got, want_bf16, want_f32)


@pytest.mark.skipif(not ON_CPU, reason="on the GPU the ragged70 cases run the kernels themselves")
@pytest.mark.timeout(300, method="thread")  # a wait for a tile never streamed deadlocks: fail
def test_attention_mosaic_gpu_through_the_api_past_the_last_tile(monkeypatch):
    """The Mosaic GPU forward and backward through `attention` in the GPU interpreter, with the
    H200's head_dim-64 tiles (dQ key tiles of 128): the api pads 70 tokens to the backward's 256
    rows, so under a window the last query tiles see no key tile and the last key tiles no query
    tile. Both kernels once waited there for a tile their pair never streamed (the GPU hung)."""
    run_in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu, "num_sms", lambda: 3)
    blocks = dict(block_q=64, block_k=128, dkdv_block_q=64, dq_block_q=64, dq_block_k=128)
    _check_attention("mosaic_gpu", 1, 70, 1, 64, True, blocks=blocks, backward="mosaic_gpu",
                     interpret=False, local_window_size=10)


# ------------------------------------------------------------------ layernorm_ffn

LNFFN_IMPLS = {"cpu": ["triton", "tpu"], "gpu": ["triton"], "tpu": ["tpu"]}[jax.default_backend()]
LNFFN_IMPLS += ["mosaic_gpu"] if mosaic_gpu.on_sm90() else []
LNFFN_NAMES = ("out", "dx", "d_ln_scale", "d_ln_bias", "dw_fc", "db_fc", "dw_proj", "db_proj")
# Tiles small enough that a 96-token, d = 256 case spans several of each (token, hidden and d
# tiles, so the accumulations over tiles and the first-tile-only db_fc sums are all exercised).
LNFFN_SMALL_BLOCKS = {
    "triton": dict(ln_block_t=16, up_block_m=32, up_block_n=128, up_block_k=64, down_block_m=16,
                   down_block_n=128, down_block_k=128, dz_block_m=32, dz_block_n=256,
                   dxn_block_m=16, dxn_block_n=128, lnb_block_t=32, dw_block_t=16, dw_block_f=256,
                   dw_block_d=128),
    "tpu": dict(block_t=16, block_f=256, bwd_block_t=32, bwd_block_f=128, dw_block_t=16,
                dw_block_f=256, dw_block_d=128),
    "mosaic_gpu": dict(ln_block_t=16, up_block_n=128, down_block_n=64, dz_block_n=256,
                       dxn_block_m=128, dxn_block_n=64, up_num_stages=2, lnb_block_t=32,
                       dw_block_m=64, dw_block_n=64, dw_num_stages=2),
}

# (x shape, x mean, x std, residual, small blocks).  x = 50 + 20 randn: LayerNorm must subtract the
# mean in f32 before squaring (E[x^2] - mean^2 would cancel away the variance).
LNFFN_CASES = [
    pytest.param((2, 100, 128), 50.0, 20.0, True, False, id="ragged2x100-d128-residual-mean50"),
    pytest.param((200, 256), 0.0, 1.0, False, False, id="ragged200-d256"),
    pytest.param((96, 256), 0.0, 3.0, True, True, id="t96-d256-residual-small-blocks"),
    pytest.param((4, 2048, 512), 0.0, 1.0, True, False, id="t8192-d512-residual", marks=LARGE),
    pytest.param((16384, 768), 50.0, 20.0, True, False, id="t16384-d768-mean50", marks=LARGE),
    pytest.param((3, 1000, 1024), 0.0, 1.0, False, False, id="ragged3000-d1024", marks=LARGE),
    pytest.param((2, 4000, 640), 0.0, 1.0, True, False, id="ragged8000-d640", marks=LARGE),
    # Widths that are odd multiples of 128 (no power of two) up to 2048, the widest documented.
    pytest.param((40, 384), 0.0, 1.0, True, False, id="t40-d384-residual"),
    pytest.param((4096, 384), 0.0, 1.0, True, False, id="t4096-d384", marks=LARGE),
    pytest.param((3000, 896), 0.0, 1.0, False, False, id="ragged3000-d896", marks=LARGE),
    pytest.param((4096, 1152), 0.0, 1.0, True, False, id="t4096-d1152", marks=LARGE),
    pytest.param((2000, 1536), 0.0, 1.0, True, False, id="ragged2000-d1536", marks=LARGE),
    pytest.param((4096, 2048), 0.0, 1.0, True, False, id="t4096-d2048", marks=LARGE),
]


@pytest.mark.parametrize("impl", LNFFN_IMPLS)
@pytest.mark.parametrize("shape, mean, std, residual, small", LNFFN_CASES)
def test_layernorm_ffn_matches_reference(impl, shape, mean, std, residual, small):
    """out and the gradients of x and all six parameters, kernel (bf16 x, f32 parameters) vs the
    math in f32, each within twice the bf16 math's error plus a slack of 0.1% of the largest
    magnitude of that output (f32 sums over thousands of tokens differ in order, not in kind)."""
    seed = zlib.crc32(f"{impl}{shape}{mean}{std}{residual}{small}".encode())
    kx, kp, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = (mean + std * jax.random.normal(kx, shape, jnp.float32)).astype(jnp.bfloat16)
    params = lnffn_params(kp, shape[-1])
    cotangent = jax.random.normal(kc, shape, jnp.bfloat16)
    blocks = LNFFN_SMALL_BLOCKS[impl] if small else None
    kernel = lambda *a: layernorm_ffn(*a, residual=residual, implementation=impl,
                                      block_sizes=blocks)
    reference = lambda *a: model.layernorm_ffn(*a, residual=residual)

    got = _value_and_grads(kernel, (x, *params), cotangent)
    ref_bf16 = _value_and_grads(reference, (x, *params), cotangent)
    with f32_precision(), pytest.MonkeyPatch.context() as patch:
        # model.matmul casts its operands to model.COMPUTE_DTYPE (bf16) whatever their dtype, so the
        # f32 truth needs that switched too; otherwise it would share the bf16 math's roundings.
        patch.setattr(model, "COMPUTE_DTYPE", jnp.float32)
        ref_f32 = _value_and_grads(reference, upcast((x, *params)), upcast(cotangent))
    for name, g, arg in zip(LNFFN_NAMES, got, (x, x, *params)):
        assert g.dtype == arg.dtype and g.shape == arg.shape, name
    for name, *outs in zip(LNFFN_NAMES, got, ref_bf16, ref_f32):
        slack = 1e-3 * float(jnp.max(jnp.abs(outs[2])))
        assert_within_twice_reference(f"{impl} {name}", *outs, atol=slack)


@pytest.mark.parametrize("impl", LNFFN_IMPLS)
def test_layernorm_ffn_dtypes(impl):
    """f32 x gives f32 out equal to the math up to summation order (both multiply in bf16);
    bf16 parameters get bf16 gradients."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 24, 128), jnp.float32)
    params = lnffn_params(jax.random.PRNGKey(2), 128)
    if impl == "mosaic_gpu":
        with pytest.raises(NotImplementedError, match="bfloat16"):
            layernorm_ffn(x, *params, residual=True, implementation=impl)
        return
    got = layernorm_ffn(x, *params, residual=True, implementation=impl)
    want = model.layernorm_ffn(x, *params, residual=True)
    assert got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want))) < 1e-2 * float(jnp.max(jnp.abs(want)))
    bf16_params = tuple(p.astype(jnp.bfloat16) for p in params)
    grads = jax.grad(lambda *a: jnp.sum(layernorm_ffn(*a, implementation=impl)),
                     argnums=tuple(range(7)))(x.astype(jnp.bfloat16), *bf16_params)
    assert all(g.dtype == jnp.bfloat16 for g in grads)


def test_layernorm_ffn_reference_is_the_model_math():
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 128), jnp.bfloat16)
    params = lnffn_params(jax.random.PRNGKey(4), 128)
    got = layernorm_ffn(x, *params, residual=True, implementation="reference")
    assert jnp.array_equal(got, model.layernorm_ffn(x, *params, residual=True))


# (epilogue, B transposed, epilogue inputs) of the four GEMMs of the Mosaic GPU LayerNorm+FFN.
MOSAIC_GEMMS = [
    pytest.param(functools.partial(lnffn_common.up_epilogue, tanh=jnp.tanh, with_grad=True), False,
                 ("vector",), id="up-bias-gelu-and-grad"),
    pytest.param(lnffn_common.down_epilogue, False, ("vector", "tile"), id="down-bias-residual"),
    pytest.param(lnffn_common.dz_epilogue, True, ("tile",), id="dz-transposed-gelu-grad"),
    pytest.param(lnffn_common.store_epilogue, True, (), id="dxn-transposed"),
]


@pytest.mark.parametrize("epilogue, b_transposed, inputs", MOSAIC_GEMMS)
@ON_CPU_OR_SM90
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_layernorm_ffn_mosaic_gpu_gemm_matches_the_product(epilogue, b_transposed, inputs,
                                                           monkeypatch):
    """The Mosaic GPU GEMM of the LayerNorm+FFN (on CPU in jax's Mosaic GPU interpreter, wgmma
    emulated; compiled on a Hopper GPU), each epilogue vs the same epilogue on the f32 product.
    300 rows (ragged: padded to 3 blocks of 2 x 64), 2 column tiles of 128, so 6 output tiles
    over 4 persistent CTAs (two take a second tile), and K = 192 in 3 steps through a 2-slot
    ring (it wraps)."""
    if ON_CPU:
        run_in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu_gemm, "num_sms", lambda: 4)
    m, k, n = 300, 192, 256
    keys = jax.random.split(jax.random.PRNGKey(n), 4)
    a = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    b = (jax.random.normal(keys[1], (n, k) if b_transposed else (k, n), jnp.bfloat16) / 8)
    operands = {"vector": jax.random.normal(keys[2], (n,), jnp.float32),
                "tile": jax.random.normal(keys[3], (m, n), jnp.bfloat16)}
    extra = [operands[name] for name in inputs]
    num_outputs = len(epilogue(jnp.zeros((1, n)), *(x[:1] for x in extra)))
    got = lnffn_mosaic_gpu.matmul(a, b, epilogue, extra,
                                  [jax.ShapeDtypeStruct((m, n), jnp.bfloat16)] * num_outputs,
                                  b_transposed=b_transposed,
                                  config=mosaic_gpu_gemm.Tiles(64, 128, 2), gemm="gemm")
    product = jnp.dot(a, b.T if b_transposed else b, preferred_element_type=jnp.float32)
    want = epilogue(product, *(x[None, :] if x.ndim == 1 else x for x in extra))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == (m, n) and g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32),
                                   rtol=1e-2, atol=1e-2)




def test_mosaic_gpu_gemm_visits_each_tile_once_a_group_of_rows_at_a_time():
    """7 rows of 5 tiles in groups of 3 rows (the last of one): column by column in a group."""
    units = mosaic_gpu_gemm._Units(64, 128, tiles_n=5, num_tiles=35, chunks=1, chunk_steps=1,
                                   a_transposed=False, b_transposed=True, group_rows=3)
    order = [tuple(int(x) for x in units.position(jnp.int32(tile))) for tile in range(35)]
    assert sorted(order) == [(row, col) for row in range(7) for col in range(5)]
    assert order[:4] == [(0, 0), (1, 0), (2, 0), (0, 1)]
    assert order[30:] == [(6, col) for col in range(5)]


@pytest.mark.parametrize("a_transposed, b_transposed, row_sums", [
    pytest.param(True, False, True, id="weight-gradient-with-row-sums"),
    pytest.param(False, True, False, id="b-transposed")])
@ON_CPU_OR_SM90
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_mosaic_gpu_split_k_gemm_matches_the_product(a_transposed, b_transposed, row_sums,
                                                     monkeypatch):
    """The split-K GEMM (the LayerNorm+FFN weight gradients' form: A stored transposed, A's row
    sums; on CPU in jax's Mosaic GPU interpreter, its TMA reduce-add emulated; compiled on a
    Hopper GPU) vs the f32 product:
    M = 200 rows (padded to 2 blocks of 2 x 64), 2 column tiles of 64, K = 740 (padded to 12
    k-steps) in 3 chunks: 12 units over 5 persistent CTAs, so a CTA runs units of different
    chunks and tiles through one 2-slot ring, and each output tile sums 3 reduce-adds."""
    if ON_CPU:
        run_in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu_gemm, "num_sms", lambda: 5)
    monkeypatch.setattr(mosaic_gpu_gemm, "choose_chunks", lambda *_: 3)
    m, k, n = 200, 740, 128
    keys = jax.random.split(jax.random.PRNGKey(k), 2)
    a = jax.random.normal(keys[0], (k, m) if a_transposed else (m, k), jnp.bfloat16)
    b = jax.random.normal(keys[1], (n, k) if b_transposed else (k, n), jnp.bfloat16)
    got, sums = mosaic_gpu_gemm.matmul_split_k(
        a, b, a_transposed=a_transposed, b_transposed=b_transposed,
        tiles=mosaic_gpu_gemm.Tiles(64, 64, 2), name="split_k", row_sums=row_sums)
    a_mk, b_kn = (a.T if a_transposed else a), (b.T if b_transposed else b)
    want = jnp.dot(a_mk, b_kn, preferred_element_type=jnp.float32)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    # f32 sums of exact bf16 products, in another order: equal to f32 rounding.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    if row_sums:
        np.testing.assert_allclose(sums, jnp.sum(a_mk.astype(jnp.float32), axis=1), rtol=1e-5,
                                   atol=1e-4)
    else:
        assert sums is None


def test_layernorm_ffn_weight_gradients_by_xla_keep_the_kernels_contract():
    """`dw_xla` (the Mosaic GPU backward's weight gradients by XLA's GEMMs) gives what the
    Triton weight-gradient kernel gives (interpreted on CPU): dW_proj [F, d], dW_fc [d, F] and
    db_fc [F] in f32, equal up to f32 summation order."""
    tokens, d = 96, 128
    keys = jax.random.split(jax.random.PRNGKey(tokens), 4)
    g, dz = (jax.random.normal(key, (tokens, 4 * d), jnp.bfloat16) for key in keys[:2])
    dy, xn = (jax.random.normal(key, (tokens, d), jnp.bfloat16) for key in keys[2:])
    by_xla = lnffn_mosaic_gpu_vjp._weight_gradients(
        g, dy, dz, xn, interpret=False, config=types.SimpleNamespace(
            dw=lnffn_mosaic_gpu_vjp.WeightTiles(128, 128, 3, xla=True)))
    triton_dw = lnffn_triton_vjp.Weights(block_t=32, block_f=128, block_d=128, num_warps=4,
                                          num_stages=2)
    by_kernel = lnffn_triton_vjp._weight_gradients(
        g, dy, dz, xn, interpret=ON_CPU, config=types.SimpleNamespace(dw=triton_dw))
    for got, want in zip(by_xla, by_kernel, strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ logits_loss

LOSS_IMPLS = {"cpu": ["triton", "tpu"], "gpu": ["triton"], "tpu": ["tpu"]}[jax.default_backend()]
LOSS_IMPLS += ["mosaic_gpu"] if mosaic_gpu.on_sm90() else []
# (h shape [..., d], vocabulary, logit scale, ignore_index): ragged tokens and a vocabulary that is
# no multiple of any tile (padded, masked columns) with ignored targets, small enough for interpret
# mode; then on an accelerator micro_gpt_4's head, GPT-2's vocabulary, a ragged odd one, logits as
# large as a trained model's. The backward's chunk budget is 1 MiB, so every case runs several
# chunks, the last one padded.
LOSS_CASES = [((2, 150, 128), 1000, 1.0, -100),
              pytest.param((8, 1024, 512), 9000, 1.0, None, marks=LARGE),
              pytest.param((2, 1000, 768), 50257, 1.0, -100, marks=LARGE),
              pytest.param((3, 700, 256), 4099, 1.0, 7, marks=LARGE),
              pytest.param((4, 1000, 512), 9000, 8.0, None, marks=LARGE)]
LOSS_CHUNK = {"probabilities_chunk_mib": 1}


def _check_logits_loss(loss_fn, shape, vocab, scale, ignore_index):
    """The loss and dh, dE of loss_fn(h, embed, targets, ignore_index) (bf16 h, f32 E) vs the
    math in f32, each within twice the bf16 math's error plus 0.1% of its largest magnitude (f32
    sums over the vocabulary or the tokens differ in order). About one target in ten is
    ignore_index: their rows of dh must be exactly 0."""
    keys = jax.random.split(jax.random.PRNGKey(zlib.crc32(f"{shape}{vocab}{scale}".encode())), 4)
    h = jax.random.normal(keys[0], shape, jnp.bfloat16)
    embed = scale * 0.05 * jax.random.normal(keys[1], (vocab, shape[-1]), jnp.float32)
    targets = jax.random.randint(keys[2], shape[:-1], 0, vocab)
    ignored = jax.random.bernoulli(keys[3], 0.1, shape[:-1]) & (ignore_index is not None)
    targets = jnp.where(ignored, -1 if ignore_index is None else ignore_index, targets)
    run = lambda f, h, embed: _value_and_grads(lambda h, e: f(h, e, targets, ignore_index),
                                               (h, embed), jnp.float32(1.0))
    got = run(loss_fn, h, embed)
    ref_bf16 = run(model.tied_logits_loss, h, embed)
    with f32_precision(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "COMPUTE_DTYPE", jnp.float32)   # as in the LayerNorm+FFN test
        ref_f32 = run(model.tied_logits_loss, *upcast((h, embed)))
    for name, g, arg in zip(("loss", "dh", "dembed"), got, (ref_bf16[0], h, embed)):
        assert g.dtype == arg.dtype and g.shape == arg.shape, name
    for name, *outs in zip(("loss", "dh", "dembed"), got, ref_bf16, ref_f32):
        slack = 1e-3 * float(jnp.max(jnp.abs(outs[2])))
        assert_within_twice_reference(name, *outs, atol=slack)
    assert not jnp.any(jnp.where(ignored[..., None], got[1], 0)), "ignored rows got a gradient"


def _loss_head(impl, **kwargs):
    return lambda h, e, t, ignore_index: logits_loss(h, e, t, ignore_index=ignore_index,
                                                     implementation=impl, **kwargs)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("shape, vocab, scale, ignore_index", LOSS_CASES, ids=str)
def test_logits_loss_matches_reference(impl, shape, vocab, scale, ignore_index):
    _check_logits_loss(_loss_head(impl, block_sizes=LOSS_CHUNK), shape, vocab, scale,
                       ignore_index)


# Forward and probabilities vocabulary tiles whose lcm pads V = 1000 (to 1024 or 1152) with whole
# forward tiles of padding only (-inf logits: their statistics must add nothing to log Z).
PADDING_TILES = {"triton": {"block_n": 16, "probabilities_block_n": 512},
                 "tpu": {"block_v": 128, "probabilities_block_v": 1152},
                 "mosaic_gpu": {"block_n": 64, "probabilities_block_n": 192}}


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_logits_loss_tiles_of_padding_only_add_nothing(impl):
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    h = jax.random.normal(keys[0], (64, 64), jnp.bfloat16)
    embed = 0.5 * jax.random.normal(keys[1], (1000, 64), jnp.float32)
    targets = jax.random.randint(keys[2], (64,), 0, 1000)
    got = logits_loss(h, embed, targets, implementation=impl, block_sizes=PADDING_TILES[impl])
    np.testing.assert_allclose(got, model.tied_logits_loss(h, embed, targets), rtol=1e-5)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_logits_loss_redoes_the_chunks_of_a_loss_beyond_the_limit(impl, monkeypatch):
    """Four chunks of 64 tokens, the third's rows of h 40 times larger, so that their logits
    reach beyond the target's by more than GRADIENT_LIMIT: that chunk (only that one) is done
    again with the row max as base, in pieces; loss and gradients vs the math all the same."""
    monkeypatch.setattr(logits_loss_common, "token_chunk", lambda *args: 64)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    row_scale = jnp.where(jnp.arange(256) // 64 == 2, 40.0, 1.0)[:, None]
    h = (row_scale * jax.random.normal(keys[0], (256, 128))).astype(jnp.bfloat16)
    embed = 0.05 * jax.random.normal(keys[1], (1000, 128), jnp.float32)
    targets = jax.random.randint(keys[2], (256,), 0, 1000)
    with f32_precision():
        logits = upcast(h) @ upcast(embed.astype(jnp.bfloat16)).T
    beyond = logits.max(axis=1) - jnp.take_along_axis(logits, targets[:, None], 1)[:, 0] > \
        logits_loss_common.GRADIENT_LIMIT
    assert [bool(chunk.any()) for chunk in beyond.reshape(4, 64)] == [False, False, True, False]
    loss = lambda f: lambda h, e: f(h, e, targets)
    got = _value_and_grads(loss(functools.partial(logits_loss, implementation=impl)),
                           (h, embed), jnp.float32(1.0))
    ref_bf16 = _value_and_grads(loss(model.tied_logits_loss), (h, embed), jnp.float32(1.0))
    with f32_precision(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "COMPUTE_DTYPE", jnp.float32)
        ref_f32 = _value_and_grads(loss(model.tied_logits_loss), upcast((h, embed)),
                                   jnp.float32(1.0))
    for name, *outs in zip(("loss", "dh", "dembed"), got, ref_bf16, ref_f32):
        assert_within_twice_reference(name, *outs, atol=1e-3 * float(jnp.max(jnp.abs(outs[2]))))


@LARGE
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_logits_loss_is_deterministic(impl):
    """The same inputs give bitwise the same loss and gradients, run after run (no atomics: each
    logits tile is one CTA's or program's, the chunks' dE add in sequence, the onehot terms each
    target's once per chunk; a race on the epilogue's shared buffers would show here)."""
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    h = jax.random.normal(keys[0], (4096, 512), jnp.bfloat16)
    embed = 0.2 * jax.random.normal(keys[1], (9000, 512), jnp.float32)
    targets = jax.random.randint(keys[2], (4096,), 0, 9000)
    run = jax.jit(jax.value_and_grad(functools.partial(logits_loss, implementation=impl,
                                                       block_sizes=LOSS_CHUNK), argnums=(0, 1)))
    first = run(h, embed, targets)
    for _ in range(3):
        again = run(h, embed, targets)
        for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# XLA's sums (common.add_by_target: the TPU head's) and the GPU heads' Triton kernel (interpreted
# on a CPU host)
BY_TARGET = {"xla": logits_loss_common.add_by_target,
             "triton": functools.partial(logits_loss_triton_by_target.add_by_target,
                                         interpret=ON_CPU)}


@pytest.mark.parametrize("impl", ["xla"] if jax.default_backend() == "tpu" else list(BY_TARGET))
@pytest.mark.parametrize("tokens, vocab, d", [(100, 1000, 64), (1000, 3, 192), (20000, 5, 64)])
def test_add_by_target_sums_each_targets_rows(impl, tokens, vocab, d):
    """The loss head's onehot term of dE, bf16 rows times f32 scales added by target in a fixed
    order, vs numpy's unbuffered add in f64: targets that repeat within a block of rows (XLA's
    RUN_BLOCK, the kernel's BLOCK), runs across blocks (3 targets over 1000 rows, in the kernel
    two slices of d), and across the blocks of blocks (20000 rows); bitwise the same when run
    again. Each error within 2^-15 of its sum of |products| (the scales in two bf16 terms hold 16
    bits)."""
    keys = jax.random.split(jax.random.PRNGKey(tokens), 4)
    targets = jax.random.randint(keys[0], (tokens,), 0, vocab)
    rows = jax.random.normal(keys[1], (tokens, d), jnp.bfloat16)
    scales = jax.random.normal(keys[2], (tokens,)) / tokens
    acc = jax.random.normal(keys[3], (vocab + 2, d))
    products = np.asarray(scales, np.float64)[:, None] * np.asarray(rows, np.float64)
    want, bound = np.asarray(acc, np.float64), np.zeros(acc.shape)
    np.add.at(want, np.asarray(targets), products)
    np.add.at(bound, np.asarray(targets), np.abs(products))
    order = jnp.argsort(targets, stable=True)
    add = jax.jit(BY_TARGET[impl])
    got, again = (add(acc, rows, scales, targets, order) for _ in range(2))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(again))
    error = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(error <= 2.0**-15 * bound + 2.0**-22 * np.abs(want)), float(np.max(error))


@ON_CPU_OR_SM90
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_logits_loss_mosaic_gpu_at_small_tiles(monkeypatch):
    """The Mosaic GPU loss head (on CPU in jax's Mosaic GPU interpreter, wgmma emulated; compiled
    on a Hopper GPU) at tiles of its own: 300 tokens by a vocabulary of 1000 (4 column tiles
    of 256, the last with 232 real columns) over 4 persistent CTAs: the statistics GEMM (only per-row outputs) and the probabilities GEMM (row inputs by TMA
    beside each tile) in chunks of 128 tokens, the last padded; loss and gradients vs the math.
    E (1024 x 128 bf16) counts as outgrowing L2, so the statistics GEMM visits its tiles in
    groups of two rows of tiles (the last group of one)."""
    if ON_CPU:
        run_in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu_gemm, "num_sms", lambda: 4)
    monkeypatch.setattr(mosaic_gpu_gemm, "GROUP_BYTES", 2 * 128 * 128 * 2)
    tiles = mosaic_gpu_gemm.Tiles(64, 256, 2)
    config = logits_loss_mosaic_gpu.Kernels(tiles, logits_loss_mosaic_gpu.Chunk(64, 256, 2, 1))
    fused = lambda h, e, t, ignore_index: logits_loss_api.fused(
        h, e, t, ignore_index=ignore_index, implementation="mosaic_gpu", config=config)
    monkeypatch.setattr(logits_loss_common, "token_chunk", lambda *args: 128)
    _check_logits_loss(fused, *LOSS_CASES[0])


def test_logits_loss_reference_is_the_model_math():
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 64), jnp.float32)
    embed = jax.random.normal(jax.random.PRNGKey(1), (50, 64), jnp.float32)
    targets = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 50)
    assert logits_loss(h, embed, targets, implementation="reference") == \
        model.tied_logits_loss(h, embed, targets)
    if ON_CPU:   # on a CPU the default is the math (interpreted kernels would be slower)
        assert logits_loss_api.default_implementation(h) == "reference"


