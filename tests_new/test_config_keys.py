"""Issue 12, cases 1 and 2: every config.json key of a supported model_type that changes the forward
pass is honoured or refused in one line naming it; output heads, tied or not, load and save as
transformers does. References: transformers' models, every parameter random."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402

V = 101


def randomize(model, seed=0, std=0.2):
    """Every parameter random: zero biases and unit norms would hide layout bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def hf_gpt2(seed=0, **overrides):
    """A tiny transformers GPT2LMHeadModel (width 32, 3 layers, 4 heads), every parameter random."""
    from transformers import GPT2Config, GPT2LMHeadModel
    kw = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return randomize(GPT2LMHeadModel(GPT2Config(**{**kw, **overrides})), seed, std=0.5).eval()


def tokens(T=40, B=2, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(ours, hf, idx):
    ref = hf(idx).logits
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    return (ours(idx)[0] - ref).abs().max().item()


# ----------------------------------------------------------------------------- the two cases

def test_case1_gpt2_scale_attn_by_inverse_layer_idx_is_honoured(tmp_path):
    hf = hf_gpt2(scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["scale_attn_by_inverse_layer_idx"] is True
    ours = models.from_pretrained(tmp_path).eval()
    assert max_diff(ours, hf, tokens()) <= 1e-4


def test_case2_untied_gpt2_keeps_its_own_head(tmp_path):
    hf = hf_gpt2(tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert max_diff(ours, hf, tokens()) <= 1e-4


# ----------------------------------------------------------------------------- helpers

import hub  # noqa: E402
from models import gpt, llama, phi, qwen  # noqa: E402

FAMILIES = {  # model_type -> (our file, transformers' config class, its causal LM class)
    "gpt2": (gpt, "GPT2Config", "GPT2LMHeadModel"), "llama": (llama, "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": (qwen, "Qwen2Config", "Qwen2ForCausalLM"), "qwen3": (qwen, "Qwen3Config", "Qwen3ForCausalLM"),
    "phi": (phi, "PhiConfig", "PhiForCausalLM")}


def hf_model(family, seed=0, **overrides):
    """A tiny transformers model of this family (width 32, 4 heads; Llama, Qwen and Phi 2 layers and
    2 kv heads, GPT-2 3 layers), every parameter random; no dropout, no bos/eos ids."""
    import transformers
    if family == "gpt2":
        return hf_gpt2(seed, **overrides)
    _, config_cls, model_cls = FAMILIES[family]
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, **({"head_dim": 16} if family == "qwen3" else {}))
    config = getattr(transformers, config_cls)(**{**kw, **overrides})
    return randomize(getattr(transformers, model_cls)(config), seed, std=0.3).eval()


def load_hf(directory):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def edit_config(directory, **changes):
    path = Path(directory) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def tied(model):
    """Whether the output head's matrix is the token embedding's (a transformers model or ours)."""
    if hasattr(model, "get_input_embeddings"):
        embedding = model.get_input_embeddings()
    else:
        embedding = model.transformer.wte if hasattr(model, "transformer") else model.model.embed_tokens
    return model.lm_head.weight is embedding.weight


# ----------------------------------------------------------------------------- every key is decided

@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_config_key_is_honoured_inert_or_refused(family):
    """Each key of transformers' configuration class (its to_dict()) is in the model file's table or in
    hub.COMMON_KEYS; each rope sub-key of transformers' RopeParameters is in its ROPE_KEYS."""
    import transformers
    from transformers.modeling_rope_utils import RopeParameters
    module, config_cls, _ = FAMILIES[family]
    kinds = (hub.HONOURED, hub.INERT, hub.TRAINING, hub.CHECKED)
    keys = getattr(transformers, config_cls)().to_dict()
    undecided = [k for k in keys if k not in module.CONFIG_KEYS and k not in hub.COMMON_KEYS]
    assert not undecided
    for rules in (module.CONFIG_KEYS, hub.COMMON_KEYS, hub.ROPE_KEYS):
        assert all(rule in kinds or isinstance(rule, tuple) for rule in rules.values())
    if family != "gpt2":
        assert set(RopeParameters.__annotations__) <= set(module.ROPE_KEYS)


def bad_value(rule):
    """A value outside a tuple of accepted values: a real name where the values are names."""
    accepted = [v for v in rule if v is not None]
    if not accepted:
        return [1, 2]
    if isinstance(accepted[0], bool):
        return not accepted[0]
    if isinstance(accepted[0], str):
        return "relu6"  # a transformers activation that no model file implements
    return 0.5


def rules(family):
    """The model file's CONFIG_KEYS over hub.COMMON_KEYS."""
    return {**hub.COMMON_KEYS, **FAMILIES[family][0].CONFIG_KEYS}


REFUSED = [(family, key) for family in FAMILIES for key, rule in rules(family).items() if isinstance(rule, tuple)]
ROPE_REFUSED = [(family, key) for family in ("llama", "qwen3", "phi")
                for key, rule in FAMILIES[family][0].ROPE_KEYS.items() if isinstance(rule, tuple)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny transformers checkpoint per family (its config.json is edited by copies)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for family in FAMILIES:
        hf_model(family).save_pretrained(root / family)
    return root


def copy_of(checkpoints, family, directory):
    import shutil
    shutil.copytree(checkpoints / family, directory)
    return directory


def assert_refused(directory, *words):
    with pytest.raises(ValueError) as error:
        models.from_pretrained(directory)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("family,key", REFUSED)
def test_refused_keys_raise_one_line_naming_the_key(checkpoints, tmp_path, family, key):
    rule = rules(family)[key]
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
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, ["use_sliding_window"]),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, ["layer_types"]),
    ("phi", {"head_dim": 16}, ["head_dim"]),
    ("llama", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     ["full_attention"]),  # rope parameters nested by layer type
])
def test_checked_keys_are_refused_when_they_change_the_forward(checkpoints, tmp_path, family, changes, words):
    directory = copy_of(checkpoints, family, tmp_path / "c")
    edit_config(directory, **changes)
    assert_refused(directory, *words)


