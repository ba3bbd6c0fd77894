"""Decoding tests for issue 19 (weight-only quantization, speculative decoding, the compiled step
against transformers); to be folded into test_all.py. `python -m pytest test_decode.py -q`.
Nothing here is timed: speed figures come from `bench.py decode`."""
import copy
import json

import pytest
import torch

import generation
import models
import quantize
import sample
import tokenization
from runtime import UserError
from test_all import PADDED_PROMPTS, hf_model, idx, saved, tiny_model, tokens

# the largest logit error of a quantized model, as a fraction of the largest |logit| of the fp32
# model, on tiny random models (2 layers, width 32; measured: int8 0.8% to 3.1%, bf16 0.4% to 1.0%)
TOLERANCE = {"int8": 0.05, "bf16": 0.03}


# ----------------------------------------------------------------------------- weight-only quantization

@pytest.mark.parametrize("scheme", ["int8", "bf16"])
@pytest.mark.parametrize("name", models.available())
def test_quantized_logits_are_within_tolerance_of_fp32(name, scheme):
    """Every nn.Linear replaced (routers kept); the logits stay within TOLERANCE of fp32's. In a
    mixture of experts a small error can flip a token's routing (a discrete choice): the
    positions of switch.py allowed past the tolerance are at most 1 in 16."""
    model = tiny_model(name, **({"eval_capacity_factor": 0.0} if name == "switch" else {}))  # dropless
    quantized = quantize.quantize(copy.deepcopy(model), scheme)
    kind = quantize.Int8Linear if scheme == "int8" else quantize.BF16Linear
    assert isinstance(quantized.lm_head, kind) and not any(type(m) is torch.nn.Linear and n.split(".")[-1]
                                                           not in quantize.KEEP for n, m in quantized.named_modules())
    x = idx(vocab=model.config.vocab_size, T=24)
    with torch.no_grad():
        ref, got = model(x)[0], quantized(x)[0]
    assert got.dtype == torch.float32 and ref.abs().max() > 0.2
    error = (got - ref).abs().amax(dim=-1) / ref.abs().max()  # per position
    assert (error > 0).any()  # really quantized
    allowed_past = error.numel() // 16 if name == "switch" else 0
    assert int((error > TOLERANCE[scheme]).sum()) <= allowed_past, error.max()


def test_int8_per_channel_scales_and_round_trip():
    """gpt-fast's scheme: one scale per output row, max |row| / 127; dequantized rows are within
    half a step of the original; an all-zero row gets scale 1."""
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    q, s = quantize.int8_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert torch.allclose(s[[0, 1, 2, 4, 5]], w.abs().amax(1)[[0, 1, 2, 4, 5]] / 127) and s[3] == 1
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(1)[[0, 1, 2, 4, 5]] == 127).all()


def test_quantized_model_decodes_with_an_fp32_cache_and_compiled_steps_agree():
    """The KV cache keeps the activations' dtype (generation.compute_dtype), not lm_head's int8;
    the compiled step over the int8 model gives the eager tokens."""
    model = quantize.quantize(tiny_model("llama", vocab_size=50, block_size=32, n_layer=1, n_kv_head=2), "int8")
    assert generation.compute_dtype(model) == torch.float32
    x, pad = generation.left_pad(PADDED_PROMPTS)
    _, cache = generation.prefill(model, x, pad, 32)
    assert cache.k[0].dtype == torch.float32
    eager = torch.stack(list(generation.generate(model, x, 20, temperature=0, pad=pad)), 1)
    compiled = torch.stack(list(generation.generate(model, x, 20, temperature=0, pad=pad, compile=True)), 1)
    assert torch.equal(compiled, eager)


# ----------------------------------------------------------------------------- speculative decoding

def perturbed(model, std, seed=1):
    """A draft that agrees with model on some tokens: model's weights plus Gaussian noise."""
    draft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return draft


@pytest.mark.parametrize("name", models.available())
def test_speculative_greedy_equals_plain_greedy(name):
    """Leviathan et al. 2023 at temperature 0: the tokens of the model alone, for a left-padded
    batch; a draft that partly agrees (some rounds keep a few tokens, some none) and the model as
    its own draft (every round keeps all k: the draft's last token is fed afterwards)."""
    model = tiny_model(name, block_size=128)
    x, pad = generation.left_pad(PADDED_PROMPTS)
    want = torch.stack(list(generation.generate(model, x, 40, temperature=0, pad=pad)), 1)
    for draft, k in ((perturbed(model, 0.05), 3), (model, 4)):
        stats = {}
        got = torch.stack(list(generation.generate(model, x, 40, temperature=0, pad=pad, draft=draft, speculate_k=k,
                                                   stats=stats)), 1)
        assert torch.equal(got, want)
        assert 0 < stats["accepted"] <= stats["drafted"] and (draft is not model or stats["accepted"] == stats["drafted"])


