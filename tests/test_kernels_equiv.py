"""The bf16 equivalence suite: every kernel implementation available on this backend, forward and
gradients, against the math in microgpt/model.py (criterion in tests/equiv.py).

On CPU the kernels run in interpret mode at small sizes; on a GPU the same tests run compiled at
larger sizes (the `LARGE` cases).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.equiv import (ON_CPU, assert_within_twice_reference, bf16_resolution, f32_precision,
                         max_err, upcast)

# ------------------------------------------------------------------ attention
import functools
import re
import threading
import zlib
from typing import NamedTuple

from kernels import compat
from kernels.attention import api, attention, mosaic_gpu
from kernels.attention.common import KERNEL_HEAD_DIMS, LOG2E, Plan, kernel_head_dim
from microgpt import model

# The implementations this backend runs: both Pallas backends interpreted on CPU, compiled natively;
# on a Hopper GPU also the Mosaic GPU forward (no interpret mode of its own: on CPU its lowering is
# tested, and it runs in jax's Mosaic GPU interpreter with wgmma emulated, below).
ATTENTION_IMPLS = {"cpu": ["triton", "tpu"], "gpu": ["triton"], "tpu": ["tpu"]}[jax.default_backend()]
ATTENTION_IMPLS += ["mosaic_gpu"] if mosaic_gpu.on_sm90() else []
# Small tiles on CPU so a few-dozen-row sequence still spans several tiles, with block_q != block_k
# (diagonal tiles split unevenly) and the backward's tiles different from the forward's.
SMALL_BLOCKS = dict(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                    block_k_dq=16)
MOSAIC_BACKWARD = {"mosaic_backward": 1}
LARGE = pytest.mark.skipif(ON_CPU, reason="large shapes need an accelerator (interpret mode is slow)")

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
                     seed_blocks=None):
    """o, dq, dk, dv of the kernel (bf16) vs the math in f32, within twice the bf16 math's error,
    on fresh random inputs drawn from a seed of the case and the block configuration (or
    seed_blocks, another configuration's, to face its inputs)."""
    seed_blocks = blocks if seed_blocks is None else seed_blocks
    seed = zlib.crc32(f"{impl}{batch}{seq}{heads}{head_dim}{causal}{q_scale}{seed_blocks}".encode())
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, do = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16)
                   for key in keys)
    q = (q * q_scale).astype(jnp.bfloat16)
    kernel = lambda q, k, v: attention(q, k, v, causal=causal, implementation=impl,
                                       block_sizes=blocks)
    reference = lambda q, k, v: model.attention(q, k, v, causal=causal)

    got = _value_and_grads(kernel, (q, k, v), do)
    ref_bf16 = _value_and_grads(reference, (q, k, v), do)
    with f32_precision():
        ref_f32 = _value_and_grads(reference, upcast((q, k, v)), upcast(do))
    for name, *outs in zip(("o", "dq", "dk", "dv"), got, ref_bf16, ref_f32):
        assert outs[0].dtype == jnp.bfloat16 and outs[0].shape == q.shape, name
        assert_within_twice_reference(f"{impl} {name}", *outs, atol=bf16_resolution(outs[2]))


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("batch, seq, heads, head_dim, causal, q_scale, small", ATTENTION_CASES)
def test_attention_matches_reference(impl, batch, seq, heads, head_dim, causal, q_scale, small):
    # mosaic_gpu: its own backward, whatever the tuning table picked (Triton's is tested above;
    # the table picks the two-kernel one, the one-pass one is tested below), where it runs.
    blocks = MOSAIC_BACKWARD if impl == "mosaic_gpu" and _mosaic_backward_runs(head_dim) else None
    _check_attention(impl, batch, seq, heads, head_dim, causal, q_scale,
                     SMALL_BLOCKS if small and ON_CPU else blocks)


def _mosaic_backward_runs(head_dim: int) -> bool:
    return kernel_head_dim(head_dim) in mosaic_gpu.MOSAIC_BACKWARD_HEAD_DIMS


def _skip_unless_mosaic_backward_runs(head_dim: int) -> None:
    if not _mosaic_backward_runs(head_dim):
        pytest.skip(f"the Mosaic GPU backward runs head_dim {mosaic_gpu.MOSAIC_BACKWARD_HEAD_DIMS}"
                    f" (at {head_dim} the table's backward is Triton's, tested above)")


@pytest.mark.skipif(not mosaic_gpu.on_sm90(), reason="mosaic_gpu runs on a Hopper GPU; on CPU "
                    "test_attention_mosaic_gpu_backward_in_the_gpu_interpreter runs it")
@pytest.mark.parametrize("batch, seq, heads, head_dim, causal, q_scale, small", ATTENTION_CASES)
def test_attention_mosaic_gpu_fused_dq_matches_reference(batch, seq, heads, head_dim, causal,
                                                         q_scale, small):
    """The one-pass backward: dq summed by the dK/dV kernel's TMA reduce-adds (2 stages: its
    dq and ds buffers leave no shared memory for a third at head_dim 128), on the inputs of
    the case above, which the two-kernel backward passes."""
    _skip_unless_mosaic_backward_runs(head_dim)
    _check_attention("mosaic_gpu", batch, seq, heads, head_dim, causal, q_scale,
                     {**MOSAIC_BACKWARD, "bwd_fused_dq": 1, "bwd_num_stages": 2},
                     seed_blocks=MOSAIC_BACKWARD)


@pytest.mark.skipif(not mosaic_gpu.on_sm90(), reason="mosaic_gpu runs on a Hopper GPU; on CPU "
                    "test_attention_mosaic_gpu_in_the_gpu_interpreter runs it")
