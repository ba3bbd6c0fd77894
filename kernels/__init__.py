"""Attention, one entry point for every model: `attention(q, k, v, causal, mask)`, and the KV
cache every model decodes with (`KVCache`).

Shapes: q (B, Hq, T, D); k, v (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query attention:
query head h reads key/value head h // (Hq // Hkv)). Returns (B, Hq, T, D).
Causal masking is aligned at the bottom right: query i (of T) sees key j (of S) iff
j <= i + S - T. With T == S that is the usual lower triangle; with a KV cache (T new queries
after S - T cached positions) each new query sees everything before it. An explicit boolean
`mask` (broadcastable to (B, Hq, T, S), True where a query may attend) replaces that rule: the
KV cache builds one for left-padded batches and for its fixed-shape (compiled) layout.

Backends: one registry, `BACKENDS` (name -> Backend), read by train.py, sample.py and bench.py
(`--attn`, through `names()`) and by the tests; a new backend is one `register(...)` call below.
Pick one with `set_backend` (every model), or per call. `auto` (the default) resolves by device:
on CUDA through `AUTO_ON_CUDA`, a table of measured speeds per GPU class; elsewhere `sdpa`.

Silent switches, on purpose (both are decoding steps, the only calls that carry a mask):
- a masked one-token step inside torch.compile goes to `naive`, whatever the backend
  (`attention` below: inductor fuses it with the cache write);
- `triton` hands masked calls to `sdpa` (the kernel knows the causal rule only).
"""
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Backend:
    """One attention implementation: fn(q, k, v, causal=True, mask=None) -> (B, Hq, T, D);
    usable(device) says whether it runs there; doc is its one-line description (--help)."""
    fn: Callable
    doc: str
    usable: Callable = lambda device: True


BACKENDS = {}  # name -> Backend, in registration order
_backend = "auto"


def register(name, fn, doc, usable=None):
    """Add an attention backend under `name` (then `--attn name` works everywhere)."""
    BACKENDS[name] = Backend(fn, doc, usable or (lambda device: True))
    return fn


def names():
    """Every backend name, and `auto`: the choices of `--attn`."""
    return list(BACKENDS) + ["auto"]


def triton_usable(device=None):
    """Triton runs on a CUDA GPU, or on the CPU under its interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def set_backend(name):
    """Choose the attention implementation used by every model (`--attn` on the command line).
    Raises ValueError for an unknown name or a backend that cannot run on this machine."""
    global _backend
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(names())}")
    if name == "triton" and not triton_usable():
        raise ValueError("the triton attention backend needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU, for tests)")
    _backend = name


# `auto` on CUDA: the fastest backend measured on each GPU class (compute capability major), with
# the figures it rests on. A class not listed gets `sdpa` (torch's own priority order).
#   sm_90 (Hopper): one NVIDIA H200, torch 2.11 + CUDA 13, triton 3.6, bf16, D = 128, 16k tokens
#   per batch, fwd+bwd TFLOP/s (triton.testing.do_bench medians; README, FlashAttention section):
#       causal T=4096: sdpa_cudnn 444, triton (ours) 325, sdpa_flash (torch's FA2) 258
#       full   T=16k:  sdpa_cudnn 557, triton (ours) 413, sdpa_flash 307
#   so cuDNN first; sdpa_cudnn falls back inside torch (to FA2, then the others) for what cuDNN
#   does not take (fp32, some head dims), so `auto` never fails where sdpa would run.
#   sm_80 (Ampere) and others: not measured here; torch's default order (FA2 first on A100).
AUTO_ON_CUDA = {9: "sdpa_cudnn"}


def get_backend(device=None):
    """The backend in use; `auto` resolves by device (default: the first CUDA device if any)."""
    if _backend != "auto":
        return _backend
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "sdpa"
    major = torch.cuda.get_device_capability(device)[0]
    choice = AUTO_ON_CUDA.get(major, "sdpa")
    return choice if BACKENDS[choice].usable(device) else "sdpa"


def causal_mask(T, S, device):
    """Boolean (T, S) mask, True where query i may attend key j (bottom-right aligned)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def naive_attention(q, k, v, causal=True, mask=None):
    """softmax(q k^T / sqrt(D)) v, written out; the softmax is taken in fp32. The query heads that
    share a key/value head are folded into the query axis, so keys and values are never copied;
    inside a compiled decoding step inductor fuses all of it (with the cache write) into a few
    loops, about twice as fast there as sdpa's kernel."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv  # consecutive query heads read the same key/value head
    scores = (q.reshape(B, Hkv, G * T, D) @ k.transpose(-2, -1)).float().view(B, Hkv, G, T, S)
    scores = scores * (1.0 / math.sqrt(D))
    if mask is None and causal:
        mask = causal_mask(T, S, q.device)
    if mask is not None:  # (T, S) or (1 or B, 1, T, S): broadcast over the group axis too
        scores = scores.masked_fill(~(mask if mask.dim() == 2 else mask[:, :, None]), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, G * T, S)
    return (probs @ v).view(B, Hq, T, D)


def sdpa_attention(q, k, v, causal=True, mask=None):
    """torch.nn.functional.scaled_dot_product_attention, with bottom-right causal alignment."""
    T, S = q.shape[2], k.shape[2]
    if mask is None and causal and T != S and T > 1:  # torch's is_causal is top-left aligned: pass the mask
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal and T == S,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _sdpa_preferring(*preferred):
    """sdpa with torch's backends tried in this priority order first (then the rest, so a shape
    the preferred kernel does not take still runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [getattr(SDPBackend, name) for name in preferred]
    order += [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH) if b not in order]

    def fn(q, k, v, causal=True, mask=None):
        with sdpa_kernel(order, set_priority=True):
            return sdpa_attention(q, k, v, causal, mask)
    return fn


