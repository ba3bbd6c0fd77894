"""The contract every model file must pass (DEVELOPERS.md, "The model contract"), for every file that
`models.available()` lists: the members shared code relies on, `# Copied from` markers, logits against
transformers on random checkpoints, config.json keys honoured or refused, decoding with a cache equal to the
full forward (padding, positions and RoPE extensions included). `python -m pytest test_all.py` is the check
for someone adding omnitron/models/NAME.py; `python -m pytest` runs everything."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
from omnitron import generation, hub, kernels, lora, models
from omnitron.kernels import performer
from omnitron.models import gpt, llama, phi, qwen, switch
from tests.helpers import (
    FAMILIES,
    HF_CLASSES,
    MOE_FAMILIES,
    ROOT,
    T_LONG,
    V_HEADS,
    SwiGLUExpert,
    V,
    assert_refused,
    assert_same,
    assert_same_logits,
    bad_value,
    contract_model,
    copied_from_problems,
    copy_of,
    decode_stepwise,
    edit_config,
    hf_class,
    hf_gpt2,
    hf_gpt2_configured,
    hf_model,
    hf_model_of_type,
    hf_moe,
    idx,
    key_rules,
    load_moe,
    load_hf,
    max_diff,
    moe_ids,
    pos_tokens,
    randomize,
    save_hub_layout,
    saved,
    shared_parameters,
    tied,
    tiny,
    tiny_gpt,
    tiny_model,
    to_hub_form,
    tokens,
    write_layout,
    write_shards,
)

# ----------------------------------------------------------------------------- models, checkpoints, the contract


@pytest.mark.parametrize("layout", ["transformers", "safetensors", "bin", "sharded"])
def test_gpt2_logits_match_transformers(tmp_path, layout):
    hf = hf_gpt2()
    if layout == "transformers":
        hf.save_pretrained(tmp_path)  # transformers' own layout: `transformer.` prefixed keys
    else:
        save_hub_layout(hf, tmp_path, layout)
    ours = models.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    assert (logits - ref).abs().max().item() <= 1e-4
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_save_pretrained_loads_in_transformers(tmp_path, bias):
    ours = tiny_model("gpt", bias=bias)
    ours.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    hf = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4
        back = models.from_pretrained(tmp_path)
        assert torch.equal(back(idx)[0], ours(idx)[0])
    assert back.config == ours.config


@pytest.mark.parametrize("pos", ["sinusoidal", "rope"])
def test_gpt_other_positions_round_trip(tmp_path, pos):
    ours = tiny_model("gpt", pos=pos)
    ours.save_pretrained(tmp_path)
    back = models.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])


def test_sinusoidal_and_rope_formulas_float64():
    pos = torch.arange(5)
    pe = gpt.sinusoidal_positions(pos, 8).double()
    for p in range(5):
        for i in range(4):
            angle = p / 10000 ** (2 * i / 8)
            assert abs(pe[p, 2 * i] - np.sin(angle)) < 1e-6 and abs(pe[p, 2 * i + 1] - np.cos(angle)) < 1e-6
    # rotary: each pair (x_i, x_{i+d/2}) turns by p * theta^(-2i/d); dot products depend on p - q only
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    cfg = gpt.Config(n_embd=16, n_head=2, pos="rope")
    def rotated_dot(p, r):
        cq, sq = gpt.rope_tables(cfg, 8, torch.tensor([[p]]), 1)
        ck, sk = gpt.rope_tables(cfg, 8, torch.tensor([[r]]), 1)
        return (gpt.apply_rope(q, cq, sq) * gpt.apply_rope(k, ck, sk)).sum().item()
    assert abs(rotated_dot(3, 1) - rotated_dot(12, 10)) < 1e-5
    assert abs(rotated_dot(0, 0) - (q * k).sum().item()) < 1e-6


def test_gpt2_initialisation():
    torch.manual_seed(0)
    m = gpt.Model(gpt.Config(vocab_size=100, block_size=32, n_layer=8, n_head=4, n_embd=256))
    assert m.lm_head.weight is m.transformer.wte.weight
    std_proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std_proj - 0.02 / 4) < 5e-4  # 0.02 / sqrt(2 * 8)
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 5e-4
    assert m.num_params() == sum(p.numel() for p in m.parameters()) - 32 * 256
    no_bias = gpt.Model(gpt.Config(vocab_size=100, block_size=32, n_layer=1, n_head=4, n_embd=64, bias=False))
    assert not [n for n, _ in no_bias.named_parameters() if n.endswith("bias")]


LOGIT_CASES = {
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mqa-biases": ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "llama-head_dim": ("llama", dict(head_dim=12)),
    "llama-linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    "llama-dynamic": ("llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0})),
    # theta 100 puts the dimensions in all three regions of yarn's ramp and of llama3's wavelength bands
    "llama-yarn": ("llama", dict(max_position_embeddings=256, rope_theta=100.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-llama3": ("llama", dict(rope_theta=100.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2-gqa-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-mha-untied": ("qwen2", dict(num_key_value_heads=4)),
    "qwen3-head_dim": ("qwen3", dict(head_dim=16)),
    "qwen3-mqa-bias-yarn": ("qwen3", dict(head_dim=12, num_key_value_heads=1, attention_bias=True,
                                          tie_word_embeddings=True, rope_scaling={"rope_type": "yarn", "factor": 2.0})),
    "phi2-shape": ("phi", dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=2,
                               partial_rotary_factor=0.4)),  # 8 of 20 dims rotate, as 32 of 80 in Phi-2
    "phi-gqa-tied-dynamic": ("phi", dict(hidden_size=64, partial_rotary_factor=0.25, tie_word_embeddings=True,
                                         rope_scaling={"type": "dynamic", "factor": 3.0})),
}


@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_logits_match_transformers(tmp_path, case):
    family, overrides = LOGIT_CASES[case]
    hf = hf_model(family, **overrides)
    ours = saved(hf, tmp_path)
    idx = tokens(T_LONG)
    assert_same_logits(ours, hf, idx)
    if ours.config.rope_type != "default":  # the scaling is really exercised
        ours.config.rope_type = "default"
        with torch.no_grad():
            assert (ours(idx)[0] - hf(idx).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    hf = hf_model(family, seed=3)
    ours = saved(hf, tmp_path)
    prompt = tokens(8, seed=4)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20)[:, 8:]
    got = torch.stack(list(generation.generate(ours, prompt, 20, temperature=0)), dim=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_left_padded_batch_generation_matches_transformers(tmp_path, family):
    """transformers' generate with left padding and an attention mask is the reference for ours."""
    hf = hf_model(family, seed=3)
    ours = saved(hf, tmp_path)
    idx, pad = generation.left_pad([tokens(9, B=1, seed=4)[0].tolist(), tokens(4, B=1, seed=5)[0].tolist()])
    mask = (torch.arange(9)[None] >= pad[:, None]).long()
    with torch.no_grad():
        want = hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=15, pad_token_id=0)[:, 9:]
    assert torch.equal(torch.stack(list(generation.generate(ours, idx, 15, temperature=0, pad=pad)), dim=1), want)


