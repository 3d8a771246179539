"""The original microGPT's one-call text generation, from a local checkpoint (no downloads).

    from microgpt.infer import generate_text
    print(generate_text(rng=jax.random.PRNGKey(0), text="Once upon a time"))
"""
from __future__ import annotations

from pathlib import Path

import jax

from microgpt.generate import generate_from_params
from microgpt.run import load_run


def generate_text(rng: jax.Array, text: str = "", ckpt: str | Path | None = None,
                  max_new_tokens: int = 100, temperature: float = 0.8, top_k: int | None = 50) -> str:
    """`text` continued by up to max_new_tokens tokens sampled from the checkpoint in `ckpt`
    (default: the newest run under runs/)."""
    model, params, tokenizer, cfg = load_run(ckpt)
    return generate_from_params(model, params, tokenizer, text, max_new_tokens, cfg.seq_len, rng,
                                temperature, top_k)
