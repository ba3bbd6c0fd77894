"""omnitron/kernels: the attention backends against float64, our Triton FlashAttention-2 (the interpreter
and ahead-of-time compilation for sm_80 / sm_90), FAVOR+ and sliding windows."""
import importlib
import math
import pkgutil
import tempfile

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction  # what triton.jit makes under TRITON_INTERPRET=1

from omnitron import kernels, models
from omnitron.kernels import compile_check, performer
from omnitron.kernels import flash_attention as fa
from tests.helpers import (
    CPU_BACKENDS,
    V,
    assert_matches,
    case_id,
    decode_stepwise,
    flash_out_and_grads,
    loss_grads_and_greedy,
    nan_padded_view,
    random_qkv,
    reference_out_and_grads,
    tiny,
    tiny_model,
)

# ----------------------------------------------------------------------------- kernels: attention backends, Triton


@pytest.mark.parametrize("T,S,hq,hkv", [(16, 16, 4, 4), (5, 16, 4, 2), (1, 9, 4, 1), (7, 7, 2, 1)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_backends_match_float64(backend, T, S, hq, hkv):
    """Every registered backend that runs on the CPU (sdpa_flash and sdpa_cudnn fall back inside torch)."""
    assert {"naive", "sdpa", "triton"} <= set(CPU_BACKENDS)  # triton under its interpreter
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((hq, T), (hkv, S), (hkv, S)))
    ref_k, ref_v = (t.double().repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    scores = q.double() @ ref_k.transpose(-1, -2) / 4.0
    i, j = torch.arange(T)[:, None], torch.arange(S)[None, :]
    ref = scores.masked_fill(j > i + S - T, float("-inf")).softmax(-1) @ ref_v
    out = kernels.attention(q, k, v, causal=True, backend=backend)
    assert (out.double() - ref).abs().max() < 1e-5
    full = kernels.attention(q, k, v, causal=False, backend=backend)
    assert (full.double() - scores.softmax(-1) @ ref_v).abs().max() < 1e-5


# A covering set rather than the full product: every value of every axis appears at least once
# (causal / not, T == S / T < S, T in {1, 17, 100, 130}, D in {16, 64, 80, 128},
# (Hq, Hkv) in {(4, 4), (4, 2), (4, 1)}, fp32 / fp16 / bf16), plus D = 96 and 256.
CASES = [
    # B, Hq, Hkv,   T,   S,   D, causal, dtype
    (2, 4, 4, 17, 17, 64, True, torch.float32),
    (1, 4, 2, 100, 100, 80, True, torch.float32),
    (1, 4, 1, 1, 130, 128, True, torch.float32),  # one decode step against a KV cache
    (2, 4, 2, 17, 50, 16, False, torch.float32),
    (1, 4, 4, 130, 130, 16, False, torch.float32),
    (1, 4, 1, 100, 130, 64, True, torch.float16),  # chunked prefill against a KV cache
    (2, 4, 2, 17, 17, 128, False, torch.float16),
    (1, 4, 2, 20, 33, 96, True, torch.float16),
    (1, 4, 4, 130, 130, 80, True, torch.bfloat16),
    (2, 4, 1, 1, 40, 64, False, torch.bfloat16),
    (1, 4, 2, 20, 20, 256, True, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_reference(case):
    B, Hq, Hkv, T, S, D, causal, dtype = case
    q, k, v, do = random_qkv(B, Hq, Hkv, T, S, D, dtype)
    got = flash_out_and_grads(q, k, v, do, causal)
    assert_matches(got, reference_out_and_grads(q, k, v, do, causal), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_views_into_nan_buffers(dtype):
    B, Hq, Hkv, T, S, D, causal = 2, 4, 2, 37, 45, 80, True
    q, k, v, do = random_qkv(B, Hq, Hkv, T, S, D, dtype, seed=1)
    views = [nan_padded_view(x.shape, x, transpose_heads=i % 2 == 0) for i, x in enumerate((q, k, v, do))]
    got = flash_out_and_grads(*views, causal)
    for x in got:
        assert torch.isfinite(x).all()
    assert_matches(got, reference_out_and_grads(q, k, v, do, causal), dtype)


def test_more_queries_than_keys_causal():
    """T > S, bottom-right causal: the first T - S queries see no key at all."""
    B, Hq, Hkv, T, S, D, scale = 1, 4, 2, 40, 20, 32, 0.3
    q, k, v, do = random_qkv(B, Hq, Hkv, T, S, D, torch.float32, seed=2)
    got = flash_out_and_grads(q, k, v, do, causal=True, scale=scale)
    out, dq = got[0], got[1]
    assert torch.isfinite(torch.cat([x.flatten() for x in got])).all()
    assert (out[:, :, :T - S] == 0).all() and (dq[:, :, :T - S] == 0).all()
    assert_matches(got, reference_out_and_grads(q, k, v, do, True, scale), torch.float32)


def test_deterministic():
    q, k, v, do = random_qkv(1, 4, 1, 50, 50, 64, torch.float16, seed=3)
    first = flash_out_and_grads(q, k, v, do, causal=True)
    second = flash_out_and_grads(q, k, v, do, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter is not a compiler: every kernel in kernels/ and every autotune config compiles
    ahead of time for sm_80 and sm_90 (no GPU needed: kernels/compile_check.py runs triton.compile with a
    GPUTarget) and fits the target's shared memory."""
    kernel_types = (triton.runtime.JITFunction, triton.runtime.Autotuner, InterpretedFunction)
    defined = set()
    for module in pkgutil.iter_modules(kernels.__path__):
        if module.name == "compile_check":
            continue
        for name, obj in vars(importlib.import_module(f"omnitron.kernels.{module.name}")).items():
            if isinstance(obj, kernel_types) and name.endswith("_kernel"):
                defined.add(name)
    jobs = compile_check.jobs()
    kernel_names = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel",
                    "preprocess": "_bwd_preprocess_kernel"}
    assert {kernel_names[j[0]] for j in jobs} == defined  # every kernel in kernels/ is compiled
    for kernel, table in fa._CONFIGS.items():  # every config of every class, at its largest head dim, on both targets
        for (block_d, size), configs in table.items():
            for config in configs:
                for target in (80, 90):
                    assert any(j[0] == kernel and j[1] == target and j[5] == config and
                               fa.config_class(triton.next_power_of_2(j[3]), 4 if j[2] == "fp32" else 2) == (block_d, size)
                               for j in jobs), (kernel, block_d, size, config, target)
        covered = [j for j in jobs if j[0] == kernel]
        assert {j[3] for j in covered} == set(compile_check.HEAD_DIMS)
        assert {j[2] for j in covered} == {"fp16", "bf16", "fp32"} and {j[4] for j in covered} == {True, False}
    failures, results = compile_check.check()
    assert not failures, "\n".join(failures)
    assert len(results) == len(jobs) and all(r[1] > 0 for r in results)


def test_autotune_prunes_to_the_configs_of_the_launch_class():
    every = [fa._config(*c) for cfgs in fa._CONFIGS["dkdv"].values() for c in cfgs]
    prune = fa._autotune("dkdv")(fa._bwd_dkdv_kernel.fn).early_config_prune
    for block_d, dtype, size in ((16, torch.bfloat16, 2), (128, torch.float16, 2), (256, torch.float32, 4)):
        kept = prune(every, {"Q": torch.empty(1, dtype=dtype)}, BLOCK_D=block_d)
        want = fa._CONFIGS["dkdv"][(max(64, block_d), size)]
        assert sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept) == sorted(want)


@pytest.mark.parametrize("family", ["gpt", "gqa_llama"])
def test_whole_model_same_loss_gradients_and_decoding_with_triton_attention(family):
    if family == "gpt":
        model = tiny_model("gpt", pos="rope")
    else:
        model = tiny_model("llama", vocab_size=97, n_kv_head=2, std=0.1)
    idx = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(4))
    naive_loss, naive_grads, naive_greedy = loss_grads_and_greedy(model, "naive", idx)
    loss, grads, greedy = loss_grads_and_greedy(model, "triton", idx)
    assert abs(naive_loss - loss) < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(naive_grads, grads))
    assert torch.equal(naive_greedy, greedy)


def test_unknown_attention_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.set_backend("fast")


# ----------------------------------------------------------------------------- long context: Performer (FAVOR+) and sliding-window attention
# Long context: Performer (FAVOR+) attention and sliding-window attention.
#
# References: FAVOR+'s own kernel formula in float64 (phi(q).phi(k) products, normalised), exact
# softmax attention in float64, a dense float64 window mask, transformers' Qwen2 with
# use_sliding_window, and each row of a left-padded batch decoded alone.


def qkv(B=2, Hq=4, Hkv=2, T=150, D=16, S=None, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    return (scale * torch.randn(B, Hq, T, D, generator=g, dtype=dtype),
            scale * torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype))


def favor_formula(q, k, v, layer, causal):
    """FAVOR+ written from the paper's formula in float64, without the stabiliser: phi(x) =
    exp(W x' - |x'|^2 / 2) / sqrt(m), x' = x / D^(1/4); out = A v / A 1 with A = phi(Q) phi(K)^T
    (lower-triangular when causal). Keys are repeated per query head (the reference may copy)."""
    D = q.shape[-1]
    W = performer.features(layer, D)

    def phi(x):
        x = x * D ** -0.25
        return torch.exp(x @ W.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])
    G = q.shape[1] // k.shape[1]
    A = phi(q) @ phi(k.repeat_interleave(G, 1)).transpose(-2, -1)
    if causal:
        A = A.tril(diagonal=k.shape[2] - q.shape[2])
    return (A @ v.repeat_interleave(G, 1)) / A.sum(-1, keepdim=True)


def softmax_reference(q, k, v, mask=None):
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v.repeat_interleave(G, 1)


# ----------------------------------------------------------------------------- FAVOR+


@pytest.mark.parametrize("causal", [True, False])
def test_favor_equals_its_kernel_formula_in_float64(causal):
    """150 positions: three chunks of the causal prefix sums (CHUNK = 64), GQA (4 query heads on 2
    key/value heads); and a query block after 40 earlier keys (S > T, bottom-right aligned)."""
    assert performer.CHUNK < 150
    for T, S in ((150, 150), (50, 90)):
        q, k, v = qkv(T=T, S=S)
        out = kernels.attention(q, k, v, causal=causal, backend="performer", layer=3)
        ref = favor_formula(q, k, v, 3, causal)
        assert out.dtype == torch.float64 and (out - ref).abs().max().item() < 1e-6
    m = performer.num_features(16)
    assert m == round(16 * math.log(16)) and performer.features(3, 16).shape == (m, 16)


def test_favor_features_are_orthogonal_with_chi_norms_and_seeded_per_layer():
    W = performer.features(0, 16)  # m = 44: two full blocks of 16 orthogonal rows and a part block
    directions = W / W.norm(dim=1, keepdim=True)
    for block in (directions[:16], directions[16:32], directions[32:]):
        gram = block @ block.T
        assert torch.allclose(gram, torch.eye(len(block), dtype=gram.dtype), atol=1e-10)
    assert not torch.allclose(W.norm(dim=1), W.norm(dim=1)[0])  # chi-distributed norms, not all sqrt(D)
    assert torch.equal(performer.features(0, 16), W) and not torch.equal(performer.features(1, 16), W)


def test_favor_redraws_every_n_training_steps():
    performer.configure(redraw=10)
    performer.set_step(0)
    first = performer.features(0, 16)
    performer.set_step(9)
    assert torch.equal(performer.features(0, 16), first)
    performer.set_step(10)
    assert not torch.equal(performer.features(0, 16), first)
    performer.configure(redraw=0)
    assert torch.equal(performer.features(0, 16), first)  # never redrawn: draw 0 whatever the step


def test_favor_error_against_softmax_falls_as_m_grows():
    """Relative error of FAVOR+ against exact softmax attention, averaged over 4 draws (layers),
    for m = 16 ... 1024: it falls at each step (within 5% noise) and by 4x over the range
    (Monte Carlo: about 1 / sqrt(m), so about 8x)."""
    q, k, v = qkv(B=1, Hq=2, Hkv=2, T=64, D=16, scale=0.6)
    exact = softmax_reference(q, k, v, torch.ones(64, 64, dtype=torch.bool).tril())
    errors = []
    for m in (16, 64, 256, 1024):
        performer.configure(features=m)
        errs = [((kernels.attention(q, k, v, backend="performer", layer=layer) - exact).norm() / exact.norm()).item()
                for layer in range(4)]
        errors.append(sum(errs) / len(errs))
    assert all(b < 1.05 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 4, errors


def test_favor_is_causal():
    """Perturbing the keys and values after position p changes no output before p: bit for bit in
    the chunks before p's, and to rounding inside it (the running stabiliser constant of the chunk
    may move, and cancels in exact arithmetic)."""
    q, k, v = qkv(T=200)
    p = 150
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p:] += 3 * torch.randn_like(k2[:, :, p:])
    v2[:, :, p:] += 1
    q2 = q.clone()
    q2[:, :, p:] += 1
    a = kernels.attention(q, k, v, backend="performer")
    b = kernels.attention(q2, k2, v2, backend="performer")
    chunk_start = p // performer.CHUNK * performer.CHUNK
    assert torch.equal(a[:, :, :chunk_start], b[:, :, :chunk_start])
    assert (a[:, :, :p] - b[:, :, :p]).abs().max().item() < 1e-12
    assert (a[:, :, p:] - b[:, :, p:]).abs().max().item() > 1e-3


def test_favor_gradients_match_the_formula():
    q, k, v = (t.requires_grad_() for t in qkv(T=70, D=8))
    out = kernels.attention(q, k, v, backend="performer", layer=1)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(favor_formula(q2, k2, v2, 1, True).square().sum(), (q2, k2, v2))
    for a, b in zip(grads, ref):
        assert (a - b).abs().max().item() < 1e-8 * max(1.0, b.abs().max().item())


def test_favor_rows_are_marginally_gaussian_and_the_estimate_is_unbiased():
    """Choromanski et al. 2021, section 2.4: each row of W is marginally N(0, I), so that
    phi(x).phi(y) = mean_r exp(w_r.x - |x|^2/2) exp(w_r.y - |y|^2/2) is an unbiased estimate of
    exp(x.y) (eq. 7). Over 3000 draws of one block of D = 8 orthogonal rows: every coordinate of
    the first and last rows has mean 0 within 3 standard errors, is positive half of the time within
    3 standard errors (sign symmetry), and the estimate of exp(x.y) for x = y = 0.5 e_1 (where the
    rows of a QR without the sign correction lean: 0.91 of the truth, 10 standard errors off) and for x = 0.8 e_2, y = 0.5 (e_1 + e_3) is within
    3 standard errors of exp(x.y)."""
    D, N = 8, 3000
    g = torch.Generator().manual_seed(0)
    Ws = torch.stack([performer.orthogonal_gaussian(D, D, g) for _ in range(N)])  # (N, D, D)
    for row in (Ws[:, 0], Ws[:, -1]):  # (N, D): one row of W over the draws
        mean, se = row.mean(0), row.std(0) / math.sqrt(N)
        assert (mean.abs() < 3 * se).all(), (mean / se)
        positive = (row > 0).double().mean(0)
        assert ((positive - 0.5).abs() < 3 * math.sqrt(0.25 / N)).all(), positive
        assert (row.var(0) - 1).abs().max() < 0.1  # unit variance: N(0, I) marginals
    e = torch.eye(D, dtype=torch.float64)
    for x, y in ((0.5 * e[0], 0.5 * e[0]), (0.8 * e[1], 0.5 * (e[0] + e[2]))):
        fx = torch.exp(Ws @ x - x @ x / 2)  # (N, D): the positive random features, eq. 7, without 1/sqrt(m)
        fy = torch.exp(Ws @ y - y @ y / 2)
        estimates = (fx * fy).mean(-1)  # one estimate of exp(x.y) per draw
        truth = math.exp(float(x @ y))
        err = estimates.std().item() / math.sqrt(N)
        assert abs(estimates.mean().item() - truth) < 3 * err, (estimates.mean().item(), truth, err)


def favor_decoded(q, k, v, layer=0):
    """Performer attention token by token through a kernels.KVCache (the running state)."""
    kernels.configure("performer")
    B, Hkv, T, D = k.shape
    cache = kernels.KVCache(layer + 1, B, Hkv, T, D, q.dtype, q.device)
    outs = []
    for t in range(T):
        outs.append(kernels.attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], layer=layer, cache=cache))
        cache.advance(1)
    return torch.cat(outs, dim=2)


