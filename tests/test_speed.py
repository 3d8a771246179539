"""Speed cases that matter, as pytest-benchmark tests, so a change's effect on each shows against
the last recorded run: `bash bench/gpu_suite.sh speed` runs them on the GPU and keeps the JSON per
device under bench/speed/ (pytest-benchmark's `--benchmark-compare` reads it). Each times what a
user gets (implementation=None, the shipped tuning) forward+backward, on a GPU only: on a CPU the
kernels are interpreted, and their times say nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from bench import attention as attention_bench
from bench import ln_ffn as ln_ffn_bench
from kernels import attention, layernorm_ffn, logits_loss
from microgpt.gpt import micro_gpt_4
from microgpt.train import TrainConfig, data_mesh, make_optimizer, make_train_step

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="speed is measured on a GPU (on a CPU the kernels are "
                                       "interpreted)")


def _time(benchmark, fn, *args):
    """pytest-benchmark over fn(*args), synchronized: the median of 5 rounds of 20 calls after
    2 warm-up rounds (bench/common.py's method)."""
    call = lambda: jax.block_until_ready(fn(*args))
    benchmark.pedantic(call, rounds=5, iterations=20, warmup_rounds=2)


# (batch, seq, heads, head_dim): the sweep's ends and micro_gpt_4's training shape.
ATTENTION_SHAPES = [(16, 1024, 32, 64), (2, 8192, 32, 64), (16, 1024, 16, 128),
                    (2, 8192, 16, 128), (128, 1024, 8, 64)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}_S{}_H{}_D{}".format(*s))
def test_attention_forward_backward(benchmark, shape):
    (q, k, v, cotangent), _, forward_backward = attention_bench.timed_calls(
        lambda q, k, v: attention(q, k, v, causal=True), shape, jnp.bfloat16)
    _time(benchmark, forward_backward, q, k, v, cotangent)


@pytest.mark.parametrize("tokens, d", ln_ffn_bench.ANCHOR_SHAPES, ids=lambda v: str(v))
def test_layernorm_ffn_forward_backward(benchmark, tokens, d):
    fn = lambda *a: layernorm_ffn(*a, residual=True)
    args, _, forward_backward = ln_ffn_bench.timed_calls(fn, tokens, d, jnp.bfloat16)
    _time(benchmark, forward_backward, *args)


@pytest.mark.parametrize("tokens", [65536, 131072])
def test_loss_head_forward_backward(benchmark, tokens):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(keys[0], (tokens, 512), jnp.bfloat16)
    embed = 0.02 * jax.random.normal(keys[1], (9000, 512), jnp.float32)
    targets = jax.random.randint(keys[2], (tokens,), 0, 9000)
    _time(benchmark, jax.jit(jax.value_and_grad(logits_loss, argnums=(0, 1))), h, embed, targets)


def test_train_step_micro_gpt_4(benchmark):
    """The pallas training step of micro_gpt_4 at seq 1024, batch 64 (bench/train_step.py's)."""
    model = micro_gpt_4(vocab=9000, model_d=512, num_heads=8, kernels="pallas")
    optimizer, _ = make_optimizer(TrainConfig(max_steps=10_000))
    step = make_train_step(model, optimizer, data_mesh(jax.devices()[:1]))
    params = model.get_params(0)
    state = [params, optimizer.init(params)]
    x, y = (jax.random.randint(jax.random.PRNGKey(i), (64, 1024), 0, 9000) for i in (1, 2))

    def one_step():
        state[:] = step(*state, x, y)[:2]
        return state[0]
    benchmark.pedantic(lambda: jax.block_until_ready(one_step()), rounds=5, iterations=10,
                       warmup_rounds=2)
