"""LoRA (lora.py) tests: `python -m pytest test_lora_part.py -q` (to be merged into test_all.py).

References: the base model itself (a fresh adapter changes nothing), the explicit merged matrix
W + scaling B A, and Hugging Face PEFT loading our adapter files onto transformers models.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

import bench
import data
import lora
import models
import sample
import train
from models import gpt, llama, phi, qwen
from test_all import corpus, hf_model, read_log, run_cli, tiny_gpt, tiny_ours, train_args  # noqa: F401 (corpus: a fixture)

FILES = {"gpt": gpt, "llama": llama, "qwen": qwen, "phi": phi}


def tiny(name, seed=0):
    """A tiny random model of models/<name>.py (2 layers, width 32; vocab 97 for gpt, 100 otherwise)."""
    return tiny_gpt(seed=seed) if name == "gpt" else tiny_ours(FILES[name], seed=seed)


def with_lora(model, targets="all", r=4, **kw):
    return lora.apply(model, lora.LoRAConfig(r, 8.0, lora.resolve_targets(model, targets), **kw))


def randomize_adapters(model, seed=1):
    """B starts at zero, which would make every comparison trivial: give A and B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def idx(vocab=97, B=2, T=16, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("name", list(FILES))
def test_fresh_adapter_is_exactly_the_base_and_merge_matches(name):
    model = tiny(name)
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


@pytest.mark.parametrize("name", list(FILES))
def test_all_targets_every_linear_layer_but_the_output_head(name):
    model = tiny(name)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    with_lora(model, "all")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)) == linears


def test_target_names_map_to_each_files_layers():
    assert lora.resolve_targets(tiny("gpt"), "q,k,v") == ["c_attn"]  # GPT-2's fused projection, once
    assert lora.resolve_targets(tiny("gpt"), "o,mlp") == ["attn.c_proj", "c_fc", "mlp.c_proj"]
    assert lora.resolve_targets(tiny("llama"), "q,v") == ["q_proj", "v_proj"]
    assert lora.resolve_targets(tiny("phi"), "o") == ["dense"]
    model = with_lora(tiny("gpt"), "o")  # attn.c_proj only, not the MLP's c_proj
    wrapped = [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert wrapped == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with pytest.raises(ValueError, match="unknown target 'query'; choose from q, k, v, o, mlp or all"):
        lora.resolve_targets(tiny("llama"), "q,query")


def test_initialisation_and_scaling():
    model = with_lora(tiny("llama"), "q", r=4)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B.weight, torch.zeros(32, 4))
    bound = 1 / 32 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert layer.scaling == 8.0 / 4
    assert with_lora(tiny("llama"), "q", r=4, use_rslora=True).model.layers[0].self_attn.q_proj.scaling == 8.0 / 2


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_only_adapters_train_and_the_base_stays_bit_identical(name):
    model = tiny(name).train()
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
    model, x = tiny("llama"), idx()
    with torch.no_grad():
        reference = copy.deepcopy(model).to(torch.bfloat16)(x)[0]
    lora.apply(model, lora.LoRAConfig(4, 8.0, ["q_proj", "v_proj"]), base_dtype=torch.bfloat16)
    dtypes = lambda adapter: {p.dtype for n, p in model.named_parameters() if (".lora_" in n) == adapter}
    assert dtypes(adapter=False) == {torch.bfloat16} and dtypes(adapter=True) == {torch.float32}
    logits, loss = model(x, targets=idx(seed=2))
    assert torch.equal(logits, reference)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_B" in n)


# ----------------------------------------------------------------------------- files: ours and PEFT's