def test_favor_causal_outputs_depend_on_past_keys_only_in_float32():
    """A later key of large norm cannot underflow the earlier keys' features: T = 2, D = 64, |k_0| = 30
    and k_1 = D^(1/4) times the longest row of W: out_0 is v_0 (its only key) in float32. On that
    input and on 150 positions of keys whose norms span 0.1 to 12 (three chunks), the full forward
    in float32 equals token-by-token decoding and the forward of every prefix (output t of the
    sequence cut after t), and the float64 formula where float32 can hold it."""
    D = 64
    W = performer.features(0, D)
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(D, generator=g, dtype=torch.float64)
    k = torch.stack([30 * k0 / k0.norm(), D ** 0.25 * W[W.norm(dim=1).argmax()]])[None, None]  # (1, 1, 2, D)
    q = torch.randn(1, 1, 2, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 2, D, generator=g, dtype=torch.float64)
    out = kernels.attention(q.float(), k.float(), v.float(), backend="performer")
    assert (out[:, :, 0] - v[:, :, 0].float()).abs().max().item() < 1e-5
    assert (out - favor_decoded(q.float(), k.float(), v.float())).abs().max().item() < 1e-5
    q, k, v = qkv(B=2, Hq=4, Hkv=2, T=150, D=16, seed=3, dtype=torch.float32)
    k = k * torch.exp(torch.empty(2, 2, 150, 1).uniform_(math.log(0.1), math.log(12), generator=g))
    full = kernels.attention(q, k, v, backend="performer")
    assert (full - favor_decoded(q, k, v)).abs().max().item() < 1e-4
    for t in (0, 1, 5, 63, 64, 100, 149):
        prefix = kernels.attention(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], backend="performer")
        assert (prefix[:, :, t] - full[:, :, t]).abs().max().item() < 1e-5, t


