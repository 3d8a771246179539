"""The kernels lower for chips this host lacks (jax.export for CUDA and TPU, from a CPU): the proof,
in CI, that the device paths build, since interpret mode checks none of Triton's, Mosaic GPU's or
Mosaic TPU's constraints. On an accelerator the equivalence suite compiles and runs them instead."""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import pytest

from kernels.attention import attention
from kernels.layernorm_ffn import layernorm_ffn
from kernels.logits_loss import logits_loss
from microgpt import model
from microgpt.gpt import micro_gpt_1
from tests.equiv import ON_CPU, lnffn_params


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
    ("mosaic_gpu", ["mosaic_gpu"] * 2), ("triton", ["__gpu$xla.gpu.triton"] * 2)],
    ids=["mosaic_bwd", "triton_bwd"])
@pytest.mark.parametrize("persistent", [0, 1], ids=["grid", "persistent"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_lowers_for_the_device(shape, causal, backward, backward_calls,
                                                    persistent):
    """The Mosaic GPU forward lowers for CUDA at the benchmark shapes: one Mosaic GPU custom call
    (jax 0.10 names it mosaic_gpu_v2) whose lowering checks the wgmma and TMA layouts, tile shapes
    and barriers in Python (a CTA per work unit, or persistent CTAs); its gradient adds the Mosaic
    GPU dK/dV and dQ kernels, or Triton's (backward_implementation="triton"), on the saved
    residuals. (The kernels' PTX is only built on the GPU, at the
    first run.)"""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f = lambda q, k, v: attention(q, k, v, causal=causal, implementation="mosaic_gpu",
                                  backward_implementation=backward,
                                  block_sizes={"persistent": persistent}, interpret=False)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    calls = lambda g: sorted(re.sub(r"^mosaic_gpu\w*", "mosaic_gpu", c) for c in re.findall(
        r"custom_call @(\S+)\(", _export_text(g, "cuda", spec, spec, spec)))
    assert calls(f) == ["mosaic_gpu"]
    assert calls(grad) == sorted(backward_calls + ["mosaic_gpu"])


@pytest.mark.parametrize("persistent", [0, 1], ids=["grid", "persistent"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_lowers_with_three_consumer_warpgroups(persistent):
    """The forward with three consumer warpgroups (each 64 query rows; S1024 in ragged units of
    three tiles) lowers for CUDA, its gradient beside it, at micro_gpt_4's head shape."""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    spec = jax.ShapeDtypeStruct((16, 1024, 32, 64), jnp.bfloat16)
    f = lambda q, k, v: attention(q, k, v, implementation="mosaic_gpu", interpret=False,
                                  block_sizes={"consumers": 3, "schedule_barrier": False,
                                               "block_q": 64, "block_k": 128,
                                               "persistent": persistent})
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    calls = lambda g: re.findall(r"custom_call @(\S+)\(", _export_text(g, "cuda", spec, spec, spec))
    assert len(calls(f)) == 1 and len(calls(grad)) == 3


@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_forward_counts_shared_memory_as_the_lowering_does(monkeypatch):
    """warp_specialized.smem_bytes, by which the persistent forward takes a third query buffer
    per warpgroup where it fits, is the shared memory the lowering lays out (and checks against
    the CTA's 227 KiB): at B32 S512 H16 D128 with 64 x 128 tiles and 2 stages (the H100's entry)
    the forward alone fits three (226 KiB), and with the backward's residuals (lse's buffer
    besides) it takes two."""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    from jax.experimental.mosaic.gpu import core as mosaic_core

    from kernels import warp_specialized
    from kernels.attention import mosaic_gpu
    if not hasattr(mosaic_core, "_smem_tree_size"):
        pytest.skip("this jax's Mosaic GPU lowering counts its shared memory elsewhere")
    counted, laid_out = [], []
    launch, tree_size = mosaic_gpu.launch, mosaic_core._smem_tree_size

    def counting_launch(kernel, *, scratch, **kwargs):
        counted.append((warp_specialized.smem_bytes(scratch), scratch["q_smem"].shape[0]))
        return launch(kernel, scratch=scratch, **kwargs)
    monkeypatch.setattr(mosaic_gpu, "launch", counting_launch)
    monkeypatch.setattr(mosaic_core, "_smem_tree_size",
                        lambda tree: laid_out.append(tree_size(tree)) or laid_out[-1])
    spec = jax.ShapeDtypeStruct((32, 512, 16, 128), jnp.bfloat16)
    f = functools.partial(attention, implementation="mosaic_gpu", interpret=False,
                          block_sizes={"block_q": 64, "block_k": 128, "num_stages": 2,
                                       "persistent": True})
    for residuals, buffers in ((False, 3), (True, 2)):
        counted.clear(), laid_out.clear()
        g = jax.vjp if residuals else lambda f, *x: f(*x)
        jax.jit(lambda q, k, v: g(f, q, k, v)).trace(spec, spec, spec).lower(
            lowering_platforms=("cuda",))
        assert counted == [(laid_out[0], 2 * buffers)] and laid_out[0] <= 227 * 1024


@pytest.mark.parametrize("backward, backward_calls", [
    (None, ["__gpu$xla.gpu.triton"] * 2), ("mosaic_gpu", ["mosaic_gpu"] * 2)],
    ids=["default_bwd", "mosaic_bwd"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_lowers_with_segment_ids(backward, backward_calls):
    """Packed documents (B2 S8192 H16 D128, documents of 512, the benchmark's case) on the
    Mosaic GPU forward lower for CUDA: one Mosaic GPU call, its pairs' key ranges read from
    GMEM and the keys' ids on a third ring; the gradient adds two backward kernels that take the
    segment ids the forward saves: Triton's by default off a tuned GPU (`default_backward`: no
    table entry here), the Mosaic GPU ones when asked. Asked for persistent CTAs (the tables'
    choice at this length), segment ids run a CTA per unit all the same (schedule_for)."""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    spec = jax.ShapeDtypeStruct((2, 8192, 16, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 8192), jnp.int32)
    blocks = {"persistent": True} | ({"dkdv_persistent": True} if backward else {})
    f = lambda q, k, v, ids: attention(q, k, v, segment_ids=ids, implementation="mosaic_gpu",
                                       backward_implementation=backward, block_sizes=blocks,
                                       interpret=False)
    grad = jax.grad(lambda q, k, v, ids: jnp.sum(f(q, k, v, ids).astype(jnp.float32)),
                    argnums=(0, 1, 2))
    calls = lambda g: sorted(re.sub(r"^mosaic_gpu\w*", "mosaic_gpu", c) for c in re.findall(
        r"custom_call @(\S+)\(", _export_text(g, "cuda", spec, spec, spec, ids)))
    assert calls(f) == ["mosaic_gpu"]
    assert calls(grad) == sorted(backward_calls + ["mosaic_gpu"])


@pytest.mark.parametrize("window", [None, (1024, 0)], ids=["causal", "window1024"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_backward_lowers_with_grouped_heads(window):
    """Grouped-query heads (the benchmark's Hq 32, Hkv 8, D 128 at S 4096), causal or with a
    window of 1024: the Mosaic GPU backward lowers for CUDA, its dK/dV kernel one unit per K/V
    head's pair of key tiles, dk and dv of k's shape."""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    q = jax.ShapeDtypeStruct((4, 4096, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 4096, 8, 128), jnp.bfloat16)
    f = lambda q, k, v: attention(q, k, v, local_window_size=window, implementation="mosaic_gpu",
                                  backward_implementation="mosaic_gpu", interpret=False)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    assert [x.shape for x in jax.eval_shape(grad, q, kv, kv)] == [q.shape, kv.shape, kv.shape]
    text = _export_text(grad, "cuda", q, kv, kv)
    assert len(re.findall(r"custom_call @mosaic_gpu\w*\(", text)) == 3


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
    forward = lambda blocks, backward=None: lambda q, k, v: attention(
        q, k, v, implementation="mosaic_gpu", backward_implementation=backward,
        block_sizes=blocks, interpret=False)
    with pytest.raises(ValueError, match=r"persistent=1 need \d+ KiB of shared memory at "
                                         r"head_dim 256; a CTA has 227"):
        export(forward({"persistent": 1}))
    grad = jax.grad(lambda q, k, v: jnp.sum(forward({}, "mosaic_gpu")(q, k, v)))
    with pytest.raises(ValueError, match="the mosaic_gpu backward runs head_dim .*use "
                                         "backward_implementation='triton'"):
        export(grad)


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
    f = lambda *a: layernorm_ffn(*a, residual=True, implementation=impl, interpret=False)
    grad = jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)),
                              argnums=tuple(range(7)))
    specs = [jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16)] + [
        jax.ShapeDtypeStruct(p.shape, jnp.float32)
        for p in jax.eval_shape(lambda: lnffn_params(jax.random.PRNGKey(0), d))]
    count = lambda g: len(re.findall(rf"custom_call @{re.escape(custom_call)}\w*\(",
                                     _export_text(g, platform, *specs)))
    assert (count(f), count(grad)) == calls


@pytest.mark.parametrize("impl, platform, calls", [
    ("mosaic_gpu", "cuda", {"mosaic_gpu": (1, 2), "__gpu$xla.gpu.triton": (0, 2)}),
    ("triton", "cuda", {"__gpu$xla.gpu.triton": (1, 4)}),
    ("tpu", "tpu", {"tpu_custom_call": (1, 2)})], ids=["mosaic_gpu", "triton", "tpu"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_logits_loss_lowers_without_a_tokens_by_vocab_array(impl, platform, calls):
    """At micro_gpt_4's head (64 x 1024 tokens, V = 9000, d = 512) the loss lowers for its chip
    with one kernel (the statistics GEMM) and its value and gradient with two calls of another
    (the probabilities GEMM in the loop over chunks, and again in its redo), on a GPU two of the
    Triton kernel of dE's onehot term beside them, and no array of the lowered gradient holds
    [T, V] values in any dtype: the largest is one bf16 chunk [8192, V'] within the 256 MiB
    budget, an eighth of [T, V]."""
    _skip_unless_pallas_lowers_for(impl, platform)
    f = lambda h, e, t: logits_loss(h, e, t, implementation=impl, interpret=False)
    grad = jax.value_and_grad(f, argnums=(0, 1))
    tokens, vocab, d = 64 * 1024, 9000, 512
    specs = (jax.ShapeDtypeStruct((64, 1024, d), jnp.bfloat16),
             jax.ShapeDtypeStruct((vocab, d), jnp.float32),
             jax.ShapeDtypeStruct((64, 1024), jnp.int32))
    count = lambda text, name: len(re.findall(rf"custom_call @{re.escape(name)}\w*\(", text))
    text = _export_text(grad, platform, *specs)
    loss_text = _export_text(f, platform, *specs)
    assert {name: (count(loss_text, name), count(text, name)) for name in calls} == calls
    sizes = [math.prod(int(n) for n in dims.split("x")[:-1])
             for dims in re.findall(r"tensor<((?:\d+x)+)\w+>", text)]
    assert max(sizes) * 2 <= 256 << 20 and max(sizes) * 7 < tokens * vocab, max(sizes)


@pytest.mark.parametrize("platform, implementations, custom_calls", [
    ("cuda", ("triton", "triton", "mosaic_gpu"), {"__gpu$xla.gpu.triton": 12, "mosaic_gpu": 2}),
    ("tpu", ("tpu", "tpu", "tpu"), {"tpu_custom_call": 9})], ids=["cuda", "tpu"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_the_model_exports_for_a_chip_the_host_lacks(platform, implementations, custom_calls):
    """A one-block model's training loss and gradients, its ops the kernels' public functions
    with an implementation each and interpret=False, lower for CUDA or TPU from this CPU host:
    attention 3 kernels (forward, dK/dV, dQ), LN+FFN Triton 7 or TPU 4, the loss head 2
    (and on CUDA two Triton calls of its dE onehot term)."""
    _skip_unless_pallas_lowers_for(implementations[0], platform)
    attention_impl, ln_impl, loss_impl = implementations
    ops = model.KernelOps(
        functools.partial(attention, implementation=attention_impl, interpret=False),
        functools.partial(layernorm_ffn, implementation=ln_impl, interpret=False),
        functools.partial(logits_loss, implementation=loss_impl, interpret=False))
    gpt = micro_gpt_1(vocab=512, model_d=128, num_heads=2)
    loss = lambda params, ids: model.loss_fn(params, ids, ids, gpt.num_heads, ops)
    params = jax.eval_shape(gpt.get_params)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    text = _export_text(jax.value_and_grad(loss), platform, params, ids)
    found = {name: len(re.findall(rf"custom_call @{re.escape(name)}\w*\(", text))
             for name in custom_calls}
    assert found == custom_calls


@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_the_model_lowers_each_kernel_once_however_deep():
    """Every block calls the same kernels at the same shapes, and each is lowered once (the op is
    jitted: kernels/op.py), so three blocks' training gradient holds as many Mosaic GPU kernels
    as one block's. (Lowered once a call, gpt2_small's gradient took minutes to compile on the
    H200: Mosaic GPU lowers each kernel in Python; bench/RESULTS.md, session 17.)"""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    ops = model.KernelOps(
        functools.partial(attention, implementation="mosaic_gpu", interpret=False),
        functools.partial(layernorm_ffn, implementation="mosaic_gpu", interpret=False),
        functools.partial(logits_loss, implementation="mosaic_gpu", interpret=False))
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def kernels(num_layers):
        gpt = dataclasses.replace(micro_gpt_1(vocab=512, model_d=128, num_heads=2),
                                  num_layers=num_layers)
        loss = lambda params, ids: model.loss_fn(params, ids, ids, gpt.num_heads, ops)
        text = _export_text(jax.grad(loss), "cuda", jax.eval_shape(gpt.get_params), ids)
        return len(re.findall(r"custom_call @mosaic_gpu\w*\(", text))

    assert kernels(3) == kernels(1) > 0


@pytest.mark.parametrize("backward", ["mosaic_gpu", "triton"])
@pytest.mark.skipif(not ON_CPU, reason="lowering is proven on CPU in CI; here the kernels compile")
def test_attention_mosaic_gpu_pads_the_sequence_once(backward):
    """A ragged length (1100) is padded once, by the api, to what every kernel of the forward and
    its backward tiles (1280: a CTA's two 128-row tiles): no kernel pads again (the pads left in
    the module widen by zero, which XLA drops)."""
    _skip_unless_pallas_lowers_for("mosaic_gpu", "cuda")
    spec = jax.ShapeDtypeStruct((1, 1100, 2, 64), jnp.bfloat16)
    f = lambda q, k, v: attention(q, k, v, implementation="mosaic_gpu", interpret=False,
                                  backward_implementation=backward)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    widths = re.findall(r"stablehlo.pad %\S+, %\S+, low = \[[^\]]*\], high = \[0, (-?\d+), 0, 0\]",
                        _export_text(grad, "cuda", spec, spec, spec))
    assert {int(w) for w in widths} - {0, -180} == {180}   # -180: the slice's transpose