SAVE_CASES = {
    "llama": ("llama", dict(n_kv_head=2, tie_embeddings=False, attention_bias=True, mlp_bias=True, rope_theta=100.0,
                          rope_type="llama3", rope_factor=8.0, rope_original_max_len=32)),
    "qwen2": ("qwen", dict(variant="qwen2", n_kv_head=1, tie_embeddings=True)),
    "qwen3": ("qwen", dict(variant="qwen3", head_dim=12, attention_bias=True, tie_embeddings=False, rope_type="yarn",
                         rope_factor=2.0, rope_original_max_len=32)),
    "phi": ("phi", dict(n_embd=40, n_head=2, n_kv_head=1, partial_rotary_factor=0.4, tie_embeddings=True,
                      rope_type="linear", rope_factor=2.0)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_pretrained_loads_in_transformers(tmp_path, case):
    name, kw = SAVE_CASES[case]
    ours = tiny_model(name, **kw)
    ours.save_pretrained(tmp_path, metadata={"step": "7"})
    assert not list(tmp_path.glob("*.tmp"))
    hf = hf_class("AutoModelForCausalLM").from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == HF_CLASSES[json.loads((tmp_path / "config.json").read_text())["model_type"]][1]
    idx = tokens(40)
    assert_same_logits(ours, hf, idx)
    back = models.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])
    assert back.config == ours.config


EXPORT_CASES = {  # every model file, and each of models/switch.py's variants
    "gpt": ("gpt", dict(bias=False, std=0.5)),
    "llama": SAVE_CASES["llama"], "qwen2": SAVE_CASES["qwen2"], "qwen3": SAVE_CASES["qwen3"], "phi": SAVE_CASES["phi"],
    "switch": ("switch", dict(n_experts=4, moe_intermediate_size=24)),  # qwen3_moe, top-1, capacity 1.25 / 2.0
    "qwen2_moe": ("switch", dict(variant="qwen2_moe", qkv_bias=True, n_experts=4, top_k=2, moe_intermediate_size=24,
                                 shared_expert_intermediate_size=16, mlp_only_layers="1", n_kv_head=2)),
    "mixtral": ("switch", dict(variant="mixtral", n_experts=4, top_k=2, norm_topk_prob=True, intermediate_size=24,
                               moe_intermediate_size=24, tie_embeddings=False)),
    "olmoe": ("switch", dict(variant="olmoe", n_experts=4, top_k=2, intermediate_size=24, moe_intermediate_size=24,
                             clip_qkv=0.8)),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_exports_load_in_transformers_with_its_defaults(tmp_path, case):
    """What a user does with our export: AutoModelForCausalLM.from_pretrained(dir) with no argument,
    which gives our logits (a mixture of experts' too: eval mode without targets is dropless). And
    every key we write into config.json is read by transformers' configuration as the plain value we
    wrote, none taken for one of its own settings (experts_implementation was: transformers 5 reads
    it as its experts kernel and refuses "auto")."""
    name, kw = EXPORT_CASES[case]
    ours = tiny_model(name, **kw)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    config = hf_class("AutoConfig").from_pretrained(tmp_path)
    for key, value in written.items():
        got = getattr(config, key, "(absent)")
        got = str(got).removeprefix("torch.") if key == "dtype" else got
        assert json.loads(json.dumps(got)) == value, (key, value, got)
    hf = hf_class("AutoModelForCausalLM").from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == written["architectures"][0]
    assert_same_logits(ours, hf, idx(ours.config.vocab_size, T=30))
    assert models.from_pretrained(tmp_path).config == ours.config


@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "none"])
def test_gpt_positions_transformers_cannot_compute_are_refused_by_transformers(tmp_path, pos):
    """transformers' GPT-2 has a learned position table only: a GPT with other positions is written under
    its own model_type, so transformers refuses it in one error instead of loading a random table, and
    our loader reads it back with the same logits."""
    ours = tiny_model("gpt", pos=pos).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "omnitron_gpt"
    with pytest.raises((ValueError, KeyError), match="omnitron_gpt"):
        hf_class("AutoModelForCausalLM").from_pretrained(tmp_path)
    back = models.from_pretrained(tmp_path).eval()
    x = idx(ours.config.vocab_size, T=20)
    assert back.config == ours.config and torch.equal(back(x)[0], ours(x)[0])


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500000.0)),
    ("qwen2", dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    ("phi", dict(hidden_size=40, num_attention_heads=2, partial_rotary_factor=0.4)),
], ids=["llama-linear", "qwen2-yarn", "phi-partial"])


def test_hub_config_form_loads(tmp_path, family, overrides):
    """The same checkpoint with its config.json in transformers 5's form and in the Hub's form:
    both load, in transformers and here, to the same logits."""
    hf = hf_model(family, **overrides)
    idx = tokens(T_LONG)
    v5 = saved(hf, tmp_path / "v5")
    hub_dir = tmp_path / "hub"
    hf.save_pretrained(hub_dir)
    to_hub_form(hub_dir, family)
    assert "rope_parameters" not in json.loads((hub_dir / "config.json").read_text())
    ours = models.from_pretrained(hub_dir).eval()
    assert ours.config == v5.config
    ref = assert_same_logits(ours, hf_class("AutoModelForCausalLM").from_pretrained(hub_dir).eval(), idx)
    assert (ref - hf(idx).logits).abs().max().item() == 0  # transformers read both forms alike


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_file_layouts_load(tmp_path, layout):
    hf = hf_model("llama", tie_word_embeddings=layout == "sharded")
    with torch.no_grad():  # bfloat16 weights (the reference keeps them in fp32)
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16))
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "model.safetensors")
    if layout != "safetensors":
        write_layout(tmp_path, layout)
    ours = models.from_pretrained(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}  # the checkpoint's dtype is kept
    ours = models.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_logits(ours, hf, tokens(40))


WEIGHT_LAYOUTS = ("safetensors", "sharded", "bin", "sharded-bin")