def test_performer_refuses_what_it_cannot_honour():
    q, k, v = qkv(T=8)
    with pytest.raises(ValueError, match="cannot honour an explicit attention mask"):
        kernels.attention(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool).tril(), backend="performer")
    with pytest.raises(ValueError, match="do not combine"):
        kernels.configure("performer", 16)
    with pytest.raises(ValueError, match="0 or more"):
        performer.configure(features=-1)
    model = tiny("llama")
    cache = model.init_cache(1, 8)  # made under sdpa: keys and values
    kernels.configure("performer")
    with pytest.raises(ValueError, match="make the cache"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_window_matches_the_dense_float64_mask(backend):
    """i - W < j <= i: the blocked path (T > 2W: blocks of W queries against 2W keys) and the
    single masked call (T <= 2W), with and without keys before the queries, forward and gradients,
    GQA, against a dense float64 reference
    (naive takes its softmax in fp32: 1e-6)."""
    tol = 1e-6 if backend == "naive" else 1e-12
    for T, S, W in ((100, 100, 8), (100, 130, 8), (100, 103, 8), (30, 30, 20)):  # S > T: keys before the queries
        q, k, v = (t.requires_grad_() for t in qkv(T=T, S=S, D=8, seed=T))
        out = kernels.attention(q, k, v, backend=backend, window=W)
        i, j = torch.arange(T)[:, None] + S - T, torch.arange(S)[None]
        ref_mask = (j <= i) & (j > i - W)
        assert torch.equal(kernels.causal_mask(T, S, "cpu", W), ref_mask)
        q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
        ref = softmax_reference(q2, k2, v2, ref_mask)
        assert (out - ref).abs().max().item() < tol
        do = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q2, k2, v2), do)):
            assert (a - b).abs().max().item() < tol