def triton_attention(q, k, v, causal=True, mask=None):
    """Our FlashAttention-2 kernel (kernels/flash_attention.py); masked calls go to sdpa."""
    if mask is not None:  # the kernel knows the causal rule only; masked calls are decoding steps
        return sdpa_attention(q, k, v, causal, mask)
    from kernels.flash_attention import flash_attention  # imports triton: only when used
    return flash_attention(q, k, v, causal=causal)


def _on_cuda(device):
    return torch.device(device).type == "cuda"


register("naive", naive_attention, "explicit softmax, materialises the T x S scores: the reference")
register("sdpa", sdpa_attention, "torch's scaled_dot_product_attention (fused kernels where torch has them)")
register("sdpa_flash", _sdpa_preferring("FLASH_ATTENTION"), "sdpa, torch's FlashAttention-2 kernel first (CUDA)")
register("sdpa_cudnn", _sdpa_preferring("CUDNN_ATTENTION"), "sdpa, cuDNN's fused attention first (CUDA)")
register("triton", triton_attention, "our FlashAttention-2 in Triton: CUDA, or the CPU under TRITON_INTERPRET=1",
         usable=triton_usable)


def attention(q, k, v, causal=True, mask=None, backend=None):
    """Attention with the chosen backend (see the module docstring for shapes and masking)."""
    if mask is not None and q.shape[2] == 1 and backend is None and torch.compiler.is_compiling():
        return naive_attention(q, k, v, causal, mask)  # a compiled decoding step: see naive_attention
    return BACKENDS[backend or get_backend(q.device)].fn(q, k, v, causal, mask)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of every layer, pre-allocated: (B, Hkv, max_len, D) each. The first `pos`
    slots are filled, the same number in every row; each forward writes its T new tokens at
    pos..pos+T-1 and then advances pos (`advance`, called by the model).

    pad (optional, (B,) ints): row b starts with pad[b] padding slots, so that prompts of
    different lengths share a batch (left padding). Padding keys are masked out, and positions
    count from each row's first real token, so every row decodes as it would alone.

    static=False: pos is an int, and a forward attends to the filled slots only (shapes grow).
    static=True: pos is a 0-d tensor on the device and a forward attends to all max_len slots under
    a mask, so every decoding step has the same shapes and the same inputs: compiled, it compiles
    once and the position is data, not a constant baked into the graph (gpt-fast's layout)."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, dtype, device, pad=None, static=False):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len, self.static = max_len, static
        self.pos = torch.zeros((), dtype=torch.long, device=device) if static else 0
        self.pad = None if pad is None else torch.as_tensor(pad, dtype=torch.long, device=device)
        self.min_pad = 0 if pad is None else int(self.pad.min())

    def end(self, T):
        """The filled length once T more tokens are written (an int); for a static cache, max_len,
        the most it will hold (what the model checks against its position table)."""
        return self.max_len if self.static else self.pos + T

    def positions(self, T, device):
        """Positions (1 or B, T) of the next T tokens."""
        pos = (self.pos + torch.arange(T, device=device))[None]
        return pos if self.pad is None else (pos - self.pad[:, None]).clamp(min=0)

    def mask(self, T, device):
        """None where the causal rule is enough, else the (1 or B, 1, T, S) attention mask: query i
        (slot pos+i) sees slot j <= pos+i that is not padding (a padding query sees itself, so that
        its row stays finite)."""
        if self.pad is None and not self.static:
            return None
        slots = torch.arange(self.end(T), device=device)
        query = (self.pos + torch.arange(T, device=device))[:, None]
        allowed = slots <= query  # (T, S)
        if self.pad is not None:
            allowed = allowed & ((slots >= self.pad[:, None, None]) | (slots == query))  # (B, T, S)
            return allowed[:, None]
        return allowed[None, None]

    def update(self, layer, k, v):
        """Write the new keys and values (B, Hkv, T, D); return those to attend to."""
        slots = self.pos + torch.arange(k.shape[2], device=k.device)  # index_copy_: compiled, it writes in place
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        S = self.end(k.shape[2])
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def advance(self, T):
        if self.static:
            self.pos.add_(T)
        else:
            self.pos += T
