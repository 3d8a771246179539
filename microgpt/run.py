"""A training run as it is stored: its configuration, its optimizer (whose state the checkpoints
hold beside the parameters), and reading a run back from its folder (microgpt/checkpoint.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import optax
from tokenizers import Tokenizer

from microgpt import checkpoint, data
from microgpt.gpt import PRESETS, MicroGPT


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "micro_gpt_2"
    model_d: int = 128
    heads: int = 4
    vocab: int = 9000
    batch_size: int = 16
    seq_len: int = 128
    max_steps: int = 500
    decay_steps: int | None = None    # the cosine's length; None: max_steps
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    kernels: str = "reference"
    document_mask: bool = False   # no attention across the <|endoftext|>-separated documents
    shard: str = "replicate"   # parameters and optimizer state: replicate | fsdp (sharding.py)
    data: str | None = None
    dataset: str | None = None
    text_field: str = "text"
    # The original microGPT's optimizer: AdamW on a warmup + cosine schedule, clipped gradients.
    peak_lr: float = 5e-4
    warmup_steps: int = 100
    end_lr: float = 1e-5
    weight_decay: float = 0.01
    clip_norm: float = 1.0

    @classmethod
    def for_preset(cls, preset: str, **fields) -> "TrainConfig":
        """The config of `preset` with its own shape defaults (`preset_defaults`) where `fields`
        do not say otherwise: TrainConfig.for_preset("gpt2_small") trains at d 768, 12 heads,
        vocabulary 50257, sequence length 1024."""
        return cls(preset=preset, **{**preset_defaults(preset), **fields})

    def model(self, vocab: int, eot_id: int | None = None) -> MicroGPT:
        """The model; with document_mask, eot_id (the tokenizer's <|endoftext|>) is needed."""
        if self.document_mask and eot_id is None:
            raise ValueError("document_mask needs the tokenizer's <|endoftext|> id")
        return PRESETS[self.preset](vocab=vocab, model_d=self.model_d, num_heads=self.heads,
                                    kernels=self.kernels,
                                    document_eot=eot_id if self.document_mask else None)


def preset_defaults(preset: str) -> dict:
    """The TrainConfig fields a preset sets when they are not given: gpt2_small (a preset with a
    context of its own, gpt.Preset) its model_d, heads, vocab and seq_len; micro_gpt_1/2/4 none,
    so they train at TrainConfig's d 128, 4 heads, vocabulary 9000, sequence length 128."""
    shape = PRESETS[preset].shape_defaults()
    return {"model_d": shape["model_d"], "heads": shape["num_heads"], "vocab": shape["vocab"],
            "seq_len": shape["context"]} if shape else {}


def make_optimizer(cfg: TrainConfig):
    """clip + AdamW on warm-up + cosine decay over decay_steps (default max_steps), then end_lr."""
    decay = cfg.decay_steps or cfg.max_steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=min(cfg.warmup_steps, decay),
        decay_steps=max(decay, cfg.warmup_steps + 1), end_value=cfg.end_lr)
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                            optax.adamw(schedule, weight_decay=cfg.weight_decay))
    return optimizer, schedule


def load_run(run_dir: str | Path | None = None, step: int | None = None):
    """(model, params, tokenizer, train config) of a checkpoint; default: the newest run's latest."""
    run_dir = Path(run_dir) if run_dir else checkpoint.newest_run()
    step, meta = checkpoint.restore_meta(run_dir, step)
    cfg = TrainConfig(**meta["config"])
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path(run_dir, meta)))
    model = cfg.model(meta["vocab"], tokenizer.token_to_id(data.EOT))
    optimizer, _ = make_optimizer(cfg)

    def init_state():
        params = model.get_params(jax.random.PRNGKey(0))
        return {"params": params, "opt_state": optimizer.init(params)}

    state = checkpoint.restore_state(run_dir, step, jax.eval_shape(init_state))
    return model, state["params"], tokenizer, cfg
