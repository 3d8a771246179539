"""dot_product_attention: jax.nn.dot_product_attention's signature and semantics on the kernels
(api.attention), so a JAX model switches by changing one import.

What the kernels serve: self-attention (query and key of one length), grouped-query heads,
is_causal, local_window_size, query_seq_lengths and key_value_seq_lengths (as segment ids: a
query past its length, and a key past its, take ids that match nothing, so the query outputs 0, as
jax.nn's does). Anything else (a bias, a dense mask, cross-attention) runs jax.nn's own XLA
implementation, with a warning that says why, once per call site.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from kernels.attention.api import attention

PADDED_QUERY, PADDED_KEY = 1, 2   # segment ids of positions past the lengths (valid ones: 0)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale: float | None = None,
                          is_causal: bool = False, query_seq_lengths=None,
                          key_value_seq_lengths=None,
                          local_window_size: int | tuple[int, int] | None = None,
                          implementation: str | None = None):
    """jax.nn.dot_product_attention (return_residual aside) on the attention kernels.

    query [B, T, N, H] (or [T, N, H]), key and value [B, S, K, H] with K dividing N; T = S for
    the kernels. local_window_size: (left, right), or an int w for (w, w) as in jax.nn. One
    difference where jax.nn's result is arbitrary: a query that may attend to no key at all
    (e.g. a key_value_seq_lengths of 0, or a window wholly past it) outputs 0, where jax.nn
    averages every value. implementation: api.attention's (None picks by backend).
    -> [B, T, N, H] (or [T, N, H]) in query's dtype.
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    unbatched = query.ndim == 3
    if unbatched:
        query, key, value = (x[None] for x in (query, key, value))
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    fallback = _unserved(query, key, bias, mask)
    if fallback:
        warnings.warn(f"kernels.dot_product_attention: {fallback}, which the kernels do not "
                      f"serve; running jax.nn.dot_product_attention's XLA implementation",
                      stacklevel=2)
        out = jax.nn.dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size)
    else:
        segment_ids = kv_segment_ids = None
        if query_seq_lengths is not None or key_value_seq_lengths is not None:
            segment_ids = _past_length(query, query_seq_lengths, PADDED_QUERY)
            kv_segment_ids = _past_length(key, key_value_seq_lengths, PADDED_KEY)
        out = attention(query, key, value, causal=is_causal, sm_scale=scale,
                        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                        local_window_size=local_window_size, implementation=implementation)
    return out[0] if unbatched else out


def _unserved(query, key, bias, mask) -> str | None:
    """Why the kernels cannot run this call, or None."""
    if bias is not None:
        return "a bias was given"
    if mask is not None:
        return "a dense mask was given"
    if query.shape[1] != key.shape[1]:
        return f"the query's length {query.shape[1]} differs from the key's {key.shape[1]}"
    return None


def _past_length(x, lengths, padded_id: int):
    """Segment ids [B, S]: 0 before each row's length, padded_id from it on (all 0 without)."""
    positions = jnp.arange(x.shape[1])[None, :]
    if lengths is None:
        return jnp.zeros((x.shape[0], x.shape[1]), jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (x.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"dot_product_attention: sequence lengths must be integers of shape "
                         f"[batch] = ({x.shape[0]},); got {lengths.dtype} {lengths.shape}")
    return jnp.where(positions < lengths[:, None], 0, padded_id).astype(jnp.int32)
