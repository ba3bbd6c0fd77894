"""models/switch.py: to be folded into test_all.py's sections."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import hub
import models
import train
from models import switch
from test_all import V, corpus, hf_class, randomize, read_log, run_cli, torchrun  # noqa: F401 (corpus: a fixture)

# --- models/switch.py: mixtures of experts

MOE_FAMILIES = {  # model_type -> transformers' config class, causal LM class, the tiny model's own settings
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, shared_expert_intermediate_size=16,
        mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, norm_topk_prob=True, decoder_sparse_step=2,
        head_dim=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=24, num_experts=4, clip_qkv=0.8,
                                                      norm_topk_prob=False)),
}


def hf_moe(family, seed=0, **overrides):
    """A tiny transformers mixture of experts (hidden 32, 3 layers, 4 heads, 2 kv heads, 4 experts, top-2),
    every parameter random (std 0.3), no bos/eos."""
    config_cls, model_cls, own = MOE_FAMILIES[family]
    kw = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, **own)
    torch.manual_seed(seed)
    return randomize(hf_class(model_cls)(hf_class(config_cls)(**{**kw, **overrides})), seed, std=0.3).eval()


def load_eager(family, directory):
    """transformers' model of a directory with its per-expert loop (its default grouped_mm differs by
    about 2e-3 in bf16)."""
    return hf_class(MOE_FAMILIES[family][1]).from_pretrained(directory, experts_implementation="eager").eval()


def moe_ids(T=20, seed=1):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same(ours, hf, x):
    ref = hf(x).logits
    assert ref.abs().max() > 1.0 and (ours(x)[0] - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_checkpoints_give_transformers_logits_and_round_trip(tmp_path, family):
    """Mixtral, Qwen2-MoE (a shared expert, a dense layer), Qwen3-MoE (sparse every 2nd layer) and OLMoE
    (clip_qkv) read from transformers' save_pretrained (one matrix per expert) give transformers'
    logits; ours written back load in transformers to the same logits, in the per-expert layout."""
    hf_moe(family).save_pretrained(tmp_path / "hf")
    hf = load_eager(family, tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    assert type(ours) is switch.Model and ours.config.capacity_factor == ours.config.eval_capacity_factor == 0
    x = moe_ids()
    assert_same(ours, hf, x)
    ours.save_pretrained(tmp_path / "ours")
    stored = set(dict(hub.read_tensors(tmp_path / "ours")))
    assert stored == set(dict(hub.read_tensors(tmp_path / "hf")))  # transformers' per-expert names exactly
    assert_same(ours, load_eager(family, tmp_path / "ours"), x)
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
    assert_same(ours, load_eager("qwen3_moe", tmp_path), moe_ids())
    back = models.from_pretrained(tmp_path)
    assert back.config == cfg  # the capacity factors and the z-loss coefficient come back from config.json


class SwiGLUExpert(nn.Module):
    """One of our stacked experts as a module, to stand in for transformers' expert_{e}."""

    def __init__(self, experts, e):
        super().__init__()
        self.experts, self.e = experts, e

    def forward(self, x):
        return self.experts.expert(self.e, x)


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


def test_decoding_is_dropless_and_evaluation_drops_at_its_capacity():
    torch.manual_seed(0)
    cfg = switch.Config(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_experts=4,
                        moe_intermediate_size=24, eval_capacity_factor=0.5)
    model = randomize(switch.Model(cfg), std=0.3).eval()
    x = moe_ids(24)
    with torch.no_grad():
        dropping = model(x)[0]
        assert model.aux_metrics()["dropped_fraction"] > 0
        cache = model.init_cache(2, 24)
        cached = torch.cat([model(x[:, :10], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(10, 24)], 1)
        model.config.eval_capacity_factor = 0.0
        dropless = model(x)[0]
    assert (cached - dropless).abs().max() <= 1e-5 and (dropping - dropless).abs().max() > 1e-3


def test_switch_trains_and_logs_router_losses_and_drops(corpus, tmp_path):
    flags = dict(data=corpus, data_dir=tmp_path / "d", out_dir=tmp_path / "run", max_iters=4, eval_interval=4,
                 eval_iters=1, log_interval=1, batch_size=4, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                 n_experts=4, moe_intermediate_size=32, intermediate_size=32, device="cpu", dtype="float32",
                 sample_tokens=0, warmup_iters=1)
    train.run(model="switch", **flags)
    logged = [r for r in read_log(tmp_path / "run") if "lm_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert r["train_loss"] == pytest.approx(r["lm_loss"] + r["balance_loss"] + r["z_loss"], rel=1e-5)
        assert 0 <= r["dropped_fraction"] < 1 and 1 <= r["max_expert_load"] <= 4
        assert r["balance_loss"] > 0 and r["z_loss"] > 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_switch_two_processes_equal_one_with_starved_experts(corpus, tmp_path, mode):
    """4 tokens per process and micro-batch for 8 experts: at least 4 experts get no token in every
    step of every process. Dropless and without the balance loss (a product of batch means), the two
    processes' losses and weights equal one process's over the same global batch."""
    common = dict(data=corpus, data_dir=tmp_path / "d", max_iters=2, eval_interval=2, eval_iters=1, log_interval=1,
                  block_size=4, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, n_experts=8, moe_intermediate_size=32,
                  intermediate_size=32, capacity_factor=0.0, eval_capacity_factor=0.0, router_aux_loss_coef=0.0,
                  device="cpu", dtype="float32", sample_tokens=0, gradient_accumulation_steps=2, warmup_iters=1)
    args = [f"--{k}={v}" for k, v in {**common, "out_dir": tmp_path / mode, "batch_size": 1, "model": "switch"}.items()]
    r = torchrun(*args, *(["--fsdp"] if mode == "fsdp" else []))
    assert r.returncode == 0, r.stderr[-2000:]
    train.run(model="switch", **common, out_dir=tmp_path / "single", batch_size=2)
    for a, b in zip(read_log(tmp_path / mode), read_log(tmp_path / "single"), strict=True):
        for key in ("train_loss", "val_loss", "z_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-5
    multi, single = models.from_pretrained(tmp_path / mode), models.from_pretrained(tmp_path / "single")
    # 1e-4, not the dense models' 1e-6: AdamW divides by sqrt(v), so an expert's gradient entry that is a
    # sum cancelling to about 1e-9 moves its weight by a sizeable fraction of lr on rounding alone
    assert all((p - q).abs().max() < 1e-4 for p, q in zip(multi.parameters(), single.parameters()))


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
