"""PyTorch's kernels as optional peers of the benchmarks, timed as bench/common.py times JAX's.

PyTorch is no dependency of the project: it is imported here lazily, where a peer row is asked
for, and a missing package (or no CUDA device) makes that row an error that says so. The JAX
benchmarks leave the GPU's memory unclaimed (bench/common.py turns JAX's preallocation off), so
PyTorch's allocator finds room beside them in one process.

    attention: torch.nn.functional.scaled_dot_product_attention under sdpa_kernel(CUDNN_ATTENTION)
               ("torch_cudnn") or sdpa_kernel(FLASH_ATTENTION) ("torch_flash", FlashAttention-2),
               on [B, H, S, D] views of [B, S, H, D] tensors, as our layout.
"""
from __future__ import annotations

import statistics
import time

ATTENTION = {"torch_cudnn": "CUDNN_ATTENTION", "torch_flash": "FLASH_ATTENTION"}


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (its package is not installed, or there is no CUDA device)."""


def _torch():
    try:
        import torch
    except ImportError:
        raise PeerUnavailable("not installed: PyTorch (an optional peer, not a dependency)") from None
    if not torch.cuda.is_available():
        raise PeerUnavailable("PyTorch sees no CUDA device")
    return torch


def time_ms(fn, warmup: int = 2, repeats: int = 5, calls: int = 20) -> float:
    """Median milliseconds of one call of fn(), as bench/common.time_ms: warm-ups, then repeats of
    `calls` back-to-back calls, synchronized at the end of each repeat."""
    torch = _torch()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(per_call)


def attention(impl: str, shape: tuple[int, int, int, int], causal: bool, dtype: str,
              timing: dict, kv_heads: int | None = None) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of SDPA with the backend of `impl` on random q of
    [B, S, H, D] `shape` and k, v of kv_heads heads (None: H; fewer: SDPA's enable_gqa);
    forward+backward is the gradient of sum(o * cotangent) in q, k, v."""
    torch = _torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device="cuda").manual_seed(0)
    b, s, h, d = shape
    kv_shape = (b, s, kv_heads or h, d)
    q, k, v, cotangent = (torch.randn(x, generator=generator, device="cuda", dtype=torch_dtype)
                          .transpose(1, 2) for x in (shape, kv_shape, kv_shape, shape))  # [B, H, S, D]
    for x in (q, k, v):
        x.requires_grad_(True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    grouped = {"enable_gqa": True} if kv_shape[2] != h else {}
    with sdpa_kernel(getattr(SDPBackend, ATTENTION[impl])):
        forward = lambda: sdpa(q, k, v, is_causal=causal, **grouped)
        backward = lambda: torch.autograd.grad(forward(), (q, k, v), cotangent)
        with torch.no_grad():
            fwd_ms = time_ms(forward, **timing)
        return fwd_ms, time_ms(backward, **timing)


LOSS_HEAD = ("torch_compile", "liger", "cce")


def _loss_head_fn(impl: str):
    """impl -> loss(h [T, d], embed [V, d], targets [T]): the mean cross-entropy of h E^T."""
    torch = _torch()
    if impl == "torch_compile":
        def loss(h, embed, targets):
            logits = (h @ embed.to(h.dtype).T).float()
            return torch.nn.functional.cross_entropy(logits, targets)
        return torch.compile(loss)
    if impl == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            raise PeerUnavailable("not installed: liger-kernel (bench/fetch_wheels.sh)") from None
        fused = LigerFusedLinearCrossEntropyLoss()
        return lambda h, embed, targets: fused(embed.to(h.dtype), h, targets)
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        raise PeerUnavailable("not installed: cut-cross-entropy (bench/fetch_wheels.sh)") from None
    return lambda h, embed, targets: linear_cross_entropy(h, embed.to(h.dtype), targets)


def loss_head(impl: str, tokens: int, vocab: int, d: int, timing: dict) -> tuple[float, float, int]:
    """(forward ms, forward+backward ms, peak bytes of one forward+backward, inputs included) of a
    PyTorch loss head on h [T, d] bf16, E [V, d] f32 at the model's scale and random targets, as
    bench/loss_head.py's JAX rows; the gradient is taken in h and E."""
    torch = _torch()
    generator = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn((tokens, d), generator=generator, device="cuda", dtype=torch.bfloat16)
    embed = 0.02 * torch.randn((vocab, d), generator=generator, device="cuda")
    targets = torch.randint(0, vocab, (tokens,), generator=generator, device="cuda")
    h.requires_grad_(True)
    embed.requires_grad_(True)
    loss = _loss_head_fn(impl)
    with torch.no_grad():
        fwd_ms = time_ms(lambda: loss(h, embed, targets), **timing)
    backward = lambda: torch.autograd.grad(loss(h, embed, targets), (h, embed))
    fwd_bwd_ms = time_ms(backward, **timing)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    backward()
    torch.cuda.synchronize()
    return fwd_ms, fwd_bwd_ms, torch.cuda.max_memory_allocated()