# ----------------------------------------------------------------------------- implemented keys: transformers' logits

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
    "phi-gelu_fast": ("phi", dict(hidden_act="gelu_fast", layer_norm_eps=0.5)),
    "phi-gelu_pytorch_tanh": ("phi", dict(hidden_act="gelu_pytorch_tanh", resid_pdrop=0.2, embd_pdrop=0.1)),
}


@pytest.mark.parametrize("case", list(IMPLEMENTED))
def test_honoured_keys_give_transformers_logits_and_round_trip(tmp_path, case):
    family, overrides = IMPLEMENTED[case]
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    idx = tokens()
    assert max_diff(ours, hf, idx) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")  # and back: transformers reads what we write alike
    assert max_diff(ours, load_hf(tmp_path / "ours"), idx) <= 1e-4
    assert models.from_pretrained(tmp_path / "ours").config == ours.config


def test_gpt2_inverse_layer_scaling_really_changes_the_logits(tmp_path):
    """The case-1 checkpoint, read as if the key were absent, gives other logits: the key matters."""
    hf = hf_gpt2(scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    for block in ours.transformer.h:
        block.attn.q_scale = 1.0
    assert max_diff(ours, hf, tokens()) > 1e-2


def test_gpt2_reorder_and_upcast_attn_is_the_same_function(tmp_path):
    """transformers applies reorder_and_upcast_attn with eager attention only: fp32 scores, the same
    logits (hub.INERT)."""
    from transformers import GPT2LMHeadModel
    hf = hf_gpt2(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    eager = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config.reorder_and_upcast_attn
    assert max_diff(models.from_pretrained(tmp_path).eval(), eager, tokens()) <= 1e-4


def test_rope_scaling_replaces_rope_parameters_and_top_level_original_length_wins(tmp_path):
    """transformers reads rope_scaling in place of rope_parameters when both are there, and a top-level
    original_max_position_embeddings over the one inside (llama3, yarn): so do we."""
    hf = hf_model("llama", max_position_embeddings=256, rope_theta=100.0)
    hf.save_pretrained(tmp_path)
    edit_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
                original_max_position_embeddings=32)
    ref = load_hf(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert (ours.config.rope_type, ours.config.rope_original_max_len) == ("yarn", 32)
    idx = tokens(80)
    assert max_diff(ours, ref, idx) <= 1e-4
    assert (ref(idx).logits - hf(idx).logits).abs().max() > 1e-3  # the edit changed transformers' logits too


# ----------------------------------------------------------------------------- output heads, tied or not

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_heads_load_and_save_as_transformers_does(tmp_path, family, tie):
    from safetensors import safe_open
    hf = hf_model(family, tie_word_embeddings=tie)
    assert tied(hf) == tie
    hf.save_pretrained(tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    assert tied(ours) == tie and ours.config.tie_embeddings == tie
    idx = tokens()
    assert max_diff(ours, hf, idx) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] == tie
    back = load_hf(tmp_path / "ours")
    assert tied(back) == tie and max_diff(ours, back, idx) <= 1e-4


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_our_gpt_untied_option_saves_for_transformers(tmp_path, tie):
    torch.manual_seed(0)
    ours = randomize(gpt.Model(gpt.Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                          tie_embeddings=tie)), std=0.5).eval()
    assert tied(ours) == tie
    n_embedding = V * 32
    assert ours.num_params() == sum(p.numel() for p in ours.parameters()) - 64 * 32 - (0 if tie else n_embedding)
    ours.save_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    assert tied(hf) == tie and max_diff(ours, hf, tokens()) <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
@pytest.mark.parametrize("stored", ["both-different", "both-equal", "head-only"])
def test_tied_config_with_a_stored_head_reads_as_transformers_does(tmp_path, family, stored):
    """tie_word_embeddings true, but the file stores lm_head.weight: transformers keeps both when they
    differ (untied), ties them when equal, and ties to the head when the embedding is absent."""
    from safetensors.torch import load_file, save_file
    hf_model(family, tie_word_embeddings=True).save_pretrained(tmp_path)
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
    assert max_diff(ours, ref, tokens()) <= 1e-4