def test_save_and_load_round_trip(tmp_path):
    model = randomize_adapters(with_lora(tiny("llama"), "q,v,mlp", r=2, lora_dropout=0.05, use_rslora=True))
    lora.save_adapter(model, tmp_path, metadata={"step": "7"})
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 8.0 and cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg["lora_dropout"] == 0.05 and cfg["fan_in_fan_out"] is False
    from safetensors import safe_open
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["step"] == "7" and len(keys) == 2 * 5 * 2  # layers x modules x (A, B)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    loaded = lora.load_adapter(tiny("llama"), tmp_path)
    assert not loaded.training  # the new layers follow the model's mode: dropout is off in eval
    x = idx()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    # a wrong rank in the file is an error naming the tensor
    cfg["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.\S+\.lora_A\.weight' has "
                                         r"shape \(2, \d+\), the model needs \(3, \d+\)"):
        lora.load_adapter(tiny("llama"), tmp_path)
    cfg.update(r=2, use_dora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora is not supported"):
        lora.load_adapter(tiny("llama"), tmp_path)


def hf_base(family, directory):
    """A tiny random transformers model and the same weights in our model: GPT-2 saved by our
    save_pretrained, Llama by transformers' save_pretrained."""
    import transformers
    if family == "gpt2":
        tiny_gpt().save_pretrained(directory)
        hf = transformers.GPT2LMHeadModel.from_pretrained(directory)
    else:
        hf_model("llama").save_pretrained(directory)
        hf = transformers.LlamaForCausalLM.from_pretrained(directory)
    return hf.eval(), models.from_pretrained(directory).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_loads_our_adapter_onto_the_transformers_model(tmp_path, family):
    from peft import PeftModel
    hf, ours = hf_base(family, tmp_path / "base")
    config = lora.LoRAConfig(4, 8.0, lora.resolve_targets(ours, "all"), base_model_name_or_path=str(tmp_path / "base"))
    randomize_adapters(lora.apply(ours, config))
    lora.save_adapter(ours, tmp_path / "adapter")
    x = idx()
    with torch.no_grad():
        base = hf(x).logits
        reference = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
        assert (reference - base).abs().max() > 0.1  # PEFT did load the adapter
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_we_load_adapters_that_peft_made(tmp_path, family):
    from peft import LoraConfig, get_peft_model
    hf, ours = hf_base(family, tmp_path / "base")
    targets = ["c_attn", "mlp.c_proj"] if family == "gpt2" else ["q_proj", "o_proj", "up_proj"]
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=targets, fan_in_fan_out=family == "gpt2",
                                               init_lora_weights=False))  # B random too
    peft_model.save_pretrained(tmp_path / "adapter")
    lora.load_adapter(ours, tmp_path / "adapter")
    x = idx()
    with torch.no_grad():
        assert (ours(x)[0] - peft_model.eval()(x).logits).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- train.py, sample.py, bench.py

def base_run(corpus, tmp_path):
    """A tiny GPT saved as a model directory with the corpus's char tokenizer: what LoRA starts from."""
    tiny_gpt().save_pretrained(tmp_path / "base")
    data.prepare(corpus, "char", tmp_path / "d", quiet=True).tokenizer.save(tmp_path / "base")
    return tmp_path / "base"


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
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lora.read_config(tmp_path / "split").base_model_name_or_path == str(base)
    assert (base / "model.safetensors").read_bytes() == base_bytes  # the base is never written
    # --merge on its own: the finished run, no more steps
    train.main(train_args(corpus, tmp_path, "split", max_iters=0) + ["--resume", "--merge"])
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "split" / "merged").eval()
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
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    hf_model("llama").save_pretrained(tmp_path / "base")
    data.prepare(corpus, "char", tmp_path / "d", quiet=True).tokenizer.save(tmp_path / "base")
    result = train.train(*train.parse_args(train_args(corpus, tmp_path, init_from=tmp_path / "base", lora_rank=2,
                                                      lora_targets="all", dtype="bfloat16", max_iters=2,
                                                      eval_interval=2, learning_rate=1e-2)))
    assert result["step"] == 2 and result["val_loss"] < 10
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(tmp_path / "run" / "adapter_model.safetensors").values()} == {torch.float32}
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    adapted, _ = sample.load(tmp_path / "run")
    x = idx(vocab=100)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(hf, tmp_path / "run").eval()(x).logits
        assert (adapted(x)[0] - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("args,message", [
    (["--lora_rank", "4", "--lora_targets", "q,query"], "unknown target 'query'"),
    (["--lora_rank", "4", "--init_from", "scratch"], "give it --init_from DIR"),
    (["--merge"], "it needs --lora_rank"),
])
def test_lora_user_errors_are_one_line(corpus, tmp_path, args, message):
    base = base_run(corpus, tmp_path)
    with pytest.raises((ValueError, data.UserError), match=message):
        train.main(train_args(corpus, tmp_path, init_from=base) + args)
    if args[-1] == "q,query":  # through the command line: one line, exit 1
        r = run_cli("train.py", *train_args(corpus, tmp_path, init_from=base), *args)
        assert r.returncode == 1 and r.stderr.strip() == f"error: --lora_targets: {message}; choose from q, k, v, o, mlp or all"


def test_bench_lora_runs_end_to_end(capsys):
    argv = ["lora", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
            "--reps", "1", "--lora_rank", "2"]
    args = bench.parser(argv).parse_args(argv)
    rows, ratios = args.run(args)
    out = capsys.readouterr().out
    for column in ("trainable params", "% of the model", "optimizer state MiB", "step peak MiB", "training MiB",
                   "step ms", "full fine-tuning / LoRA"):
        assert column in out
    full, low = rows
    assert low["trainable"] == 2 * (32 + 96)  # c_attn of one layer: A 2 x 32, B 96 x 2
    assert ratios["trainable"] == full["trainable"] / low["trainable"] > 10
    assert ratios["opt_state_mib"] > 10  # AdamW keeps two moments per trainable parameter