@pytest.mark.parametrize("batch, seq, heads, head_dim, causal, q_scale, small", ATTENTION_CASES)
def test_attention_mosaic_gpu_persistent_matches_reference(batch, seq, heads, head_dim, causal,
                                                           q_scale, small):
    """The persistent forward and backward (a CTA per multiprocessor, through the work units in
    turn), on the inputs of the case above."""
    _skip_unless_mosaic_backward_runs(head_dim)
    _check_attention("mosaic_gpu", batch, seq, heads, head_dim, causal, q_scale,
                     {**MOSAIC_BACKWARD, "persistent": 1, "bwd_persistent": 1},
                     seed_blocks=MOSAIC_BACKWARD)


@settings(max_examples=6 if ON_CPU else 12, deadline=None, derandomize=True)
@given(batch=st.integers(1, 2), seq=st.integers(1, 80 if ON_CPU else 2500),
       heads=st.integers(1, 3), head_dim=st.sampled_from((32, 64, 96, 128, 256)),
       causal=st.booleans())
def test_attention_matches_reference_at_any_shape(batch, seq, heads, head_dim, causal):
    """Shapes hypothesis picks (any length, including 1 and lengths just past a tile) on the
    backend's native implementation (CPU: Triton-style kernels interpreted, with small tiles)."""
    _check_attention(ATTENTION_IMPLS[0], batch, seq, heads, head_dim, causal,
                     blocks=SMALL_BLOCKS if ON_CPU else None)


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


@pytest.mark.parametrize("args, kwargs, message", [
    (((2, 16, 64),) * 3, {}, "rank 4"),
    (((1, 16, 2, 64), (1, 32, 2, 64), (1, 32, 2, 64)), {}, "one shape"),
    (((1, 16, 2, 64),) * 3, {"dtypes": ("bfloat16", "float32", "bfloat16")}, "one dtype"),
    (((1, 16, 2, 64),) * 3, {"dtypes": ("float16",) * 3}, "supports dtypes"),
    (((1, 16, 2, 320),) * 3, {}, "head_dim up to 256"),
    (((1, 16, 2, 64),) * 3, {"implementation": "cuda"}, "known: .*reference.*triton.*tpu"),
    (((1, 16, 2, 64),) * 3, {"block_sizes": {"block_q": 48}}, "block_q=48 must be a power of two"),
    (((1, 16, 2, 64),) * 3, {"block_sizes": {"blok_q": 64}}, "no tuning parameter 'blok_q'"),
])
def test_attention_rejects_bad_inputs(args, kwargs, message):
    kwargs = dict(kwargs)
    dtypes = kwargs.pop("dtypes", ("bfloat16",) * 3)
    q, k, v = (jnp.zeros(shape, dtype) for shape, dtype in zip(args, dtypes))
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, **{"implementation": "triton", **kwargs})