def test_window_refuses_a_mask_and_non_causal():
    q, k, v = qkv(T=8)
    with pytest.raises(ValueError, match="causal"):
        kernels.attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="explicit mask"):
        kernels.attention(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool), window=4)
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        kernels.set_window(-2)


def test_triton_window_skips_key_blocks_forward_and_backward():
    """Our Triton kernel with a window (interpreter, fp32, GQA): output and gradients against the
    float64 dense reference; then keys and values poisoned with NaN in the key blocks that lie
    outside every query's window: a kernel that only masked them would read 0 * NaN = NaN; ours
    never visits them (loop bounds), so everything stays finite and equal."""
    from omnitron.kernels.flash_attention import _INTERPRETER_CONFIG, flash_attention
    block_n = _INTERPRETER_CONFIG[1]
    T, S, W = 40, 168, 10  # one query block (BLOCK_M 64) after 128 cached keys
    q, k, v = (t.float().requires_grad_() for t in qkv(B=1, Hq=2, Hkv=1, T=T, S=S, D=16))
    out = flash_attention(q, k, v, causal=True, window=W)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    mask = kernels.causal_mask(T, S, "cpu", W)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = softmax_reference(q2, k2, v2, mask)
    assert (out - ref).abs().max().item() < 1e-5
    for a, b in zip(grads, torch.autograd.grad(ref, (q2, k2, v2), do.double())):
        assert (a - b).abs().max().item() < 1e-5
    first_seen = S - T - W + 1  # the first key any query sees: 119
    unseen = first_seen // block_n * block_n  # blocks before this one are never visited: keys 0..95
    assert unseen >= 3 * block_n
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[:, :, :unseen], vp[:, :, :unseen] = float("nan"), float("nan")
    qp, kp, vp = q.detach().requires_grad_(), kp.requires_grad_(), vp.requires_grad_()
    out_p = flash_attention(qp, kp, vp, causal=True, window=W)
    gp = torch.autograd.grad(out_p, (qp, kp, vp), do)
    assert torch.equal(out_p, out) and torch.equal(gp[0], grads[0])
    assert torch.equal(gp[1][:, :, unseen:], grads[1][:, :, unseen:]) and not gp[1][:, :, :unseen].any()
    # through the registry (the triton backend takes the window natively)
    assert torch.equal(kernels.attention(q.detach(), k.detach(), v.detach(), backend="triton", window=W), out.detach())


