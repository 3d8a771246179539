"""What the kernels' public functions refuse, in one line naming the argument (shapes, dtypes,
implementations, block sizes, hardware), and the configurations they build: every documented
width, the Mosaic GPU launch grid."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from kernels.attention import attention, mosaic_gpu
from kernels.attention.common import KERNEL_HEAD_DIMS
from kernels.layernorm_ffn import api as layernorm_ffn_api
from kernels.layernorm_ffn import layernorm_ffn
from kernels.logits_loss import logits_loss
from tests.equiv import ON_CPU


@pytest.mark.parametrize("args, kwargs, message", [
    (((2, 16, 64),) * 3, {}, "rank 4"),
    (((1, 16, 2, 64), (1, 32, 2, 64), (1, 32, 2, 64)), {}, "one shape"),
    (((1, 16, 2, 64),) * 3, {"dtypes": ("bfloat16", "float32", "bfloat16")}, "one dtype"),
    (((1, 16, 2, 64),) * 3, {"dtypes": ("float16",) * 3}, "supports dtypes"),
    (((1, 16, 2, 320),) * 3, {}, "head_dim up to 256"),
    (((1, 16, 2, 64),) * 3, {"implementation": "cuda"}, "known: .*reference.*triton.*tpu"),
    (((1, 16, 2, 64),) * 3, {"block_sizes": {"block_q": 48}}, "block_q=48 must be a power of two"),
    (((1, 16, 2, 64),) * 3, {"block_sizes": {"blok_q": 64}}, "no tuning parameter 'blok_q'"),
    (((1, 16, 2, 64),) * 3, {"block_sizes": {"dkdv_num_warps": 0}},
     "attention/triton: dkdv_num_warps=0 must be >= 1"),
    (((1, 16, 2, 64),) * 3, {"backward_implementation": "tpu"},
     r"backward_implementation='tpu' cannot differentiate the triton forward; it takes \('triton',\)"),
    (((1, 16, 4, 64), (1, 16, 3, 64), (1, 16, 3, 64)), {},
     r"k's and v's heads \(3\) must divide q's \(4\)"),
    (((1, 16, 4, 64), (1, 16, 2, 64), (1, 16, 1, 64)), {}, "k and v of one shape"),
    (((1, 16, 2, 64),) * 3, {"segment_ids": jnp.zeros((1, 15), jnp.int32)},
     r"segment_ids must be integers of shape \[batch, seq\] = \(1, 16\); got int32 \(1, 15\)"),
    (((1, 16, 2, 64),) * 3, {"segment_ids": jnp.zeros((1, 16), jnp.float32)},
     "segment_ids must be integers"),
    (((1, 16, 2, 64),) * 3, {"kv_segment_ids": jnp.zeros((1, 16), jnp.int32)},
     "kv_segment_ids needs segment_ids"),
    (((1, 16, 2, 64),) * 3, {"local_window_size": -1}, "local_window_size must be an int >= 0"),
    (((1, 16, 2, 64),) * 3, {"local_window_size": (4, -2)}, r"a pair \(left, right\)"),
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


def test_attention_mosaic_gpu_groups_the_heads_whose_tiles_fit_in_l2():
    """launch_grid: (groups, pairs, members), members the most (batch, head)s dividing batch x
    heads whose streamed tiles fit in group_mib MiB, at least one."""
    mib = 2 ** 20
    assert mosaic_gpu.launch_grid(2, 32, 64, 2 * mib, 12) == (16, 64, 4)  # 6 fit, 4 divide 64
    assert mosaic_gpu.launch_grid(2, 3, 5, mib // 4, 12) == (1, 5, 6)     # all fit: one group
    assert mosaic_gpu.launch_grid(2, 3, 5, 64 * mib, 12) == (6, 5, 1)     # none fits: one each


@pytest.mark.parametrize("blocks, message", [
    ({"consumers": 4, "schedule_barrier": False}, r"consumers=4 must be one of \[2, 3\]"),
    ({"consumers": 3}, "consumers=3 runs without the ping-pong barrier")])
def test_attention_mosaic_gpu_takes_two_or_three_consumer_warpgroups(blocks, message):
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="attention/mosaic_gpu: " + message):
        attention(q, q, q, implementation="mosaic_gpu", block_sizes=blocks)


@pytest.mark.skipif(mosaic_gpu.on_sm90(), reason="on a Hopper GPU mosaic_gpu runs")
def test_attention_mosaic_gpu_refuses_off_hopper():
    """No interpret mode: anywhere but an sm90 GPU it says so (and where to go instead)."""
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="runs only on an sm90 GPU; use "
                                                  "implementation='triton' to interpret on CPU"):
        attention(q, q, q, implementation="mosaic_gpu")


# The widths the README documents: any multiple of 128 up to 2048.
LNFFN_WIDTHS = tuple(range(128, 2049, 128))


@pytest.mark.parametrize("change, message", [
    ({"d": 96}, "multiple of 128"),
    ({"x_dtype": jnp.int32}, "x must be a floating array"),
    ({"w_fc": (128, 256)}, r"w_fc has shape \(128, 256\); expected \(d, 4d\) = \(128, 512\)"),
    ({"w_proj": (512, 256)}, r"w_proj has shape \(512, 256\); expected \(4d, d\)"),
    ({"b_fc": (128,)}, r"b_fc has shape \(128,\); expected \(4d,\) = \(512,\)"),
    ({"ln_bias": (1, 128)}, r"ln_bias has shape \(1, 128\); expected \(d,\)"),
    ({"b_proj_dtype": jnp.bfloat16}, "b_proj has dtype bfloat16 but ln_scale has float32"),
    ({"ln_scale_dtype": jnp.int32}, "ln_scale has dtype int32; parameters must be floating"),
    ({"implementation": "cuda"}, "unknown layernorm_ffn implementation 'cuda'"),
    ({"block_sizes": {"up_block_n": 96}}, "up_block_n=96 must .*be a power of two"),
    ({"block_sizes": {"up_block_n": 1024}}, "up_block_n=1024 must divide 512"),
    ({"block_sizes": {"upblock_n": 64}}, "no tuning parameter 'upblock_n'"),
    ({"block_sizes": {"dw_num_stages": 0}}, "layernorm_ffn/triton: dw_num_stages=0 must be >= 1"),
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


@pytest.mark.parametrize("impl", ["triton", "tpu", "mosaic_gpu"])
def test_layernorm_ffn_configures_every_documented_width(impl):
    """Every backend's default (and tuned) tiles are valid at every d the README documents."""
    for d in LNFFN_WIDTHS:
        for tokens in (16, 65536):
            layernorm_ffn_api.kernel_config(impl, d, tokens)


