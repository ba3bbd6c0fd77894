"""Performer attention: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

    out = performer_attention(q, k, v, causal=True, mask=None, layer=0, cache=None)

    q: (B, Hq, T, D)    k, v: (B, Hkv, S, D)    Hq % Hkv == 0    out: (B, Hq, T, D)

Softmax attention's kernel exp(q.k / sqrt(D)) is replaced by an inner product of random features,
    exp(q.k / sqrt(D)) = E[phi(q') . phi(k')],   x' = x / D^(1/4),
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)                      (positive random features, eq. 7)
with W (m, D) the random projections: orthogonal rows (blocks of D from QR decompositions of Gaussian
matrices, each Q's columns multiplied by the signs of R's diagonal so that Q is Haar-distributed),
each rescaled to the norm of a D-dimensional Gaussian vector (chi distributed), so that each row is
marginally N(0, I) and the estimator stays unbiased (section 2.4, "orthogonal random features").
Without the sign correction Q depends on the QR routine's sign convention (LAPACK's makes R's
diagonal negative when the column's first entry is positive) and the rows are not N(0, I): the
reference implementations (google-research/performer, performer-pytorch) omit it. Then
    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)      (j <= i when causal)
          = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))
and the two sums are an (m, D) matrix and an (m,) vector: time O(T m D), memory O(T m), never a
T x S matrix. m defaults to the paper's rule m = D ln D (section 4, Theorem 4: m = Theta(D log D)),
rounded to the nearest integer (round(D ln D), at least 1: 44 at D = 16, 111 at D = 32, 266 at
D = 64); performer-pytorch truncates (int(D ln D): 110 at D = 32). The theorem fixes only the order,
so the rounding is a convention: --performer_features M gives any other m.

Causal attention (section 2.6, prefix sums) is computed chunk by chunk: within a chunk of CHUNK
positions the exact masked product of features (a CHUNK x CHUNK matrix), across chunks the running
state S = sum phi(k) v^T, z = sum phi(k). Decoding keeps only that state per layer (kernels.KVCache:
O(1) memory per layer whatever the length).

Numerically safe form (the max-subtraction the reference implementation uses, google-research/
performer fast_attention.py, softmax_kernel_transformation): phi(q_i) is multiplied by exp(-max of
its own logits), and the keys that query i reads by exp(-c_i), where c_i is the running maximum of
the key logits up to position i (causal; the state is rescaled when it grows, as the online
softmax does); both cancel between numerator and denominator. Inside a chunk key j enters query
i's sums as exp(a_j - c_j) * exp(c_j - c_i) (both factors <= 1), so output i depends on keys
j <= i only, also in float32: a later key of large norm cannot underflow the features of the
earlier ones for the earlier queries, and the full forward equals token-by-token decoding (whose
state carries the same running maximum) to rounding. Non-causal attention uses one constant per
(batch, head), the maximum over all keys.

Features: one fixed seed per layer (`layer` at the call), the same on every process; with
`configure(redraw=N)` the features are redrawn every N training steps (`set_step`, called by
train.py): draw d = step // N has its own seed. The paper redraws during training; the last draw is
what a trained model is evaluated with in that process.

Padding: with a left-padded kernels.KVCache, the padded slots' key features are zero. An explicit
`mask` (any pattern other than causal / full and the cache's padding) cannot be honoured by linear
attention: ValueError.
"""
import math
import zlib

import torch

CHUNK = 64  # positions per chunk of the causal prefix sums: the exact masked product inside one
_settings = {"features": 0, "redraw": 0}
_step = 0
_features = {}  # (layer, D, m, draw) -> (m, D) float64 projections on the CPU


def configure(features=0, redraw=0):
    """features: m, the number of random features (0: the paper's rule, round(D ln D), see
    num_features); redraw: new
    features every this many training steps (0: never). ValueError for negative values."""
    if features < 0 or redraw < 0:
        raise ValueError(f"performer features and redraw must be 0 or more, not {features} and {redraw}")
    _settings.update(features=features, redraw=redraw)


def set_step(step):
    """The training step (train.py calls it before each step): selects the draw when redrawing."""
    global _step
    _step = step


def num_features(head_dim):
    """m for this head dim: configure's, or the paper's rule D ln D (section 4) rounded to the
    nearest integer, at least 1 (performer-pytorch: int(), truncated)."""
    return _settings["features"] or max(1, round(head_dim * math.log(head_dim)))