@pytest.mark.parametrize("impl", [None, "tpu"])
def test_attention_names_the_largest_head_dim(impl):
    q = jnp.zeros((1, 16, 2, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"head_dim up to {KERNEL_HEAD_DIMS[-1]}; got 512 "
                                         r"\(implementation='reference' computes any\)"):
        attention(q, q, q, implementation=impl)


def _export_text(f, platform, *args) -> str:
    exported = jax.export.export(
        jax.jit(f), platforms=[platform],
        # Pallas Triton's custom call has no export compatibility guarantee; we only lower here.
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    return exported(*args).mlir_module()


def _skip_unless_pallas_lowers_for(impl: str, platform: str) -> None:
    """Skip (with the reason) when this jax cannot lower any Pallas kernel for the platform."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plmgpu
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as plgpu

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    if impl == "mosaic_gpu":  # its own entry point (pallas_call for Mosaic GPU is deprecated)
        probe = lambda x: plmgpu.kernel(copy, out_type=x)(x)
    else:
        params = {"triton": plgpu, "tpu": pltpu}[impl].CompilerParams()
        probe = lambda x: pl.pallas_call(copy, out_shape=x, compiler_params=params)(x)
    try:
        _export_text(probe, platform, jax.ShapeDtypeStruct((16, 128), jnp.float32))
    except Exception as e:  # noqa: BLE001 - any failure here means the platform is unavailable
        pytest.skip(f"this jax cannot lower Pallas {impl} kernels for {platform}: {e}")


@pytest.mark.parametrize("impl, platform, custom_call", [
    ("triton", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("shape", [(16, 1024, 32, 64), (2, 8192, 16, 128), (8, 1024, 16, 96),
                                   (4, 2048, 8, 256)], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_lowers_for_the_device(impl, platform, custom_call, shape, causal):
    """The kernels compile to the platform's Pallas custom call at the benchmark shapes: one for
    the forward, three (forward, dK/dV, dQ) for the gradient. Interpret mode checks none of the
    Triton/Mosaic constraints; this lowering is the proof the device path builds."""
    _skip_unless_pallas_lowers_for(impl, platform)
    spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f = lambda q, k, v: attention(q, k, v, causal=causal, implementation=impl, interpret=False)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    assert _export_text(f, platform, spec, spec, spec).count(f"custom_call @{custom_call}") == 1
    assert _export_text(grad, platform, spec, spec, spec).count(f"custom_call @{custom_call}") == 3


@pytest.mark.parametrize("shape", [(16, 1024, 32, 64), (2, 8192, 16, 128)], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backward, backward_calls", [
    ({"mosaic_backward": 1, "bwd_fused_dq": 0}, ["mosaic_gpu"] * 2),
    ({"mosaic_backward": 1, "bwd_fused_dq": 1}, ["mosaic_gpu"]),
    ({"mosaic_backward": 0}, ["__gpu$xla.gpu.triton"] * 2)],
    ids=["mosaic_bwd", "mosaic_bwd_fused_dq", "triton_bwd"])
@pytest.mark.parametrize("persistent", [0, 1], ids=["grid", "persistent"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_lowers_for_the_device(shape, causal, backward, backward_calls,
                                                    persistent):
    """The Mosaic GPU forward lowers for CUDA at the benchmark shapes: one Mosaic GPU custom call
    (jax 0.10 names it mosaic_gpu_v2) whose lowering checks the wgmma and TMA layouts, tile shapes
    and barriers in Python (a CTA per work unit, or persistent CTAs); its gradient adds the Mosaic
    GPU dK/dV and dQ kernels (or the dK/dV kernel alone with bwd_fused_dq), or Triton's with
    mosaic_backward=0, on the saved residuals. (The kernels' PTX is only built on the GPU, at the
    first run.)"""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f = lambda q, k, v: attention(q, k, v, causal=causal, implementation="mosaic_gpu",
                                  block_sizes={**backward, "persistent": persistent},
                                  interpret=False)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    calls = lambda g: sorted(re.sub(r"^mosaic_gpu\w*", "mosaic_gpu", c) for c in re.findall(
        r"custom_call @(\S+)\(", _export_text(g, "cuda", spec, spec, spec)))
    assert calls(f) == ["mosaic_gpu"]
    assert calls(grad) == sorted(backward_calls + ["mosaic_gpu"])


@pytest.mark.parametrize("head_dim", [32, 96, 256])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_lowers_at_every_head_dim(head_dim):
    """The Mosaic GPU forward lowers for CUDA at the head dims it pads (32 -> 64, 96 -> 128) and
    at 256 (64-row query tiles); their gradients take the Triton backward by default (at 256
    the only one: the Mosaic GPU backward's dk and dv would not fit in registers)."""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    spec = jax.ShapeDtypeStruct((4, 2048, 8, head_dim), jnp.bfloat16)
    f = lambda q, k, v: attention(q, k, v, implementation="mosaic_gpu", interpret=False)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    calls = lambda g: sorted(re.sub(r"^mosaic_gpu\w*", "mosaic_gpu", c) for c in re.findall(
        r"custom_call @(\S+)\(", _export_text(g, "cuda", spec, spec, spec)))
    assert calls(f) == ["mosaic_gpu"]
    assert calls(grad) == sorted(["__gpu$xla.gpu.triton"] * 2 + ["mosaic_gpu"])


@pytest.mark.skipif(not ON_CPU, reason="the check runs before the kernel, on any backend")
def test_attention_mosaic_gpu_names_what_does_not_fit_at_head_dim_256():
    """At head_dim 256 the persistent forward's shared memory and the Mosaic GPU backward's
    registers do not suffice: each says so in one line, naming the knob."""
    spec = jax.ShapeDtypeStruct((1, 1024, 2, 256), jnp.bfloat16)
    export = lambda f: _export_text(f, "cuda", spec, spec, spec)
    forward = lambda blocks: lambda q, k, v: attention(q, k, v, implementation="mosaic_gpu",
                                                       block_sizes=blocks, interpret=False)
    with pytest.raises(ValueError, match=r"persistent=1 need \d+ KiB of shared memory at "
                                         r"head_dim 256; a CTA has 227"):
        export(forward({"persistent": 1}))
    grad = jax.grad(lambda q, k, v: jnp.sum(forward({"mosaic_backward": 1})(q, k, v)))
    with pytest.raises(ValueError, match="mosaic_backward=1 runs head_dim .*use mosaic_backward=0"):
        export(grad)


def _in_the_gpu_interpreter(monkeypatch):
    """Mosaic GPU kernels (warp_specialized.launch) run by jax's Mosaic GPU interpreter on CPU,
    with what jax 0.10's interpreter lacks emulated for the kernel's trace: wgmma
    (acc += a b in f32; a from registers or shared memory, b maybe a transposed ref, which the
    interpreter cannot read: ref.transpose only marks it for the emulated wgmma), its
    accumulators (zeros, or pl.run_state's initial value; run_state's other values become refs
    too), layout casts and loads in a layout (it has no layouts)."""
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu import core as mgpu_core
    from jax._src.state import types as state_types
    from jax.experimental import pallas as pl
    plgpu = mosaic_gpu.plgpu

    class Acc:  # an accumulator's value, threaded through the trace instead of registers
        def __init__(self, value):
            self.value = value

        def __getitem__(self, index):
            return self.value

        def __setitem__(self, index, value):
            self.value = value

    class AccType(NamedTuple):
        shape: tuple
        dtype: object
        value: object = None

        @staticmethod
        def init(value):
            return AccType(value.shape, value.dtype, value)

    def operand(x):   # registers, a shared-memory ref, or a transposed one ("T", ref)
        if isinstance(x, tuple):
            return x[1][...].T
        return x if isinstance(x, jax.Array) else x[...]

    def wgmma(acc, a, b):
        acc.value = acc.value + jnp.dot(operand(a), operand(b), preferred_element_type=jnp.float32)

    def copy_smem_to_gmem(*, reduction_op, **kwargs):
        """The TMA's reduce-add (cp.reduce.async.bulk), which jax 0.10's interpreter refuses: its
        plain copy with the store into the destination made dst += src, one copy at a time."""
        if reduction_op is None:
            return real_copy(reduction_op=None, **kwargs)
        memory = type(gpu_callbacks._get_shared_memory())
        dst = gpu_callbacks.HostAllocationKey.from_array(kwargs["dst_allocation_key_as_array"])
        with reduction_lock, monkeypatch.context() as patch:  # one add at a time, as in L2
            store = memory.store_buffer_content

            def add(self, key, rnge, value, thread, *args, **kw):
                if key == dst:
                    value = value + self.get_buffer_content(key, rnge, thread)[0]
                return store(self, key, rnge, value, thread, *args, **kw)
            patch.setattr(memory, "store_buffer_content", add)
            return real_copy(reduction_op=None, **kwargs)

    def run_scoped(f, *types, **kwargs):
        if types and all(isinstance(t, AccType) for t in types):
            return f(*(Acc(jnp.zeros(t.shape, t.dtype)) for t in types))
        return real_run_scoped(f, *types, **kwargs)

    def run_state(f):   # accumulators and arrays: each becomes a ref that f updates
        def run(acc_types):
            accs = jax.tree_util.tree_map(
                lambda t: Acc(t.value if isinstance(t, AccType) else t), acc_types,
                is_leaf=lambda t: isinstance(t, AccType))
            f(accs)
            return jax.tree_util.tree_map(lambda acc: acc.value, accs,
                                          is_leaf=lambda a: isinstance(a, Acc))
        return run

    real_run_scoped, real_copy = pl.run_scoped, gpu_callbacks.copy_smem_to_gmem
    reduction_lock = threading.Lock()
    for module, name, value in [
            (gpu_callbacks, "copy_smem_to_gmem", copy_smem_to_gmem),
            (plgpu, "wgmma", wgmma), (plgpu, "ACC", AccType), (pl, "run_scoped", run_scoped),
            (pl, "run_state", run_state),
            (plgpu, "wgmma_accumulator_load", lambda acc, wait_n=0: acc.value),
            (state_types.TransformedRef, "transpose", lambda ref, _: ("T", ref)),
            (plgpu, "layout_cast", lambda x, _: x), (mgpu_core, "layout_cast", lambda x, _: x),
            (compat, "mosaic_gpu_load", lambda ref, _: ref[...]),
            (pl, "kernel", functools.partial(pl.kernel, interpret=params.InterpretGPUParams()))]:
        monkeypatch.setattr(module, name, value)


@pytest.mark.parametrize("seq, head_dim, causal, schedule_barrier, group_mib, persistent",
                         [(256, 64, True, 1, 0, 0), (200, 128, False, 0, 12, 0),
                          (256, 64, True, 1, 0, 1), (200, 128, False, 0, 12, 1),
                          (128, 256, True, 1, 12, 0)])
@pytest.mark.skipif(not ON_CPU, reason="on the GPU the kernel itself runs")
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_attention_mosaic_gpu_in_the_gpu_interpreter(seq, head_dim, causal, schedule_barrier,
                                                     group_mib, persistent, monkeypatch):
    """The Mosaic GPU forward run by jax's Mosaic GPU interpreter on CPU, which simulates its
    warpgroups, TMA copies and barriers (a wrong protocol deadlocks or leaves a barrier phase
    unobserved, which it reports), with wgmma emulated: o, lse and o's low half vs the math.
    Tiles of 64 and 2 stages, so the ring wraps and (causal) the lower query tile of a pair
    releases the tiles only its neighbour needs (in step with it through the ping-pong barrier);
    200 rows leave a ragged, masked last key tile; 128 rows at head_dim 256 one pair whose q and
    K/V tiles span four swizzled column tiles. Two heads: a group per (batch, head) (group_mib 0)
    or one group of both (launch_grid), a CTA per pair of query tiles; or, with two batches of two
    heads, 3 persistent CTAs through the 4 folds (each both pairs of a (batch, head)), the first
    CTA two folds, so its rings and q buffers carry over from fold to fold."""
    _in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu, "num_sms", lambda: 3)
    config = {**mosaic_gpu.DEFAULTS[head_dim], "block_q": 64, "block_k": 64, "num_stages": 2,
              "schedule_barrier": schedule_barrier, "group_mib": group_mib,
              "persistent": persistent}
    sm_scale = head_dim ** -0.5
    plan = Plan("mosaic_gpu", causal, sm_scale, seq, tuple(sorted(config.items())), False)
    q, k, v = (jax.random.normal(key, (1 + persistent, seq, 2, head_dim), jnp.bfloat16)
               for key in jax.random.split(jax.random.PRNGKey(seq), 3))
    o, (*_, lse, o_lo) = mosaic_gpu.forward(q, k, v, plan, residuals=True)

    ref_bf16 = model.attention(q, k, v, causal=causal)
    with f32_precision():
        ref_f32 = model.attention(*upcast((q, k, v)), causal=causal)
        s = jnp.einsum("bqhd,bkhd->bhqk", *upcast((q, k))) * sm_scale
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), s, -jnp.inf)
    assert_within_twice_reference("mosaic_gpu o", o, ref_bf16, ref_f32)
    assert jnp.all(jnp.abs(upcast(o_lo)) <= jnp.abs(upcast(o)) * 2.0 ** -8)  # half a bf16 ulp
    assert max_err(upcast(o) + upcast(o_lo), ref_f32) <= max_err(o, ref_f32)
    assert max_err(lse, jax.nn.logsumexp(s, axis=-1) * LOG2E) < 1e-4