@pytest.mark.parametrize("change, error, message", [
    ({"d": 96}, ValueError, "multiple of 64"),
    ({"embed_shape": (50, 128)}, ValueError, r"embed must be a floating \[V, d\] array with d = "),
    ({"targets_shape": (2, 7)}, ValueError, r"targets must be integers of shape h.shape\[:-1\]"),
    ({"targets_dtype": jnp.float32}, ValueError, "targets must be integers"),
    ({"implementation": "cuda"}, ValueError, "unknown logits_loss implementation 'cuda'"),
    ({"ignore_index": 1.5}, ValueError, "ignore_index must be an int or None"),
    ({"implementation": "triton", "block_sizes": {"block_k": 128}}, ValueError,
     "logits_loss/triton: block_k=128 must divide d = 64"),
    ({"implementation": "tpu", "block_sizes": {"probabilities_block_v": 200}}, ValueError,
     "logits_loss/tpu: probabilities_block_v=200 must be a multiple of 128"),
    ({"implementation": "mosaic_gpu", "block_sizes": {"block_n": 96}}, ValueError,
     "logits_loss/mosaic_gpu: block_n=96 must be a multiple of 64"),
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
                    block_sizes=change.get("block_sizes"), ignore_index=change.get("ignore_index"))


@pytest.mark.skipif(not ON_CPU, reason="on a GPU the kernel runs")
def test_logits_loss_mosaic_gpu_refuses_off_the_gpu():
    h = jnp.zeros((2, 8, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="runs only on a GPU .*implementation='reference'"):
        logits_loss(h, jnp.zeros((50, 64)), jnp.zeros((2, 8), jnp.int32),
                    implementation="mosaic_gpu")
