"""The GPT, written from its equations in pure jax.numpy.

Notation (used in every docstring below):
  B batch, S sequence length, d model width, H heads, Dh = d / H head width,
  V vocabulary size, L number of blocks, F = 4d hidden width of the FFN.

    x_0      = E[ids] * sqrt(d) + P                      (token embedding, sinusoidal positions)
    for l in 1..L (pre-LN block):
      a      = x + Attn(LN_1(x)) Wo                      (causal multi-head self-attention)
      x      = a + gelu(LN_2(a) W_fc + b_fc) W_proj + b_proj
    logits   = LN_f(x_L) E^T                             (logits tied to the embedding table)

Mixed precision: parameters are kept in float32; matmuls take bfloat16 inputs and accumulate in
float32; LayerNorm statistics, softmax statistics and the loss are float32.

Each block calls attention and LayerNorm+FFN, and the loss calls its head, through `ops`
(`KernelOps`, by default this file's math), so that the hand-written kernels in `kernels/`
replace the math here without touching anything else: microgpt/gpt.py holds the switch
(`kernel_ops("reference" | "pallas" | "xla")`) and the presets.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = dict  # a pytree of float32 arrays; see `init_params` for its structure.

COMPUTE_DTYPE = jnp.bfloat16
LN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# The equations, one function each.
# ----------------------------------------------------------------------------------------------

def sinusoidal_positions(seq_len: int, d: int, start: int | jax.Array = 0) -> jax.Array:
    """P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(t / 10000^(2i/d)) for t = start .. start+S-1.

    -> [S, d] float32.  `start` may be traced (KV-cache decoding continues from a position).
    """
    t = (start + jnp.arange(seq_len)).astype(jnp.float32)[:, None]
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = t * inv_freq[None, :]                                   # [S, d/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(seq_len, d)


def embed(ids: jax.Array, table: jax.Array, start: int | jax.Array = 0) -> jax.Array:
    """x_0 = E[ids] * sqrt(d) + P[start : start + S].  ids [B, S] int -> [B, S, d] bfloat16."""
    d = table.shape[-1]
    x = table[ids] * math.sqrt(d) + sinusoidal_positions(ids.shape[-1], d, start)
    return x.astype(COMPUTE_DTYPE)


def layernorm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
              eps: float = LN_EPS) -> jax.Array:
    """LN(x) = (x - mean) / sqrt(var + eps) * scale + bias over the last axis, statistics in float32.

    x [..., d]; scale, bias [d] or None (no affine).  -> [..., d] in x's dtype.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """gelu(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), elementwise."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


@jax.custom_vjp
def matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """a @ w with bfloat16 inputs and float32 accumulation.  a [..., m], w [m, n] -> [..., n] float32.

    The backward keeps the same rule: with g = dL/d(a @ w) rounded to bfloat16,
        da = g w^T,   dw = sum over the leading axes of a^T g,
    bfloat16 products accumulated in float32 (autodiff would multiply the float32 g by an upcast
    operand: float32 matmuls, which GPUs run at half the bfloat16 rate or less).
    """
    return jnp.matmul(a.astype(COMPUTE_DTYPE), w.astype(COMPUTE_DTYPE),
                      preferred_element_type=jnp.float32)


def _matmul_forward(a, w):
    return matmul(a, w), (a, w)


