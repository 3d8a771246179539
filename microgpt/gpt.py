"""The GPT as users build it: the kernels switch and the original microGPT's API (presets
micro_gpt_1/2/4 with count_params / get_params / run_fn, and gpt2_small), over the equations in
model.py.

    gpt = micro_gpt_4(vocab=9000, model_d=512, kernels="pallas")
    logits = jax.jit(gpt.run_fn)(ids, gpt.get_params())
"""
from __future__ import annotations

import dataclasses

import jax

import kernels as pallas
from microgpt import model
from microgpt.model import KernelOps, Params

KERNELS = ("reference", "pallas", "xla")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                  sm_scale: float | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """The stock path: jax.nn.dot_product_attention, cuDNN on GPUs (asked for by name, so that it
    fails loudly rather than silently falling back to XLA's attention); with segment_ids, which
    it has no argument for, their dense mask on XLA's.  Shapes as model.attention."""
    if segment_ids is not None:
        mask = model.attention_mask(q.shape[1], causal=causal, segment_ids=segment_ids)
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, mask=mask)
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                        implementation=implementation)


def kernel_ops(kernels: str) -> KernelOps:
    """The ops the model runs for `kernels`:

    "reference"  the math of model.py;
    "pallas"     the hand-written kernels of kernels/ (implementation chosen by backend);
    "xla"        the strongest stock path: jax.nn.dot_product_attention (cuDNN on GPU), and
                 model.py's LayerNorm+FFN and loss head fused by XLA.
    """
    if kernels == "reference":
        return model.REFERENCE_OPS
    if kernels == "pallas":
        return KernelOps(pallas.attention, pallas.layernorm_ffn, pallas.logits_loss)
    if kernels == "xla":
        return model.REFERENCE_OPS._replace(attention=xla_attention)
    raise ValueError(f"unknown kernels {kernels!r}; choose one of {KERNELS}")


@dataclasses.dataclass(frozen=True)
class MicroGPT:
    """A GPT's static configuration (hashable) with the original microGPT's methods.

        gpt = micro_gpt_4(vocab=9000, model_d=512)
        params = gpt.get_params()
        logits = jax.jit(gpt.run_fn, static_argnames=['num_heads'])(ids, params, num_heads=8)
    """
    vocab: int = 9000
    model_d: int = 512
    num_layers: int = 4
    num_heads: int = 8
    kernels: str = "reference"
    document_eot: int | None = None   # the <|endoftext|> id: no attention across documents

    def __post_init__(self):
        if self.model_d % self.num_heads:
            raise ValueError(f"model_d={self.model_d} is not divisible by num_heads={self.num_heads}")
        if self.model_d % 2:
            raise ValueError(f"model_d={self.model_d} must be even for sinusoidal positions")
        kernel_ops(self.kernels)  # fail early on an unknown name

    @property
    def ops(self) -> KernelOps:
        return kernel_ops(self.kernels)

    def get_params(self, rng: jax.Array | int = 0) -> Params:
        """Freshly initialised float32 parameters (see model.init_params)."""
        key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
        return model.init_params(key, self.vocab, self.model_d, self.num_layers)

    def count_params(self) -> int:
        """Number of parameters, computed from shapes alone (no arrays are allocated)."""
        return model.count_params(jax.eval_shape(self.get_params))

    def run_fn(self, input_ids: jax.Array, params: Params, num_heads: int | None = None) -> jax.Array:
        """Logits [B, S, V] float32 for input_ids [B, S]."""
        return model.forward(params, input_ids, num_heads or self.num_heads, self.ops,
                             self.segment_ids(input_ids))

    def loss(self, params: Params, input_ids: jax.Array, targets: jax.Array,
             gather=None) -> jax.Array:
        """Mean next-token loss; gather: model.loss_fn's (the sharded trainer's all-gather)."""
        return model.loss_fn(params, input_ids, targets, self.num_heads, self.ops,
                             self.segment_ids(input_ids), gather)

    def segment_ids(self, input_ids: jax.Array) -> jax.Array | None:
        """With document_eot, each document's tokens attend within it only (model.document_ids)."""
        return None if self.document_eot is None else model.document_ids(input_ids,
                                                                           self.document_eot)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named GPT: its depth, and the defaults of its other sizes. Called like the original's
    presets, it builds the MicroGPT: `micro_gpt_4(vocab=9000, model_d=512)`; an argument left out
    takes the preset's default.

    `context`: the sequence length the preset is defined with (gpt2_small: GPT-2's 1024), which
    the command lines then train and measure at; with it, its vocab, model_d and num_heads are
    their defaults too (`shape_defaults`). None for micro_gpt_1/2/4, which the original defined by
    their depth only: the command lines keep their own defaults of width and sequence length."""
    name: str
    num_layers: int
    vocab: int = 9000
    model_d: int = 512
    num_heads: int = 8
    context: int | None = None

    def __call__(self, vocab: int | None = None, model_d: int | None = None,
                 num_heads: int | None = None, kernels: str = "reference",
                 document_eot: int | None = None) -> MicroGPT:
        return MicroGPT(self.vocab if vocab is None else vocab,
                        self.model_d if model_d is None else model_d, self.num_layers,
                        self.num_heads if num_heads is None else num_heads, kernels, document_eot)

    def shape_defaults(self) -> dict[str, int]:
        """{vocab, model_d, num_heads, context} where the preset defines its whole shape (a
        context of its own), else {}: what a command line takes for the flags it is not given."""
        if self.context is None:
            return {}
        return {"vocab": self.vocab, "model_d": self.model_d, "num_heads": self.num_heads,
                "context": self.context}


micro_gpt_1 = Preset("micro_gpt_1", 1)
micro_gpt_2 = Preset("micro_gpt_2", 2)
micro_gpt_4 = Preset("micro_gpt_4", 4)
# GPT-2 small's shape (12 blocks, d 768, 12 heads, context 1024, vocabulary 50257) in this model:
# 123,614,976 parameters (README: parameter count).
gpt2_small = Preset("gpt2_small", 12, vocab=50257, model_d=768, num_heads=12, context=1024)
PRESETS = {p.name: p for p in (micro_gpt_1, micro_gpt_2, micro_gpt_4, gpt2_small)}
