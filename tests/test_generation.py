"""omnitron/generation.py and omnitron/quantize.py: decoding (prefill, steps, batches of prompts), sampling
filters against transformers' logits processors, int8 / bf16 weights, speculative decoding."""
import copy
import io
import math

import pytest
import torch

import sample
import train
from omnitron import generation, models, quantize, runtime, tokenization
from omnitron.models import gpt
from tests.helpers import (
    MODEL_VOCAB,
    PADDED_PROMPTS,
    TOKENIZER_IDS,
    TOLERANCE,
    assert_same_survivors,
    bpe_tokenizer_json,
    hf_class,
    hf_model,
    idx,
    logit_sets,
    perturbed,
    randomize,
    refill_rule_greedy,
    run_entry_point,
    saved,
    tiny_model,
    tokens,
)

# ----------------------------------------------------------------------------- decoding (generation.py)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_kv_cache_decoding_equals_recomputation(pos):
    model = tiny_model("gpt", pos=pos)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = torch.stack(list(generation.generate(model, prompt, 25, temperature=0)), dim=1)
        seq = prompt
        for _ in range(25):  # no cache: the whole sequence every step
            seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
        assert torch.equal(cached, seq[:, 7:])
        uncached = torch.stack(list(generation.generate(model, prompt, 25, temperature=0, use_cache=False)), dim=1)
        assert torch.equal(uncached, cached)
        # logits of cached decoding, token by token, equal a single full forward
        full, _ = model(seq)
        cache = model.init_cache(2, 64)
        steps = [model(seq[:, :7], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(7, 32)]
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi"])
def test_kv_cache_decoding_equals_recomputation_llama_qwen_phi(tmp_path, family):
    ours = saved(hf_model(family, seed=5, rope_theta=100.0), tmp_path)
    seq = tokens(30, seed=6)
    with torch.no_grad():
        full, _ = ours(seq)
        cache = ours.init_cache(2, 64)
        assert cache.k[0].shape == (2, ours.config.n_kv_head, 64, ours.config.head_dim)
        steps = [ours(seq[:, :7], cache=cache)[0]] + [ours(seq[:, t:t + 1], cache=cache)[0] for t in range(7, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_generate_past_block_size_refills_the_cache():
    model = tiny_model("gpt").double()  # block_size 64; float64: no near-ties between cached and recomputed logits
    prompt = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(4))
    out = list(generation.generate(model, prompt, 40, temperature=0))
    assert len(out) == 40
    # 50 + 14 tokens fill the cache; token 16 onwards follow the refill from the last 32 of 65 tokens
    with torch.no_grad():
        want = refill_rule_greedy(model, prompt, 40, keep=32)
        assert torch.equal(torch.stack(out, dim=1), want)
        for keep in (31, 33, 64):  # another window gives other tokens after the refill: the check can tell
            other = refill_rule_greedy(model, prompt, 40, keep)
            assert torch.equal(other[:, :15], want[:, :15]) and not torch.equal(other, want)


@pytest.mark.parametrize("name,kw", [("gpt", dict(pos="learned")), ("gpt", dict(pos="sinusoidal")),
                                     ("gpt", dict(pos="rope")), ("llama", dict(n_kv_head=2)),
                                     ("qwen", dict(n_kv_head=2, variant="qwen3")), ("phi", dict(n_kv_head=2))])


def test_batched_prompts_of_different_lengths_decode_as_each_alone(name, kw):
    module = models.get(name)
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)
    model = randomize(module.Model(module.Config(**cfg)), std=0.3).double().eval()  # float64: no near-ties
    idx, pad = generation.left_pad(PADDED_PROMPTS)
    assert pad.tolist() == [0, 5, 3] and idx[1].tolist() == [0] * 5 + [9, 8]
    # with the cache, up to block_size in all (7 + 25 = 32); recomputing, well past it (sliding window)
    for use_cache, n in ((True, 25), (False, 45)):
        batched = torch.stack(list(generation.generate(model, idx, n, temperature=0, pad=pad, use_cache=use_cache)), 1)
        for row, prompt in zip(batched, PADDED_PROMPTS):
            alone = torch.stack(list(generation.generate(model, torch.tensor([prompt]), n, temperature=0,
                                                     use_cache=use_cache)), 1)[0]
            assert torch.equal(row, alone)
    # a static cache (the compiled layout: every slot, masked) gives the logits of a growing one
    with torch.no_grad():
        seq = torch.cat((idx, batched[:, :10]), dim=1)
        logits = []
        for static in (False, True):
            cache = model.init_cache(3, 32, pad=pad, static=static)
            logits.append(torch.cat([model(seq[:, :7], cache=cache)[0]] +
                                    [model(seq[:, t:t + 1], cache=cache)[0] for t in range(7, 17)], dim=1))
        assert (logits[0] - logits[1]).abs().max().item() < 1e-12


def test_decoding_under_bf16_autocast_keeps_a_bf16_cache():
    model, caches = tiny_model("gpt"), []
    make_cache = model.init_cache
    model.init_cache = lambda *a, **kw: caches.append(make_cache(*a, **kw)) or caches[-1]
    idx, pad = generation.left_pad(PADDED_PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # sample.py --dtype bfloat16
        out = list(generation.generate(model, idx, 70, temperature=0, pad=pad))  # past block_size 64: a refill
    assert len(out) == 70 and len(caches) == 2 and all(c.k[0].dtype == torch.bfloat16 for c in caches)
    assert model.lm_head.weight.dtype == torch.float32


def test_compiled_decoding_equals_eager_and_compiles_once():
    """sample.py --compile: the one-token step compiled over a static cache, GQA, padded rows, past
    block_size (the cache is refilled); a second call with other prompts reuses the compiled step."""
    model = tiny_model("llama", vocab_size=50, block_size=32, n_layer=1, n_kv_head=2)
    idx, pad = generation.left_pad(PADDED_PROMPTS)
    eager = torch.stack(list(generation.generate(model, idx, 40, temperature=0, pad=pad)), 1)
    compiled = torch.stack(list(generation.generate(model, idx, 40, temperature=0, pad=pad, compile=True)), 1)
    assert torch.equal(compiled, eager)
    idx, pad = generation.left_pad([[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = torch.stack(list(generation.generate(model, idx, 30, temperature=0, pad=pad, compile=True)), 1)
    assert torch.equal(compiled, torch.stack(list(generation.generate(model, idx, 30, temperature=0, pad=pad)), 1))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert generation.sample_next(logits, temperature=0).item() == 1
    assert {generation.sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)} == {1}
    assert {generation.sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(20)} == {1}
    top2 = {generation.sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert top2 == {1, 3}
    # nucleus 0.9: softmax is [.032, .644, .087, .237]; the top three reach 0.968
    top_p = {generation.sample_next(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(300)}
    assert top_p == {1, 2, 3}


# --- sampling filters as transformers' logits processors (temperature, top-k, top-p, min-p: ties and exact
# boundaries); only ids the tokenizer has are drawn and decoded (a model vocabulary padded past its tokenizer's)


def test_top_p_keeps_only_the_nucleus_at_an_exact_boundary():
    """Probabilities exactly (0.5, 0.25, 0.25) at top_p 0.5: the nucleus is {0};
    (0.3, 0.1, 0.1, 0.5) at top_p 0.8: {0, 3}, as transformers keeps."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[math.log(2), 0., 0.]])
    assert {generation.sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(300)} == {0}
    logits = torch.tensor([[0.3, 0.1, 0.1, 0.5]]).log()
    assert {generation.sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {0, 3}
    assert torch.equal(hf_class("TopPLogitsWarper")(0.8)(None, logits).isfinite(), torch.tensor([[True, False, False, True]]))


LOGITS = logit_sets()


TOP_PS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.875, 0.9, 0.95, 0.9375, 0.99, 1.0]


MIN_PS = [0.0, 0.01, 0.1, 0.125, 0.25, 0.5, 0.9, 1.0]


TOP_KS = [1, 2, 3, 5, 10, 36, 37, 50]


TEMPERATURES = [0.25, 0.5, 0.7, 1.0, 1.5, 2.0]


@pytest.mark.parametrize("name,values", [("temperature", TEMPERATURES), ("top_k", TOP_KS), ("top_p", TOP_PS),
                                         ("min_p", MIN_PS)])


def test_each_filter_keeps_the_tokens_transformers_keeps(name, values):
    for _, logits in LOGITS:
        for value in values:
            assert_same_survivors(logits, **{name: value})


def test_filters_combined_keep_the_tokens_transformers_keeps():
    """temperature, then top-k, then top-p, then min-p, each on what the one before left."""
    g = torch.Generator().manual_seed(1)
    pick = lambda xs: xs[torch.randint(len(xs), (), generator=g)]  # noqa: E731
    for _ in range(50):
        setting = dict(temperature=pick(TEMPERATURES), top_k=pick(TOP_KS + [None]), top_p=pick(TOP_PS + [None]),
                       min_p=pick(MIN_PS + [None]))
        for _, logits in LOGITS:
            assert_same_survivors(logits, **setting)


def test_sampling_draws_only_the_survivors():
    """sample_next draws from filter_logits: every survivor appears, nothing else does."""
    g = torch.Generator().manual_seed(2)
    logits = torch.tensor([[2.0, 1.9, 0.5, -1.0, 1.0, 1.0]])
    for setting in (dict(min_p=0.4), dict(top_k=4), dict(top_p=0.7), dict(top_k=5, top_p=0.9, min_p=0.2),
                    dict(temperature=0.5, min_p=0.1)):
        survivors = set(generation.filter_logits(logits, **setting).isfinite().nonzero()[:, 1].tolist())
        temperature = setting.pop("temperature", 1.0)
        drawn = {generation.sample_next(logits, temperature, generator=g, **setting).item() for _ in range(400)}
        assert drawn == survivors, setting


@pytest.mark.parametrize("setting,message", [
    (dict(temperature=-1.0), "temperature must be >= 0"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k must be an integer >= 0"), (dict(top_p=1.5), "top_p must be between 0 and 1"),
    (dict(top_p=-0.1), "top_p"), (dict(min_p=2.0), "min_p must be between 0 and 1"),
])


def test_sampling_settings_out_of_range_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        generation.check_sampling(**setting)
    model = randomize(gpt.Model(gpt.Config(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)), std=0.3).eval()
    with pytest.raises(ValueError, match=message):
        next(generation.generate(model, torch.tensor([[1, 2]]), 2, **setting))


def test_sample_py_with_a_vocabulary_larger_than_its_tokenizer_runs_to_the_end(padded_vocab_dir, capsys,
                                                                                monkeypatch):
    """320 rows, 281 ids, temperature 1: the run finishes (it was KeyError
    'Invalid token for decoding: 281' from tiktoken)."""
    code, err = run_entry_point(["sample.py", "--out_dir", str(padded_vocab_dir), "--prompt", "ROMEO:",
                                 "--temperature", "1", "--top_k", "0", "--max_new_tokens", "200", "--device", "cpu",
                                 "--dtype", "float32"], capsys, monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and err == [], err
    assert out.startswith("ROMEO:") and len(out) > 100


def test_sampling_never_proposes_ids_the_tokenizer_lacks(padded_vocab_dir):
    """Greedy and sampled, one row and a batch: every id is one the tokenizer has; greedy is the
    argmax over those ids (recomputed here from the full forward at every step)."""
    model, tok = sample.load(padded_vocab_dir)
    allowed = generation.decodable(tok, MODEL_VOCAB)
    assert allowed.sum() == TOKENIZER_IDS and not allowed[TOKENIZER_IDS:].any()
    prompt = torch.tensor([tok.encode("ROMEO: the")])
    assert model(prompt)[0][0, -1].argmax() >= TOKENIZER_IDS  # unmasked, greedy would take a padded row
    greedy = [t.item() for t in generation.generate(model, prompt, 20, temperature=0, allowed=allowed)]
    seq = prompt
    with torch.no_grad():
        for want in greedy:
            nxt = model(seq)[0][:, -1, :TOKENIZER_IDS].argmax(-1)
            assert nxt.item() == want
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack(list(generation.generate(model, prompt.repeat(4, 1), 50, temperature=1.5, generator=g,
                                                 allowed=allowed)))
    assert drawn.max() < TOKENIZER_IDS
    # stream and complete take the ids from their tokenizer
    out = io.StringIO()
    text = generation.stream(model, tok, prompt[0].tolist(), 60, out=out, temperature=1.5, generator=g)
    assert out.getvalue() == text and len(text) > 30
    assert generation.complete(model, tok, [prompt[0].tolist()], 20, temperature=0) == [tok.decode(greedy)]


def test_decode_skips_ids_it_lacks_as_tokenizers_does(tmp_path):
    """Our decode against tokenizers' Tokenizer.decode on id lists with ids past the tokenizer's
    last one (tokenizers skips them), and the char tokenizer and gaps between ids likewise."""
    ref = bpe_tokenizer_json(TOKENIZER_IDS)
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = tokenization.hf_tokenizer(tmp_path)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, 400, (int(torch.randint(1, 30, (), generator=g)),), generator=g).tolist()
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), ids
    assert ours.decode([281, 5000]) == ref.decode([281, 5000]) == ""
    char = tokenization.CharTokenizer("abc")
    assert char.decode([0, 3, 2, 99]) == "ac" and list(char.known_ids) == [0, 1, 2]
    import tiktoken  # a gap: ids 256..259 are nobody's
    enc = tiktoken.Encoding(name="gap", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<s>": 260})
    gap = tokenization.TiktokenTokenizer(enc, "test")
    assert gap.decode([104, 257, 260, 105, 300]) == "h<s>i"
    allowed = generation.decodable(gap, 264)
    assert allowed[:256].all() and not allowed[256:260].any() and allowed[260] and not allowed[261:].any()


def test_train_closing_sample_with_a_vocabulary_larger_than_its_tokenizer(padded_vocab_dir, sampling_corpus, tmp_path,
                                                                         capsys):
    """train.py's closing sample (stream) of a fine-tuned model of 320 rows and 281 ids."""
    train.main([f"--data={sampling_corpus}", f"--data_dir={tmp_path / 'd'}", f"--out_dir={tmp_path / 'ft'}",
                f"--init_from={padded_vocab_dir}", "--max_iters=1", "--eval_interval=1", "--eval_iters=1",
                "--batch_size=2", "--block_size=16", "--device=cpu", "--dtype=float32", "--sample_tokens=100",
                "--learning_rate=0"])
    out = capsys.readouterr().out
    assert "sample:" in out and len(out.split("sample:", 1)[1]) > 40


def test_sample_py_min_p_and_a_batch_run(padded_vocab_dir, capsys):
    """--min_p reaches the sampler; the batched path (complete) too."""
    assert sample.main(["--out_dir", str(padded_vocab_dir), "--prompt", "ROMEO:", "--prompt", "JULIET: O",
                        "--num_samples", "2", "--temperature", "1", "--top_k", "0", "--min_p", "0.05",
                        "--max_new_tokens", "30", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("-" * 40) == 3


# --- fast decoding: weight-only int8 / bf16 logits against fp32, speculative decoding against plain greedy and


# transformers, the rejection rule's distribution (nothing timed: speed figures come from bench.py decode)
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


def large_norms_small_weights(model, k=300.0):
    """The same kind of checkpoint with its norms' weights (and biases) k times larger and every other
    matrix but the embeddings k times smaller, as in trained float16 models: a Linear reads inputs in
    the hundreds through weights near 0.001, so x @ W_int8^T (127 / max|W| times the output) passes
    float16's 65,504 while the outputs stay small. In place; returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.mul_(k)
            elif p.dim() >= 2 and not name.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight")):
                p.div_(k)
    return model


def test_int8_linear_does_not_overflow_float16():
    """Linear(64, 1), weights 0.01, x = 10: 6.40 in every dtype; the unscaled product (127 * 10 * 64)
    does not fit float16."""
    linear = torch.nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.01)
    q = quantize.Int8Linear(linear)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = q(torch.full((2, 64), 10.0, dtype=dtype))
        assert y.dtype == dtype and torch.allclose(y.float(), torch.full((2, 1), 6.4), rtol=1e-2), (dtype, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", models.available())
def test_int8_logits_on_every_checkpoint_dtype_are_within_tolerance(name, dtype):
    """quantize(..., "int8") keeps a checkpoint's dtype (sample.py --quantize int8): on fp32, bf16 and
    fp16 checkpoints with large norms and small weights (large_norms_small_weights), the int8 model's
    logits are finite and within TOLERANCE["int8"] of the same weights' float64 forward."""
    untied = {} if name == "gpt" else {"tie_embeddings": False}  # the head's matrix scaled, not the embedding
    model = large_norms_small_weights(tiny_model(name, **untied)).to(dtype)
    x = idx(vocab=model.config.vocab_size, T=24)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x)[0]
        got = quantize.quantize(copy.deepcopy(model), "int8")(x)[0]
    assert got.dtype == dtype and ref.abs().max() > 1.0
    assert torch.isfinite(got).all()
    error = (got.double() - ref).abs().amax(dim=-1) / ref.abs().max()  # per position
    assert (error > 0).any() and error.max() <= TOLERANCE["int8"], error.max()


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
    generate's on a tiny random Llama (compiled = eager: the compiled-decoding test in this file)."""
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
    with pytest.raises((runtime.UserError, ValueError)) as error:
        sample.main(["--out_dir", str(model_dirs / "main"), "--max_new_tokens", "4", "--device", "cpu", *extra])
    assert "\n" not in str(error.value) and words in str(error.value), error.value
