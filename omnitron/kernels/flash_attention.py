"""
FlashAttention-2 in Triton: fused causal / non-causal attention with GQA, forward and backward.

    out = flash_attention(q, k, v, causal=True, scale=None)

    q: (B, Hq, T, D)    k, v: (B, Hkv, S, D)    Hq % Hkv == 0    out: (B, Hq, T, D)

Why a fused kernel?
-------------------
Plain attention computes the scores S = q @ k^T (a T x S matrix per head), writes it to GPU
main memory (HBM), reads it back for the softmax, writes P = softmax(S), reads it back for
P @ v. For long sequences that matrix dominates both memory (O(T*S)) and time (HBM traffic).

FlashAttention never materialises it. Each Triton program loads ONE block of BLOCK_M query
rows into on-chip SRAM/registers and streams over the keys/values in blocks of BLOCK_N rows.
For each key block it computes a small BLOCK_M x BLOCK_N tile of scores, folds it into a
running ("online") softmax and into a BLOCK_M x D output accumulator, and throws the tile away.
All that lives on chip at any moment is: the q block, one k and one v block, one score tile,
the accumulator and two per-row statistics (m = running max, l = running sum of exponentials).
Extra memory is therefore O(T) per head (the output and one log-sum-exp per row), not O(T*S).

Online softmax (per query row):
    for each key block:  m_new = max(m, max_j s_j)
                         alpha = exp(m - m_new)              # rescales what we summed so far
                         p_j   = exp(s_j - m_new)
                         l     = alpha * l + sum_j p_j
                         acc   = alpha * acc + p @ v_block
    out = acc / l,  lse = m + log(l)
We work in base 2 (exp2 is the native GPU instruction): log2(e) is folded into the score scale,
so exp(x) becomes exp2(x * log2(e)) with no extra multiply in the inner loop. All softmax
statistics and accumulators are fp32 whatever the input dtype.

Backward (FlashAttention-2): instead of storing P we store only lse per row and recompute
P = exp2(s - lse) tile by tile. With dP = dO @ v^T and delta = rowsum(dO * O):
    dV = P^T @ dO        dS = P * (dP - delta)        dQ = scale * dS @ k        dK = scale * dS^T @ q
Three kernels:
  1. preprocess: delta = rowsum(dO * O), one fp32 per query row.
  2. dK/dV:      each program owns one block of keys of ONE kv head and loops over every query
                 head of its GQA group and every query block; dK, dV accumulate in registers
                 and are written once. K/V are never repeated in memory and no atomics are
                 needed, so the result is deterministic.
  3. dQ:         each program owns one block of queries and loops over the key blocks.

Causal masking is aligned BOTTOM-RIGHT: query i may attend key j iff j <= i + (S - T). With
T == S this is the usual lower triangle; with T < S (a KV cache: T new queries after S - T
cached keys) the last query sees every key. With T > S the first T - S queries see no key at
all: their output is 0, their lse is +inf and their gradients are 0 (no NaN anywhere).

Under the Triton interpreter (TRITON_INTERPRET=1, runs on CPU tensors) the same kernels run
with one small fixed block configuration; on a GPU the block sizes are autotuned.
"""

import functools
import inspect
import math
import os
import zlib

import torch
import triton
import triton.language as tl

# Read once, at import: triton.jit also decides at decoration time whether to interpret.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = math.log2(math.e)