def test_speculative_greedy_equals_transformers_generate(tmp_path):
    """Greedy tokens of ours (plain, and speculative with a 1-layer draft) are transformers'
    generate's on a tiny random Llama (compiled = eager: test_all.py's compiled-decoding test)."""
    hf = hf_model("llama", seed=3)
    ours = saved(hf, tmp_path)
    prompt = tokens(8, seed=4)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20)[:, 8:]
    draft = tiny_model("llama", seed=5, n_layer=1, n_kv_head=2)
    for kw in ({}, {"draft": draft, "speculate_k": 3}):
        assert torch.equal(torch.stack(list(generation.generate(ours, prompt, 20, temperature=0, **kw)), 1), want), kw


def test_rejection_rule_draws_from_the_target_distribution():
    """speculative_accept on 400,000 independent rows, vocabulary 5, k = 3, position-wise target p
    and draft q that differ (a token p never draws, one q never draws): the token a row emits at
    position j (its j-th kept draft token, or the one drawn after them) follows p_j. Deterministic
    seed; 6 binomial standard deviations of slack at the rarest position. The draft's own tokens
    are far from p (total variation > 0.1), so ignoring the rule would fail."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.10, 0.40, 0.20, 0.30, 0.00], [0.25, 0.25, 0.25, 0.05, 0.20],
                      [0.60, 0.10, 0.10, 0.10, 0.10], [0.05, 0.05, 0.10, 0.30, 0.50]])
    q = torch.tensor([[0.30, 0.20, 0.20, 0.10, 0.20], [0.10, 0.50, 0.10, 0.20, 0.10],
                      [0.30, 0.30, 0.00, 0.20, 0.20]])
    B, k, V = 400_000, 3, 5
    drafted = torch.multinomial(q, B, replacement=True, generator=g).t()  # (B, k), column j from q_j
    accepted, nxt = generation.speculative_accept(p.expand(B, -1, -1), q.expand(B, -1, -1), drafted, g)
    emitted = torch.cat([drafted, torch.zeros(B, 1, dtype=torch.long)], 1)
    emitted[torch.arange(B), accepted] = nxt  # row b: drafted[:accepted], then nxt
    for j in range(k + 1):
        rows = accepted >= j
        freq = torch.bincount(emitted[rows, j], minlength=V).double() / rows.sum()
        slack = 6 * (0.25 / rows.sum().double()).sqrt()
        assert (freq - p[j]).abs().max() < slack, (j, freq, p[j])
        if j < k:
            assert 0.5 * (q[j] - p[j]).abs().sum() > 0.1
    assert 0 < accepted.float().mean() < k


def test_speculative_sampling_keeps_the_model_distribution():
    """End to end through both KV caches, with top-p: 20,000 rows of one prompt sample 3 tokens with
    a perturbed draft (k = 2); the marginal of each new token matches the model's exact
    distribution (enumerated over the 8-token vocabulary with token_probabilities, the filter that
    plain sampling uses) within 6 binomial standard deviations."""
    model = tiny_model("llama", vocab_size=8, block_size=32, n_layer=1)
    draft = perturbed(model, 0.15)
    settings = dict(temperature=0.9, top_p=0.95)
    prompt = tokens(5, B=1, seed=2) % 8
    B = 20_000
    g = torch.Generator().manual_seed(0)
    stats = {}
    out = torch.stack(list(generation.generate(model, prompt.expand(B, -1), 3, generator=g, draft=draft,
                                               speculate_k=2, stats=stats, **settings)), 1)
    assert 0 < stats["accepted"] < stats["drafted"]
    with torch.no_grad():  # exact marginals: p(t1), sum_t1 p(t1) p(t2 | t1), ...
        joint = torch.ones(1)
        seqs = prompt
        for step in range(3):
            probs = generation.token_probabilities(model(seqs)[0][:, -1], **settings)  # (n, 8)
            marginal = (joint[:, None] * probs).sum(0)
            freq = torch.bincount(out[:, step], minlength=8).float() / B
            assert (freq - marginal).abs().max() < 6 * (0.25 / B) ** 0.5, (step, freq, marginal)
            joint = (joint[:, None] * probs).reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(8, 0), torch.arange(8).repeat(len(seqs))[:, None]], 1)


def test_speculative_refuses_what_it_cannot_do():
    model = tiny_model("llama", block_size=32)
    x = tokens(8, B=1)
    with pytest.raises(ValueError, match="vocabulary"):
        list(generation.generate(model, x, 5, draft=tiny_model("llama", vocab_size=60)))
    with pytest.raises(ValueError, match="block_size"):
        list(generation.generate(model, x, 30, draft=model))
    with pytest.raises(ValueError, match="KV cache"):
        list(generation.generate(model, x, 5, draft=model, use_cache=False))


# ----------------------------------------------------------------------------- sample.py

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A saved tiny Llama with a character tokenizer of the 95 printable ASCII characters, a 1-layer
    draft of the same vocabulary, and one of another vocabulary (same characters)."""
    root = tmp_path_factory.mktemp("decode_models")
    for name, kw in (("main", {}), ("draft", {"n_layer": 1}), ("other", {"vocab_size": 120})):
        tiny_model("llama", **{"vocab_size": 96, "block_size": 256, **kw}).save_pretrained(root / name)
        tokenization.CharTokenizer([chr(i) for i in range(32, 127)]).save(root / name)
    return root


