"""The bf16 equivalence suite: every kernel implementation available on this backend, forward and
gradients, against the math in microgpt/model.py (criterion in tests/equiv.py).

On CPU the kernels run in interpret mode at small sizes; on a GPU the same tests run compiled at
larger sizes (the `LARGE` cases).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.equiv import ON_CPU, assert_within_twice_reference, f32_precision, upcast

# ------------------------------------------------------------------ attention
import re
import zlib

from kernels.attention import attention
from kernels.attention.common import SUPPORTED_HEAD_DIMS
from microgpt import model

# The implementations this backend runs: both Pallas backends interpreted on CPU, compiled natively.
ATTENTION_IMPLS = {"cpu": ["triton", "tpu"], "gpu": ["triton"], "tpu": ["tpu"]}[jax.default_backend()]
# Small tiles on CPU so a few-dozen-row sequence still spans several tiles, with block_q != block_k
# (diagonal tiles split unevenly) and the backward's tiles different from the forward's.
SMALL_BLOCKS = dict(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                    block_k_dq=16)
LARGE = pytest.mark.skipif(ON_CPU, reason="large shapes need an accelerator (interpret mode is slow)")

# (batch, seq, heads, head_dim, causal, q_scale, small blocks); q_scale ~30 makes logits of tens to
# a hundred, which overflow a softmax that does not subtract its max.
ATTENTION_CASES = [
    pytest.param(1, 40, 2, 64, True, 1.0, True, id="ragged40-causal-d64"),
    pytest.param(2, 200, 2, 64, False, 1.0, False, id="ragged200-noncausal-d64-default-blocks"),
    pytest.param(1, 56, 3, 128, True, 1.0, True, id="ragged56-causal-d128"),
    pytest.param(1, 64, 2, 128, False, 1.0, True, id="noncausal-d128"),
    pytest.param(1, 48, 2, 64, True, 30.0, True, id="large-logits-causal"),
    pytest.param(2, 4096, 4, 64, True, 1.0, False, id="s4096-causal-d64", marks=LARGE),
    pytest.param(4, 1024, 8, 128, True, 1.0, False, id="s1024-causal-d128", marks=LARGE),
    pytest.param(2, 2048, 8, 64, False, 1.0, False, id="s2048-noncausal-d64", marks=LARGE),
    pytest.param(3, 1000, 4, 128, True, 1.0, False, id="ragged1000-causal-d128", marks=LARGE),
    pytest.param(2, 384, 4, 64, False, 1.0, False, id="s384-noncausal-d64", marks=LARGE),
    pytest.param(2, 1024, 4, 64, True, 30.0, False, id="large-logits-s1024", marks=LARGE),
]


def _value_and_grads(f, args, cotangent):
    """(f(*args), *grads) for the cotangent, as one jitted program (op-by-op is slow on GPUs)."""
    def run(args, cotangent):
        out, vjp = jax.vjp(f, *args)
        return (out, *vjp(cotangent))
    return jax.jit(run)(args, cotangent)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("batch, seq, heads, head_dim, causal, q_scale, small", ATTENTION_CASES)
def test_attention_matches_reference(impl, batch, seq, heads, head_dim, causal, q_scale, small):
    """o, dq, dk, dv of the kernel (bf16) vs the math in f32, within twice the bf16 math's error."""
    seed = zlib.crc32(f"{impl}{batch}{seq}{heads}{head_dim}{causal}{q_scale}".encode())
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, do = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16)
                   for key in keys)
    q = (q * q_scale).astype(jnp.bfloat16)
    blocks = SMALL_BLOCKS if small and ON_CPU else None
    kernel = lambda q, k, v: attention(q, k, v, causal=causal, implementation=impl,
                                       block_sizes=blocks)
    reference = lambda q, k, v: model.attention(q, k, v, causal=causal)

    got = _value_and_grads(kernel, (q, k, v), do)
    ref_bf16 = _value_and_grads(reference, (q, k, v), do)
    with f32_precision():
        ref_f32 = _value_and_grads(reference, upcast((q, k, v)), upcast(do))
    for name, *outs in zip(("o", "dq", "dk", "dv"), got, ref_bf16, ref_f32):
        assert outs[0].dtype == jnp.bfloat16 and outs[0].shape == q.shape, name
        assert_within_twice_reference(f"{impl} {name}", *outs)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_attention_f32_and_explicit_scale(impl):
    """f32 inputs give f32 outputs close to the math; sm_scale is honoured."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(7), (3, 1, 24, 2, 64), jnp.float32)
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
    (((1, 16, 2, 48),) * 3, {}, "head_dim in"),
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


def test_attention_names_supported_head_dims():
    q = jnp.zeros((1, 16, 2, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match=re.escape(str(SUPPORTED_HEAD_DIMS))):
        attention(q, q, q, implementation="tpu")


def _export_text(f, platform, *args) -> str:
    exported = jax.export.export(
        jax.jit(f), platforms=[platform],
        # Pallas Triton's custom call has no export compatibility guarantee; we only lower here.
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    return exported(*args).mlir_module()


def _skip_unless_pallas_lowers_for(impl: str, platform: str) -> None:
    """Skip (with the reason) when this jax cannot lower any Pallas kernel for the platform."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as plgpu

    params = plgpu.CompilerParams() if impl == "triton" else pltpu.CompilerParams()

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    probe = lambda x: pl.pallas_call(copy, out_shape=x, compiler_params=params)(x)
    try:
        _export_text(probe, platform, jax.ShapeDtypeStruct((16, 128), jnp.float32))
    except Exception as e:  # noqa: BLE001 - any failure here means the platform is unavailable
        pytest.skip(f"this jax cannot lower Pallas {impl} kernels for {platform}: {e}")


@pytest.mark.parametrize("impl, platform, custom_call", [
    ("triton", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("shape", [(16, 1024, 32, 64), (2, 8192, 16, 128)], ids=str)
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


# ------------------------------------------------------------------ layernorm_ffn