def is_available(device) -> bool:
    """Can flash_attention run on tensors living on `device`?"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _INTERPRET


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M = query rows, BLOCK_N = key rows per tile.
# The fwd and dQ kernels own a query block and loop over keys (tall tiles); the dK/dV kernel owns
# a key block and loops over queries (wide tiles). A few configs per kernel and head-dim class
# (BLOCK_D up to 64, 128, 256) and element size, taken from FlashAttention-2's published choices
# (Dao 2023, section 3.3, and Triton's fused-attention tutorial) rather than a wide grid: each one
# compiles on the first call, so the grid is what the first call costs. Every one of them fits in
# the shared memory of both sm_80 (163 KiB per block) and sm_90 (227 KiB): tests/test_kernels.py compiles
# each ahead of time for both targets and checks (test_triton_kernels_compile_for_sm80_and_sm90).
# Not yet tuned on a GPU: which of them wins is measured by bench.py attention (scripts/gpu_check.sh).
_CONFIGS = {
    "fwd": {(64, 2): [(128, 64, 4, 3), (64, 64, 4, 3)], (128, 2): [(128, 64, 8, 3), (64, 64, 4, 3)],
            (256, 2): [(64, 64, 8, 2), (64, 32, 4, 2)]},
    "dkdv": {(64, 2): [(32, 128, 4, 3), (64, 128, 8, 2)], (128, 2): [(32, 128, 8, 2), (32, 64, 4, 2)],
             (256, 2): [(32, 64, 4, 1), (16, 64, 4, 1)]},
    "dq": {(64, 2): [(128, 32, 4, 3), (64, 64, 4, 2)], (128, 2): [(128, 32, 8, 2), (64, 32, 4, 2)],
           (256, 2): [(64, 32, 4, 1), (32, 32, 4, 1)]},
}
for _kernel in _CONFIGS.values():  # fp32 inputs (three TF32 products each, see _compile_time_args): small tiles
    _kernel.update({(64, 4): [(32, 32, 4, 1)], (128, 4): [(32, 32, 4, 1)], (256, 4): [(16, 32, 4, 1)]})
# Under the Triton interpreter (CPU, tests) nothing is tuned: one fixed config. Its cost is per
# tile, so fairly big tiles keep tests fast; BLOCK_M != BLOCK_N so that mixing the two up fails.
_INTERPRETER_CONFIG = (64, 32, 4, 1)
# Autotune cache key. T and S enter only as power-of-two buckets (see _bucket), otherwise a
# KV-cache decode loop (S grows by one every step) would re-run the benchmark at every step.
# DEVICE_KEY (a hash of the GPU's name) keys the tuning results kept on disk to the GPU model;
# triton adds its own version and the target architecture, and the autotuner the input dtypes.
_TUNE_KEY = ["HEAD_DIM", "T_BUCKET", "S_BUCKET", "CAUSAL", "WINDOW", "DEVICE_KEY"]


def config_class(block_d, element_size):
    """The _CONFIGS key of a launch: (head-dim class 64, 128 or 256; bytes per element, 2 or 4)."""
    return (64 if block_d <= 64 else block_d, 4 if element_size == 4 else 2)


def _config(m, n, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _autotune(kernel):
    """triton.autotune over every config of this kernel; before tuning a launch, the configs not
    of its class (config_class) are pruned, so none is discovered not to fit at run time. The
    winner is kept on disk (triton's cache_results; triton's cache directory) and a later
    process with the same GPU, triton version, key and configs reuses it without re-tuning."""
    table = _CONFIGS[kernel]
    every = dict.fromkeys(c for cfgs in table.values() for c in cfgs)  # one of each, in order
    configs = [_config(*c) for c in ([_INTERPRETER_CONFIG] if _INTERPRET else every)]

    def prune(configs, named_args, **kwargs):
        allowed = table[config_class(kwargs["BLOCK_D"], named_args["Q"].element_size())]
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune}, **extra)


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing, a constant after
@functools.lru_cache(maxsize=None)
def _device_key(device):
    """A small int naming the GPU model (part of the autotune key); 0 off CUDA."""
    return zlib.crc32(torch.cuda.get_device_name(device).encode()) & 0x7FFFFFFF if device.type == "cuda" else 0


def _bucket(n):
    return triton.next_power_of_2(n)


# ---------------------------------------------------------------------------------------------
# Small shared helpers (inlined by Triton)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _head_ptr(X, b, h, stride_b, stride_h):
    """Base pointer of the (T, D) matrix of batch b, head h (64-bit offsets: big tensors)."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _ptrs(base, rows, stride_row, stride_d, BLOCK_D: tl.constexpr):
    """Pointers of a (len(rows), BLOCK_D) tile whose bounds mask is another tile's (same rows)."""
    return base + rows[:, None] * stride_row + tl.arange(0, BLOCK_D)[None, :] * stride_d


