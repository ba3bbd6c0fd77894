"""Attention, one entry point for every model: `attention(q, k, v, causal, mask)`, and the KV
cache every model decodes with (`KVCache`).

Shapes: q (B, Hq, T, D); k, v (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query attention:
query head h reads key/value head h // (Hq // Hkv)). Returns (B, Hq, T, D).
Causal masking is aligned at the bottom right: query i (of T) sees key j (of S) iff
j <= i + S - T. With T == S that is the usual lower triangle; with a KV cache (T new queries
after S - T cached positions) each new query sees everything before it. An explicit boolean
`mask` (broadcastable to (B, Hq, T, S), True where a query may attend) replaces that rule: the
KV cache builds one for left-padded batches and for its fixed-shape (compiled) layout.

Backends (pick one with `set_backend`, or per call):
  naive   the explicit-softmax reference: materialises the T x S score matrix
  sdpa    torch.nn.functional.scaled_dot_product_attention (fused kernels where torch has them)
  triton  our FlashAttention-2 kernel (kernels/flash_attention.py): CUDA, or the CPU under
          the Triton interpreter (TRITON_INTERPRET=1, slow: for tests)
  auto    triton on CUDA, sdpa elsewhere (the default)
Calls with a mask (only decoding makes them) go to sdpa when the backend is triton.
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
    T, S = q.shape[2], k.shape[2]
    if mask is None and causal and T != S and T > 1:  # torch's is_causal is top-left aligned: pass the mask
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal and T == S,
                                          enable_gqa=q.shape[1] != k.shape[1])


def triton_attention(q, k, v, causal=True, mask=None):
    if mask is not None:  # the kernel knows the causal rule only; masked calls are decoding steps
        return sdpa_attention(q, k, v, causal, mask)
    from kernels.flash_attention import flash_attention  # imports triton: only when used
    return flash_attention(q, k, v, causal=causal)


_IMPLEMENTATIONS = {"naive": naive_attention, "sdpa": sdpa_attention, "triton": triton_attention}


def attention(q, k, v, causal=True, mask=None, backend=None):
    if mask is not None and q.shape[2] == 1 and backend is None and torch.compiler.is_compiling():
        return naive_attention(q, k, v, causal, mask)  # a compiled decoding step: see naive_attention
    return _IMPLEMENTATIONS[backend or get_backend(q.device)](q, k, v, causal, mask)


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
