"""omnitron/lora.py: LoRA for every model, in PEFT's adapter format, checked against peft."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
import train
from omnitron import data, lora, models, runtime
from omnitron.models import gpt
from tests.helpers import (
    FILES,
    AlwaysTiedGPT,
    V,
    base_run,
    check_merge,
    hf_base,
    hf_class,
    hf_model,
    idx,
    peft_api,
    peft_untied_merged,
    randomize,
    randomize_adapters,
    read_log,
    run_cli,
    tied_llama_and_peft_adapter,
    tied_names,
    tiny_model,
    train_args,
    with_lora,
)

# ----------------------------------------------------------------------------- LoRA (lora.py)


@pytest.mark.parametrize("name", FILES)
def test_fresh_adapter_is_exactly_the_base_and_merge_matches(name):
    model = tiny_model(name)
    x = idx()
    with torch.no_grad():
        base_logits = model(x)[0]
        with_lora(model)
        assert torch.equal(model(x)[0], base_logits)  # B = 0: bit for bit the base model
        randomize_adapters(model)
        unmerged = model(x)[0]
        assert (unmerged - base_logits).abs().max() > 0.1
        lora.merge(model)
        assert (model(x)[0] - unmerged).abs().max() <= 1e-5
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())  # a plain model again


@pytest.mark.parametrize("name", FILES)
def test_all_targets_every_linear_layer_but_the_output_head(name):
    model = tiny_model(name)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    with_lora(model, "all")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)) == linears


def test_target_names_map_to_each_files_layers():
    assert lora.resolve_targets(tiny_model("gpt"), "q,k,v") == ["c_attn"]  # GPT-2's fused projection, once
    assert lora.resolve_targets(tiny_model("gpt"), "o,mlp") == ["attn.c_proj", "c_fc", "mlp.c_proj"]
    assert lora.resolve_targets(tiny_model("llama"), "q,v") == ["q_proj", "v_proj"]
    assert lora.resolve_targets(tiny_model("phi"), "o") == ["dense"]
    model = with_lora(tiny_model("gpt"), "o")  # attn.c_proj only, not the MLP's c_proj
    wrapped = [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert wrapped == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with pytest.raises(ValueError, match="unknown target 'query'; choose from q, k, v, o, mlp or all"):
        lora.resolve_targets(tiny_model("llama"), "q,query")


def test_initialisation_and_scaling():
    model = with_lora(tiny_model("llama"), "q", r=4)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B.weight, torch.zeros(32, 4))
    bound = 1 / 32 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert layer.scaling == 8.0 / 4
    assert with_lora(tiny_model("llama"), "q", r=4, use_rslora=True).model.layers[0].self_attn.q_proj.scaling == 8.0 / 2


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_only_adapters_train_and_the_base_stays_bit_identical(name):
    model = tiny_model(name).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with_lora(model, "all", lora_dropout=0.1)
    opt = train.make_optimizer(model, {"weight_decay": 0.1, "learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.99}, "cpu")
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in adapters}
    for step in range(3):
        model(idx(), targets=idx(seed=2))[1].backward()
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
        assert all(p.grad is not None for p in adapters)
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    for n, p in base.items():  # the wrapped layers' weights live under .base now
        key = n if n in params else n.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(params[key], p), n
    assert all(p.abs().sum() > 0 for n, p in params.items() if ".lora_B" in n)  # B has moved


def test_bf16_base_weights_with_fp32_adapters():
    model, x = tiny_model("llama"), idx()
    with torch.no_grad():
        reference = copy.deepcopy(model).to(torch.bfloat16)(x)[0]
    lora.apply(model, lora.LoRAConfig(4, 8.0, ["q_proj", "v_proj"]), base_dtype=torch.bfloat16)
    dtypes = lambda adapter: {p.dtype for n, p in model.named_parameters() if (".lora_" in n) == adapter}
    assert dtypes(adapter=False) == {torch.bfloat16} and dtypes(adapter=True) == {torch.float32}
    logits, loss = model(x, targets=idx(seed=2))
    assert torch.equal(logits, reference)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_B" in n)


def test_save_and_load_round_trip(tmp_path):
    model = randomize_adapters(with_lora(tiny_model("llama"), "q,v,mlp", r=2, lora_dropout=0.05, use_rslora=True))
    lora.save_adapter(model, tmp_path, metadata={"step": "7"})
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 8.0 and cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg["lora_dropout"] == 0.05 and cfg["fan_in_fan_out"] is False
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["step"] == "7" and len(keys) == 2 * 5 * 2  # layers x modules x (A, B)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    loaded = lora.load_adapter(tiny_model("llama"), tmp_path)
    assert not loaded.training  # the new layers follow the model's mode: dropout is off in eval
    x = idx()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    # a wrong rank in the file is an error naming the tensor
    cfg["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.\S+\.lora_A\.weight' has "
                                         r"shape \(2, \d+\), the model needs \(3, \d+\)"):
        lora.load_adapter(tiny_model("llama"), tmp_path)
    cfg.update(r=2, use_dora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora is not supported"):
        lora.load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_loads_our_adapter_onto_the_transformers_model(tmp_path, family):
    hf, ours = hf_base(family, tmp_path / "base")
    config = lora.LoRAConfig(4, 8.0, lora.resolve_targets(ours, "all"), base_model_name_or_path=str(tmp_path / "base"))
    randomize_adapters(lora.apply(ours, config))
    lora.save_adapter(ours, tmp_path / "adapter")
    x = idx()
    with torch.no_grad():
        base = hf(x).logits
        reference = peft_api("PeftModel").from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
        assert (reference - base).abs().max() > 0.1  # PEFT did load the adapter
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_we_load_adapters_that_peft_made(tmp_path, family):
    hf, ours = hf_base(family, tmp_path / "base")
    targets = ["c_attn", "mlp.c_proj"] if family == "gpt2" else ["q_proj", "o_proj", "up_proj"]
    peft_model = peft_api("get_peft_model")(hf, peft_api("LoraConfig")(
        r=4, lora_alpha=16, target_modules=targets, fan_in_fan_out=family == "gpt2", init_lora_weights=False))  # B random too
    peft_model.save_pretrained(tmp_path / "adapter")
    lora.load_adapter(ours, tmp_path / "adapter")
    x = idx()
    with torch.no_grad():
        assert (ours(x)[0] - peft_model.eval()(x).logits).abs().max() <= 1e-4


def test_train_lora_resumes_bit_for_bit_and_merges(corpus, tmp_path, capsys):
    base = base_run(corpus, tmp_path)
    base_bytes = (base / "model.safetensors").read_bytes()
    flags = dict(init_from=base, lora_rank=4, lora_dropout=0.1, lora_targets="q,o,mlp", learning_rate=1e-2)
    train.main(train_args(corpus, tmp_path, "full", **flags))
    train.main(train_args(corpus, tmp_path, "split", max_iters=4, **flags))
    train.main(train_args(corpus, tmp_path, "split", max_iters=8) + ["--resume"])
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    losses = lambda log, key: [(r["step"], r[key]) for r in log if key in r and r["step"] > 4]
    assert losses(full, "train_loss") == losses(split, "train_loss")
    assert losses(full, "val_loss") == losses(split, "val_loss") and losses(full, "val_loss")
    assert full[-1]["val_loss"] < full[0]["val_loss"]
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "train_state.pt"]
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lora.read_config(tmp_path / "split").base_model_name_or_path == str(base)
    assert (base / "model.safetensors").read_bytes() == base_bytes  # the base is never written
    # --merge on its own: the finished run, no more steps
    train.main(train_args(corpus, tmp_path, "split", max_iters=0) + ["--resume", "--merge"])
    hf = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path / "split" / "merged").eval()
    adapted, tok = sample.load(tmp_path / "split")  # the base and the adapter, merged on loading
    x = idx(vocab=tok.vocab_size)
    with torch.no_grad():
        assert (hf(x).logits - adapted(x)[0]).abs().max() <= 1e-4
        assert (hf(x).logits - models.from_pretrained(base)(x)[0]).abs().max() > 1e-3  # training changed it
    capsys.readouterr()
    outputs = []
    for run in ("split", "split/merged"):  # sample.py: an adapter folder or the merged model, the same text
        sample.main(["--out_dir", str(tmp_path / run), "--prompt", "ROMEO:", "--max_new_tokens", "20",
                     "--temperature", "0", "--device", "cpu"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("ROMEO:")


def test_train_lora_llama_in_bf16_loads_in_peft(corpus, tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "base")
    data.prepare(corpus, "char", tmp_path / "d", quiet=True).tokenizer.save(tmp_path / "base")
    result = train.train(*train.parse_args(train_args(corpus, tmp_path, init_from=tmp_path / "base", lora_rank=2,
                                                      lora_targets="all", dtype="bfloat16", max_iters=2,
                                                      eval_interval=2, learning_rate=1e-2)))
    assert result["step"] == 2 and result["val_loss"] < 10
    assert {t.dtype for t in load_file(tmp_path / "run" / "adapter_model.safetensors").values()} == {torch.float32}
    hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "base").eval()
    adapted, _ = sample.load(tmp_path / "run")
    x = idx(vocab=100)
    with torch.no_grad():
        reference = peft_api("PeftModel").from_pretrained(hf, tmp_path / "run").eval()(x).logits
        assert (adapted(x)[0] - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("args,message", [
    (["--lora_rank", "4", "--lora_targets", "q,query"], "unknown target 'query'"),
    (["--lora_rank", "4", "--init_from", "scratch"], "give it --init_from DIR"),
    (["--merge"], "it needs --lora_rank"),
])


def test_lora_user_errors_are_one_line(corpus, tmp_path, args, message):
    base = base_run(corpus, tmp_path)
    with pytest.raises((ValueError, runtime.UserError), match=message):
        train.main(train_args(corpus, tmp_path, init_from=base) + args)
    if args[-1] == "q,query":  # through the command line: one line, exit 1
        r = run_cli("train.py", *train_args(corpus, tmp_path, init_from=base), *args)
        assert r.returncode == 1 and r.stderr.strip() == f"error: --lora_targets: {message}; choose from q, k, v, o, mlp or all"


# --- tied weights: LoRA on a tied output head, and merges that never change a tensor shared with another module
# (references: transformers' LlamaForCausalLM and GPT2LMHeadModel with PEFT)


def test_peft_adapter_on_a_tied_head_merges_into_its_own_head(tmp_path):
    """save_embedding_layers=False; unmerged and merged logits equal PEFT's unmerged ones, the
    embedding does not move, and the merged model is saved untied."""
    peft_model = tied_llama_and_peft_adapter(tmp_path)
    x = idx(V)
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
    hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(x).logits - merged).abs().max() <= 1e-4
        assert (models.from_pretrained(tmp_path / "merged").eval()(x)[0] - merged).abs().max() <= 1e-5


def test_peft_default_save_with_the_base_head_loads(tmp_path):
    """PEFT's default save (save_embedding_layers="auto") stores lm_head.base_layer.weight, equal to
    the base model's: it loads, and the logits are PEFT's, unmerged and merged."""
    peft_model = tied_llama_and_peft_adapter(tmp_path)
    stored = load_file(tmp_path / "adapter_auto" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in stored
    x = idx(V)
    ours = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter_auto")
    with torch.no_grad():
        reference = peft_model(x).logits
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


def test_a_stored_base_head_that_differs_is_honoured_as_peft_does(tmp_path):
    """PEFT's loader writes a stored base tensor into the model (load_state_dict), into the tied
    embedding too: so do we, and a save of the adapter keeps it."""
    tied_llama_and_peft_adapter(tmp_path)
    path = tmp_path / "adapter_auto" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] + 0.25 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, path, metadata={"format": "pt"})
    x = idx(V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "base")
        reference_model = peft_api("PeftModel").from_pretrained(hf, tmp_path / "adapter_auto").eval()
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
    tied_llama_and_peft_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "base")
        config = peft_api("LoraConfig")(r=4, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True)
        peft_api("get_peft_model")(hf, config).save_pretrained(tmp_path / "tied_adapters", save_embedding_layers=False)
    with pytest.raises(ValueError, match=r"the LoRA target model\.embed_tokens is an Embedding: LoRA here adapts "
                                         r"linear layers \(nn\.Linear\) only"):
        lora.load_adapter(models.from_pretrained(tmp_path / "base"), tmp_path / "tied_adapters")


@pytest.mark.parametrize("name", ["gpt", "llama", "qwen", "phi"])
def test_merge_on_a_tied_head_unties_it_and_keeps_the_embedding(name, tmp_path):
    model = tiny_model(name, std=0.3, vocab_size=V, tie_embeddings=True)
    embedding = "transformer.wte.weight" if name == "gpt" else "model.embed_tokens.weight"
    assert tied_names(model) == [["lm_head.weight", embedding]]
    targets = lora.resolve_targets(model, "all") + ["lm_head"]
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, targets)))
    x = idx(V)
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    merged = check_merge(model, x, adapted)
    assert tied_names(model) == [] and model.config.tie_embeddings is False
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert (models.from_pretrained(tmp_path).eval()(x)[0] - merged).abs().max() <= 1e-5


def test_merge_keeps_a_tie_it_does_not_touch():
    """Adapting every layer but the head of a tied model: the tie stays, and so does the config."""
    model = tiny_model("llama", tie_embeddings=True)
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, lora.resolve_targets(model, "all"))))
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    check_merge(model, idx(V), adapted)
    assert tied_names(model) == [["lm_head.weight", "model.embed_tokens.weight"]] and model.config.tie_embeddings


def test_merge_on_a_head_its_file_cannot_untie_is_refused_and_changes_nothing():
    """A file that ties its head by construction (no config key unties it): merging an adapter on
    lm_head would change the embedding or write a model its file cannot hold, so it is refused in
    one line, before anything changes; the adapted model still runs unmerged."""
    torch.manual_seed(0)
    model = randomize(AlwaysTiedGPT(gpt.Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32)),
                      std=0.3).eval()
    targets = lora.resolve_targets(model, "all") + ["lm_head"]
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, targets)))
    x = idx(V)
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
    tiny_model("gpt", std=0.3, vocab_size=V).save_pretrained(tmp_path / "base")
    hf = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path / "base").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft_api("get_peft_model")(hf, peft_api("LoraConfig")(
            r=4, lora_alpha=16, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True))
        randomize_adapters(peft_model).eval()
        peft_model.save_pretrained(tmp_path / "adapter_false", save_embedding_layers=False)
        peft_model.save_pretrained(tmp_path / "adapter_auto")
    x = idx(V)
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
    model = tiny_model("gpt", std=0.3, vocab_size=V)
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, lora.resolve_targets(model, "all"))))
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    check_merge(model, idx(V), adapted)
    assert tied_names(model) == [["lm_head.weight", "transformer.wte.weight"]]


def test_merge_unties_any_shared_weight_not_only_the_head():
    """A weight shared by two layers (tied by hand; the file does not tie them): adapting one layer
    gives it its own merged weight and leaves the other's as it was."""
    model = tiny_model("llama", tie_embeddings=False)
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, ["layers.0.mlp.up_proj"])))
    check_merge(model, idx(V), adapted={"model.layers.0.mlp.up_proj"})
    assert layers[0].mlp.up_proj.weight is not layers[1].mlp.up_proj.weight


