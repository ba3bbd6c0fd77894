"""Long context (issue 15, part A): Performer (FAVOR+) attention and sliding-window attention.

References: FAVOR+'s own kernel formula in float64 (phi(q).phi(k) products, normalised), exact
softmax attention in float64, a dense float64 window mask, transformers' Qwen2 with
use_sliding_window, and each row of a left-padded batch decoded alone.
"""
import math
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (the Triton window path)

import pytest  # noqa: E402
import torch  # noqa: E402

import generation  # noqa: E402
import kernels  # noqa: E402
import models  # noqa: E402
import runtime  # noqa: E402
from kernels import compile_check, performer  # noqa: E402

V = 61


@pytest.fixture(autouse=True)
def default_attention():
    """Every test starts and ends with the default attention settings (they are process-wide)."""
    kernels.configure()
    performer.set_step(0)
    yield
    kernels.configure()
    performer.set_step(0)


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


# ----------------------------------------------------------------------------- models: decoding, padding

def tiny(name, **overrides):
    module = models.get(name)
    torch.manual_seed(0)
    cfg = module.Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, **overrides)
    return module.Model(cfg).double().eval()


def decode_stepwise(model, seq, prefill=5, pad=None):
    with torch.no_grad():
        cache = model.init_cache(seq.shape[0], seq.shape[1], pad=pad)
        steps = [model(seq[:, :prefill], cache=cache)[0]]
        steps += [model(seq[:, t:t + 1], cache=cache)[0] for t in range(prefill, seq.shape[1])]
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("name", ["llama", "gpt"])
@pytest.mark.parametrize("attn,window", [("performer", 0), ("sdpa", 6)])
def test_cached_decoding_equals_the_parallel_form(name, attn, window):
    """Token by token (after a prefill of 5) against one forward of 30 tokens (5 windows); the cache
    holds O(1) per Performer layer and the last W - 1 positions per windowed layer. (Every model
    file: test_all.py's test_model_contract.)"""
    kernels.configure(attn, window)
    model = tiny(name)
    seq = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)[0]
    steps, cache = decode_stepwise(model, seq)
    assert (steps - full).abs().max().item() < 1e-10
    if attn == "performer":
        S, z, c = cache.state[0]
        m = performer.num_features(model.config.head_dim)
        assert S.shape == (2, model.config.n_kv_head, m, model.config.head_dim) and z.shape == (2, model.config.n_kv_head, m)
        assert all(k.numel() == 0 for k in cache.k)
    else:
        assert all(k.shape[2] == window - 1 for k in cache.k)
        kernels.configure(attn, 0)  # and the window changed the model
        with torch.no_grad():
            assert not torch.allclose(model(seq)[0], full)


@pytest.mark.parametrize("attn,window", [("performer", 0), ("sdpa", 5)])
def test_left_padded_rows_decode_as_they_would_alone(attn, window):
    """Two prompts of 9 and 4 tokens in one left-padded batch (Performer: the padded slots' features
    are zero; the window: their keys masked), then 12 tokens fed one by one: each row's logits are
    those of the row run alone."""
    kernels.configure(attn, window)
    model = tiny("llama")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (9 + 12, 4 + 12)]
    pad = torch.tensor([0, 5])
    seq = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pad.tolist(), rows)])
    batched, _ = decode_stepwise(model, seq, prefill=9, pad=pad)
    for b, (row, p) in enumerate(zip(rows, pad.tolist())):
        with torch.no_grad():
            alone = model(row[None])[0][0]
        assert (batched[b, p:] - alone).abs().max().item() < 1e-10


def test_cache_take_rows_keeps_the_state():
    """evaluation.py reuses a context's cache per candidate through KVCache.take(rows)."""
    kernels.configure("performer")
    model = tiny("llama")
    seq = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.init_cache(2, 20)
        model(seq[:, :12], cache=cache)
        taken = cache.take(torch.tensor([1, 1, 0]))
        out = model(seq[[1, 1, 0], 12:], cache=taken)[0]
        ref = model(seq[[1, 1, 0]])[0][:, 12:]
    assert (out - ref).abs().max().item() < 1e-10


