"""Issue 12, case 3: LoRA on a tied output head, and merges that never change a tensor shared with
another module. References: transformers' LlamaForCausalLM and PEFT (test-only packages), every
parameter random. Run from the repository root: python -m pytest tests_new/test_lora_tied.py
"""
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import lora  # noqa: E402
import models  # noqa: E402
from models import gpt, llama, phi, qwen  # noqa: E402

V = 100
FILES = {"gpt": gpt, "llama": llama, "qwen": qwen, "phi": phi}


def randomize(model, seed=0, std=0.3):
    """Every parameter random (norms and biases included: unit norms and zero biases hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def randomize_adapters(model, seed=1):
    """lora_B starts at zero, which would make every comparison trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tiny(name, **kw):
    """A tiny random model of models/<name>.py (2 layers, width 32, vocab 100)."""
    module = FILES[name]
    if name == "gpt":
        cfg = gpt.Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, **kw)
    else:
        cfg = module.Config(**{**dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                      intermediate_size=64), **kw})
    return randomize(module.Model(cfg)).eval()


def idx(B=2, T=16, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def plain_name(name):
    """A parameter's name in the model without adapters (a wrapped layer's weight lives under .base)."""
    return name.replace(".base.", ".")


def base_tensors(model):
    """{name: a copy} of every parameter that is not an adapter, under the unadapted model's names
    (a tied tensor under each of its names)."""
    return {plain_name(n): p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)
            if "lora_" not in n}


def check_merge(model, x, adapted):
    """Merge; the logits equal the unmerged ones, the adapted weights moved and every other tensor
    (a tied embedding included) is bit for bit what it was."""
    before = base_tensors(model)
    with torch.no_grad():
        unmerged = model(x)[0]
        lora.merge(model)
        merged = model(x)[0]
    assert (merged - unmerged).abs().max() <= 1e-5
    after = base_tensors(model)
    assert after.keys() == before.keys()
    for name in before:
        if name.rpartition(".")[0] in adapted and name.endswith(".weight"):
            assert not torch.equal(after[name], before[name]), name
        else:
            assert torch.equal(after[name], before[name]), name
    return merged


def ties(model):
    """The sets of parameter names that share one tensor."""
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


# ----------------------------------------------------------------------------- against PEFT

def tied_llama_and_peft_adapter(tmp_path, targets=("q_proj", "v_proj", "down_proj", "lm_head")):
    """A tiny random tied LlamaForCausalLM saved in tmp_path/base, and a PEFT model on it with random A
    and B, saved both ways: adapter_false (save_embedding_layers=False) and adapter_auto (PEFT's
    default, which stores the base head too). Returns the PEFT model (unmerged, eval)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = randomize(transformers.LlamaForCausalLM(config)).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=list(targets)))
    randomize_adapters(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "adapter_false", save_embedding_layers=False)
        peft_model.save_pretrained(tmp_path / "adapter_auto")  # "auto": the base head is stored too
    for d in ("adapter_false", "adapter_auto"):  # the base directory, as our files name it
        cfg = json.loads((tmp_path / d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(tmp_path / "base")
        (tmp_path / d / "adapter_config.json").write_text(json.dumps(cfg))
    return peft_model.eval()


def peft_untied_merged(tmp_path, adapter):
    """PEFT's merge done the way PEFT documents for a tied model (tuners_utils._check_merge_allowed):
    load the base untied, the head a copy of the embedding, then merge_and_unload."""
    import transformers
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", tie_word_embeddings=False)
    hf.lm_head.weight.data = hf.model.embed_tokens.weight.data.clone()
    return PeftModel.from_pretrained(hf, tmp_path / adapter).merge_and_unload().eval()


def test_peft_adapter_on_a_tied_head_merges_into_its_own_head(tmp_path):
    """Case 3: save_embedding_layers=False; unmerged and merged logits equal PEFT's unmerged ones,
    the embedding does not move, and the merged model is saved untied."""
    peft_model = tied_llama_and_peft_adapter(tmp_path)
    x = idx()
    ours = models.from_pretrained(tmp_path / "base").eval()
    embedding = ours.model.embed_tokens.weight.detach().clone()
    lora.load_adapter(ours, tmp_path / "adapter_false")
    with torch.no_grad():
        reference = peft_model(x).logits
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        merged = check_merge(ours, x, adapted={"lm_head"} | {f"model.layers.{i}.{m}" for i in range(2) for m in
                                                             ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")})
        assert (merged - reference).abs().max() <= 1e-4
        assert torch.equal(ours.model.embed_tokens.weight, embedding)
        assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_embeddings
        untied = peft_untied_merged(tmp_path, "adapter_false")
        assert (untied(x).logits - merged).abs().max() <= 1e-4
        assert (untied.lm_head.weight - ours.lm_head.weight).abs().max() <= 1e-5
    ours.save_pretrained(tmp_path / "merged")  # tie_word_embeddings false, lm_head.weight stored
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(x).logits - merged).abs().max() <= 1e-4
        assert (models.from_pretrained(tmp_path / "merged").eval()(x)[0] - merged).abs().max() <= 1e-5


def test_peft_default_save_with_the_base_head_loads(tmp_path):
    """PEFT's default save (save_embedding_layers="auto") stores lm_head.base_layer.weight, equal to
    the base model's: it loads, and the logits are PEFT's, unmerged and merged."""
    from safetensors.torch import load_file
    peft_model = tied_llama_and_peft_adapter(tmp_path)
    stored = load_file(tmp_path / "adapter_auto" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in stored
    x = idx()
    ours = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter_auto")
    with torch.no_grad():
        reference = peft_model(x).logits
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


def test_a_stored_base_head_that_differs_is_honoured_as_peft_does(tmp_path):
    """PEFT's loader writes a stored base tensor into the model (load_state_dict), into the tied
    embedding too: so do we, and a save of the adapter keeps it."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    import transformers
    tied_llama_and_peft_adapter(tmp_path)
    path = tmp_path / "adapter_auto" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] + 0.25 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, path, metadata={"format": "pt"})
    x = idx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        reference_model = PeftModel.from_pretrained(hf, tmp_path / "adapter_auto").eval()
    ours = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter_auto")
    with torch.no_grad():
        reference = reference_model(x).logits
        assert torch.equal(ours.model.embed_tokens.weight, reference_model.base_model.model.model.embed_tokens.weight)
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        lora.save_adapter(ours, tmp_path / "again")  # what was honoured is written back
        assert torch.equal(load_file(tmp_path / "again" / "adapter_model.safetensors")[key], tensors[key])
        again = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / "again")
        assert torch.equal(again(x)[0], ours(x)[0])
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


