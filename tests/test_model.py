"""The reference GPT: shapes, causality, parameter counts, the loss at initialisation, learning."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from microgpt import gpt2_small, micro_gpt_1, micro_gpt_2, micro_gpt_4, model
from microgpt.gpt import MicroGPT
from microgpt.model import attention, layernorm, sinusoidal_positions


def random_ids(key, shape, vocab):
    return jax.random.randint(jax.random.PRNGKey(key), shape, 0, vocab)


def test_original_api_and_shapes():
    gpt = micro_gpt_4(vocab=9000, model_d=512)
    params = gpt.get_params()
    run = jax.jit(gpt.run_fn, static_argnames=["num_heads"])
    logits = run(random_ids(0, (2, 16), 9000), params, num_heads=8)
    assert logits.shape == (2, 16, 9000) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("make, kwargs, expected", [
    (micro_gpt_4, dict(vocab=9000, model_d=512), 17_209_344),   # original: 17,205,248 with 1 LN/block
    (micro_gpt_4, dict(vocab=9000, model_d=256, num_heads=4), 5_458_944),
    (micro_gpt_1, dict(vocab=9000, model_d=512), 4_608_000 + 3_150_336),
    (micro_gpt_2, dict(vocab=9000, model_d=512), 4_608_000 + 2 * 3_150_336),
    (gpt2_small, {}, 123_614_976),   # its defaults: 50257 x 768 + 12 blocks of 12 d^2 + 9 d
])
def test_parameter_counts(make, kwargs, expected):
    gpt = make(**kwargs)
    assert gpt.count_params() == expected
    # count_params (from shapes) agrees with the real arrays
    if expected < 6_000_000:
        assert sum(p.size for p in jax.tree_util.tree_leaves(gpt.get_params())) == expected


def test_each_block_is_drawn_from_its_own_key():
    """init_params draws the blocks together (vmap); each equals init_block on its own key, so the
    values are those of one draw per block."""
    key = jax.random.PRNGKey(3)
    params = model.init_params(key, 50, 128, 3)
    for block, block_key in zip(params["blocks"], jax.random.split(key, 4)[1:], strict=True):
        want = model.init_block(block_key, 128, 3)
        assert jax.tree_util.tree_structure(block) == jax.tree_util.tree_structure(want)
        assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(block),
                                                          jax.tree_util.tree_leaves(want)))
    assert not jnp.array_equal(params["blocks"][0]["attn"]["wq"], params["blocks"][1]["attn"]["wq"])


def test_causality():
    """Changing token t never changes the logits before t."""
    gpt = micro_gpt_2(vocab=97, model_d=64, num_heads=4)
    params = gpt.get_params(1)
    ids = random_ids(1, (1, 24), 97)
    t = 13
    changed = ids.at[0, t].set((ids[0, t] + 1) % 97)
    a, b = gpt.run_fn(ids, params), gpt.run_fn(changed, params)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_the_document_mask_keeps_documents_apart():
    """With document_eot, changing a token of one document never changes another document's
    logits (without it, it does); each <|endoftext|> starts a document."""
    eot = 0
    ids = random_ids(2, (1, 24), 96) + 1
    ids = ids.at[0, 10].set(eot)   # documents [0, 10) and [10, 24)
    changed = ids.at[0, 4].set(ids[0, 4] % 96 + 1)
    for document_eot, apart in ((eot, True), (None, False)):
        gpt = micro_gpt_2(vocab=97, model_d=64, num_heads=4, document_eot=document_eot)
        params = gpt.get_params(1)
        a, b = gpt.run_fn(ids, params), gpt.run_fn(changed, params)
        assert np.array_equal(a[:, 10:], b[:, 10:]) == apart
    np.testing.assert_array_equal(model.document_ids(ids, eot)[0], (np.arange(24) >= 10))


@pytest.mark.parametrize("kernels", ["pallas", "xla"])
def test_the_document_mask_loss_matches_the_reference(kernels):
    """The masked loss and its gradient on the kernels (interpreted on CPU) and on the stock path
    (jax.nn with the dense mask) equal the math's within bf16 noise."""
    ids = random_ids(3, (2, 64), 500).at[:, jnp.array([5, 6, 40])].set(0)   # documents, one of 1
    targets = random_ids(4, (2, 64), 500)
    losses = {}
    for name in ("reference", kernels):
        gpt = MicroGPT(vocab=500, model_d=128, num_layers=1, num_heads=2, kernels=name,
                       document_eot=0)
        losses[name] = jax.value_and_grad(gpt.loss)(gpt.get_params(0), ids, targets)
    (ref, ref_grads), (got, grads) = losses["reference"], losses[kernels]
    assert abs(float(got) - float(ref)) < 2e-3 * float(ref)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert float(jnp.max(jnp.abs(g - r))) <= 0.05 * float(jnp.max(jnp.abs(r))) + 1e-6


def test_untrained_loss_is_log_vocab():
    vocab = 9000
    gpt = micro_gpt_2(vocab=vocab, model_d=128, num_heads=4)
    ids, targets = random_ids(2, (4, 64), vocab), random_ids(3, (4, 64), vocab)
    loss = float(gpt.loss(gpt.get_params(2), ids, targets))
    assert abs(loss - math.log(vocab)) < 0.3, loss