def test_attention_mosaic_gpu_groups_the_heads_whose_tiles_fit_in_l2():
    """launch_grid: (groups, pairs, members), members the most (batch, head)s dividing batch x
    heads whose streamed tiles fit in group_mib MiB, at least one."""
    mib = 2 ** 20
    assert mosaic_gpu.launch_grid(2, 32, 64, 2 * mib, 12) == (16, 64, 4)  # 6 fit, 4 divide 64
    assert mosaic_gpu.launch_grid(2, 3, 5, mib // 4, 12) == (1, 5, 6)     # all fit: one group
    assert mosaic_gpu.launch_grid(2, 3, 5, 64 * mib, 12) == (6, 5, 1)     # none fits: one each


@pytest.mark.parametrize("seq, head_dim, causal, fused_dq, persistent, dq_tiles", [
    (256, 64, True, 0, 0, (64, 128, 2)), (200, 128, False, 0, 0, (128, 64, 3)),
    (256, 64, True, 1, 0, None), (200, 128, False, 1, 0, None),
    (256, 64, True, 0, 1, (64, 64, 2)), (200, 128, False, 0, 1, (64, 64, 2))])
@pytest.mark.skipif(not ON_CPU, reason="on the GPU the kernels themselves run")
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_attention_mosaic_gpu_backward_in_the_gpu_interpreter(seq, head_dim, causal, fused_dq,
                                                              persistent, dq_tiles, monkeypatch):
    """The Mosaic GPU backward in jax's Mosaic GPU interpreter (wgmma emulated), on the
    reference's residuals: dq, dk, dv vs the math; its dK/dV and dQ kernels, or (fused_dq) the
    dK/dV kernel alone adding dq by TMA reduce-add. Tiles of 64 and 2 stages over 256 rows: the
    rings wrap, and (causal) the upper key tile of a dK/dV pair skips the query tiles only its
    neighbour needs, the lower query tile of a dQ pair the key tiles; 200 rows leave a ragged,
    masked last tile (and padded rows whose do is zero). The dQ kernel's own tiles (query rows,
    key rows, stages) differ from dK/dV's 64 x 64 in the first two cases: the sequence is padded
    for the larger. One (batch, head); persistent: two batches of two heads, 3 CTAs through the
    4 folds of each kernel (both pairs of a (batch, head)), the first CTA two folds, so its rings
    and second buffers carry over from fold to fold."""
    from kernels.attention import common, mosaic_gpu_vjp
    _in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu, "num_sms", lambda: 3)
    config = {**mosaic_gpu.DEFAULTS[head_dim], "mosaic_backward": 1, "bwd_block_q": 64,
              "bwd_block_k": 64, "bwd_num_stages": 2, "bwd_fused_dq": fused_dq,
              "bwd_persistent": persistent,
              **dict(zip(("bwd_dq_block_q", "bwd_dq_block_k", "bwd_dq_num_stages"),
                         dq_tiles or ()))}
    sm_scale = head_dim ** -0.5
    plan = Plan("mosaic_gpu", causal, sm_scale, seq, tuple(sorted(config.items())), False)
    q, k, v, do = (jax.random.normal(key, (1 + persistent, seq, 1 + persistent, head_dim),
                                     jnp.bfloat16)
                   for key in jax.random.split(jax.random.PRNGKey(seq), 4))
    with f32_precision():
        o32 = model.attention(*upcast((q, k, v)), causal=causal)
        s = jnp.einsum("bqhd,bkhd->bhqk", *upcast((q, k))) * sm_scale
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1) * LOG2E                          # [B, H, S], base 2
    o = o32.astype(jnp.bfloat16)
    grads = mosaic_gpu_vjp.backward(plan, (q, k, v, o, lse, common.low_half(o32, o.dtype)), do)

    math = lambda q, k, v: model.attention(q, k, v, causal=causal)
    ref_bf16 = jax.vjp(math, q, k, v)[1](do)
    with f32_precision():
        ref_f32 = jax.vjp(math, *upcast((q, k, v)))[1](upcast(do))
    for name, got, want_bf16, want_f32 in zip(("dq", "dk", "dv"), grads, ref_bf16, ref_f32):
        assert got.shape == q.shape and got.dtype == q.dtype
        assert_within_twice_reference(f"mosaic_gpu {name}", got, want_bf16, want_f32)