def test_a_target_that_is_not_a_linear_layer_is_refused():
    model = tiny_model("llama")
    for targets, kind in [(["q_proj", "embed_tokens"], "Embedding"), (["mlp"], "MLP"), (["norm"], "RMSNorm")]:
        with pytest.raises(ValueError, match=rf"the LoRA target \S+ is an? \w*{kind}\w*: LoRA here adapts linear"):
            lora.apply(tiny_model("llama"), lora.LoRAConfig(4, 8.0, targets))
    assert isinstance(lora.apply(model, lora.LoRAConfig(4, 8.0, ["q_proj"])).model.layers[0].self_attn.q_proj,
                      lora.LoRALinear)


@pytest.mark.parametrize("key,value", [("alora_invocation_tokens", [1, 2]), ("use_qalora", True),
                                       ("use_bdlora", {"nblocks": 2}), ("arrow_config", {"top_k": 2}),
                                       ("kasa_config", {"any": 1}), ("monteclora_config", {"n": 2})])


def test_peft_variants_that_change_the_computation_are_refused(tmp_path, key, value):
    model = randomize_adapters(lora.apply(tiny_model("llama"), lora.LoRAConfig(4, 8.0, ["q_proj"])))
    lora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=f"the PEFT option {key} is not supported"):
        lora.read_config(tmp_path)