def draw():
    """The index of the current draw of features: step // redraw, or 0 without redraws."""
    return _step // _settings["redraw"] if _settings["redraw"] else 0


def orthogonal_gaussian(m, D, generator):
    """(m, D) float64: blocks of D orthonormal rows (QR of a Gaussian matrix, Q's columns times
    sign(diag R): a Haar-distributed orthogonal matrix, Mezzadri 2007), the last block cut to m
    rows, each row rescaled to the norm of a Gaussian vector in R^D (chi(D)): FAVOR+'s W, each row
    marginally N(0, I) (Choromanski et al. 2021, section 2.4)."""
    blocks = []
    for _ in range(-(-m // D)):
        Q, R = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=generator))
        Q = Q * torch.where(R.diagonal() < 0, -1.0, 1.0).to(Q.dtype)  # column j times sign(R[j, j])
        blocks.append(Q.T)  # Q's columns are orthonormal: its transpose's rows are
    norms = torch.randn(m, D, dtype=torch.float64, generator=generator).norm(dim=1)
    return torch.cat(blocks)[:m] * norms[:, None]


def features(layer, head_dim, device=None, dtype=torch.float64):
    """The random projections W (m, head_dim) of this layer at the current draw, in dtype on device.
    Seeded from (layer, draw): every process and every call draws the same."""
    m, d = num_features(head_dim), draw()
    key = (layer, head_dim, m, d)
    if key not in _features:
        if len(_features) > 256:  # old draws
            _features.clear()
        g = torch.Generator().manual_seed(zlib.crc32(f"favor+ layer {layer} draw {d}".encode()))
        _features[key] = orthogonal_gaussian(m, head_dim, g)
    return _features[key].to(device=device, dtype=dtype)


def _logits(x, W):
    """W x' - |x'|^2 / 2 with x' = x / D^(1/4): (..., D) -> (..., m), the exponent of phi."""
    x = x * x.shape[-1] ** -0.25
    return x @ W.T - (x * x).sum(-1, keepdim=True) / 2


def _safe(c):
    """c with -inf (nothing seen yet) replaced by 0, so that exp(c_old - c) is 0, never NaN."""
    return torch.where(torch.isinf(c), torch.zeros_like(c), c)