@pytest.mark.skipif(mosaic_gpu.on_sm90(), reason="on a Hopper GPU mosaic_gpu runs")
def test_attention_mosaic_gpu_refuses_off_hopper():
    """No interpret mode: anywhere but an sm90 GPU it says so (and where to go instead)."""
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="runs only on an sm90 GPU; use "
                                                  "implementation='triton' to interpret on CPU"):
        attention(q, q, q, implementation="mosaic_gpu")


# (backend, Hopper, the tuning table's preference, dtype) -> the default implementation.
DEFAULT_CASES = [
    ("cpu", False, None, jnp.bfloat16, "triton"),
    ("tpu", False, "mosaic_gpu", jnp.bfloat16, "tpu"),
    ("gpu", False, "mosaic_gpu", jnp.bfloat16, "triton"),       # not a Hopper GPU
    ("gpu", True, None, jnp.bfloat16, "triton"),                # not measured here
    ("gpu", True, "triton", jnp.bfloat16, "triton"),            # measured slower
    ("gpu", True, "mosaic_gpu", jnp.float32, "triton"),         # wgmma would round f32 to tf32
    ("gpu", True, "mosaic_gpu", jnp.bfloat16, "mosaic_gpu"),
]


@pytest.mark.parametrize("backend, sm90, preferred, dtype, expected", DEFAULT_CASES)
def test_attention_default_follows_the_tuning_table(backend, sm90, preferred, dtype, expected,
                                                    monkeypatch):
    """implementation=None picks mosaic_gpu only on Hopper, for bf16, where bench/tune.py measured
    it faster at that head_dim and length."""
    monkeypatch.setattr(api.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(mosaic_gpu, "on_sm90", lambda: sm90)
    asked = []
    monkeypatch.setattr(api.tuning, "preferred_implementation",
                        lambda op, key: asked.append((op, key)) or preferred)
    q = jnp.zeros((1, 16, 2, 128), dtype)
    assert api.default_implementation(q) == expected
    assert asked in ([], [("attention", "d128_s16")])   # head_dim 128, length 16


# ------------------------------------------------------------------ layernorm_ffn
from kernels.layernorm_ffn import layernorm_ffn
from kernels.layernorm_ffn import api as layernorm_ffn_api
from kernels.layernorm_ffn import common as lnffn_common
from kernels.layernorm_ffn import mosaic_gpu as lnffn_mosaic_gpu

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
# The widths the README documents: any multiple of 128 up to 2048.
LNFFN_WIDTHS = tuple(range(128, 2049, 128))


def _lnffn_params(key, d, dtype=jnp.float32):
    """The six parameters at the scales of a trained block (GPT-2 init plus some spread)."""
    k = jax.random.split(key, 6)
    normal = lambda i, shape, scale: scale * jax.random.normal(k[i], shape, jnp.float32)
    return tuple(p.astype(dtype) for p in (
        1.0 + normal(0, (d,), 0.1), normal(1, (d,), 0.1), normal(2, (d, 4 * d), 0.02),
        normal(3, (4 * d,), 0.02), normal(4, (4 * d, d), 0.02), normal(5, (d,), 0.02)))


@pytest.mark.parametrize("impl", LNFFN_IMPLS)
@pytest.mark.parametrize("shape, mean, std, residual, small", LNFFN_CASES)
def test_layernorm_ffn_matches_reference(impl, shape, mean, std, residual, small):
    """out and the gradients of x and all six parameters, kernel (bf16 x, f32 parameters) vs the
    math in f32, each within twice the bf16 math's error plus a slack of 0.1% of the largest
    magnitude of that output (f32 sums over thousands of tokens differ in order, not in kind)."""
    seed = zlib.crc32(f"{impl}{shape}{mean}{std}{residual}{small}".encode())
    kx, kp, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = (mean + std * jax.random.normal(kx, shape, jnp.float32)).astype(jnp.bfloat16)
    params = _lnffn_params(kp, shape[-1])
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
    params = _lnffn_params(jax.random.PRNGKey(2), 128)
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
    params = _lnffn_params(jax.random.PRNGKey(4), 128)
    got = layernorm_ffn(x, *params, residual=True, implementation="reference")
    assert jnp.array_equal(got, model.layernorm_ffn(x, *params, residual=True))


@pytest.mark.parametrize("change, message", [
    ({"d": 96}, "multiple of 128"),
    ({"x_dtype": jnp.int32}, "x must be a floating array"),
    ({"w_fc": (128, 256)}, r"w_fc has shape \(128, 256\); expected \(d, 4d\) = \(128, 512\)"),
    ({"w_proj": (512, 256)}, r"w_proj has shape \(512, 256\); expected \(4d, d\)"),
    ({"b_fc": (128,)}, r"b_fc has shape \(128,\); expected \(4d,\) = \(512,\)"),
    ({"ln_bias": (1, 128)}, r"ln_bias has shape \(1, 128\); expected \(d,\)"),
    ({"b_proj_dtype": jnp.bfloat16}, "b_proj has dtype bfloat16 but ln_scale has float32"),
    ({"ln_scale_dtype": jnp.int32}, "ln_scale has dtype int32; parameters must be floating"),
    ({"implementation": "cuda"}, "unknown implementation 'cuda'"),
    ({"block_sizes": {"up_block_n": 96}}, "up_block_n=96 must .*be a power of two"),
    ({"block_sizes": {"up_block_n": 1024}}, "up_block_n=1024 must divide 512"),
    ({"block_sizes": {"upblock_n": 64}}, "no tuning parameter 'upblock_n'"),
])
def test_layernorm_ffn_rejects_bad_inputs(change, message):
    d = change.get("d", 128)
    x = jnp.zeros((4, d), change.get("x_dtype", jnp.bfloat16))
    names = ("ln_scale", "ln_bias", "w_fc", "b_fc", "w_proj", "b_proj")
    shapes = ((d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,))
    params = [jnp.zeros(change.get(n, s), change.get(f"{n}_dtype", jnp.float32))
              for n, s in zip(names, shapes)]
    with pytest.raises(ValueError, match=message):
        layernorm_ffn(x, *params, implementation=change.get("implementation", "triton"),
                      block_sizes=change.get("block_sizes"))


@pytest.mark.parametrize("backend, sm90, preferred, dtype, expected", DEFAULT_CASES)
def test_layernorm_ffn_default_follows_the_tuning_table(backend, sm90, preferred, dtype, expected,
                                                        monkeypatch):
    """implementation=None picks mosaic_gpu only on Hopper, for bf16 x, where bench/tune.py
    measured it faster at that width."""
    monkeypatch.setattr(layernorm_ffn_api.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(layernorm_ffn_api.warp_specialized, "on_sm90", lambda: sm90)
    asked = []
    monkeypatch.setattr(layernorm_ffn_api.tuning, "preferred_implementation",
                        lambda op, key: asked.append((op, key)) or preferred)
    x = jnp.zeros((16, 512), dtype)
    assert layernorm_ffn_api.default_implementation(x) == expected
    assert asked in ([], [("layernorm_ffn", "d512")])


# (epilogue, B transposed, epilogue inputs) of the four GEMMs of the Mosaic GPU LayerNorm+FFN.
MOSAIC_GEMMS = [
    pytest.param(functools.partial(lnffn_common.up_epilogue, tanh=jnp.tanh, with_grad=True), False,
                 ("vector",), id="up-bias-gelu-and-grad"),
    pytest.param(lnffn_common.down_epilogue, False, ("vector", "tile"), id="down-bias-residual"),
    pytest.param(lnffn_common.dz_epilogue, True, ("tile",), id="dz-transposed-gelu-grad"),
    pytest.param(lnffn_common.store_epilogue, True, (), id="dxn-transposed"),
]


@pytest.mark.parametrize("epilogue, b_transposed, inputs", MOSAIC_GEMMS)
@pytest.mark.skipif(not ON_CPU, reason="on the GPU the kernels themselves run")
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_layernorm_ffn_mosaic_gpu_gemm_in_the_gpu_interpreter(epilogue, b_transposed, inputs,
                                                              monkeypatch):
    """The Mosaic GPU GEMM of the LayerNorm+FFN in jax's Mosaic GPU interpreter (wgmma emulated),
    each epilogue vs the same epilogue on the f32 product. 300 rows (ragged: padded to 3 blocks of
    2 x 64), 2 column tiles of 128, so 6 output tiles over 4 persistent CTAs (two take a second
    tile), and K = 192 in 3 steps through a 2-slot ring (it wraps)."""
    _in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu_gemm, "num_sms", lambda: 4)
    m, k, n = 300, 192, 256
    keys = jax.random.split(jax.random.PRNGKey(n), 4)
    a = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    b = (jax.random.normal(keys[1], (n, k) if b_transposed else (k, n), jnp.bfloat16) / 8)
    operands = {"vector": jax.random.normal(keys[2], (n,), jnp.float32),
                "tile": jax.random.normal(keys[3], (m, n), jnp.bfloat16)}
    extra = [operands[name] for name in inputs]
    num_outputs = len(epilogue(jnp.zeros((1, n)), *(x[:1] for x in extra)))
    config = dict(gemm_block_m=64, gemm_block_n=128, gemm_num_stages=2)
    got = lnffn_mosaic_gpu.matmul(a, b, epilogue, extra,
                                  [jax.ShapeDtypeStruct((m, n), jnp.bfloat16)] * num_outputs,
                                  b_transposed=b_transposed, config=config, gemm="gemm")
    product = jnp.dot(a, b.T if b_transposed else b, preferred_element_type=jnp.float32)
    want = epilogue(product, *(x[None, :] if x.ndim == 1 else x for x in extra))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == (m, n) and g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", ["triton", "tpu", "mosaic_gpu"])
def test_layernorm_ffn_configures_every_documented_width(impl):
    """Every backend's default (and tuned) tiles are valid at every d the README documents."""
    for d in LNFFN_WIDTHS:
        for tokens in (16, 65536):
            layernorm_ffn_api.kernel_config(impl, d, tokens)


@pytest.mark.parametrize("impl, platform, custom_call, calls", [
    ("triton", "cuda", "__gpu$xla.gpu.triton", (3, 7)), ("tpu", "tpu", "tpu_custom_call", (1, 4)),
    ("mosaic_gpu", "cuda", "mosaic_gpu", (2, 6))])
@pytest.mark.parametrize("tokens, d", [(131072, 512), (65536, 768), (8192, 384), (8192, 640),
                                       (8192, 1152), (8192, 2048)], ids=str)
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_layernorm_ffn_lowers_for_the_device(impl, platform, custom_call, calls, tokens, d):
    """Forward and forward+backward lower to the platform's Pallas custom calls at the benchmark
    shapes: Triton 3 kernels (LN, up, down) and 4 more for the gradient (dz, dxn, LN', weights);
    TPU 1 fused kernel and 3 more (dx, dW_proj, dW_fc); Mosaic GPU the 2 GEMMs and 4 more (dz,
    dxn, the two weight gradients; its LN passes are Triton's).  Interpret mode checks none of the
    Triton/Mosaic block constraints; this lowering is the proof the device path builds."""
    _skip_unless_pallas_lowers_for(impl, platform)
    config = layernorm_ffn_api.kernel_config(impl, d, tokens)
    f = lambda *a: layernorm_ffn_api.fused(*a, eps=model.LN_EPS, residual=True,
                                           implementation=impl, config=config, interpret=False)
    grad = jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)),
                              argnums=tuple(range(7)))
    specs = [jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16)] + [
        jax.ShapeDtypeStruct(p.shape, jnp.float32)
        for p in jax.eval_shape(lambda: _lnffn_params(jax.random.PRNGKey(0), d))]
    count = lambda g: len(re.findall(rf"custom_call @{re.escape(custom_call)}\w*\(",
                                     _export_text(g, platform, *specs)))
    assert (count(f), count(grad)) == calls