def test_a_few_steps_lower_the_loss():
    gpt = micro_gpt_1(vocab=64, model_d=64, num_heads=2)
    params = gpt.get_params(3)
    ids = random_ids(4, (8, 32), 64)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = optax.adamw(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(gpt.loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(30):
        params, state, loss = step(params, state)
        first = first if first is not None else float(loss)
    assert float(loss) < first - 1.0, (first, float(loss))


def test_layernorm_subtracts_the_mean_in_f32():
    x = (1000.0 + jax.random.normal(jax.random.PRNGKey(5), (4, 256))).astype(jnp.bfloat16)
    y = layernorm(x, None, None).astype(jnp.float32)
    np.testing.assert_allclose(np.mean(y, -1), 0.0, atol=0.05)
    np.testing.assert_allclose(np.std(y, -1), 1.0, atol=0.05)


def test_sinusoidal_positions_with_offset():
    full = sinusoidal_positions(10, 16)
    np.testing.assert_allclose(sinusoidal_positions(4, 16, start=6), full[6:], atol=1e-6)


def test_attention_matches_a_loop_over_rows():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 6, 2, 8)) for i in range(3))
    out = attention(q, k, v, causal=True)
    for t in range(6):
        s = jnp.einsum("hd,khd->hk", q[0, t], k[0, : t + 1]) / math.sqrt(8)
        expected = jnp.einsum("hk,khd->hd", jax.nn.softmax(s, -1), v[0, : t + 1])
        np.testing.assert_allclose(out[0, t], expected, atol=1e-5)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="divisible"):
        MicroGPT(vocab=10, model_d=66, num_heads=4)
    with pytest.raises(ValueError, match="unknown kernels"):
        MicroGPT(kernels="nope")


def test_matmul_backward_multiplies_bf16_operands_accumulating_in_f32():
    """model.matmul's gradients follow its forward's rule: every product of the backward takes
    bfloat16 operands (the cotangent rounded to bf16) with float32 accumulation, and they agree
    with the float32 gradient to bf16 precision; da and dw come back in a's and w's dtypes."""
    ka, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    a = jax.random.normal(ka, (2, 8, 32), jnp.bfloat16)
    w = jax.random.normal(kw, (32, 16), jnp.float32)
    g = jax.random.normal(kg, (2, 8, 16), jnp.float32)
    backward = lambda a, w, g: jax.vjp(model.matmul, a, w)[1](g)

    dots = [eqn for eqn in jax.make_jaxpr(backward)(a, w, g).eqns
            if eqn.primitive.name == "dot_general"]
    assert len(dots) == 2   # da and dw (the forward's product does not reach the cotangents)
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
        assert eqn.params["preferred_element_type"] == jnp.float32

    da, dw = backward(a, w, g)
    assert (da.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)
    with jax.default_matmul_precision("highest"):
        exact = jax.vjp(lambda a, w: a @ w, a.astype(jnp.float32), w)[1](g)
    for got, want in zip((da, dw), exact):
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) <= 2 ** -6 * scale


def test_logsumexp_in_one_pass_matches_jax():
    """The one-pass (max, rescaled sum) reduction vs jax.nn.logsumexp, rows with -inf included
    (masked entries) and rows all -inf (the merge of two empty pairs must not make nan)."""
    x = 30.0 * jax.random.normal(jax.random.PRNGKey(0), (5, 1000), jnp.float32)
    x = x.at[1, ::3].set(-jnp.inf).at[2].set(-jnp.inf)
    np.testing.assert_allclose(model.logsumexp(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6)
    assert float(model.logsumexp(x)[2]) == -np.inf


def test_tied_logits_loss_and_its_written_out_gradient_match_optax():
    """The loss head and its hand-written gradient (dlogits = (softmax - onehot) g / N in bf16,
    then matmul's rule) against optax's integer-label cross-entropy of the same logits,
    differentiated by autodiff, under a scaled cotangent; the loss also equals cross_entropy of
    tied_logits, the logits that forward returns."""
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 64), jnp.float32)
    embed = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (333, 64), jnp.float32)
    targets = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, 333)
    optax_loss = lambda h, e: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        model.matmul(h, e.T), targets))
    loss = model.tied_logits_loss(h, embed, targets)
    np.testing.assert_allclose(loss, optax_loss(h, embed), rtol=1e-6)
    np.testing.assert_allclose(loss, model.cross_entropy(model.matmul(h, embed.T), targets),
                               rtol=1e-6)
    got = jax.grad(lambda h, e: 3.0 * model.tied_logits_loss(h, e, targets), (0, 1))(h, embed)
    want = jax.grad(lambda h, e: 3.0 * optax_loss(h, e), (0, 1))(h, embed)
    for g, w, x in zip(got, want, (h, embed)):
        assert g.dtype == x.dtype and g.shape == x.shape
        # both round dlogits to bf16 before matmul's products: the same up to summation order
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(w))))
