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
- `triton` hands masked calls to `sdpa` (the kernel knows the causal and window rules only).

Two long-context variants (Tay et al. 2020's survey of efficient Transformers):
- `performer` (kernels/performer.py): FAVOR+ linear attention, a stateful backend: it takes the
  call's `layer` (its random features are per layer) and `cache` (its decoding state is
  S = sum phi(k) v^T, z = sum phi(k) per layer, not keys and values).
- a sliding window (`set_window(W)`, `--attn_window W`, or a model's own per-layer `window`, Mistral's
  and Qwen2's `sliding_window`): query i sees key j iff i - W < j <= i. Our Triton kernel skips the
  key blocks outside the window in its loops; the other backends get a mask, over blocks of W
  queries at a time (so the cost is O(T W), not O(T^2)); the KV cache keeps the last W - 1 positions
  of a windowed layer (a rolling buffer).
Model files call `attention(q, k, v, mask=mask, layer=i, cache=cache)` (DEVELOPERS.md, the contract):
the cache is written here, as each layer's layout requires.
"""
import copy
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Backend:
    """One attention implementation: fn(q, k, v, causal=True, mask=None) -> (B, Hq, T, D);
    usable(device) says whether it runs there; doc is its one-line description (--help).
    window: fn also takes window=W (a sliding window of its own; else `attention` masks for it).
    stateful: fn also takes layer= and cache= and keeps its own decoding state in the cache
    (KVCache.performer_state) instead of keys and values.
    exact: computes softmax attention (to rounding); False for an approximation (performer)."""
    fn: Callable
    doc: str
    usable: Callable = lambda device: True
    window: bool = False
    stateful: bool = False
    exact: bool = True


BACKENDS = {}  # name -> Backend, in registration order
_backend = "auto"
_window = 0  # set_window: the sliding window of every layer that has none of its own (0: off)


def register(name, fn, doc, usable=None, window=False, stateful=False, exact=True):
    """Add an attention backend under `name` (then `--attn name` works everywhere)."""
    BACKENDS[name] = Backend(fn, doc, usable or (lambda device: True), window, stateful, exact)
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


def set_window(window):
    """Sliding-window attention of width `window` for every layer without a window of its own
    (`--attn_window`; 0: off): query i sees key j iff i - window < j <= i. ValueError if negative."""
    global _window
    if window < 0:
        raise ValueError(f"the attention window must be 0 (off) or more, not {window}")
    _window = window


def get_window():
    """The window that set_window chose (0: off)."""
    return _window


def configure(attn="auto", window=0, performer_features=0, performer_redraw=0):
    """Every attention choice of the command line at once (runtime.add_device_flags' --attn,
    --attn_window, --performer_features, --performer_redraw). ValueError for a bad combination."""
    from omnitron.kernels import performer
    if window and attn == "performer":
        raise ValueError("--attn_window and --attn performer do not combine (a window of linear attention "
                         "is not implemented)")
    set_backend(attn)
    set_window(window)
    performer.configure(performer_features, performer_redraw)


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


def causal_mask(T, S, device, window=0):
    """Boolean (T, S) mask, True where query i may attend key j (bottom-right aligned); with a
    window W > 0 only the last W of those: i + S - T - W < j <= i + S - T."""
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
    return mask.triu(diagonal=S - T - window + 1) if window else mask


def window_attention(fn, q, k, v, window):
    """Causal sliding-window attention through a backend that takes a mask (fn): queries in blocks
    of `window`, each against its own block of keys and the block before (all that its window can
    reach), under causal_mask's window rule: O(T * window) time and memory, not O(T^2). The blocks
    are torch.split views and torch.cat copies, whose backward is O(T) (a slice's backward would
    write a zero-filled full-size gradient per block: O(T^2 / window))."""
    T, S = q.shape[2], k.shape[2]
    if T <= 2 * window:
        return fn(q, k, v, True, causal_mask(T, S, q.device, window))
    q_blocks = q.split(window, dim=2)
    prefix = S - T  # keys before the first query (bottom-right alignment)
    k_blocks = k.split([prefix] * bool(prefix) + [b.shape[2] for b in q_blocks], dim=2)
    v_blocks = v.split([prefix] * bool(prefix) + [b.shape[2] for b in q_blocks], dim=2)
    k_prev = v_prev = None
    if prefix:
        (k_prev, *k_blocks), (v_prev, *v_blocks) = k_blocks, v_blocks
        k_prev, v_prev = k_prev[:, :, -window:], v_prev[:, :, -window:]
    outs = []
    for qb, kb, vb in zip(q_blocks, k_blocks, v_blocks):
        kk = kb if k_prev is None else torch.cat([k_prev, kb], dim=2)
        vv = vb if v_prev is None else torch.cat([v_prev, vb], dim=2)
        outs.append(fn(qb, kk, vv, True, causal_mask(qb.shape[2], kk.shape[2], q.device, window)))
        k_prev, v_prev = kb, vb
    return torch.cat(outs, dim=2)


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


def triton_attention(q, k, v, causal=True, mask=None, window=0):
    """Our FlashAttention-2 kernel (kernels/flash_attention.py), a sliding window included; masked
    calls go to sdpa."""
    if mask is not None:  # the kernel knows the causal and window rules only; masked calls are decoding steps
        return sdpa_attention(q, k, v, causal, mask)
    from omnitron.kernels.flash_attention import flash_attention  # imports triton: only when used
    return flash_attention(q, k, v, causal=causal, window=window)


def performer_attention(q, k, v, causal=True, mask=None, layer=0, cache=None):
    """FAVOR+ (kernels/performer.py; imported when used)."""
    from omnitron.kernels import performer
    return performer.performer_attention(q, k, v, causal, mask, layer, cache)


def _on_cuda(device):
    return torch.device(device).type == "cuda"


register("naive", naive_attention, "explicit softmax, materialises the T x S scores: the reference")
register("sdpa", sdpa_attention, "torch's scaled_dot_product_attention (fused kernels where torch has them)")
register("sdpa_flash", _sdpa_preferring("FLASH_ATTENTION"), "sdpa, torch's FlashAttention-2 kernel first (CUDA)")
register("sdpa_cudnn", _sdpa_preferring("CUDNN_ATTENTION"), "sdpa, cuDNN's fused attention first (CUDA)")
register("triton", triton_attention, "our FlashAttention-2 in Triton: CUDA, or the CPU under TRITON_INTERPRET=1",
         usable=triton_usable, window=True)
register("performer", performer_attention, "FAVOR+ linear attention (Performer; --performer_features, "
         "--performer_redraw): O(T) time and memory", stateful=True, exact=False)


def attention(q, k, v, causal=True, mask=None, backend=None, *, layer=0, cache=None, window=None):
    """Attention with the chosen backend (see the module docstring for shapes and masking).
    layer: the calling layer's index (Performer's features and state, the cache's layer); cache: the
    model's KVCache or None: with one, k and v are the new tokens' (written into the cache here) and
    mask is cache.mask(T) (windowed and Performer layers use their own); window: this layer's
    sliding window (None: set_window's; 0: none). ValueError for a cache of another layout."""
    name = backend or get_backend(q.device)
    impl = BACKENDS[name]
    window = _window if window is None else window
    if window and not causal:
        raise ValueError("a sliding window is causal: attention(causal=False) cannot take one")
    if cache is not None:
        cache.check_layout(layer, "performer" if impl.stateful else window)
    if impl.stateful:
        if window:
            raise ValueError("the performer backend has no sliding window")
        return impl.fn(q, k, v, causal, mask, layer=layer, cache=cache)
    if cache is not None and window:
        k, v, mask = cache.update_window(layer, k, v)
    elif cache is not None:
        k, v = cache.update(layer, k, v)
    elif window:
        if mask is not None:
            raise ValueError("a sliding window with an explicit mask: put the window into the mask (causal_mask)")
        return impl.fn(q, k, v, causal, window=window) if impl.window else window_attention(impl.fn, q, k, v, window)
    if mask is not None and q.shape[2] == 1 and backend is None and torch.compiler.is_compiling():
        return naive_attention(q, k, v, causal, mask)  # a compiled decoding step: see naive_attention
    return impl.fn(q, k, v, causal, mask)


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
    once and the position is data, not a constant baked into the graph (gpt-fast's layout).

    Layouts per layer (`layout`, fixed when the cache is made, checked at every attention call):
    "full" as above; a window W (windows[layer], default set_window's): a rolling buffer of the
    last W - 1 keys and values, the only ones a window of W can reach again; "performer" (when the
    backend is performer): FAVOR+'s running state (performer_state), O(1) per layer. The last two
    are dynamic only (static=False) and cannot rewind (speculative decoding)."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, dtype, device, pad=None, static=False,
                 windows=None):
        if BACKENDS[get_backend(device)].stateful:
            self.layout = ["performer"] * n_layer
        else:
            windows = [_window if w is None else w for w in (windows or [None] * n_layer)]
            self.layout = [w or "full" for w in windows]
        if static and self.layout != ["full"] * n_layer:
            raise ValueError("a static (compiled) KV cache takes full attention only, not --attn performer or "
                             "a sliding window")
        shapes = [(batch_size, n_kv_head, 0 if w != "full" else max_len, head_dim) for w in self.layout]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.state = [None] * n_layer  # performer layers: (S, z, c), see kernels/performer.py
        self.max_len, self.static = max_len, static
        self.pos = torch.zeros((), dtype=torch.long, device=device) if static else 0
        self.pad = None if pad is None else torch.as_tensor(pad, dtype=torch.long, device=device)
        self.min_pad = 0 if pad is None else int(self.pad.min())

    def check_layout(self, layer, want):
        """ValueError unless layer's layout is what this attention call needs ("performer", a window
        W, or 0 / "full")."""
        if self.layout[layer] != (want or "full"):
            raise ValueError(f"this KV cache holds layer {layer} as {self.layout[layer]!r}, the attention call "
                             f"needs {want or 'full'!r}: make the cache (model.init_cache) under the same "
                             "--attn and --attn_window")

    def end(self, T):
        """The filled length once T more tokens are written (an int); for a static cache, max_len,
        the most it will hold (what the model checks against its position table)."""
        return self.max_len if self.static else self.pos + T

    def positions(self, T, device):
        """Positions (1 or B, T) of the next T tokens."""
        pos = (self.pos + torch.arange(T, device=device))[None]
        return pos if self.pad is None else (pos - self.pad[:, None]).clamp(min=0)

    def _allowed(self, slots, T, device, window=0):
        """(1 or B, 1, T, len(slots)) mask: query i (slot pos+i) sees slot j <= pos+i (and, with a
        window, > pos+i-window) that is not padding (a padding query sees itself, so that its row
        stays finite)."""
        query = (self.pos + torch.arange(T, device=device))[:, None]
        allowed = slots <= query  # (T, S)
        if window:
            allowed = allowed & (slots > query - window)
        if self.pad is not None:
            allowed = allowed & ((slots >= self.pad[:, None, None]) | (slots == query))  # (B, T, S)
            return allowed[:, None]
        return allowed[None, None]

    def mask(self, T, device):
        """None where the causal rule is enough, else the (1 or B, 1, T, S) attention mask of the
        full layers (see _allowed)."""
        if self.pad is None and not self.static:
            return None
        return self._allowed(torch.arange(self.end(T), device=device), T, device)

    def update(self, layer, k, v):
        """Write the new keys and values (B, Hkv, T, D); return those to attend to."""
        slots = self.pos + torch.arange(k.shape[2], device=k.device)  # index_copy_: compiled, it writes in place
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        S = self.end(k.shape[2])
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def update_window(self, layer, k, v):
        """A windowed layer: the new keys and values (B, Hkv, T, D) after the rolling buffer's last
        W - 1, and their mask; the buffer then keeps the last W - 1 of them. Returns (k, v, mask)."""
        W, T = self.layout[layer], k.shape[2]
        if self.end(T) > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.end(T)} were asked for")
        k = torch.cat([self.k[layer], k.to(self.k[layer].dtype)], dim=2)
        v = torch.cat([self.v[layer], v.to(self.v[layer].dtype)], dim=2)
        slots = torch.arange(self.pos + T - k.shape[2], self.pos + T, device=k.device)
        mask = self._allowed(slots, T, k.device, W)
        keep = max(0, k.shape[2] - (W - 1))
        self.k[layer], self.v[layer] = k[:, :, keep:].clone(), v[:, :, keep:].clone()
        return k, v, mask

    def key_slots_kept(self, T, device):
        """(B, T) bool, False where the next T slots are left padding; None without padding."""
        if self.pad is None:
            return None
        return (self.pos + torch.arange(T, device=device))[None] >= self.pad[:, None]

    def performer_state(self, layer):
        """A performer layer's running state (S, z, c) (see kernels/performer.py), None before the
        first token."""
        return self.state[layer]

    def set_performer_state(self, layer, state):
        self.state[layer] = state

    def take(self, rows):
        """A new cache holding these rows ((R,) indices) of this one, at the same position."""
        new = copy.copy(self)
        new.k, new.v = [t[rows] for t in self.k], [t[rows] for t in self.v]
        new.state = [None if s is None else tuple(t[rows] for t in s) for s in self.state]
        new.pos = self.pos.clone() if self.static else self.pos
        if self.pad is not None:
            new.pad = self.pad[rows]
            new.min_pad = int(new.pad.min())
        return new

    def advance(self, T):
        if self.static:
            self.pos.add_(T)
        else:
            self.pos += T