def test_a_stored_base_tensor_of_the_wrong_shape_or_name_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    tied_llama_and_peft_adapter(tmp_path)
    path = tmp_path / "adapter_auto" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lm_head.base_layer.weight"
    for bad, message in [({key: tensors[key][:-1]}, r"tensor '.*lm_head\.base_layer\.weight' has shape \(99, 32\), "
                                                     r"the model needs \(100, 32\)"),
                         ({"base_model.model.model.norm.base_layer.weight": torch.ones(32)},
                          r"unexpected tensor 'base_model\.model\.model\.norm\.base_layer\.weight'")]:
        save_file({**tensors, **bad}, path, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            lora.load_adapter(models.from_pretrained(tmp_path / "base"), tmp_path / "adapter_auto")


def test_peft_tied_adapters_on_the_embedding_are_refused_in_one_line(tmp_path):
    """ensure_weight_tying=True on a tied model makes PEFT adapt embed_tokens (an nn.Embedding): not
    supported here, and said so instead of ignoring the target."""
    import transformers
    from peft import LoraConfig, get_peft_model
    tied_llama_and_peft_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        get_peft_model(hf, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True)
                       ).save_pretrained(tmp_path / "tied_adapters", save_embedding_layers=False)
    with pytest.raises(ValueError, match=r"the LoRA target model\.embed_tokens is an Embedding: LoRA here adapts "
                                         r"linear layers \(nn\.Linear\) only"):
        lora.load_adapter(models.from_pretrained(tmp_path / "base"), tmp_path / "tied_adapters")


# ----------------------------------------------------------------------------- the kind: every sharing

@pytest.mark.parametrize("name", ["gpt", "llama", "qwen", "phi"])
def test_merge_on_a_tied_head_unties_it_and_keeps_the_embedding(name, tmp_path):
    model = tiny(name, tie_embeddings=True)
    embedding = "transformer.wte.weight" if name == "gpt" else "model.embed_tokens.weight"
    assert ties(model) == [["lm_head.weight", embedding]]
    targets = lora.resolve_targets(model, "all") + ["lm_head"]
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, targets)))
    x = idx()
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    merged = check_merge(model, x, adapted)
    assert ties(model) == [] and model.config.tie_embeddings is False
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert (models.from_pretrained(tmp_path).eval()(x)[0] - merged).abs().max() <= 1e-5


def test_merge_keeps_a_tie_it_does_not_touch():
    """Adapting every layer but the head of a tied model: the tie stays, and so does the config."""
    model = tiny("llama", tie_embeddings=True)
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, lora.resolve_targets(model, "all"))))
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    check_merge(model, idx(), adapted)
    assert ties(model) == [["lm_head.weight", "model.embed_tokens.weight"]] and model.config.tie_embeddings