def test_window_kernels_are_in_the_ahead_of_time_compile_jobs():
    """test_all's compile test compiles every job; these are the window variants of each kernel."""
    jobs = [j for j in compile_check.jobs() if j[6]]
    assert {j[0] for j in jobs} == {"fwd", "dkdv", "dq"} and {j[1] for j in jobs} == {80, 90}
    assert all(j[4] for j in jobs) and len(jobs) <= 4


def test_qwen2_sliding_window_matches_transformers(tmp_path):
    """Qwen2 with use_sliding_window (window 6 on the layers from max_window_layers on, and on
    the layers an explicit layer_types names), 30 tokens: logits against transformers' eager
    Qwen2; cached decoding against our forward; config.json round trip."""
    transformers = pytest.importorskip("transformers")
    for max_window_layers, layer_types in ((1, None), (0, ["sliding_attention", "full_attention", "sliding_attention"])):
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                       sliding_window=6, max_window_layers=max_window_layers, layer_types=layer_types,
                                       max_position_embeddings=64)
        hf = transformers.Qwen2ForCausalLM(cfg).eval()
        hf.save_pretrained(tmp_path)
        ours = models.from_pretrained(tmp_path).eval()
        windows = [ours.config.layer_window(i) for i in range(3)]
        assert windows == [0 if t == "full_attention" else 6 for t in hf.config.layer_types]
        x = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert (hf(x).logits - ours(x)[0]).abs().max().item() < 1e-5
        ours.double()
        with torch.no_grad():
            full = ours(x)[0]
        steps, cache = decode_stepwise(ours, x, prefill=9)
        assert (steps - full).abs().max().item() < 1e-10
        assert [k.shape[2] for k in cache.k] == [5 if w else 30 for w in windows]
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            back = transformers.Qwen2ForCausalLM.from_pretrained(d)
            assert back.config.layer_types == hf.config.layer_types and back.config.sliding_window == 6


def test_qwen_refuses_sliding_layer_types_without_a_window(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   layer_types=["sliding_attention", "full_attention"])
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layer_types"):
        models.from_pretrained(tmp_path)