# ------------------------------------------------------------------ logits_loss
from kernels import mosaic_gpu_gemm  # noqa: E402
from kernels.logits_loss import api as logits_loss_api, logits_loss  # noqa: E402

LOSS_IMPLS = ["mosaic_gpu"] if mosaic_gpu.on_sm90() else []
# (h shape [..., d], vocabulary, logit scale): ragged tokens and a vocabulary that is no multiple
# of the tile (padded, masked columns); micro_gpt_4's head; logits as large as a trained model's.
LOSS_CASES = [((2, 150, 128), 1000, 1.0), ((8, 1024, 512), 9000, 1.0),
              ((4, 1000, 512), 9000, 8.0)]


def _check_logits_loss(loss_fn, shape, vocab, scale):
    """The loss and dh, dE of loss_fn(h, embed, targets) (bf16 h, f32 E) vs the math in f32, each
    within twice the bf16 math's error plus 0.1% of its largest magnitude (f32 sums over the
    vocabulary or the tokens differ in order)."""
    keys = jax.random.split(jax.random.PRNGKey(zlib.crc32(f"{shape}{vocab}{scale}".encode())), 3)
    h = jax.random.normal(keys[0], shape, jnp.bfloat16)
    embed = scale * 0.05 * jax.random.normal(keys[1], (vocab, shape[-1]), jnp.float32)
    targets = jax.random.randint(keys[2], shape[:-1], 0, vocab)
    run = lambda f, h, embed: _value_and_grads(lambda h, e: f(h, e, targets), (h, embed),
                                               jnp.float32(1.0))
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


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("shape, vocab, scale", LOSS_CASES, ids=str)
def test_logits_loss_matches_reference(impl, shape, vocab, scale):
    _check_logits_loss(functools.partial(logits_loss, implementation=impl), shape, vocab, scale)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_logits_loss_is_deterministic(impl):
    """The same inputs give bitwise the same loss and gradients, run after run (no atomics: each
    logits tile is one CTA's; a race on the epilogue's shared buffers would show here)."""
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    h = jax.random.normal(keys[0], (4096, 512), jnp.bfloat16)
    embed = 0.2 * jax.random.normal(keys[1], (9000, 512), jnp.float32)
    targets = jax.random.randint(keys[2], (4096,), 0, 9000)
    run = jax.jit(jax.value_and_grad(functools.partial(logits_loss, implementation=impl),
                                     argnums=(0, 1)))
    first = run(h, embed, targets)
    for _ in range(3):
        again = run(h, embed, targets)
        for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not ON_CPU, reason="on the GPU the kernel itself runs")