class AlwaysTiedGPT(gpt.Model):
    """A model file that ties its head to the embedding whatever its config says."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.weight = self.transformer.wte.weight


def test_merge_on_a_head_its_file_cannot_untie_is_refused_and_changes_nothing():
    """A file that ties its head by construction (no config key unties it): merging an adapter on
    lm_head would change the embedding or write a model its file cannot hold, so it is refused in
    one line, before anything changes; the adapted model still runs unmerged."""
    torch.manual_seed(0)
    model = randomize(AlwaysTiedGPT(gpt.Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32))).eval()
    targets = lora.resolve_targets(model, "all") + ["lm_head"]
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, targets)))
    x = idx()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(x)[0]
    with pytest.raises(ValueError, match=r"^lora\.merge: lm_head\.weight shares its tensor with "
                                         r"transformer\.wte\.weight and .* cannot untie them "
                                         r"\(no config key does\); use the adapter unmerged$"):
        lora.merge(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert hasattr(model, "lora_config") and isinstance(model.lm_head, lora.LoRALinear)
    with torch.no_grad():
        assert torch.equal(model(x)[0], unmerged)


def test_peft_adapter_on_gpt2s_head_runs_and_merges_untied(tmp_path):
    """GPT2LMHeadModel (tied) with a PEFT adapter on c_attn and lm_head, saved both ways: our logits
    are PEFT's, unmerged and merged; the merge unties the head (gpt.py's tie_embeddings) and wte stays."""
    import transformers
    from peft import LoraConfig, get_peft_model
    tiny("gpt").save_pretrained(tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "lm_head"],
                                                   fan_in_fan_out=True))
        randomize_adapters(peft_model).eval()
        peft_model.save_pretrained(tmp_path / "adapter_false", save_embedding_layers=False)
        peft_model.save_pretrained(tmp_path / "adapter_auto")
    x = idx()
    with torch.no_grad():
        reference = peft_model(x).logits
        for adapter in ("adapter_false", "adapter_auto"):
            ours = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / adapter)
            assert (ours(x)[0] - reference).abs().max() <= 1e-4
            wte = ours.transformer.wte.weight.detach().clone()
            lora.merge(ours)
            assert (ours(x)[0] - reference).abs().max() <= 1e-4
            assert torch.equal(ours.transformer.wte.weight, wte) and ours.config.tie_embeddings is False


def test_merge_on_gpt2_without_the_head_keeps_wte():
    model = tiny("gpt")
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, lora.resolve_targets(model, "all"))))
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    check_merge(model, idx(), adapted)
    assert ties(model) == [["lm_head.weight", "transformer.wte.weight"]]


def test_merge_unties_any_shared_weight_not_only_the_head():
    """A weight shared by two layers (tied by hand; the file does not tie them): adapting one layer
    gives it its own merged weight and leaves the other's as it was."""
    model = tiny("llama", tie_embeddings=False)
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, ["layers.0.mlp.up_proj"])))
    check_merge(model, idx(), adapted={"model.layers.0.mlp.up_proj"})
    assert layers[0].mlp.up_proj.weight is not layers[1].mlp.up_proj.weight


def test_a_target_that_is_not_a_linear_layer_is_refused():
    model = tiny("llama")
    for targets, kind in [(["q_proj", "embed_tokens"], "Embedding"), (["mlp"], "MLP"), (["norm"], "RMSNorm")]:
        with pytest.raises(ValueError, match=rf"the LoRA target \S+ is an? \w*{kind}\w*: LoRA here adapts linear"):
            lora.apply(tiny("llama"), lora.LoRAConfig(4, 8.0, targets))
    assert isinstance(lora.apply(model, lora.LoRAConfig(4, 8.0, ["q_proj"])).model.layers[0].self_attn.q_proj,
                      lora.LoRALinear)


@pytest.mark.parametrize("key,value", [("alora_invocation_tokens", [1, 2]), ("use_qalora", True),
                                       ("use_bdlora", {"nblocks": 2}), ("arrow_config", {"top_k": 2}),
                                       ("kasa_config", {"any": 1}), ("monteclora_config", {"n": 2})])
def test_peft_variants_that_change_the_computation_are_refused(tmp_path, key, value):
    model = randomize_adapters(lora.apply(tiny("llama"), lora.LoRAConfig(4, 8.0, ["q_proj"])))
    lora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=f"the PEFT option {key} is not supported"):
        lora.read_config(tmp_path)
