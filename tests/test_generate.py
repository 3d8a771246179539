"""KV-cache decoding: equal to recomputing the whole sequence, prompt cut, sliding window, CLI."""
import jax
import jax.numpy as jnp
import numpy as np

from microgpt import generate, train
from microgpt.gpt import micro_gpt_2


def greedy_uncached(model, params, prompt, n):
    """Greedy decoding by a whole-sequence forward per token. The sequence is zero-padded to its
    final length, so one program serves every step: the model is causal, so the padding after
    the last real token changes none of the logits before it."""
    ids = list(prompt)
    run = jax.jit(model.run_fn)
    for _ in range(n):
        padded = jnp.asarray([ids + [0] * (len(prompt) + n - len(ids))])
        ids.append(int(jnp.argmax(run(padded, params)[0, len(ids) - 1])))
    return ids


def test_greedy_cached_equals_uncached():
    model = micro_gpt_2(vocab=101, model_d=64, num_heads=4)
    params = model.get_params(7)
    prompt = [5, 17, 42, 3, 99]
    cached = generate.generate_ids(model, params, prompt, 20, context=32,
                                   rng=jax.random.PRNGKey(0), temperature=0.0)
    assert cached == greedy_uncached(model, params, prompt, 20)


def test_document_masked_decoding_equals_the_masked_forward():
    """A model trained with the document mask decodes as its forward computes: greedy ids from
    the cache (restarting its sight at every <|endoftext|>, of the prompt and sampled; the
    sampling is steered to one) equal a whole-sequence forward's with the mask."""
    model = micro_gpt_2(vocab=101, model_d=64, num_heads=4, document_eot=0)
    params = model.get_params(9)
    for block in params["blocks"]:   # attention that matters (at initialisation it barely does)
        block["attn"] = {name: 10 * w for name, w in block["attn"].items()}
    # <|endoftext|> gets sampled where the model would pick its favourite, 91.
    params["embed"] = params["embed"].at[0].set(2 * params["embed"][91])
    prompt = [5, 17, 0, 42, 3]
    cached = generate.generate_ids(model, params, prompt, 20, context=32,
                                   rng=jax.random.PRNGKey(0), temperature=0.0)
    assert cached == greedy_uncached(model, params, prompt, 20)
    assert 0 in cached[len(prompt):]


def test_document_masked_cache_logits_match_the_masked_forward():
    """forward_cached with visible_from at each token's document start gives the document-masked
    forward's logits (documents start at the <|endoftext|>s at 3 and 8)."""
    model = micro_gpt_2(vocab=101, model_d=64, num_heads=4, document_eot=0)
    params = model.get_params(10)
    for block in params["blocks"]:   # attention that matters (at initialisation it barely does)
        block["attn"] = {name: 10 * w for name, w in block["attn"].items()}
    ids = jax.random.randint(jax.random.PRNGKey(2), (1, 12), 1, 101).at[0, jnp.array([3, 8])].set(0)
    full = model.run_fn(ids, params)
    unmasked = micro_gpt_2(vocab=101, model_d=64, num_heads=4).run_fn(ids, params)
    assert float(jnp.max(jnp.abs(full - unmasked))) > 0.2   # the mask is visible in the logits
    cache = generate.init_cache(model, 1, 16)
    logits, cache = generate.forward_cached(params, ids[:, :3], cache, jnp.int32(0), 4)
    steps = [logits]
    for t in range(3, 12):
        first = 8 if t >= 8 else 3
        logits, cache = generate.forward_cached(params, ids[:, t:t + 1], cache, jnp.int32(t), 4,
                                                visible_from=jnp.int32(first))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-2)


def test_cached_logits_match_the_full_forward():
    model = micro_gpt_2(vocab=101, model_d=64, num_heads=4)
    params = model.get_params(8)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 101)
    full = model.run_fn(ids, params)
    cache = generate.init_cache(model, 2, 16)
    logits, cache = generate.forward_cached(params, ids[:, :7], cache, jnp.int32(0), 4)
    steps = [logits]
    for t in range(7, 12):
        logits, cache = generate.forward_cached(params, ids[:, t:t + 1], cache, jnp.int32(t), 4)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-2)


def test_long_prompt_is_cut_from_the_left_and_generation_passes_the_context(capsys):
    model = micro_gpt_2(vocab=50, model_d=32, num_heads=2)
    params = model.get_params(9)
    ids = generate.generate_ids(model, params, list(range(40)), 30, context=16,
                                rng=jax.random.PRNGKey(0))
    assert "keeping the last 16" in capsys.readouterr().err
    assert ids[:16] == list(range(24, 40)) and len(ids) == 46


def test_sampling_respects_top_k():
    logits = jnp.array([[0.0, 5.0, 4.0, -1.0, 3.0]])
    draws = {int(generate.sample_next(logits, jax.random.PRNGKey(i), 1.0, 2)[0]) for i in range(50)}
    assert draws == {1, 2}
    assert int(generate.sample_next(logits, jax.random.PRNGKey(0), 0.0, None)[0]) == 1


def test_generate_cli_and_generate_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MICROGPT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be that is the question\n" * 300)
    cfg = train.TrainConfig(preset="micro_gpt_1", model_d=32, heads=2, vocab=300, batch_size=4,
                            seq_len=16, max_steps=4, eval_every=4, eval_batches=1, data=str(corpus))
    train.train(cfg, out=str(tmp_path / "runs" / "a"), sample=False)
    capsys.readouterr()
    assert generate.main(["--ckpt", str(tmp_path / "runs" / "a"), "--prompt", "to be",
                          "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("to be")
    monkeypatch.chdir(tmp_path)   # generate_text finds the newest run under ./runs
    from microgpt.infer import generate_text
    text = generate_text(rng=jax.random.PRNGKey(0), text="Once upon a time", max_new_tokens=5)
    assert text.startswith("Once upon a time")
    assert generate.main(["--ckpt", str(tmp_path / "nothing")]) == 2