@pytest.mark.timeout(300, method="thread")  # a broken barrier protocol deadlocks: fail, don't hang
def test_logits_loss_mosaic_gpu_in_the_gpu_interpreter(monkeypatch):
    """The Mosaic GPU loss head in jax's Mosaic GPU interpreter (wgmma emulated): 300 tokens
    (padded to 3 row blocks of 2 x 64) by a vocabulary of 1000 (4 column tiles of 256, the last
    with 232 real columns), 12 output tiles over 4 persistent CTAs, the per-row statistics of each
    tile out beside its bf16 tile; loss and gradients vs the math."""
    _in_the_gpu_interpreter(monkeypatch)
    monkeypatch.setattr(mosaic_gpu_gemm, "num_sms", lambda: 4)
    config = {"block_m": 64, "block_n": 256, "num_stages": 2}
    fused = lambda h, e, t: logits_loss_api.fused(h, e, t, implementation="mosaic_gpu",
                                                  config=config)
    _check_logits_loss(fused, *LOSS_CASES[0])


@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernel compiles")
def test_logits_loss_lowers_for_the_device():
    """At micro_gpt_4's head (64 x 1024 tokens, V = 9000, d = 512) the loss and its gradient lower
    for CUDA with one Mosaic GPU kernel each (the backward is XLA's)."""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    config = logits_loss_api.kernel_config("mosaic_gpu", 512)
    f = lambda h, e, t: logits_loss_api.fused(h, e, t, implementation="mosaic_gpu", config=config)
    grad = jax.value_and_grad(f, argnums=(0, 1))
    specs = (jax.ShapeDtypeStruct((64, 1024, 512), jnp.bfloat16),
             jax.ShapeDtypeStruct((9000, 512), jnp.float32),
             jax.ShapeDtypeStruct((64, 1024), jnp.int32))
    count = lambda g: len(re.findall(r"custom_call @mosaic_gpu\w*\(", _export_text(g, "cuda", *specs)))
    assert (count(f), count(grad)) == (1, 1)


