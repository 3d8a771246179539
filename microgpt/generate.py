"""Sample from a trained microGPT with a KV cache: `python -m microgpt.generate --ckpt DIR --prompt "..."`.

Decoding runs the prompt through the model once (prefill), storing every block's keys and values,
then feeds one token per step, attending over the cache: each new token costs one position's work
instead of a whole-sequence forward. The cache holds `context` positions (the training length);
when it fills, the last half is re-prefilled and decoding continues (a sliding window).
A run trained with --kernels=pallas decodes with its kernels for LayerNorm+FFN; attention over the
cache is the reference math (`masked_attention`): the flash kernel computes whole causal
self-attention, not new queries against a cache.
"""
from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer

from microgpt import checkpoint, data
from microgpt.run import load_run
from microgpt.cli import DefaultsHelpFormatter
from microgpt.gpt import MicroGPT, kernel_ops
from microgpt.model import (COMPUTE_DTYPE, Params, attention_projections, block_output, embed,
                            masked_attention, tied_logits)

Cache = list  # per block: (keys, values), each [B, T, H, Dh] bfloat16


def init_cache(model: MicroGPT, batch: int, length: int) -> Cache:
    shape = (batch, length, model.num_heads, model.model_d // model.num_heads)
    return [(jnp.zeros(shape, COMPUTE_DTYPE), jnp.zeros(shape, COMPUTE_DTYPE))
            for _ in range(model.num_layers)]


def forward_cached(params: Params, ids: jax.Array, cache: Cache, start: jax.Array,
                   num_heads: int, kernels: str = "reference",
                   visible_from: jax.Array | int = 0) -> tuple[jax.Array, Cache]:
    """The GPT forward for tokens at positions start .. start+n-1, given the cache of earlier ones.

    ids [B, n]; cache per block ([B, T, H, Dh], [B, T, H, Dh]).  -> logits [B, n, V] float32, new cache.
    Query t attends to cached keys at positions visible_from .. t (the causal mask, offset by
    `start`; visible_from: where the current document starts, for a document-masked model).
    """
    ops = kernel_ops(kernels)
    x = embed(ids, params["embed"], start)
    n, length = ids.shape[1], cache[0][0].shape[1]
    q_pos = start + jnp.arange(n)
    keys_at = jnp.arange(length)[None, :]
    mask = (keys_at <= q_pos[:, None]) & (keys_at >= visible_from)           # [n, T]
    new_cache = []
    for block, (keys, values) in zip(params["blocks"], cache):
        q, k, v = attention_projections(block, x, num_heads)
        keys = jax.lax.dynamic_update_slice(keys, k, (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v, (0, start, 0, 0))
        attn = masked_attention(q, keys, values, mask, 1.0 / math.sqrt(q.shape[-1]))
        x = block_output(block, x, attn, ops)
        new_cache.append((keys, values))
    return tied_logits(params, x), new_cache


_forward_cached = jax.jit(forward_cached, static_argnames=("num_heads", "kernels"))


def sample_next(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """Next token ids [B] from logits [B, V]: greedy when temperature == 0, else softmax(logits / T)
    restricted to the top_k largest."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def generate_ids(model: MicroGPT, params: Params, prompt: list[int], max_new_tokens: int,
                 context: int, rng: jax.Array, temperature: float = 0.8,
                 top_k: int | None = 50) -> list[int]:
    """prompt + max_new_tokens sampled ids. A prompt longer than `context` keeps its last tokens.
    A model trained with the document mask (model.document_eot) attends within the current
    document only, as in training: from the window's last <|endoftext|> on, positions counting
    from the window's start."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if len(prompt) > context:
        print(f"notice: the prompt has {len(prompt)} tokens, more than the context of {context}; "
              f"keeping the last {context}", file=sys.stderr)
        prompt = prompt[-context:]
    ids = list(prompt)

    def document_start(window: list[int]) -> int:
        """Where the window's current document starts (0 without the document mask)."""
        eot = model.document_eot
        return len(window) - 1 - window[::-1].index(eot) if eot in window else 0

    def prefill(window: list[int]):
        """The cache of the window's current document (earlier ones are out of its sight)."""
        first = document_start(window)
        cache = init_cache(model, 1, context)
        return _forward_cached(params, jnp.asarray([window[first:]]), cache, jnp.int32(first),
                               num_heads=model.num_heads, kernels=model.kernels,
                               visible_from=jnp.int32(first)), first

    (logits, cache), first = prefill(ids)
    pos = len(ids)
    for _ in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        token = int(sample_next(logits[:, -1], key, temperature, top_k)[0])
        ids.append(token)
        if pos == context:  # the cache is full: slide the window and rebuild it
            window = ids[-(context // 2):]
            (logits, cache), first = prefill(window)
            pos = len(window)
            continue
        if token == model.document_eot:   # a new document: the cache before it is out of sight
            first = pos
        logits, cache = _forward_cached(params, jnp.asarray([[token]]), cache, jnp.int32(pos),
                                        num_heads=model.num_heads, kernels=model.kernels,
                                        visible_from=jnp.int32(first))
        pos += 1
    return ids


def generate_from_params(model: MicroGPT, params: Params, tokenizer: Tokenizer, prompt: str,
                         max_new_tokens: int, context: int, rng: jax.Array,
                         temperature: float = 0.8, top_k: int | None = 50) -> str:
    """Text continuing `prompt` (an empty prompt starts a new document)."""
    eot = tokenizer.token_to_id(data.EOT)
    prompt_ids = tokenizer.encode(prompt).ids if prompt else [eot]
    ids = generate_ids(model, params, prompt_ids, max_new_tokens, context, rng, temperature, top_k)
    return tokenizer.decode(ids if prompt else ids[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m microgpt.generate", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt", help="run folder (default: the newest under runs/)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--seed", type=int, default=0, help="the sampling's random seed")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 0 or args.top_k < 0:
        p.error("--temperature, --max-new-tokens and --top-k must not be negative")
    try:
        model, params, tokenizer, cfg = load_run(args.ckpt, args.step)
    except checkpoint.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        print(generate_from_params(model, params, tokenizer, args.prompt, args.max_new_tokens,
                                   cfg.seq_len, jax.random.PRNGKey(args.seed), args.temperature,
                                   args.top_k or None))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