def write_weights(directory, state, layout):
    """state as one of WEIGHT_LAYOUTS: model.safetensors, two safetensors shards and their index,
    pytorch_model.bin, or pytorch_model.bin's two shards and their index."""
    if layout == "safetensors":
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    elif layout == "sharded":
        write_shards(state, directory)
    elif layout == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, ks in shards.items():
            torch.save({k: state[k] for k in ks}, directory / name)
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS[1:] + ("adapter",))
def test_save_over_another_checkpoint_leaves_one_set_of_weights(tmp_path, layout):
    """save_pretrained into a folder that holds another checkpoint (train.py --init_from DIR --out_dir
    DIR): its shards and index, pytorch_model.bin or a LoRA adapter are removed, and our loader and
    transformers' (with its defaults) both read the new weights."""
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    if layout == "adapter":
        ours = models.from_pretrained(tmp_path)
        lora.apply(ours, lora.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # an adapter that changes the logits
            for name, p in ours.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
        lora.save_adapter(ours, tmp_path)
        adapter = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": str(tmp_path)}))
        assert lora.is_adapter(tmp_path)  # checkpoints.load would read the base and this adapter
    else:
        state = load_file(tmp_path / "model.safetensors")
        (tmp_path / "model.safetensors").unlink()
        write_weights(tmp_path, state, layout)
    old = sorted(p.name for p in tmp_path.iterdir())
    new = randomize(models.from_pretrained(tmp_path), seed=5, std=0.3).eval()  # other weights, same config
    new.save_pretrained(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "generation_config.json")  # not weights
    assert left == ["config.json", "model.safetensors"], old
    x = tokens(20)
    with torch.no_grad():
        assert torch.equal(models.from_pretrained(tmp_path).eval()(x)[0], new(x)[0])
    assert_same_logits(new, load_hf(tmp_path), x)


@pytest.mark.parametrize("first,second", [(a, b) for i, a in enumerate(WEIGHT_LAYOUTS) for b in WEIGHT_LAYOUTS[i + 1:]])
def test_reading_follows_transformers_order_of_preference(tmp_path, first, second):
    """A folder with two checkpoints' files (what an interrupted save or a copy leaves): the one
    transformers prefers (model.safetensors, then model.safetensors.index.json, pytorch_model.bin,
    pytorch_model.bin.index.json) is the one our loader reads."""
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    other = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) * 0.3 for k, v in state.items()}
    write_weights(tmp_path, state, first)
    write_weights(tmp_path, other, second)
    ours = models.from_pretrained(tmp_path).eval()
    assert_same_logits(ours, load_hf(tmp_path), tokens(20))
    assert_same_logits(ours, hf, tokens(20))


# a tensor to delete, one to add and one to reshape, per checkpoint family
CHECKPOINT_KEYS = {"gpt2": ("transformer.h.1.mlp.c_fc.weight", "transformer.h.1.extra.weight", "transformer.wpe.weight"),
                   "llama": ("model.layers.1.mlp.up_proj.weight", "model.layers.1.extra.weight",
                             "model.layers.0.self_attn.k_proj.weight")}


@pytest.mark.parametrize("family,problem", [("gpt2", p) for p in ("missing", "unexpected", "shape", "model_type",
                                                                  "corrupt", "no_weights")]
                         + [("llama", p) for p in ("missing", "unexpected", "shape", "model_type")])


def test_checkpoint_errors_name_the_problem(tmp_path, family, problem):
    (tiny_model("gpt") if family == "gpt2" else hf_model("llama")).save_pretrained(tmp_path)
    missing, extra, reshaped = CHECKPOINT_KEYS[family]
    st = tmp_path / "model.safetensors"
    state = load_file(st)
    if problem == "missing":
        del state[missing]
    elif problem == "unexpected":
        state[extra] = torch.zeros(2)
    elif problem == "shape":
        state[reshaped] = torch.zeros(10, 32)
    save_file(state, st)
    if problem == "model_type":
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    elif problem == "corrupt":
        st.write_bytes(st.read_bytes()[:200])
    elif problem == "no_weights":
        st.unlink()
    expected = {"missing": f"tensor '{missing}' is missing", "unexpected": f"unexpected tensor '{extra}'",
                "shape": f"tensor '{reshaped}' has shape", "model_type": "mamba", "corrupt": "cannot load",
                "no_weights": "no model.safetensors"}[problem]
    with pytest.raises((ValueError, FileNotFoundError), match=expected.replace(".", r"\.")):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize("family,change,expected", [
    ("phi", {"qk_layernorm": True}, "qk_layernorm"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "mscale": 0.7}},
     "mscale"),
])


def test_unsupported_options_are_rejected(tmp_path, family, change, expected):
    hf_model(family).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=expected):
        models.from_pretrained(tmp_path)


def test_hub_reads_and_writes_model_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        list(hub.read_tensors(tmp_path))
    model = tiny_model("gpt")
    state = hub.checkpoint_state(model)  # tied once, Conv1D weights transposed
    assert "lm_head.weight" not in state and "transformer.wte.weight" in state
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    hub.write(tmp_path, {"model_type": "gpt2"}, state, metadata={"step": "5"})
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "5"}
    assert hub.read_config(tmp_path) == {"model_type": "gpt2"} and not list(tmp_path.glob("*.tmp"))
    read = dict(hub.read_tensors(tmp_path))
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    with torch.device("meta"):
        empty = gpt.Model(model.config)
    loaded = hub.load_weights(empty, tmp_path, dtype=torch.float64)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and loaded.lm_head.weight.dtype == torch.float64


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_convert_kv_heads_to_n_head_is_the_identity(tmp_path, family):
    ours = saved(hf_model(family, num_key_value_heads=4), tmp_path)
    idx = tokens(20)
    with torch.no_grad():
        before = ours(idx)[0]
        ours.convert_kv_heads(4)
        assert torch.equal(ours(idx)[0], before)
    assert ours.config.n_kv_head == 4


@pytest.mark.parametrize("family,old,new", [("llama", 4, 2), ("llama", 4, 1), ("qwen2", 4, 2), ("qwen3", 2, 1)])
def test_convert_kv_heads_pools_each_group_by_its_mean(tmp_path, family, old, new):
    ours = saved(hf_model(family, num_key_value_heads=old), tmp_path / "before")
    D, group = ours.config.head_dim, old // new
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.convert_kv_heads(new)
    assert ours.config.n_kv_head == new
    after = ours.state_dict()
    for layer in range(2):
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"model.layers.{layer}.self_attn.{proj}.{kind}"
                if key not in before:
                    continue
                for j in range(new):  # new head j: the mean of old heads j * group .. (j + 1) * group - 1
                    heads = [before[key][h * D:(h + 1) * D] for h in range(j * group, (j + 1) * group)]
                    assert torch.allclose(after[key][j * D:(j + 1) * D], sum(heads) / group, atol=1e-6)
                assert after[key].shape[0] == new * D
    for key in before:  # nothing else changes
        if ".k_proj." not in key and ".v_proj." not in key:
            assert torch.equal(before[key], after[key])
    with pytest.raises(ValueError, match="groups"):
        ours.convert_kv_heads(new + 1 if new > 1 else 0)
    # the converted model is a valid checkpoint with `new` key/value heads
    ours.save_pretrained(tmp_path / "after")
    assert_same_logits(ours, hf_class("AutoModelForCausalLM").from_pretrained(tmp_path / "after").eval(), tokens(20))
    assert ours.init_cache(1, 8).k[0].shape[1] == new