def _matmul_backward(residuals, g):
    a, w = residuals
    a_c, w_c, g_c = (x.astype(COMPUTE_DTYPE) for x in (a, w, g))
    da = jnp.matmul(g_c, w_c.T, preferred_element_type=jnp.float32)
    dw = jnp.matmul(a_c.reshape(-1, a.shape[-1]).T, g_c.reshape(-1, g.shape[-1]),
                    preferred_element_type=jnp.float32)
    return da.astype(a.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     sm_scale: float) -> jax.Array:
    """softmax(q k^T * sm_scale, masked) v, per head, softmax statistics in float32.

    q [B, Sq, H, Dh], k, v [B, Sk, H, Dh]; mask broadcastable to [B, H, Sq, Sk] (True = attend)
    or None. A row that may attend to no key outputs 0. -> [B, Sq, H, Dh] in q's dtype.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # Subtract the max, so exp never overflows (0 for a row wholly masked: its exps are all 0).
    p = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def attention_mask(seq_len: int, *, causal: bool, local_window_size: tuple[int, int] | None = None,
                   segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None) -> jax.Array | None:
    """Which keys j each query i may attend to -> bool [B or 1, 1, S, S], or None for all.

    causal: j <= i.  local_window_size (left, right): i - left <= j <= i + right.
    segment_ids [B, S] int (packed documents): segment_ids[i] == kv_segment_ids[j], where
    kv_segment_ids defaults to segment_ids. Every condition given must hold.
    """
    i = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    masks = []
    if causal:
        masks.append(j <= i)
    if local_window_size is not None:
        left, right = local_window_size
        masks.append((i - left <= j) & (j <= i + right))
    masks = [m[None, None] for m in masks]
    if segment_ids is not None:
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        masks.append((segment_ids[:, :, None] == kv_ids[:, None, :])[:, None])
    return functools.reduce(jnp.logical_and, masks) if masks else None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              sm_scale: float | None = None, segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              local_window_size: tuple[int, int] | None = None) -> jax.Array:
    """Multi-head attention, the math every kernel is checked against.

    q [B, S, Hq, Dh], k, v [B, S, Hkv, Dh] (the layout of jax.nn.dot_product_attention), Hkv
    dividing Hq: query head h reads key/value head h // (Hq / Hkv) (grouped-query attention;
    multi-query when Hkv = 1). Which keys a query sees: `attention_mask`. sm_scale defaults to
    1/sqrt(Dh).  -> [B, S, Hq, Dh] in q's dtype.
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    mask = attention_mask(q.shape[1], causal=causal, local_window_size=local_window_size,
                          segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    return masked_attention(q, k, v, mask, sm_scale)


def layernorm_ffn(x: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array, w_fc: jax.Array,
                  b_fc: jax.Array, w_proj: jax.Array, b_proj: jax.Array, *, eps: float = LN_EPS,
                  residual: bool = False) -> jax.Array:
    """[x +] gelu(LN(x) W_fc + b_fc) W_proj + b_proj, the math every LN+FFN kernel is checked against.

    x [..., d]; ln_scale, ln_bias [d]; w_fc [d, F]; b_fc [F]; w_proj [F, d]; b_proj [d].
    LN statistics in float32, bfloat16 matmul inputs, float32 accumulation.  -> [..., d] in x's dtype.
    """
    h = layernorm(x, ln_scale, ln_bias, eps)
    hidden = gelu_tanh(matmul(h, w_fc) + b_fc.astype(jnp.float32))   # [..., F] float32
    out = matmul(hidden, w_proj) + b_proj.astype(jnp.float32)
    if residual:
        out = out + x.astype(jnp.float32)
    return out.astype(x.dtype)


def logsumexp(x: jax.Array) -> jax.Array:
    """log sum exp(x) over the last axis, in one pass.  x [..., V] float32 -> [...].

    A running pair (m, s) = (max so far, sum of exp(x - m)) merges as m = max(m1, m2),
    s = s1 exp(m1 - m) + s2 exp(m2 - m); jax.nn.logsumexp reads x twice, for the max and then
    for the sum, and at [B S, V] every read of the float32 logits is a pass over gigabytes.
    """
    def merge(a, b):
        (m1, s1), (m2, s2) = a, b
        m = jnp.maximum(m1, m2)
        rescale = lambda mi: jnp.exp(jnp.where(mi == m, 0.0, mi - m))  # -inf - -inf is nan
        return m, s1 * rescale(m1) + s2 * rescale(m2)
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (-jnp.inf, 0.0), merge, (x.ndim - 1,))
    return m + jnp.log(s)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over tokens of -log softmax(logits)[target], in float32.  logits [B, S, V], targets [B, S]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(logsumexp(logits) - target_logit)


def tied_logits_loss(h: jax.Array, embed: jax.Array, targets: jax.Array,
                     ignore_index: int | None = None) -> jax.Array:
    """cross_entropy(h E^T, targets): the loss of the tied logits.  h = LN_f(x_L) [B, S, d],
    embed E [V, d], targets [B, S] -> scalar float32.

    Targets equal to ignore_index add nothing; the mean is over the N others (optax's and
    PyTorch's convention), and is 0 when there are none.  With g = dL/dloss the gradient is
    written out:
        dlogits = g (softmax(logits) - onehot(target)) / N      0 on ignored rows; bf16 once
        dh = dlogits E,   dE = dlogits^T h                      (`matmul`'s rule)
    one fused pass over the float32 [B, S, V] logits that writes bfloat16; autodiff through
    cross_entropy and matmul wrote dlogits in float32 and read it again to round it.
    """
    return _tied_logits_loss(ignore_index, h, embed, targets)