@triton.jit
def _tile(base, rows, n_rows, stride_row, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers and bounds mask of a (len(rows), BLOCK_D) tile of a (n_rows, HEAD_DIM) matrix.
    BLOCK_D is HEAD_DIM rounded up to a power of two; the padding columns are masked."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return _ptrs(base, rows, stride_row, stride_d, BLOCK_D), mask


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter only) works around the interpreter's
    wrong bf16 matmul; on a GPU the tensor cores take the 16-bit operands directly."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(q, k, offs_m, offs_n, T, S, qk_scale, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scores tile s = (q @ k^T) * scale * log2(e), shape (BLOCK_M, BLOCK_N), with -inf wherever
    query offs_m[i] may not see key offs_n[j]: out of bounds, (causal) j > i + (S - T), or (a
    sliding window, WINDOW > 0) j <= i + (S - T) - WINDOW."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    visible = (offs_m[:, None] < T) & (offs_n[None, :] < S)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (S - T))
    if WINDOW > 0:
        visible = visible & (offs_n[None, :] > offs_m[:, None] + (S - T - WINDOW))
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _key_end(start_m, T, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key that the query block [start_m, start_m + BLOCK_M) can see.
    With causal masking, key blocks entirely above the diagonal are never visited."""
    end = S
    if CAUSAL:
        end = tl.minimum(S, start_m + BLOCK_M + (S - T))
    return end


@triton.jit
def _key_start(start_m, T, S, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The first key block that the query block starting at start_m can see: 0, or with a sliding
    window the block of key start_m + (S - T) - WINDOW + 1 (blocks before it are never visited)."""
    start = 0
    if WINDOW > 0:
        start = tl.maximum(0, start_m + (S - T - WINDOW + 1)) // BLOCK_N * BLOCK_N
    return start


@triton.jit
def _query_start(start_n, T, S, CAUSAL: tl.constexpr):
    """First query that can see key start_n (the mirror image of _key_end)."""
    start = 0
    if CAUSAL:
        start = tl.maximum(0, start_n - (S - T))
    return start


@triton.jit
def _query_end(start_n, T, S, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """One past the last query that can see the key block starting at start_n: T, or with a
    sliding window the last query whose window still reaches key start_n + BLOCK_N - 1 (the
    mirror image of _key_start)."""
    end = T
    if WINDOW > 0:
        end = tl.minimum(T, start_n + BLOCK_N - 1 - (S - T) + WINDOW)
    return end


@triton.jit
def _probs_and_dscores(q, do, k, v, lse, delta, offs_m, offs_n, T, S, qk_scale,
                       CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Backward recomputation for one (query block, key block) tile:
    P = softmax probabilities (from the saved lse) and dS = P * (dO @ v^T - delta).
    Masked entries have s = -inf, so P = exp2(-inf - lse) = 0 (rows with no visible key have
    lse = +inf, which also gives 0), hence dS = 0 there: no NaN can appear."""
    s = _scores(q, k, offs_m, offs_n, T, S, qk_scale, CAUSAL, WINDOW, PRECISION, UPCAST)
    p = tl.math.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
    return p, ds


# ---------------------------------------------------------------------------------------------
# Forward kernel: grid = (query blocks, B * Hq)
# ---------------------------------------------------------------------------------------------
@_autotune("fwd")
@triton.jit
def _fwd_kernel(
    Q, stride_qb, stride_qh, stride_qt, stride_qd,
    K, stride_kb, stride_kh, stride_ks, stride_kd,
    V, stride_vb, stride_vh, stride_vs, stride_vd,
    O, stride_ob, stride_oh, stride_ot, stride_od,
    LSE,  # (B, Hq, T) fp32, contiguous
    H, GROUP, T, S, qk_scale,
    T_BUCKET, S_BUCKET, DEVICE_KEY,  # only read by the autotuner (cache key)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    h_kv = h // GROUP  # GQA: query heads h_kv*GROUP .. h_kv*GROUP + GROUP-1 share kv head h_kv
    offs_m = start_m + tl.arange(0, BLOCK_M)
    Q = _head_ptr(Q, b, h, stride_qb, stride_qh)
    K = _head_ptr(K, b, h_kv, stride_kb, stride_kh)
    V = _head_ptr(V, b, h_kv, stride_vb, stride_vh)
    O = _head_ptr(O, b, h, stride_ob, stride_oh)

    # The query block stays in SRAM/registers for the whole loop.
    q_ptrs, q_mask = _tile(Q, offs_m, T, stride_qt, stride_qd, HEAD_DIM, BLOCK_D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)       # running sum of p @ v

    for start_n in range(_key_start(start_m, T, S, WINDOW, BLOCK_N), _key_end(start_m, T, S, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs, kv_mask = _tile(K, offs_n, S, stride_ks, stride_kd, HEAD_DIM, BLOCK_D)
        v_ptrs = _ptrs(V, offs_n, stride_vs, stride_vd, BLOCK_D)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)

        s = _scores(q, k, offs_m, offs_n, T, S, qk_scale, CAUSAL, WINDOW, PRECISION, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet has m_new = -inf; subtracting it would give
        # (-inf) - (-inf) = NaN. Subtract 0 instead: exp2(-inf - 0) = 0, as it should be.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)  # rescale factor for the old statistics
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    # l_i >= 1 for every row that saw a key (its max contributes exp2(0) = 1); l_i == 0 means
    # the row is fully masked: output 0 and lse = +inf (so backward recomputes P = 0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))

    o_ptrs, o_mask = _tile(O, offs_m, T, stride_ot, stride_od, HEAD_DIM, BLOCK_D)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + bh * T + offs_m, lse, mask=offs_m < T)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(
    O, stride_ob, stride_oh, stride_ot, stride_od,
    DO, stride_dob, stride_doh, stride_dot, stride_dod,
    DELTA,  # (B, Hq, T) fp32, contiguous
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d]   (grid = (query blocks, B * Hq))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    o_ptrs, mask = _tile(_head_ptr(O, b, h, stride_ob, stride_oh), offs_m, T,
                         stride_ot, stride_od, HEAD_DIM, BLOCK_D)
    do_ptrs = _ptrs(_head_ptr(DO, b, h, stride_dob, stride_doh), offs_m, stride_dot, stride_dod, BLOCK_D)
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@_autotune("dkdv")
@triton.jit
def _bwd_dkdv_kernel(
    Q, stride_qb, stride_qh, stride_qt, stride_qd,
    K, stride_kb, stride_kh, stride_ks, stride_kd,
    V, stride_vb, stride_vh, stride_vs, stride_vd,
    DO, stride_dob, stride_doh, stride_dot, stride_dod,
    DK, stride_dkb, stride_dkh, stride_dks, stride_dkd,
    DV, stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    LSE, DELTA,
    H, H_KV, GROUP, T, S, qk_scale, sm_scale,
    T_BUCKET, S_BUCKET, DEVICE_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grid = (key blocks, B * Hkv). One program = one block of BLOCK_N keys of one kv head."""
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    b, h_kv = bh_kv // H_KV, bh_kv % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)

    # The key/value block and its two gradient accumulators stay on chip throughout.
    k_ptrs, kv_mask = _tile(_head_ptr(K, b, h_kv, stride_kb, stride_kh), offs_n, S,
                            stride_ks, stride_kd, HEAD_DIM, BLOCK_D)
    v_ptrs = _ptrs(_head_ptr(V, b, h_kv, stride_vb, stride_vh), offs_n, stride_vs, stride_vd, BLOCK_D)
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Causal: queries before this one never see these keys, so their blocks are skipped; with a
    # sliding window, so are the queries whose window has moved past them.
    first_query = _query_start(start_n, T, S, CAUSAL)
    last_query = _query_end(start_n, T, S, WINDOW, BLOCK_N)
    for g in range(0, GROUP):  # every query head that reads this kv head (GQA)
        h = h_kv * GROUP + g
        Qh = _head_ptr(Q, b, h, stride_qb, stride_qh)
        DOh = _head_ptr(DO, b, h, stride_dob, stride_doh)
        row_stats = (b * H + h) * T  # offset of this head's rows in LSE / DELTA
        for start_m in range(first_query, last_query, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ptrs, q_mask = _tile(Qh, offs_m, T, stride_qt, stride_qd, HEAD_DIM, BLOCK_D)
            do_ptrs = _ptrs(DOh, offs_m, stride_dot, stride_dod, BLOCK_D)
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            do = tl.load(do_ptrs, mask=q_mask, other=0.0)
            lse = tl.load(LSE + row_stats + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + row_stats + offs_m, mask=offs_m < T, other=0.0)

            p, ds = _probs_and_dscores(q, do, k, v, lse, delta, offs_m, offs_n, T, S,
                                       qk_scale, CAUSAL, WINDOW, PRECISION, UPCAST)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)  # P^T @ dO
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)   # dS^T @ q

    dk_ptrs, dkv_mask = _tile(_head_ptr(DK, b, h_kv, stride_dkb, stride_dkh), offs_n, S,
                              stride_dks, stride_dkd, HEAD_DIM, BLOCK_D)
    dv_ptrs = _ptrs(_head_ptr(DV, b, h_kv, stride_dvb, stride_dvh), offs_n, stride_dvs, stride_dvd, BLOCK_D)
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=dkv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dkv_mask)


@_autotune("dq")
@triton.jit
def _bwd_dq_kernel(
    Q, stride_qb, stride_qh, stride_qt, stride_qd,
    K, stride_kb, stride_kh, stride_ks, stride_kd,
    V, stride_vb, stride_vh, stride_vs, stride_vd,
    DO, stride_dob, stride_doh, stride_dot, stride_dod,
    DQ, stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    LSE, DELTA,
    H, GROUP, T, S, qk_scale, sm_scale,
    T_BUCKET, S_BUCKET, DEVICE_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grid = (query blocks, B * Hq). One program = one block of BLOCK_M queries of one head."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    h_kv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    K = _head_ptr(K, b, h_kv, stride_kb, stride_kh)
    V = _head_ptr(V, b, h_kv, stride_vb, stride_vh)

    q_ptrs, q_mask = _tile(_head_ptr(Q, b, h, stride_qb, stride_qh), offs_m, T,
                           stride_qt, stride_qd, HEAD_DIM, BLOCK_D)
    do_ptrs = _ptrs(_head_ptr(DO, b, h, stride_dob, stride_doh), offs_m, stride_dot, stride_dod, BLOCK_D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(_key_start(start_m, T, S, WINDOW, BLOCK_N), _key_end(start_m, T, S, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs, kv_mask = _tile(K, offs_n, S, stride_ks, stride_kd, HEAD_DIM, BLOCK_D)
        v_ptrs = _ptrs(V, offs_n, stride_vs, stride_vd, BLOCK_D)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        p, ds = _probs_and_dscores(q, do, k, v, lse, delta, offs_m, offs_n, T, S,
                                   qk_scale, CAUSAL, WINDOW, PRECISION, UPCAST)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)  # dS @ k

    dq_ptrs = _ptrs(_head_ptr(DQ, b, h, stride_dqb, stride_dqh), offs_m, stride_dqt, stride_dqd, BLOCK_D)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Python side
# ---------------------------------------------------------------------------------------------
def _compile_time_args(q, T, S, causal, window=0):
    """Keyword arguments shared by the forward, dK/dV and dQ kernel launches."""
    D = q.shape[-1]
    return dict(
        T_BUCKET=_bucket(T), S_BUCKET=_bucket(S), DEVICE_KEY=_device_key(q.device),
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot needs >= 16
        CAUSAL=causal, WINDOW=window,
        # fp32 inputs: three TF32 tensor-core products per tl.dot (the operands split into high and
        # low parts), about fp32's accuracy, where plain TF32 (the default) keeps 10 mantissa bits;
        # "ieee" (scalar FMA) would be far slower and takes minutes to compile. For fp16/bf16
        # operands the flag makes no difference. The interpreter computes in full fp32 anyway.
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        UPCAST=_INTERPRET,
    )


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window):
        B, H, T, D = q.shape
        H_KV, S = k.shape[1], k.shape[2]
        o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
        _fwd_kernel[grid](
            q, *q.stride(), k, *k.stride(), v, *v.stride(), o, *o.stride(), lse,
            H, H // H_KV, T, S, scale * _LOG2E,
            **_compile_time_args(q, T, S, causal, window),
        )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        H_KV, S = k.shape[1], k.shape[2]
        args = _compile_time_args(q, T, S, ctx.causal, ctx.window)
        qk_scale = ctx.scale * _LOG2E

        delta = torch.empty_like(lse)
        preprocess_block = 16 if _INTERPRET else 64
        _bwd_preprocess_kernel[(triton.cdiv(T, preprocess_block), B * H)](
            o, *o.stride(), do, *do.stride(), delta, H, T,
            HEAD_DIM=D, BLOCK_D=args["BLOCK_D"], BLOCK_M=preprocess_block,
        )

        dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, H_KV, S, D), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, H_KV, S, D), dtype=v.dtype, device=v.device)
        kv_grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H_KV)
        _bwd_dkdv_kernel[kv_grid](
            q, *q.stride(), k, *k.stride(), v, *v.stride(), do, *do.stride(),
            dk, *dk.stride(), dv, *dv.stride(), lse, delta,
            H, H_KV, H // H_KV, T, S, qk_scale, ctx.scale, **args,
        )
        q_grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
        _bwd_dq_kernel[q_grid](
            q, *q.stride(), k, *k.stride(), v, *v.stride(), do, *do.stride(),
            dq, *dq.stride(), lse, delta,
            H, H // H_KV, T, S, qk_scale, ctx.scale, **args,
        )
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=True, scale=None, window=0):
    """Fused scaled-dot-product attention (FlashAttention-2), differentiable.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (GQA / MQA);
    fp16, bf16 or fp32, any strides. Returns (B, Hq, T, D) in q's dtype.
    causal: query i sees key j iff j <= i + (S - T) (bottom-right aligned, KV-cache friendly).
    scale: multiplies q @ k^T, default 1 / sqrt(D).
    window: a sliding window (with causal): query i also needs j > i + (S - T) - window; the key
    blocks outside every window of a query block are skipped (loop bounds), forward and backward.
    A compile-time constant: each window width is its own compiled kernel. 0: off.
    """
    B, H, T, D = q.shape
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, "k, v must be (B, Hkv, S, D)"
    assert H % k.shape[1] == 0, "number of query heads must be a multiple of kv heads"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert D <= 256, "head dim up to 256"
    assert is_available(q.device), f"flash_attention cannot run on {q.device} (TRITON_INTERPRET=1 for CPU)"
    assert window >= 0 and (causal or not window), "a sliding window needs causal=True"
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    return _FlashAttention.apply(q, k, v, causal, scale, int(window))