def test_logits_loss_reference_is_the_model_math():
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 64), jnp.float32)
    embed = jax.random.normal(jax.random.PRNGKey(1), (50, 64), jnp.float32)
    targets = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 50)
    assert logits_loss(h, embed, targets, implementation="reference") == \
        model.tied_logits_loss(h, embed, targets)
    if not LOSS_IMPLS:   # off Hopper the default is the math
        assert logits_loss_api.default_implementation(h) == "reference"


@pytest.mark.parametrize("change, error, message", [
    ({"d": 96}, ValueError, "multiple of 64"),
    ({"embed_shape": (50, 128)}, ValueError, r"embed must be a floating \[V, d\] array with d = "),
    ({"targets_shape": (2, 7)}, ValueError, r"targets must be integers of shape h.shape\[:-1\]"),
    ({"targets_dtype": jnp.float32}, ValueError, "targets must be integers"),
    ({"implementation": "triton"}, ValueError, "unknown implementation 'triton'"),
    ({"implementation": "mosaic_gpu", "block_sizes": {"block_n": 96}}, ValueError,
     "block_n=96 must be a positive multiple of 64"),
    ({"implementation": "mosaic_gpu", "block_sizes": {"blockn": 64}}, ValueError,
     "no tuning parameter 'blockn'"),
])
def test_logits_loss_rejects_bad_inputs(change, error, message):
    d = change.get("d", 64)
    h = jnp.zeros((2, 8, d), jnp.bfloat16)
    embed = jnp.zeros(change.get("embed_shape", (50, d)), jnp.float32)
    targets = jnp.zeros(change.get("targets_shape", (2, 8)), change.get("targets_dtype", jnp.int32))
    with pytest.raises(error, match=message):
        logits_loss(h, embed, targets, implementation=change.get("implementation", "reference"),
                    block_sizes=change.get("block_sizes"))


@pytest.mark.skipif(not ON_CPU, reason="on a GPU the kernel runs")
def test_logits_loss_mosaic_gpu_refuses_off_the_gpu():
    h = jnp.zeros((2, 8, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="runs only on a GPU .*implementation='reference'"):
        logits_loss(h, jnp.zeros((50, 64)), jnp.zeros((2, 8), jnp.int32),
                    implementation="mosaic_gpu")