def target_weights(targets: jax.Array, ignore_index: int | None) -> tuple[jax.Array, jax.Array]:
    """(targets with ignored ones replaced by 0, weights 1/N on the N counted tokens, 0 on ignored
    ones): the loss is sum_t weight_t (log Z_t - logit_t,target)."""
    counted = (jnp.ones(targets.shape, bool) if ignore_index is None
               else targets != ignore_index)
    weights = counted / jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)
    return jnp.where(counted, targets, 0), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tied_logits_loss(ignore_index, h, embed, targets):
    return _tied_logits_loss_forward(ignore_index, h, embed, targets)[0]


def _tied_logits_loss_forward(ignore_index, h, embed, targets):
    logits = matmul(h, embed.T).astype(jnp.float32)
    targets, weights = target_weights(targets, ignore_index)
    log_z = logsumexp(logits)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(weights * (log_z - target_logit))
    return loss, (h, embed, targets, weights, logits, log_z)


def _tied_logits_loss_backward(ignore_index, residuals, g):
    h, embed, targets, weights, logits, log_z = residuals
    softmax = jnp.exp(logits - log_z[..., None])
    onehot = targets[..., None] == jnp.arange(logits.shape[-1])
    dlogits = ((softmax - onehot) * (g * weights)[..., None]).astype(COMPUTE_DTYPE)
    dh, dembed_t = _matmul_backward((h, embed.T), dlogits)
    return dh, dembed_t.T, None


_tied_logits_loss.defvjp(_tied_logits_loss_forward, _tied_logits_loss_backward)


# ----------------------------------------------------------------------------------------------
# The fused ops a block and the loss call (microgpt/gpt.py's kernel_ops swaps them).
# ----------------------------------------------------------------------------------------------

class KernelOps(NamedTuple):
    """The fused ops: a block's attention(q, k, v) and layernorm_ffn(x, ..., residual=True), and
    the loss head logits_loss(h, embed, targets)."""
    attention: Callable[..., jax.Array]
    layernorm_ffn: Callable[..., jax.Array]
    logits_loss: Callable[..., jax.Array]


REFERENCE_OPS = KernelOps(attention, layernorm_ffn, tied_logits_loss)


# ----------------------------------------------------------------------------------------------
# Parameters and the forward pass.
# ----------------------------------------------------------------------------------------------

def init_params(rng: jax.Array, vocab: int, model_d: int, num_layers: int) -> Params:
    """Random float32 parameters (GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2L)).

    {'embed': [V, d],
     'blocks': [{'ln1': {'scale', 'bias'} [d], 'attn': {'wq', 'wk', 'wv', 'wo'} [d, d],
                 'ln2': {'scale', 'bias'} [d],
                 'ffn': {'w_fc' [d, F], 'b_fc' [F], 'w_proj' [F, d], 'b_proj' [d]}}] * L}
    The final LayerNorm has no parameters of its own (see README: parameter count).
    """
    keys = jax.random.split(rng, 1 + num_layers)
    # Every block's weights drawn at once: the values of one init_block call per key, in a fifth
    # of the compiled kernels at gpt2_small (162 against 777 fusions), which a GPU compiles apart.
    blocks = jax.vmap(lambda key: init_block(key, model_d, num_layers))(keys[1:])
    return {"embed": 0.02 * jax.random.normal(keys[0], (vocab, model_d), jnp.float32),
            "blocks": [jax.tree_util.tree_map(lambda x: x[i], blocks) for i in range(num_layers)]}


def init_block(key: jax.Array, model_d: int, num_layers: int) -> Params:
    """One block's parameters (init_params' 'blocks' entry): weights N(0, 0.02), the residual
    projections wo and w_proj N(0, 0.02 / sqrt(2L)), LayerNorms 1 and 0, biases 0."""
    d, f = model_d, 4 * model_d
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * num_layers)
    kq, kk, kv, ko, kf, kp = jax.random.split(key, 6)

    def normal(key, shape, s):
        return s * jax.random.normal(key, shape, jnp.float32)

    ln = lambda: {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}
    return {
        "ln1": ln(),
        "attn": {"wq": normal(kq, (d, d), std), "wk": normal(kk, (d, d), std),
                 "wv": normal(kv, (d, d), std), "wo": normal(ko, (d, d), proj_std)},
        "ln2": ln(),
        "ffn": {"w_fc": normal(kf, (d, f), std), "b_fc": jnp.zeros((f,), jnp.float32),
                "w_proj": normal(kp, (f, d), proj_std), "b_proj": jnp.zeros((d,), jnp.float32)},
    }


