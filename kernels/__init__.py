"""Attention, one entry point for every model: `attention(q, k, v, causal)`.

Shapes: q (B, Hq, T, D); k, v (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query attention:
query head h reads key/value head h // (Hq // Hkv)). Returns (B, Hq, T, D).
Causal masking is aligned at the bottom right: query i (of T) sees key j (of S) iff
j <= i + S - T. With T == S that is the usual lower triangle; with a KV cache (T new queries
after S - T cached positions) each new query sees everything before it.

Backends (pick one with `set_backend`, or per call):
  naive   the explicit-softmax reference: materialises the T x S score matrix
  sdpa    torch.nn.functional.scaled_dot_product_attention (fused kernels where torch has them)
  triton  our FlashAttention-2 kernel (kernels/flash_attention.py): CUDA, or the CPU under
          the Triton interpreter (TRITON_INTERPRET=1, slow: for tests)
  auto    triton on CUDA, sdpa elsewhere (the default)
"""
import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("naive", "sdpa", "triton")
_backend = "auto"


def triton_usable():
    """Triton runs on a CUDA GPU, or on the CPU under its interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def set_backend(name):
    """Choose the attention implementation used by every model (`--attn` on the command line)."""
    global _backend
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS + ('auto',))}")
    if name == "triton" and not triton_usable():
        raise ValueError("the triton attention backend needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU, for tests)")
    _backend = name


def get_backend(device=None):
    """The backend in use; `auto` resolves by device (default: the first CUDA device if any)."""
    if _backend != "auto":
        return _backend
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return "triton" if on_cuda and triton_usable() else "sdpa"


def causal_mask(T, S, device):
    """Boolean (T, S) mask, True where query i may attend key j (bottom-right aligned)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def naive_attention(q, k, v, causal=True):
    """softmax(q k^T / sqrt(D)) v, written out; the softmax is taken in fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


def sdpa_attention(q, k, v, causal=True):
    T, S = q.shape[2], k.shape[2]
    mask = None
    if causal and T != S and T > 1:  # torch's is_causal is top-left aligned: pass the mask
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T == S,
                                          enable_gqa=q.shape[1] != k.shape[1])


def triton_attention(q, k, v, causal=True):
    from kernels.flash_attention import flash_attention  # imports triton: only when used
    return flash_attention(q, k, v, causal=causal)


_IMPLEMENTATIONS = {"naive": naive_attention, "sdpa": sdpa_attention, "triton": triton_attention}


def attention(q, k, v, causal=True, backend=None):
    return _IMPLEMENTATIONS[backend or get_backend(q.device)](q, k, v, causal)