@pytest.mark.parametrize("old,new", [(4, 2), (4, 1)])
def test_phi_convert_kv_heads_pools_weights_and_biases(tmp_path, old, new):
    """Phi's conversion is Llama's: each group's k_proj and v_proj weights and biases are averaged."""
    test_convert_kv_heads_pools_each_group_by_its_mean(tmp_path, "phi", old, new)


@pytest.mark.parametrize("module", [llama, qwen, phi], ids=lambda m: m.__name__.split(".")[-1])
def test_default_config_trains(module):
    """train.py's flags come from the Config fields: plain defaults, a small model that takes a step."""
    for name, default, _ in train.model_flags(module):
        assert type(default) in (int, float, str, bool), name
    cfg = module.Config(vocab_size=V, block_size=32)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (4, 128, 4)
    torch.manual_seed(0)
    model = module.Model(cfg)
    x = torch.randint(0, V, (2, 32))
    y = x.roll(-1, dims=1)
    y[:, -1] = -1  # ignored
    logits, loss = model(x, y)
    assert logits.shape == (2, 32, V)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, :-1].reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-5 and abs(loss.item() - torch.log(torch.tensor(V)).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    n = model.num_params()
    assert 0 < n < 2_000_000 and model.flops_per_token(32) > 6 * n
    assert dataclasses.replace(cfg) == cfg


# What shared code relies on (DEVELOPERS.md, "The model contract"), checked for every models/NAME.py:
# a new model file is covered the day it lands.
@pytest.mark.parametrize("name", models.available())
def test_model_contract(tmp_path, name):
    module = models.get(name)
    model, Model = contract_model(module), module.Model
    cfg = model.config
    assert dataclasses.is_dataclass(cfg) and dataclasses.replace(cfg) == cfg
    # members and their types
    keys = list(model.state_dict())
    assert isinstance(Model.FAN_IN_FAN_OUT, tuple) and all(isinstance(s, str) for s in Model.FAN_IN_FAN_OUT)
    assert all(any(k.endswith(s) for k in keys) for s in Model.FAN_IN_FAN_OUT)  # each names real weights
    assert set(Model.LORA_TARGETS) == {"q", "k", "v", "o", "mlp"}
    units = model.fsdp_units()
    assert isinstance(units, list) and units and all(isinstance(u, nn.Module) for u in units)
    submodules = [m for m in model.modules() if m is not model]
    assert all(any(u is m for m in submodules) for u in units) and len({id(u) for u in units}) == len(units)
    for i, unit in enumerate(units):  # bottom-up: no unit comes after one of its ancestors
        assert not any(later is m for later in units[i + 1:] for m in unit.modules())
    assert model.max_positions is None or (type(model.max_positions) is int and model.max_positions > 0)
    assert type(cfg.head_dim) is int and type(cfg.n_kv_head) is int and cfg.n_head % cfg.n_kv_head == 0
    if "head_dim" not in {f.name for f in dataclasses.fields(cfg)}:  # then it is derived from the width
        assert cfg.head_dim * cfg.n_head == cfg.n_embd
    assert model.init_cache(2, 16).k[0].shape == (2, cfg.n_kv_head, 16, cfg.head_dim)
    # a forward with a loss
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, dims=1)
    y[:, -1] = -1  # ignored
    logits, loss = model(x, y)
    assert logits.shape == (2, 16, V) and loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, :-1].reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    aux = model.aux_losses()
    assert isinstance(aux, dict) and all(v.dim() == 0 and torch.isfinite(v) for v in aux.values())
    if model.max_positions is not None:
        with pytest.raises(ValueError):
            model(torch.zeros(1, model.max_positions + 1, dtype=torch.long))
    # cached decoding, token by token, gives the logits of one forward over the whole sequence (a
    # mixture of experts' capacity drops tokens by design; decoding is dropless, so the forward is too)
    model.double()  # float64: the comparison is of layouts, not of rounding
    if hasattr(cfg, "eval_capacity_factor"):
        cfg.eval_capacity_factor = 0.0
    seq = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq)[0]
        cache = model.init_cache(2, 24)
        steps = [model(seq[:, :5], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(5, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-9 * full.abs().max().item()
    # the same with --attn performer (per-layer features and running state: the attention call passes
    # layer= and cache=) and with a sliding window (a rolling buffer per layer)
    for attn, window in (("performer", 0), ("sdpa", 5)):
        kernels.configure(attn, window)
        try:
            with torch.no_grad():
                whole = model(seq)[0]
                cache = model.init_cache(2, 24)
                steps = [model(seq[:, :5], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(5, 24)]
        finally:
            kernels.configure()
        assert (torch.cat(steps, dim=1) - whole).abs().max().item() <= 1e-9 * whole.abs().max().item()
        assert cache.layout == (["performer"] if window == 0 else [window]) * cfg.n_layer
        assert not torch.allclose(whole, full)  # the variant changed the model's computation
    # save_pretrained -> from_pretrained: the same model, and models.from_pretrained finds the file
    model.save_pretrained(tmp_path, metadata={"step": "3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert models.MODEL_TYPES[hub.read_config(tmp_path)["model_type"]] == name
    back = models.from_pretrained(tmp_path).eval()
    assert type(back) is Model and back.config == cfg and shared_parameters(back) == shared_parameters(model)
    assert not [n for n, p in back.named_parameters() if p.device.type != "cpu" or p.dtype != torch.float64]
    with torch.no_grad():
        assert torch.equal(back(seq)[0], full)
        if hasattr(model, "convert_kv_heads"):  # to as many key/value heads as there are: the identity
            model.convert_kv_heads(cfg.n_kv_head)
            assert torch.equal(model(seq)[0], full)


@pytest.mark.parametrize("name", models.available())
def test_model_contract_prefix(name):
    """forward(idx, targets, cache, prefix): prefix (B, P, n_embd) before the token embeddings, logits and
    loss over the tokens only; an empty prefix is no prefix; gradients reach the prefix through a frozen
    model; decoding after a prefilled prefix gives the logits of the whole forward."""
    model = contract_model(models.get(name)).double()
    cfg = model.config
    if hasattr(cfg, "eval_capacity_factor"):
        cfg.eval_capacity_factor = 0.0  # dropless, as decoding is
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(0, V, (2, 12), generator=gen)
    prefix = torch.randn(2, 5, cfg.n_embd, generator=gen, dtype=torch.float64)
    y = seq.roll(-1, dims=1)
    y[:, -1] = -1
    with torch.no_grad():
        plain, plain_loss = model(seq, y)
        empty, empty_loss = model(seq, y, prefix=prefix[:, :0])
        with_image, loss = model(seq, y, prefix=prefix)
    assert torch.equal(empty, plain) and torch.equal(empty_loss, plain_loss)
    assert with_image.shape == plain.shape == (2, 12, V)  # the text positions only
    assert (with_image - plain).abs().max() > 1e-3  # the prefix is seen
    ref = torch.nn.functional.cross_entropy(with_image[:, :-1].reshape(-1, V), y[:, :-1].reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-12 * ref.item()  # the loss is the text's
    # every language-model parameter frozen: the gradient still reaches the prefix, and only the prefix
    model.requires_grad_(False)
    leaf = prefix.clone().requires_grad_(True)
    model(seq, y, prefix=leaf)[1].backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # with a cache: the prefix prefilled once with the first tokens, then one token at a time
    with torch.no_grad():
        cache = model.init_cache(2, 24)
        steps = [model(seq[:, :4], cache=cache, prefix=prefix)[0]] + [
            model(seq[:, t:t + 1], cache=cache)[0] for t in range(4, 12)]
        assert cache.end(0) == 5 + 12
        assert (torch.cat(steps, dim=1) - with_image).abs().max().item() <= 1e-9 * with_image.abs().max().item()
        with pytest.raises(ValueError, match="left-padded"):
            model(seq, cache=model.init_cache(2, 24, pad=[0, 2]), prefix=prefix)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("name", models.available())
def test_loss_is_the_fp32_cross_entropy_of_bf16_logits(name, device):
    """The training forward leaves the fp32 upcast of the (B, T, vocab) logits to autocast, whose
    fp32 list holds cross_entropy_loss (CPU) or its log_softmax and nll_loss (CUDA): the loss equals
    the one from logits.float(). bf16 weights without autocast: the model upcasts them itself."""
    model = contract_model(models.get(name)).to(device)
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    y = x.roll(-1, dims=1)
    y[:, -1] = -1
    for weights in (torch.float32, torch.bfloat16):  # under autocast, then bf16 weights without it
        model.to(weights)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=weights == torch.float32):
            logits, loss = model(x, y)
        ref = torch.nn.functional.cross_entropy(logits.float().view(-1, V), y.view(-1), ignore_index=-1)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()


def test_copied_from_markers_match_their_source():
    counts = {}
    for name in models.available():
        counts[name], problems = copied_from_problems((ROOT / "omnitron" / "models" / f"{name}.py").read_text(), f"models/{name}.py")
        assert not problems
    assert counts["qwen"] >= 10 and counts["phi"] >= 5  # the copies are marked
    # an edit to one copy is caught, and so is a marker that has moved away from its definition
    text = (ROOT / "omnitron" / "models" / "qwen.py").read_text()
    edited = text.replace("xf.pow(2).mean(-1, keepdim=True)", "xf.square().mean(-1, keepdim=True)")
    assert edited != text and copied_from_problems(edited, "qwen.py")[1] == [
        f"qwen.py:{text.splitlines().index('# Copied from models/llama.py:RMSNorm') + 1}: RMSNorm differs from "
        "models/llama.py's"]
    moved = text.replace("# Copied from models/llama.py:RMSNorm\n", "# Copied from models/llama.py:RMSNorm\n\n")
    assert "not right above" in copied_from_problems(moved, "qwen.py")[1][0]


# --- config.json keys and output heads: every key of a supported model_type that changes the forward pass is
# honoured or refused in one line naming it; output heads, tied or not, load and save as transformers does


def test_case1_gpt2_scale_attn_by_inverse_layer_idx_is_honoured(tmp_path):
    hf = hf_gpt2_configured(scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["scale_attn_by_inverse_layer_idx"] is True
    ours = models.from_pretrained(tmp_path).eval()
    assert max_diff(ours, hf, idx(V_HEADS, T=40)) <= 1e-4


def test_case2_untied_gpt2_keeps_its_own_head(tmp_path):
    hf = hf_gpt2_configured(tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert max_diff(ours, hf, idx(V_HEADS, T=40)) <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_config_key_is_honoured_inert_or_refused(family):
    """Each key of transformers' configuration class (its to_dict()) is in the model file's table or in
    hub.COMMON_KEYS; each rope sub-key of transformers' RopeParameters is in its ROPE_KEYS."""
    module, config_cls, _ = FAMILIES[family]
    kinds = (hub.HONOURED, hub.INERT, hub.TRAINING, hub.CHECKED)
    keys = hf_class(config_cls)().to_dict()
    undecided = [k for k in keys if k not in module.CONFIG_KEYS and k not in hub.COMMON_KEYS]
    assert not undecided
    for table in (module.CONFIG_KEYS, hub.COMMON_KEYS, hub.ROPE_KEYS):
        assert all(rule in kinds or isinstance(rule, tuple) for rule in table.values())
    if family != "gpt2":
        assert set(hf_class("RopeParameters").__annotations__) <= set(module.ROPE_KEYS)


REFUSED = [(family, key) for family in FAMILIES for key, rule in key_rules(family).items() if isinstance(rule, tuple)]
ROPE_REFUSED = [(family, key) for family in ("llama", "qwen3", "phi")
                for key, rule in FAMILIES[family][0].ROPE_KEYS.items() if isinstance(rule, tuple)]


@pytest.mark.parametrize("family,key", REFUSED)
def test_refused_keys_raise_one_line_naming_the_key(checkpoints, tmp_path, family, key):
    rule = key_rules(family)[key]
    directory = copy_of(checkpoints, family, tmp_path / "c")
    edit_config(directory, **{key: bad_value(rule)})
    assert_refused(directory, key, json.dumps(bad_value(rule)))


@pytest.mark.parametrize("family,key", ROPE_REFUSED)
def test_refused_rope_keys_raise_one_line_naming_the_key(checkpoints, tmp_path, family, key):
    directory = copy_of(checkpoints, family, tmp_path / "c")
    rope = json.loads((directory / "config.json").read_text())["rope_parameters"]
    edit_config(directory, rope_parameters={**rope, "rope_type": "yarn", "factor": 2.0,
                                            key: bad_value(FAMILIES[family][0].ROPE_KEYS[key])})
    assert_refused(directory, key)


@pytest.mark.parametrize("family,changes,words", [
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, ["layer_types"]),  # without use_sliding_window
    ("phi", {"head_dim": 16}, ["head_dim"]),
    ("llama", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     ["full_attention"]),  # rope parameters nested by layer type
])


def test_checked_keys_are_refused_when_they_change_the_forward(checkpoints, tmp_path, family, changes, words):
    directory = copy_of(checkpoints, family, tmp_path / "c")
    edit_config(directory, **changes)
    assert_refused(directory, *words)


IMPLEMENTED = {  # family, constructor overrides of the transformers model
    "gpt2-no-scale": ("gpt2", dict(scale_attn_weights=False)),
    "gpt2-both-scales": ("gpt2", dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)),
    "gpt2-n_inner": ("gpt2", dict(n_inner=48)),
    "gpt2-eps": ("gpt2", dict(layer_norm_epsilon=0.5)),
    "gpt2-resid_pdrop": ("gpt2", dict(resid_pdrop=0.3, embd_pdrop=0.2, attn_pdrop=0.1)),  # eval: no dropout
    **{f"gpt2-{act}": ("gpt2", dict(activation_function=act)) for act in gpt.ACTIVATIONS if act != "gelu_new"},
    "gpt2-untied-relu": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu")),
    "llama-pretraining_tp": ("llama", dict(pretraining_tp=2, rms_norm_eps=0.01)),
    "llama-attention_dropout": ("llama", dict(attention_dropout=0.5)),
    "qwen2-window-unused": ("qwen2", dict(use_sliding_window=False, sliding_window=4, max_window_layers=0)),
    "qwen3-window-off": ("qwen3", dict(use_sliding_window=False, sliding_window=4, max_window_layers=1)),
    "qwen2-sliding_window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3-sliding-layer_types": ("qwen3", dict(use_sliding_window=True, sliding_window=6,
                                                layer_types=["sliding_attention", "full_attention"])),
    "phi-gelu_fast": ("phi", dict(hidden_act="gelu_fast", layer_norm_eps=0.5)),
    "phi-gelu_pytorch_tanh": ("phi", dict(hidden_act="gelu_pytorch_tanh", resid_pdrop=0.2, embd_pdrop=0.1)),
}


@pytest.mark.parametrize("case", list(IMPLEMENTED))
def test_honoured_keys_give_transformers_logits_and_round_trip(tmp_path, case):
    family, overrides = IMPLEMENTED[case]
    hf = hf_model_of_type(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    x = idx(V_HEADS, T=40)
    assert max_diff(ours, hf, x) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")  # and back: transformers reads what we write alike
    assert max_diff(ours, load_hf(tmp_path / "ours"), x) <= 1e-4
    assert models.from_pretrained(tmp_path / "ours").config == ours.config


def test_gpt2_inverse_layer_scaling_really_changes_the_logits(tmp_path):
    """The case-1 checkpoint, read as if the key were absent, gives other logits: the key matters."""
    hf = hf_gpt2_configured(scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    for block in ours.transformer.h:
        block.attn.q_scale = 1.0
    assert max_diff(ours, hf, idx(V_HEADS, T=40)) > 1e-2


def test_gpt2_reorder_and_upcast_attn_is_the_same_function(tmp_path):
    """transformers applies reorder_and_upcast_attn with eager attention only: fp32 scores, the same
    logits (hub.INERT)."""
    hf = hf_gpt2_configured(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    eager = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config.reorder_and_upcast_attn
    assert max_diff(models.from_pretrained(tmp_path).eval(), eager, idx(V_HEADS, T=40)) <= 1e-4


def test_rope_scaling_replaces_rope_parameters_and_top_level_original_length_wins(tmp_path):
    """transformers reads rope_scaling in place of rope_parameters when both are there, and a top-level
    original_max_position_embeddings over the one inside (llama3, yarn): so do we."""
    hf = hf_model_of_type("llama", max_position_embeddings=256, rope_theta=100.0)
    hf.save_pretrained(tmp_path)
    edit_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
                original_max_position_embeddings=32)
    ref = load_hf(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert (ours.config.rope_type, ours.config.rope_original_max_len) == ("yarn", 32)
    x = idx(V_HEADS, T=80)
    assert max_diff(ours, ref, x) <= 1e-4
    assert (ref(x).logits - hf(x).logits).abs().max() > 1e-3  # the edit changed transformers' logits too


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_heads_load_and_save_as_transformers_does(tmp_path, family, tie):
    hf = hf_model_of_type(family, tie_word_embeddings=tie)
    assert tied(hf) == tie
    hf.save_pretrained(tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    assert tied(ours) == tie and ours.config.tie_embeddings == tie
    x = idx(V_HEADS, T=40)
    assert max_diff(ours, hf, x) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] == tie
    back = load_hf(tmp_path / "ours")
    assert tied(back) == tie and max_diff(ours, back, x) <= 1e-4


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_our_gpt_untied_option_saves_for_transformers(tmp_path, tie):
    ours = tiny_model("gpt", std=0.5, vocab_size=V_HEADS, tie_embeddings=tie)
    assert tied(ours) == tie
    n_embedding = V_HEADS * 32
    assert ours.num_params() == sum(p.numel() for p in ours.parameters()) - 64 * 32 - (0 if tie else n_embedding)
    ours.save_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    assert tied(hf) == tie and max_diff(ours, hf, idx(V_HEADS, T=40)) <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
@pytest.mark.parametrize("stored", ["both-different", "both-equal", "head-only"])
def test_tied_config_with_a_stored_head_reads_as_transformers_does(tmp_path, family, stored):
    """tie_word_embeddings true, but the file stores lm_head.weight: transformers keeps both when they
    differ (untied), ties them when equal, and ties to the head when the embedding is absent."""
    hf_model_of_type(family, tie_word_embeddings=True).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    embed = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    head = torch.randn(state[embed].shape, generator=torch.Generator().manual_seed(9)) * 0.5
    if stored == "both-different":
        state["lm_head.weight"] = head
    elif stored == "both-equal":
        state["lm_head.weight"] = state[embed].clone()
    else:
        state["lm_head.weight"] = head
        del state[embed]
    save_file(state, path, metadata={"format": "pt"})
    ref = load_hf(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert tied(ref) == tied(ours) == (stored != "both-different") == ours.config.tie_embeddings
    assert max_diff(ours, ref, idx(V_HEADS, T=40)) <= 1e-4


# --- models/switch.py: mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints; Switch's


# router, capacity and losses against transformers' SwitchTransformersSparseMLP and float64 formulas)
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_checkpoints_give_transformers_logits_and_round_trip(tmp_path, family):
    """Mixtral, Qwen2-MoE (a shared expert, a dense layer), Qwen3-MoE (sparse every 2nd layer) and OLMoE
    (clip_qkv) read from transformers' save_pretrained (one matrix per expert) give transformers'
    logits; ours written back load in transformers to the same logits, in the per-expert layout."""
    hf_moe(family).save_pretrained(tmp_path / "hf")
    hf = load_moe(family, tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    assert type(ours) is switch.Model and ours.config.capacity_factor == ours.config.eval_capacity_factor == 0
    x = moe_ids()
    assert_same(ours, hf, x)
    ours.save_pretrained(tmp_path / "ours")
    stored = set(dict(hub.read_tensors(tmp_path / "ours")))
    assert stored == set(dict(hub.read_tensors(tmp_path / "hf")))  # transformers' per-expert names exactly
    assert_same(ours, load_moe(family, tmp_path / "ours"), x)
    if family == "qwen3_moe":  # real checkpoints carry num_experts (transformers 5.24 writes num_local_experts)
        assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_experts"] == 4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_stacked_expert_layout_loads(tmp_path, family):
    """A file in transformers 5's in-memory layout (mlp.experts.gate_up_proj (E, 2I, H), down_proj
    (E, H, I)) loads to the same model."""
    hf = hf_moe(family)
    hf.save_pretrained(tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "hf" / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in dict(hub.read_tensors(tmp_path / "hf")))
    assert_same(models.from_pretrained(tmp_path / "hf").eval(), hf, moe_ids())


def test_moe_missing_or_extra_expert_is_named(tmp_path):
    hf_moe("qwen3_moe").save_pretrained(tmp_path / "a")
    state = dict(hub.read_tensors(tmp_path / "a"))
    for name, change in [("model.layers.1.mlp.experts.2.up_proj.weight", "drop"),
                         ("model.layers.1.mlp.experts.4.up_proj.weight", "add")]:
        edited = dict(state)
        if change == "drop":
            del edited[name]
        else:
            edited[name] = state["model.layers.1.mlp.experts.0.up_proj.weight"].clone()
        save_file(edited, tmp_path / "a" / "model.safetensors")
        with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
            models.from_pretrained(tmp_path / "a")
        assert ("missing" if change == "drop" else "unexpected") in str(err.value)


def test_moe_config_keys_are_honoured_inert_or_refused(tmp_path):
    kinds = (hub.HONOURED, hub.INERT, hub.TRAINING, hub.CHECKED)
    for family, (config_cls, _, _) in MOE_FAMILIES.items():
        keys = hf_class(config_cls)().to_dict()
        assert not [k for k in keys if k not in switch.CONFIG_KEYS and k not in hub.COMMON_KEYS], family
    assert all(rule in kinds or isinstance(rule, tuple) for rule in switch.CONFIG_KEYS.values())
    hf_moe("mixtral").save_pretrained(tmp_path)
    for change, words in [({"sliding_window": 16}, "sliding_window 16"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"model_type": "qwen3_moe", "use_sliding_window": True}, "use_sliding_window")]:
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=words):
            models.from_pretrained(tmp_path)
        (tmp_path / "config.json").write_text(json.dumps(config))


def test_switch_model_exports_as_qwen3_moe_top1(tmp_path):
    """Our Switch model (top-1, gate = p_max, no renormalisation) is transformers' Qwen3-MoE with
    num_experts_per_tok 1 and norm_topk_prob false; transformers computes dropless, as our forward with
    eval_capacity_factor 0 (and decoding) does."""
    torch.manual_seed(0)
    cfg = switch.Config(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_experts=4,
                        moe_intermediate_size=24, eval_capacity_factor=0.0)
    ours = randomize(switch.Model(cfg), std=0.3).eval()
    ours.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["model_type"], hf["num_experts_per_tok"], hf["norm_topk_prob"], hf["num_experts"]) == ("qwen3_moe", 1, False, 4)
    assert_same(ours, load_moe("qwen3_moe", tmp_path), moe_ids())
    back = models.from_pretrained(tmp_path)
    assert back.config == cfg  # the capacity factors and the z-loss coefficient come back from config.json
    edit_config(tmp_path, experts_implementation="auto")  # what earlier exports carry: read as inert
    assert models.from_pretrained(tmp_path).config == cfg


def test_switch_layer_matches_transformers_switch_sparse_mlp_with_drops():
    """Our top-1 layer against transformers' SwitchTransformersSparseMLP (its router weights ours, its
    experts ours): a capacity small enough to drop tokens, the same tokens dropped (output 0), the same
    outputs; the z-loss and balance loss equal router_z_loss_func and load_balancing_loss_func."""
    N, E = 48, 4
    cfg = switch.Config(vocab_size=V, n_embd=32, n_experts=E, top_k=1, moe_intermediate_size=16, capacity_factor=1.0)
    torch.manual_seed(0)
    ours = randomize(switch.SparseMoE(cfg), std=0.3).train()
    capacity = math.ceil(N / E * cfg.capacity_factor)
    hf_cfg = hf_class("SwitchTransformersConfig")(d_model=32, d_ff=16, num_experts=E, expert_capacity=capacity,
                                                  router_jitter_noise=0.0, dropout_rate=0.0)
    from transformers.models.switch_transformers import modeling_switch_transformers as st
    hf = st.SwitchTransformersSparseMLP(hf_cfg).eval()
    with torch.no_grad():
        hf.router.classifier.weight.copy_(ours.gate.weight)
    for e in range(E):
        hf.experts[f"expert_{e}"] = SwiGLUExpert(ours.experts, e)
    x = torch.randn(1, N, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = ours(x), hf(x)
        dispatch, _, hf_logits = hf.router(x)
    hf_dropped = dispatch.sum(-1)[0] == 0
    assert 0 < hf_dropped.sum() < N // 2  # drops happen
    assert torch.equal((got[0] == 0).all(-1), hf_dropped)
    assert (got - ref).abs().max() <= 1e-6
    logits, probs = ours.route(x[0])
    assert torch.allclose(ours.stats["z"], st.router_z_loss_func(hf_logits), atol=1e-6)
    balance = st.load_balancing_loss_func(probs[None], probs.argmax(-1)[None])
    assert torch.allclose(ours.stats["balance"], balance, atol=1e-6)
    assert ours.stats["dropped"].item() == pytest.approx(hf_dropped.float().mean().item(), abs=1e-6)


def test_capacity_drops_first_choices_first_in_token_order():
    """E = 2, k = 2, 6 tokens, capacity ceil(6 * 2 / 2 * 0.5) = 3: the first choices in token order,
    then the second choices."""
    experts = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]])
    keep = switch.capacity_mask(experts, 2, 0.5)
    T, F_ = True, False
    assert keep.tolist() == [[T, T], [T, F_], [T, F_], [F_, F_], [T, F_], [T, F_]]
    assert switch.capacity_mask(experts, 2, 0.0).all()  # 0: dropless
    for e in range(2):
        assert (experts[keep] == e).sum() <= 3


@pytest.mark.parametrize("k", [1, 2])
def test_balance_and_z_losses_follow_their_formulas(k):
    """balance = E sum_i f_i P_i with f_i the share of the N k top-k assignments (float64 here), 1 for
    a uniform router at any k; z = mean logsumexp^2; a dropped token passes through (layer output 0)."""
    cfg = switch.Config(vocab_size=V, n_embd=16, n_experts=4, top_k=k, moe_intermediate_size=8, capacity_factor=0.5,
                        norm_topk_prob=k > 1)
    torch.manual_seed(1)
    layer = randomize(switch.SparseMoE(cfg), std=0.5).double().train()
    x = torch.randn(1, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = layer(x)[0]
    logits = x[0] @ layer.gate.weight.T
    probs = logits.softmax(-1)
    top = probs.topk(k, -1).indices
    f = torch.bincount(top.reshape(-1), minlength=4).double() / (40 * k)
    assert torch.allclose(layer.stats["balance"].double(), 4 * (f * probs.mean(0)).sum(), atol=1e-6)
    assert torch.allclose(layer.stats["z"].double(), torch.logsumexp(logits, -1).pow(2).mean(), atol=1e-5)
    keep = switch.capacity_mask(top, 4, 0.5)
    assert (~keep.any(-1)).any() and torch.equal((y == 0).all(-1), ~keep.any(-1))
    with torch.no_grad():
        layer.gate.weight.zero_()  # a uniform router
    layer(x)
    assert layer.stats["balance"].item() == pytest.approx(1.0, abs=1e-6)


def test_router_runs_in_fp32_and_jitter_reaches_the_router_only():
    cfg = switch.Config(vocab_size=V, n_embd=16, n_experts=4, moe_intermediate_size=8, capacity_factor=0.0,
                        router_jitter_noise=0.5)
    torch.manual_seed(0)
    layer = randomize(switch.SparseMoE(cfg), std=0.5).train()
    x = torch.randn(1, 30, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    logits, probs = layer.route(x[0])
    torch.manual_seed(5)
    y = layer(x)[0]
    assert not torch.allclose(logits, x[0] @ layer.gate.weight.T)  # the router saw noise
    p, e = probs.max(-1)
    want = torch.stack([p[t] * layer.experts.expert(e[t].item(), x[0, t:t + 1])[0] for t in range(30)])
    assert (y - want).abs().max() <= 1e-5  # ... the experts saw x itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.route(x[0])[0].dtype == torch.float32


def test_grouped_mm_equals_the_per_expert_loop():
    """torch's grouped_mm (the CUDA path) gives the loop's outputs and gradients, on CPU here; an
    expert with no assignment included."""
    cfg = switch.Config(vocab_size=V, n_embd=16, n_experts=4, moe_intermediate_size=8)
    torch.manual_seed(0)
    loop = randomize(switch.Experts(cfg), std=0.5)
    grouped = switch.Experts(switch.Config(**{**cfg.__dict__, "experts_implementation": "grouped_mm"}))
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 3])
    experts = torch.tensor([0, 3, 0, 1, 3, 0, 1, 0, 3, 1, 1, 0])  # expert 2 receives nothing
    gates = torch.rand(12, generator=torch.Generator().manual_seed(2))
    outs = [m(x, tokens, experts, gates) for m in (loop, grouped)]
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    for out in outs:
        out.pow(2).sum().backward()
    assert (loop.gate_up_proj.grad - grouped.gate_up_proj.grad).abs().max() <= 1e-4
    assert (loop.down_proj.grad - grouped.down_proj.grad).abs().max() <= 1e-4
    assert loop.down_proj.grad[2].abs().max() == 0


def test_decoding_and_logits_are_dropless_and_a_validation_loss_drops_at_its_capacity():
    """eval_capacity_factor applies to a loss in eval mode (targets given: the validation loss, Switch's
    evaluation); the logits without targets and decoding with a cache are dropless, so a row's
    logits are those of the row alone."""
    torch.manual_seed(0)
    cfg = switch.Config(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_experts=4,
                        moe_intermediate_size=24, eval_capacity_factor=0.5)
    model = randomize(switch.Model(cfg), std=0.3).eval()
    x = moe_ids(24)
    with torch.no_grad():
        dropping, loss = model(x, x)
        assert model.aux_metrics()["dropped_fraction"] > 0
        logits = model(x)[0]
        assert model.aux_metrics()["dropped_fraction"] == 0
        cache = model.init_cache(2, 24)
        cached = torch.cat([model(x[:, :10], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(10, 24)], 1)
        rows = torch.cat([model(x[i:i + 1])[0] for i in range(2)])
        model.config.eval_capacity_factor = 0.0
        dropless = model(x, x)[0]
    assert (cached - dropless).abs().max() <= 1e-5 and (dropping - dropless).abs().max() > 1e-3
    assert (logits - dropless).abs().max() <= 1e-6 and (rows - logits).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- models: decoding, padding


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


# ----------------------------------------------------------------------------- positions: learned, sinusoidal, RoPE, NoPE; RoPE context extension (models/gpt.py, bench.py positions)
# Positions: models/gpt.py's NoPE and RoPE context extension, and bench.py
# positions' per-position evaluation. Each test checks against an independent reference: transformers'
# ROPE_INIT_FUNCTIONS, a float64 loop of prefix forwards, exact invariants.


# ----------------------------------------------------------------------------- NoPE


def test_nope_has_no_position_input_and_stays_causal():
    """Without positions a layer sees the tokens before t as a set: in one layer, permuting them leaves
    t's logits unchanged (with every position method it does not). In any depth, a sequence of one
    repeated token gives the same logits at every position (a position table or sinusoids do not); a
    later token never changes an earlier logit; no parameter holds positions."""
    x = pos_tokens(2, 12)
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
    model, x = tiny_gpt(pos="none"), pos_tokens(2, 20)
    with torch.no_grad():
        full = model(x)[0]
        cache = model.init_cache(2, 32)
        steps = [model(x[:, :5], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(5, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_learned_table_refuses_longer_sequences_in_one_line():
    model = tiny_gpt(pos="learned")
    with torch.no_grad():
        model(pos_tokens(1, 16))  # the whole table is fine
        with pytest.raises(ValueError) as e:
            model(pos_tokens(1, 17))
    assert "\n" not in str(e.value) and "longer than the learned position table (block_size 16)" in str(e.value)
    for pos in ("sinusoidal", "rope", "none"):  # computed positions: any length
        with torch.no_grad():
            assert tiny_gpt(pos=pos)(pos_tokens(1, 40))[0].shape == (1, 40, 50)


def test_sinusoidal_input_is_scaled_embedding_plus_sinusoids():
    """Vaswani et al. 3.4: the embedding times sqrt(d_model), plus PE[p, 2i] = sin(p / 10000^(2i/d)),
    PE[p, 2i+1] = cos(...): the first block's input against that formula in float64."""
    model, x = tiny_gpt(pos="sinusoidal", std=0.02), pos_tokens(1, 10)
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
    x = pos_tokens(1, 10)
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
    x = pos_tokens(2, 40)
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
    text = (ROOT / "omnitron" / "models" / "gpt.py").read_text()
    count, problems = copied_from_problems(text, "models/gpt.py")
    assert not problems
    for name in ("rope_frequencies", "rope_tables", "_rope_config", "_rope_parameters", "apply_rope"):
        assert f"# Copied from models/llama.py:{name}\n" in text
    edited = text.replace("theta = theta * (s * seq_len", "theta = theta * (2 * s * seq_len")
    assert edited != text and copied_from_problems(edited, "gpt.py")[1]