@pytest.mark.parametrize("extra", [["--quantize", "int8"], ["--quantize", "bf16"], ["--draft", "DRAFT"],
                                   ["--draft", "DRAFT", "--quantize", "int8", "--num_samples", "2"]])
def test_sample_py_quantize_and_draft_run(model_dirs, capsys, extra):
    extra = [str(model_dirs / "draft") if a == "DRAFT" else a for a in extra]
    base = ["--out_dir", str(model_dirs / "main"), "--prompt", "ab", "--max_new_tokens", "12", "--temperature", "0",
            "--device", "cpu"]
    assert sample.main(base) == 0
    plain = capsys.readouterr().out
    assert sample.main(base + extra) == 0
    out = capsys.readouterr().out
    if "--quantize" not in extra:
        assert out.split("-" * 40)[0].strip() == plain.strip()  # speculative greedy: the same text


@pytest.mark.parametrize("extra,words", [(["--draft", "nowhere"], "draft"), (["--draft", "OTHER"], "vocabulary"),
                                         (["--quantize", "int4"], "quantize"), (["--speculate_k", "0"], "speculate_k")])
def test_sample_py_decoding_user_errors_are_one_line(model_dirs, extra, words):
    extra = [str(model_dirs / "other") if a == "OTHER" else a for a in extra]
    with pytest.raises((UserError, ValueError)) as error:
        sample.main(["--out_dir", str(model_dirs / "main"), "--max_new_tokens", "4", "--device", "cpu", *extra])
    assert "\n" not in str(error.value) and words in str(error.value), error.value


# ----------------------------------------------------------------------------- bench.py decode

def test_bench_decode_runs_and_reports_the_roofline(capsys):
    """bench.py decode end to end on a tiny model (no figure is checked: speed comes from bench.py
    only): every non-compiled mode of ours, greedy tokens equal to fp32 where they must be, bytes
    per token from the weights' dtypes."""
    import bench
    rows = bench.main(["decode", "--vocab_size", "100", "--n_layer", "3", "--n_embd", "64", "--n_head", "4",
                       "--n_kv_head", "2", "--intermediate_size", "128", "--block_size", "256", "--batches", "1,2",
                       "--new_tokens", "8", "--reps", "1", "--modes", "cache,bf16,int8,speculative", "--step_variants",
                       "false", "--json"])
    assert rows == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rows = [json.loads(line) for line in out]
    assert [r["mode"] for r in rows] == ["cache", "bf16", "int8", "speculative"] * 2
    by = {(r["batch"], r["mode"]): r for r in rows}
    for batch in (1, 2):
        assert by[batch, "speculative"]["same_tokens"] == 1.0 and 0 <= by[batch, "speculative"]["acceptance"] <= 1
        assert by[batch, "int8"]["mb_per_token"] < 0.5 * by[batch, "cache"]["mb_per_token"]
        assert 0 < by[batch, "cache"]["roofline"] and by[batch, "cache"]["bandwidth_gb_s"] > 0
    assert by[2, "cache"]["mb_per_token"] < by[1, "cache"]["mb_per_token"]  # weights read once for both rows