def attention_projections(block: Params, x: jax.Array, num_heads: int):
    """q, k, v = LN_1(x) Wq, LN_1(x) Wk, LN_1(x) Wv, split into heads.  x [B, S, d] -> 3 x [B, S, H, Dh]."""
    h = layernorm(x, block["ln1"]["scale"], block["ln1"]["bias"])
    b, s, d = x.shape

    def heads(w):
        return matmul(h, w).astype(x.dtype).reshape(b, s, num_heads, d // num_heads)

    return heads(block["attn"]["wq"]), heads(block["attn"]["wk"]), heads(block["attn"]["wv"])


def block_output(block: Params, x: jax.Array, attn: jax.Array, ops: KernelOps) -> jax.Array:
    """a = x + attn Wo;  x' = a + FFN(LN_2(a)).  x [B, S, d], attn [B, S, H, Dh] -> [B, S, d]."""
    a = x + matmul(attn.reshape(x.shape), block["attn"]["wo"]).astype(x.dtype)
    f = block["ffn"]
    return ops.layernorm_ffn(a, block["ln2"]["scale"], block["ln2"]["bias"], f["w_fc"], f["b_fc"],
                             f["w_proj"], f["b_proj"], residual=True)


def transformer_block(block: Params, x: jax.Array, num_heads: int, ops: KernelOps,
                      segment_ids: jax.Array | None = None) -> jax.Array:
    """One pre-LN block.  x [B, S, d] -> [B, S, d]; segment_ids [B, S] (documents) or None."""
    with jax.named_scope("attention"):
        q, k, v = attention_projections(block, x, num_heads)
        attn = ops.attention(q, k, v, causal=True, segment_ids=segment_ids)
    with jax.named_scope("layernorm_ffn"):
        return block_output(block, x, attn, ops)


def tied_logits(params: Params, x: jax.Array) -> jax.Array:
    """logits = LN_f(x) E^T.  x [B, S, d] -> [B, S, V] float32."""
    return matmul(layernorm(x, None, None), params["embed"].T)


def document_ids(ids: jax.Array, eot_id: int) -> jax.Array:
    """Segment ids of packed documents: each <|endoftext|> (eot_id) starts a new one, as it
    starts generation's prompt.  ids [B, S] int -> [B, S] int32."""
    return jnp.cumsum(ids == eot_id, axis=1, dtype=jnp.int32)


def hidden(params: Params, ids: jax.Array, num_heads: int, ops: KernelOps = REFERENCE_OPS,
           segment_ids: jax.Array | None = None, gather=None) -> jax.Array:
    """The embedding and the blocks.  ids [B, S] int -> x_L [B, S, d] float32; with segment_ids
    (document_ids) no token attends across documents. gather(block) -> the block's whole
    parameters, just before it runs: the sharded trainer's all-gather (microgpt/sharding.py);
    None when they are whole already."""
    with jax.named_scope("embedding"):
        x = embed(ids, params["embed"])
    for block in params["blocks"]:
        x = transformer_block(gather(block) if gather else block, x, num_heads, ops, segment_ids)
    return x


def forward(params: Params, ids: jax.Array, num_heads: int, ops: KernelOps = REFERENCE_OPS,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """The whole GPT.  ids [B, S] int -> logits [B, S, V] float32."""
    x = hidden(params, ids, num_heads, ops, segment_ids)
    with jax.named_scope("logits"):
        return tied_logits(params, x)


def loss_fn(params: Params, ids: jax.Array, targets: jax.Array, num_heads: int,
            ops: KernelOps = REFERENCE_OPS, segment_ids: jax.Array | None = None,
            gather=None) -> jax.Array:
    """Mean next-token cross-entropy of forward's logits.  ids, targets [B, S] -> scalar float32.
    gather: as in `hidden` (the embedding, used at both ends, is gathered once)."""
    if gather:
        params = {**params, "embed": gather(params["embed"])}
    x = hidden(params, ids, num_heads, ops, segment_ids, gather)
    with jax.named_scope("logits"):
        h = layernorm(x, None, None)
    with jax.named_scope("loss"):   # the logits' matmul, fused with the loss's gradient
        return ops.logits_loss(h, params["embed"], targets)


def count_params(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def flops_per_token(num_layers: int, model_d: int, seq_len: int, vocab: int) -> int:
    """Training FLOPs per token, PaLM appendix B: 6N (matmul weights incl. the tied logits) + 12 L S d.

    N counts the parameters that take part in matmuls: 12 d^2 per block plus the V x d logits.
    The attention term 12 L S d is forward + backward of q k^T and p v (causal masking not subtracted).
    """
    n_matmul = num_layers * 12 * model_d ** 2 + vocab * model_d
    return 6 * n_matmul + 12 * num_layers * seq_len * model_d