def performer_attention(q, k, v, causal=True, mask=None, layer=0, cache=None):
    """FAVOR+ attention (module docstring). q (B, Hq, T, D), k and v (B, Hkv, S, D); returns
    (B, Hq, T, D) in q's dtype (computed in fp32, or float64 for float64 inputs). Causal alignment
    is bottom-right: with S > T the first S - T keys are everyone's past. With a cache (made under
    this backend) the new keys are folded into the layer's running state and the queries attend to
    all of it; left padding comes from the cache. Raises ValueError for an explicit mask without a
    cache (linear attention cannot honour an arbitrary mask) and for a cache of another layout."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if cache is None and mask is not None:
        raise ValueError("performer attention cannot honour an explicit attention mask (linear attention "
                         "takes causal or full attention, and left padding through kernels.KVCache)")
    if cache is not None and not causal:
        raise ValueError("performer attention with a KV cache is causal")
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    W = features(layer, D, q.device, work)
    a_q = _logits(q.to(work).view(B, Hkv, G, T, D), W)  # (B, Hkv, G, T, m)
    phi_q = torch.exp(a_q - a_q.amax(-1, keepdim=True).detach()) / math.sqrt(W.shape[0])
    a_k = _logits(k.to(work), W)  # (B, Hkv, S, m)
    v = v.to(work)
    if cache is not None:
        keep = cache.key_slots_kept(S, q.device)  # (B, S) or None: False on left padding
        if keep is not None:
            a_k = a_k.masked_fill(~keep[:, None, :, None], float("-inf"))  # phi = exp(-inf) = 0
        state = cache.performer_state(layer)
    else:
        state = None
    if not causal:
        c = a_k.amax(dim=(-2, -1), keepdim=True).detach()  # one constant per (batch, head)
        phi_k = torch.exp(a_k - c) / math.sqrt(W.shape[0])
        kv, z = phi_k.transpose(-2, -1) @ v, phi_k.sum(-2)  # (B, Hkv, m, Dv), (B, Hkv, m)
        num = phi_q @ kv[:, :, None]
        den = (phi_q @ z[:, :, None, :, None]).squeeze(-1)
        out = num / den.clamp_min(torch.finfo(work).tiny)[..., None]
        return out.reshape(B, Hq, T, -1).to(q.dtype)
    out, state = _causal(phi_q, a_k, v, T, state, math.sqrt(W.shape[0]))
    if cache is not None:
        cache.set_performer_state(layer, state)
    return out.reshape(B, Hq, T, -1).to(q.dtype)


def _ratio(c_num, c_den):
    """exp(c_num - c_den) for running maxima c_num <= c_den, 0 where c_num is -inf (nothing seen,
    or a padded key: its features are 0 anyway), never NaN."""
    diff = c_num - c_den
    return torch.exp(torch.where(torch.isnan(diff) | torch.isinf(c_num), torch.full_like(diff, float("-inf")), diff))


def _causal(phi_q, a_k, v, T, state, sqrt_m):
    """Causal FAVOR+ by chunked prefix sums. phi_q (B, Hkv, G, T, m); a_k (B, Hkv, S, m) key logits
    (-inf: a padded key); v (B, Hkv, S, Dv); state (S (B, Hkv, m, Dv), z (B, Hkv, m), c (B, Hkv, 1))
    or None: the sums so far, scaled by exp(-c), c the running maximum of the key logits. Inside a
    chunk, query i reads key j <= i as exp(a_j - c_j) exp(c_j - c_i) and the state as
    exp(c_state - c_i) (c_i: the running maximum at position i), so out_i depends on keys j <= i
    only. Returns (out (B, Hkv, G, T, Dv), the new state)."""
    B, Hkv, S_len, m = a_k.shape
    Dv = v.shape[-1]
    if state is None:
        state = (a_k.new_zeros(B, Hkv, m, Dv), a_k.new_zeros(B, Hkv, m), a_k.new_full((B, Hkv, 1), float("-inf")))
    kv, z, c = state
    tiny = torch.finfo(a_k.dtype).tiny
    # keys before the first query are everyone's past: folded into the state first. The chunks are
    # torch.split views (their backward is one concatenation; slicing's would write a zero-filled
    # full-size gradient per chunk, O(T^2 / CHUNK) in all).
    prefix = S_len - T
    sizes = [min(CHUNK, T - s) for s in range(0, T, CHUNK)]
    q_chunks = [None] * bool(prefix) + list(phi_q.split(sizes, dim=3))
    k_chunks = a_k.split([prefix] * bool(prefix) + sizes, dim=2)
    v_chunks = v.split([prefix] * bool(prefix) + sizes, dim=2)
    outs = []
    for fq, ak, vc in zip(q_chunks, k_chunks, v_chunks):
        if fq is not None:  # a chunk of queries (B, Hkv, G, C, m): the exact masked product inside, the state before
            # c_pos[..., i]: the running maximum of the key logits up to position i of the chunk (B, Hkv, C)
            c_pos = torch.maximum(c, torch.cummax(ak.amax(-1).detach(), dim=-1).values)
            own = torch.exp(ak - _safe(c_pos)[..., None]) / sqrt_m  # key j scaled by exp(-c_j) (B, Hkv, C, m)
            C = ak.shape[2]
            later = torch.ones(C, C, dtype=torch.bool, device=ak.device).triu(1)  # key j after query i
            decay = _ratio(c_pos[..., None, :], c_pos[..., :, None]).masked_fill(later, 0.0)  # (B, Hkv, C_i, C_j)
            scores = (fq @ own[:, :, None].transpose(-2, -1)) * decay[:, :, None]  # (B, Hkv, G, C, C)
            old = _ratio(c, c_pos)[:, :, None, :, None]  # the state's constant -> query i's (B, Hkv, 1, C, 1)
            num = scores @ vc[:, :, None] + old * (fq @ kv[:, :, None])
            den = scores.sum(-1) + old[..., 0] * (fq @ z[:, :, None, :, None]).squeeze(-1)
            outs.append(num / den.clamp_min(tiny)[..., None])
        c_new = torch.maximum(c, ak.amax(dim=(-2, -1)).detach()[..., None])  # (B, Hkv, 1)
        c_safe = _safe(c_new)
        rescale = torch.exp(c - c_safe)  # the state's old constant -> the new one (0 while empty)
        kv, z = kv * rescale[..., None], z * rescale
        phi_k = torch.exp(ak - c_safe[..., None]) / sqrt_m  # (B, Hkv, C, m)
        kv = kv + phi_k.transpose(-2, -1) @ vc
        z = z + phi_k.sum(-2)
        c = c_new
    return torch.cat(outs, dim=3), (kv, z, c)