def test_speculative_decoding_refuses_a_cache_that_cannot_rewind():
    kernels.configure("sdpa", 4)
    model = tiny("llama")
    cache = model.init_cache(1, 16)
    with pytest.raises(ValueError, match="cannot rewind"):
        generation._rewind(cache, 3)
    with pytest.raises(ValueError, match="static"):
        model.init_cache(1, 16, static=True)


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
    from kernels.flash_attention import _INTERPRETER_CONFIG, flash_attention
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
                                       max_position_embeddings=64, attn_implementation="eager")
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


# ----------------------------------------------------------------------------- command lines

def test_attention_flags_reach_every_command():
    """--attn performer, --attn_window, --performer_features and --performer_redraw: train.py's flag
    table, and sample.py's and bench.py's parsers (runtime.add_attention_flags)."""
    import bench
    import sample
    import train
    names = {name for name, _, _ in runtime.ATTENTION_FLAGS}
    assert names <= {name for name, _, _ in train.TRAIN_FLAGS}
    runtime.configure_attention(sample.parser().parse_args(["--attn", "performer", "--performer_features", "32"]))
    assert kernels.get_backend("cpu") == "performer" and performer.num_features(64) == 32
    runtime.configure_attention(bench.parser(["speed"]).parse_args(["speed", "--attn", "sdpa", "--attn_window", "16"]))
    assert kernels.get_window() == 16 and kernels.get_backend("cpu") == "sdpa" and performer.num_features(64) == 266


def test_train_and_sample_with_performer_and_a_window(tmp_path, capsys):
    """--attn performer (with redraws) and --attn_window through train.run and sample.py end to end."""
    import sample
    import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO: but soft, what light through yonder window breaks?\n" * 60)
    common = dict(data=str(corpus), data_dir=str(tmp_path / "d"), max_iters=3, batch_size=2, block_size=32,
                  eval_interval=3, eval_iters=1, log_interval=1, sample_tokens=0, device="cpu", n_layer=1,
                  n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64)
    runs = {"performer": dict(attn="performer", performer_features=8, performer_redraw=2), "window": dict(attn_window=8)}
    for name, flags in runs.items():
        result = train.run(model="llama", out_dir=str(tmp_path / name), **common, **flags)
        assert math.isfinite(result["val_loss"])
        if name == "performer":  # steps 0..3, redrawn every 2 steps: the last evaluation's draw is 3 // 2
            assert performer.draw() == 1
    out = capsys.readouterr().out
    assert "attention performer (m = 8 random features)" in out and "window 8" in out
    assert sample.main(["--out_dir", str(tmp_path / "performer"), "--prompt", "ROMEO:", "--max_new_tokens", "5",
                        "--device", "cpu", "--attn", "performer", "--performer_features", "8"]) == 0
    assert kernels.get_backend("cpu") == "performer"


def test_bench_scaling_slope_and_crossover():
    """bench.py attention --scaling's fits: the exponent of a power law, and where one cost curve
    crosses another (interpolated in log-log between the measured lengths around it)."""
    import bench
    assert abs(bench.loglog_slope([(T, 3e-6 * T ** 2) for T in (2048, 4096, 8192)]) - 2.0) < 1e-9
    rows = [{"backend": "sdpa", "T": T, "fwdbwd_ms": 1e-4 * T ** 2} for T in (512, 1024, 2048, 4096)]
    rows += [{"backend": "performer", "T": T, "fwdbwd_ms": 0.2 * T} for T in (512, 1024, 2048, 4096)]
    assert bench.crossover(rows, "performer", "sdpa") == 2000  # 0.2 T = 1e-4 T^2
    assert bench.crossover(rows, "sdpa", "performer") == "below"
    assert bench.quadratic("sdpa") and not bench.quadratic("performer") and not bench.quadratic("sdpa+window")
