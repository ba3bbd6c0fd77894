"""Positions (issue 15, measurement 3): models/gpt.py's NoPE and RoPE context extension, and bench.py
positions' per-position evaluation. Each test checks against an independent reference: transformers'
ROPE_INIT_FUNCTIONS, a float64 loop of prefix forwards, exact invariants."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import models
from models import gpt

ROOT = Path(__file__).resolve().parent


def tiny_gpt(seed=0, std=0.3, **overrides):
    """A 2-layer GPT of width 32 (4 heads of 8), vocab 50, block_size 16, every parameter random with
    std (large enough that attention is far from uniform, so positions matter)."""
    torch.manual_seed(seed)
    model = gpt.Model(gpt.Config(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32), **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tokens(n, T, seed=1, vocab=50):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- NoPE

def test_nope_has_no_position_input_and_stays_causal():
    """Without positions a layer sees the tokens before t as a set: in one layer, permuting them leaves
    t's logits unchanged (with every position method it does not). In any depth, a sequence of one
    repeated token gives the same logits at every position (a position table or sinusoids do not); a
    later token never changes an earlier logit; no parameter holds positions."""
    x = tokens(2, 12)
    perm = torch.cat((torch.randperm(11, generator=torch.Generator().manual_seed(3)), torch.tensor([11])))
    assert not torch.equal(perm, torch.arange(12))
    same = torch.full((1, 12), 7)
    with torch.no_grad():
        for pos in ("none", "learned", "sinusoidal", "rope"):
            model = tiny_gpt(pos=pos, n_layer=1)
            gap = (model(x)[0][:, -1] - model(x[:, perm])[0][:, -1]).abs().max().item()
            assert gap < 1e-5 if pos == "none" else gap > 1e-2, (pos, gap)
        for pos in ("none", "learned", "sinusoidal"):
            logits = tiny_gpt(pos=pos, n_layer=3)(same)[0][0]
            spread = (logits - logits[0]).abs().max().item()
            assert spread < 1e-5 if pos == "none" else spread > 1e-2, (pos, spread)
        nope = tiny_gpt(pos="none")
        future = x.clone()
        future[:, 7:] = (future[:, 7:] + 1) % 50
        assert torch.equal(nope(x)[0][:, :7], nope(future)[0][:, :7])
        assert (nope(x)[0][:, 7:] - nope(future)[0][:, 7:]).abs().max() > 1e-2
    learned = tiny_gpt(pos="learned")
    assert sorted(set(dict(learned.named_parameters())) - set(dict(nope.named_parameters()))) == ["transformer.wpe.weight"]
    assert nope.max_positions is None  # any length


def test_nope_decodes_with_the_kv_cache_as_in_one_forward():
    model, x = tiny_gpt(pos="none"), tokens(2, 20)
    with torch.no_grad():
        full = model(x)[0]
        cache = model.init_cache(2, 32)
        steps = [model(x[:, :5], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(5, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_learned_table_refuses_longer_sequences_in_one_line():
    model = tiny_gpt(pos="learned")
    with torch.no_grad():
        model(tokens(1, 16))  # the whole table is fine
        with pytest.raises(ValueError) as e:
            model(tokens(1, 17))
    assert "\n" not in str(e.value) and "longer than the learned position table (block_size 16)" in str(e.value)
    for pos in ("sinusoidal", "rope", "none"):  # computed positions: any length
        with torch.no_grad():
            assert tiny_gpt(pos=pos)(tokens(1, 40))[0].shape == (1, 40, 50)


def test_sinusoidal_input_is_scaled_embedding_plus_sinusoids():
    """Vaswani et al. 3.4: the embedding times sqrt(d_model), plus PE[p, 2i] = sin(p / 10000^(2i/d)),
    PE[p, 2i+1] = cos(...): the first block's input against that formula in float64."""
    model, x = tiny_gpt(pos="sinusoidal", std=0.02), tokens(1, 10)
    seen = []
    model.transformer.drop.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(x)
    p = torch.arange(10, dtype=torch.float64)[:, None]
    angles = p / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    pe = torch.stack((angles.sin(), angles.cos()), -1).flatten(-2)
    want = model.transformer.wte.weight.double()[x[0]] * math.sqrt(32) + pe
    assert (seen[0][0].double() - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------- RoPE's context extension

ROPE_CASES = {  # rope_type: gpt.Config overrides; transformers' rope_parameters
    # theta 100 and a 64-token context put head_dim 16's pairs on both sides of YaRN's ramp and Llama 3.1's bands
    "linear": (dict(rope_factor=4.0), {"factor": 4.0}),
    "dynamic": (dict(rope_factor=2.0), {"factor": 2.0}),
    "dynamic_factor1": (dict(rope_type="dynamic", rope_factor=1.0), {"rope_type": "dynamic", "factor": 1.0}),
    "yarn": (dict(rope_factor=4.0, rope_beta_fast=8.0), {"factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0,
                                                       "original_max_position_embeddings": 64}),
    "llama3": (dict(rope_factor=8.0, rope_original_max_len=32), {"factor": 8.0, "low_freq_factor": 1.0,
                                                                 "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_extension_frequencies_equal_transformers(case):
    """gpt.rope_frequencies (inverse frequencies and the cos/sin scale) against transformers'
    ROPE_INIT_FUNCTIONS for the same configuration, inside and past the trained length (dynamic)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    ours, theirs = ROPE_CASES[case]
    rope_type = ours.get("rope_type", case)
    cfg = gpt.Config(vocab_size=50, block_size=64, n_head=2, n_embd=32, pos="rope", rope_theta=100.0,
                     **{"rope_type": rope_type, **ours})
    hf = LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64,
                     rope_parameters={"rope_type": rope_type, "rope_theta": 100.0, **theirs})
    for seq_len in (64, 256):
        inv_freq, scale = gpt.rope_frequencies(cfg, cfg.head_dim, seq_len)
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len=seq_len)
        assert torch.allclose(inv_freq.double(), ref.double(), rtol=1e-6, atol=0), (seq_len, inv_freq, ref)
        assert math.isclose(scale, ref_scale, rel_tol=1e-6)
    default = gpt.rope_frequencies(gpt.Config(block_size=64, n_head=2, n_embd=32, pos="rope", rope_theta=100.0), 16, 256)[0]
    assert not torch.allclose(inv_freq, default)  # the extension changes something


def test_rope_extension_changes_the_forward_as_its_frequencies_say():
    """Linear interpolation by s at position s * p is plain RoPE at position p: the rotary tables, and so
    the whole forward of a sequence whose positions are all multiples of s. The check through the model:
    logits with rope_type linear (s = 2) at positions 0, 2, 4, ... via a KV cache equal those of plain RoPE
    at 0, 1, 2, ..."""
    plain = tiny_gpt(pos="rope")
    linear = tiny_gpt(pos="rope", rope_type="linear", rope_factor=2.0)
    pos = torch.arange(10)[None]
    c1, s1 = gpt.rope_tables(plain.config, 8, pos, 10)
    c2, s2 = gpt.rope_tables(linear.config, 8, 2 * pos, 20)
    assert torch.allclose(c1, c2, atol=1e-6) and torch.allclose(s1, s2, atol=1e-6)
    x = tokens(1, 10)
    with torch.no_grad():
        assert (plain(x)[0] - linear(x)[0]).abs().max() > 1e-3  # it does change the model


def test_rope_type_needs_rotary_positions():
    with pytest.raises(ValueError, match="rope_type yarn rescales rotary positions: it needs pos rope, not learned"):
        gpt.Config(pos="learned", rope_type="yarn", rope_factor=2.0)
    with pytest.raises(ValueError, match="pos must be learned, sinusoidal, rope, none; not 'alibi'"):
        gpt.Config(pos="alibi")


@pytest.mark.parametrize("overrides", [dict(pos="none"), dict(pos="rope", rope_type="linear", rope_factor=4.0),
                                       dict(pos="rope", rope_type="dynamic", rope_factor=2.0),
                                       dict(pos="rope", rope_type="yarn", rope_factor=4.0, rope_beta_fast=16.0,
                                            rope_attention_factor=1.2)],
                         ids=["nope", "linear", "dynamic", "yarn"])
def test_positions_round_trip_through_config_json(tmp_path, overrides):
    """What the new Config fields say is written to config.json and read back: the same config and the
    same logits, past block_size too (where dynamic scaling acts)."""
    ours = tiny_gpt(**overrides)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["position_embedding_type"] == overrides["pos"]
    if overrides["pos"] == "rope":
        assert written["rope_parameters"]["rope_type"] == overrides["rope_type"]
    back = models.from_pretrained(tmp_path)
    assert back.config == ours.config
    x = tokens(2, 40)
    with torch.no_grad():
        assert torch.equal(back(x)[0], ours(x)[0])


def test_config_json_rope_keys_are_refused_in_one_line(tmp_path):
    ours = tiny_gpt(pos="rope", rope_type="yarn", rope_factor=2.0)
    ours.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "rope_parameters": {**cfg["rope_parameters"], "mscale": 0.7}}))
    with pytest.raises(ValueError, match="mscale"):
        models.from_pretrained(tmp_path)
    path.write_text(json.dumps({**cfg, "position_embedding_type": "learned"}))  # scaling a table: refused
    with pytest.raises(ValueError, match="needs pos rope, not learned"):
        models.from_pretrained(tmp_path)
    # the Hub's older form, with a top-level rope_theta (what our earlier files wrote) and rope_scaling
    hub_form = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    path.write_text(json.dumps({**hub_form, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 3.0}}))
    loaded = models.from_pretrained(tmp_path).config
    assert (loaded.rope_type, loaded.rope_factor, loaded.rope_theta) == ("linear", 3.0, 10000.0)


def test_gpt_copies_of_llama_rope_code_are_marked_and_checked():
    """The rope code gpt.py shares with llama.py is marked, so test_copied_from_markers_match_their_source
    keeps the copies equal to llama.py's."""
    from test_all import copied_from_problems
    text = (ROOT / "models" / "gpt.py").read_text()
    count, problems = copied_from_problems(text, "models/gpt.py")
    assert not problems
    for name in ("rope_frequencies", "rope_tables", "_rope_config", "_rope_parameters", "apply_rope"):
        assert f"# Copied from models/llama.py:{name}\n" in text
    edited = text.replace("theta = theta * (s * seq_len", "theta = theta * (2 * s * seq_len")
    assert edited != text and copied_from_problems(edited, "gpt.py")[1]


# ----------------------------------------------------------------------------- bench.py positions

def test_position_losses_equal_prefix_forwards_in_float64():
    """bench.position_losses (one forward per batch of windows) against -log softmax computed in float64
    from a separate forward of each prefix x[:, :t+1]; bucket_means against plain means, None past a
    learned table."""
    model = tiny_gpt(pos="rope")
    x, y = tokens(5, 12, seed=2), tokens(5, 12, seed=3)
    got = bench.position_losses(model, x, y, batch_size=2)  # 3 batches, the last of 1
    model = copy.deepcopy(model).double()
    want = torch.zeros(12, dtype=torch.float64)
    with torch.no_grad():
        for t in range(12):
            logp = torch.log_softmax(model(x[:, :t + 1])[0][:, -1].double(), -1)
            want[t] = -logp.gather(1, y[:, t:t + 1]).mean()
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert bench.bucket_means(got, [0, 4, 8, 12]) == pytest.approx([want[0:4].mean().item(), want[4:8].mean().item(), want[8:].mean().item()])
    assert bench.bucket_means(got[:8], [0, 4, 8, 12])[2] is None


def test_val_windows_and_unigram_entropy(tmp_path):
    import data
    (tmp_path / "c.txt").write_text("abcab" * 400)
    ds = data.prepare(str(tmp_path / "c.txt"), "char", str(tmp_path / "d"), quiet=True)
    x, y = bench.val_windows(ds, 30, 4)
    val = np.asarray(ds.tokens("val"))
    assert x.shape == (4, 30) and torch.equal(x[:, 1:], y[:, :-1])
    assert x[0].tolist() == val[:30].tolist() and y[-1].tolist() == val[-30:].tolist()
    with pytest.raises(bench.UserError, match="fewer than"):
        bench.val_windows(ds, len(val), 1)
    counts = np.bincount(np.asarray(ds.tokens("train")))
    p = counts[counts > 0] / counts.sum()
    assert bench.unigram_entropy(ds) == pytest.approx(-(p * np.log(p)).sum()) and 1.0 < bench.unigram_entropy(ds) < math.log(3) + 1e-9


def test_bench_positions_end_to_end(tmp_path, capsys):
    """A miniature bench.py positions: trains, fine-tunes, evaluates; the learned table is '-' past its
    length; a second call reuses every run (cached by settings) and gives the same summary."""
    (tmp_path / "c.txt").write_text("".join(chr(97 + (i * i) % 7) for i in range(6000)))
    argv = ["positions", "--methods", "learned,rope", "--seeds", "1", "--max_iters", "2", "--batch_size", "2",
            "--block_size", "16", "--n_layer", "1", "--n_embd", "16", "--eval_windows", "3", "--bucket", "4",
            "--finetune", "linear", "--finetune_iters", "1", "--eval_iters", "1", "--data", str(tmp_path / "c.txt"),
            "--data_dir", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--plot", "", "--device", "cpu"]
    assert bench.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["learned", "rope", "rope+linear", "rope+dynamic", "rope+yarn", "rope+linear+ft"]
    assert summary["edges"] == [0, 16, 32, 64]
    assert rows["learned"]["buckets"][0] is not None and rows["learned"]["buckets"][1:] == [None, None]
    assert all(b is not None for r in summary["rows"][1:] for b in r["buckets"])
    assert len(summary["curves"]["learned-s0"]) == 16 and len(summary["curves"]["rope-s0"]) == 64
    ft = json.loads((tmp_path / "out" / "rope+linear+ft-s0" / "config.json").read_text())
    assert ft["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    stamp = (tmp_path / "out" / "rope-s0" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "training" not in out and "learned (GPT-2)      1" in out  # reused; its row printed
    assert (tmp_path / "out" / "rope-s0" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == summary["rows"]
    with pytest.raises(bench.UserError, match="^unknown position method[(]s[)] alibi; methods: learned, sinusoidal, rope, none$"):
        bench.main(argv + ["--methods", "alibi"])
