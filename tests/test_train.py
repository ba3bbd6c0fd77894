"""train.py: the training loop in stages, resume, fine-tuning, configs, several processes."""

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
import train
from omnitron import data, lora, models, runtime
from tests.helpers import (
    LLAMA3_SPLIT,
    ROOT,
    hf_model,
    hf_moe,
    read_log,
    split_then_byte_level,
    tiny_model,
    torchrun,
    train_args,
    train_flags,
    train_hf,
)

# ----------------------------------------------------------------------------- train (train.py)


def test_resume_equals_the_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    # dropout on, so the RNG states must be restored as well as weights, optimizer and data position
    train.main(train_args(corpus, tmp_path, "full"))
    train.main(train_args(corpus, tmp_path, "split", max_iters=4))
    train.main(train_args(corpus, tmp_path, "split", max_iters=8) + ["--resume"])
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    losses = lambda log, key: [(r["step"], r[key]) for r in log if key in r and r["step"] > 4]
    assert losses(full, "train_loss") == losses(split, "train_loss")
    assert losses(full, "val_loss") == losses(split, "val_loss") and losses(full, "val_loss")
    a, b = models.from_pretrained(tmp_path / "full"), models.from_pretrained(tmp_path / "split")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_resume_between_evaluations_equals_the_uninterrupted_run(corpus, tmp_path):
    """A run that stopped at a step that is not a multiple of --eval_interval (6, evaluating every 4)
    has a checkpoint there too (one is written at max_iters), and continues from it as the run that
    never stopped."""
    train.main(train_args(corpus, tmp_path, "full", max_iters=8, eval_interval=4))
    train.main(train_args(corpus, tmp_path, "split", max_iters=6, eval_interval=4))
    train.main(train_args(corpus, tmp_path, "split", max_iters=8) + ["--resume"])
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    steps = lambda log: [(r["step"], r["train_loss"]) for r in log if "val_loss" not in r]  # training lines
    evals = lambda log: {r["step"]: (r["train_loss"], r["val_loss"]) for r in log if "val_loss" in r}
    assert steps(full) == steps(split) and [s for s, _ in steps(split)] == list(range(1, 9))
    assert evals(split).keys() == {0, 4, 6, 8} and evals(full).keys() == {0, 4, 8}
    assert all(evals(full)[s] == evals(split)[s] for s in (0, 4, 8))
    a, b = models.from_pretrained(tmp_path / "full"), models.from_pretrained(tmp_path / "split")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_torn_checkpoint_is_detected(corpus, tmp_path):
    train.main(train_args(corpus, tmp_path, max_iters=4))
    st = tmp_path / "run" / "model.safetensors"
    save_file(load_file(st), st, metadata={"format": "pt", "step": "2"})
    with pytest.raises(runtime.UserError, match="do not match"):
        train.main(train_args(corpus, tmp_path, max_iters=8) + ["--resume"])


def test_short_training_run_loss_falls(corpus, tmp_path):
    result = train.train(*train.parse_args(train_args(corpus, tmp_path, max_iters=40, eval_interval=40,
                                                      dropout=0.0, learning_rate=1e-2, eval_iters=4,
                                                      gradient_accumulation_steps=2)))
    log = read_log(tmp_path / "run")
    first_val, vocab = log[0]["val_loss"], len(set(corpus.read_text()))
    assert abs(first_val - np.log(vocab)) < 0.2  # the untrained model is near uniform
    assert result["val_loss"] < first_val - 1.0
    assert all({"step", "elapsed_s"} <= set(r) and ("train_loss" in r or "val_loss" in r) for r in log)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "log.jsonl", "model.safetensors", "tokenizer_omnitron.json", "train_state.pt"]
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 40 and state["args"]["gradient_accumulation_steps"] == 2


def test_run_from_python_equals_the_command_line_and_takes_a_loss_fn(corpus, tmp_path):
    """train.run: the flags as keyword arguments, with the command line's defaults and checks; a
    loss_fn's metrics land in log.jsonl (those of the last micro-batch of each logged step)."""
    with pytest.raises(runtime.UserError, match="unknown flag.*max_itres"):
        train.run(max_itres=3)
    with pytest.raises(runtime.UserError, match="--max_iters: expected int"):
        train.run(max_iters="ten")
    train.main(train_args(corpus, tmp_path, "cli", max_iters=4))
    result = train.run(**train_flags(corpus, tmp_path, "py", max_iters=4))
    assert result["out_dir"] == str(tmp_path / "py") and result["step"] == 4
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in log]
    assert strip(read_log(tmp_path / "cli")) == strip(read_log(tmp_path / "py"))
    assert result["val_loss"] == read_log(tmp_path / "py")[-1]["val_loss"]

    def z_loss(model, batch):  # PaLM's z-loss: keeps the softmax normaliser near 1
        x, y = batch
        logits, loss = model(x, y)
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return loss + 1e-4 * z, {"z_loss": z.detach()}

    result = train.run(**train_flags(corpus, tmp_path, "z", max_iters=4), loss_fn=z_loss)
    logged = [r for r in read_log(tmp_path / "z") if "z_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(r["z_loss"] > 0 for r in logged)
    assert result["z_loss"] == logged[-1]["z_loss"]


def test_lm_loss_adds_the_models_auxiliary_losses():
    model = tiny_model("gpt")
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)
    loss, metrics = train.lm_loss(model, (x, y))
    assert torch.equal(loss, model(x, y)[1]) and metrics == {}
    model.aux_losses = lambda: {"load_balance": torch.tensor(0.25)}  # as a mixture of experts reports it
    compiled = torch.compile(model)  # the loss reaches the model inside torch.compile's wrapper
    assert train.unwrap(compiled) is model
    loss, metrics = train.lm_loss(model, (x, y))
    assert torch.allclose(loss, model(x, y)[1] + 0.25)
    assert metrics["load_balance"] == 0.25 and torch.equal(metrics["lm_loss"], model(x, y)[1])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(corpus, tmp_path, mode):
    common = dict(max_iters=3, eval_interval=3, dropout=0.0, gradient_accumulation_steps=2)
    r = torchrun(*train_args(corpus, tmp_path, mode, batch_size=4, **common), *(["--fsdp"] if mode == "fsdp" else []))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("step 3: train loss") == 1  # only rank 0 prints
    train.main(train_args(corpus, tmp_path, "single", batch_size=8, **common))
    for a, b in zip(read_log(tmp_path / mode), read_log(tmp_path / "single"), strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-6
    multi, single = models.from_pretrained(tmp_path / mode), models.from_pretrained(tmp_path / "single")
    assert all((p - q).abs().max() < 1e-6 for p, q in zip(multi.parameters(), single.parameters()))
    if mode == "ddp":  # a checkpoint written by two processes resumes in one with the same next step
        for run in (mode, "single"):
            train.main(train_args(corpus, tmp_path, run, batch_size=8, **{**common, "max_iters": 4}) + ["--resume"])
        assert abs(read_log(tmp_path / mode)[-2]["train_loss"] - read_log(tmp_path / "single")[-2]["train_loss"]) < 1e-6


def test_learning_rate_schedule():
    a = {"learning_rate": 1.0, "min_lr": -1.0, "warmup_iters": 10, "lr_decay_iters": -1, "max_iters": 110}
    lrs = [train.lr_at(s, a) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_learning_rate_schedule_on_elapsed_time_under_max_time():
    """With --max_time the decay is as far as the further of the step's share and the clock's share of
    max_time, so it ends at whichever limit comes first; the warmup stays in steps."""
    cosine = {"learning_rate": 1.0, "min_lr": 0.0, "warmup_iters": 10, "lr_decay_iters": -1, "max_iters": 10**6,
              "max_time": 100.0}
    assert train.lr_at(5, cosine, elapsed=50.0) == pytest.approx(6 / 11)  # warming up: the step decides
    assert train.lr_at(20, cosine, elapsed=50.0) == pytest.approx(0.5)    # half the time: half the cosine
    assert train.lr_at(10**5, cosine, elapsed=25.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert train.lr_at(20, cosine, elapsed=100.0) == 0.0 and train.lr_at(20, cosine, elapsed=130.0) == 0.0
    trapezoidal = {**cosine, "lr_schedule": "trapezoidal", "cooldown_frac": 0.4}
    lrs = [train.lr_at(50, trapezoidal, elapsed=t) for t in (0.0, 59.0, 60.0, 80.0, 90.0, 100.0, 120.0)]
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    # whichever limit comes first ends the decay: here the steps (max_iters 100, with time to spare)
    by_steps = {**trapezoidal, "max_iters": 100, "max_time": 10**6}
    assert train.lr_at(80, by_steps, elapsed=5.0) == pytest.approx(0.5) and train.lr_at(100, by_steps, 5.0) == 0.0
    assert train.lr_at(60, {**cosine, "max_iters": 110}, elapsed=1.0) == pytest.approx(0.5)


def test_max_time_ends_the_run_on_time_and_resumes_to_a_longer_budget(corpus, tmp_path):
    """--max_time ends training once that many seconds are spent (evaluating and saving there), with
    the cooldown finished by then; a resumed run counts the first run's seconds and trains on to its
    own --max_time."""
    flags = dict(max_iters=10**6, eval_interval=10**6, log_interval=5, lr_schedule="trapezoidal", min_lr=0.0,
                 warmup_iters=2, lr_decay_iters=None)
    t0 = time.time()
    train.main(train_args(corpus, tmp_path, max_time=3, **flags))
    assert time.time() - t0 < 30  # (a clock that never stopped would run a million steps)
    log = read_log(tmp_path / "run")
    final, steps = log[-1], [r for r in log if "lr" in r]
    assert "val_loss" in final and 3.0 <= final["elapsed_s"] < 3.0 + 5.0 and final["step"] > 10
    assert steps[-1]["lr"] < 0.2 * max(r["lr"] for r in steps)  # cooled down, not cut off at the peak
    assert load_file(tmp_path / "run" / "model.safetensors", device="cpu") is not None
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == final["step"]
    train.main(train_args(corpus, tmp_path, max_time=5, **flags) + ["--resume"])
    resumed = read_log(tmp_path / "run")
    assert resumed[-1]["step"] > final["step"] and 5.0 <= resumed[-1]["elapsed_s"] < 5.0 + 5.0
    with pytest.raises(runtime.UserError, match="--max_time must be 0 .off. or more, not -1"):
        train.main(train_args(corpus, tmp_path, "bad", max_time=-1))


@torch.no_grad()
def whole_val_loss(out_dir, corpus, data_dir, block_size):
    """The reference of --eval_full_val: the saved model's float64 cross-entropy over every token of the
    val split, in consecutive windows of block_size that end at the split's end."""
    model = models.from_pretrained(out_dir).double().eval()
    val = torch.from_numpy(np.asarray(data.prepare(corpus, "char", data_dir, quiet=True).tokens("val"),
                                      dtype=np.int64))
    n = (len(val) - 1) // block_size
    tail = val[len(val) - 1 - n * block_size:]
    x, y = tail[:-1].view(n, block_size), tail[1:].view(n, block_size)
    logits = model(x)[0]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item(), n


@pytest.mark.parametrize("name", models.available())
def test_eval_full_val_is_the_mean_over_every_val_token(corpus, tmp_path, name):
    """Every model file: --eval_full_val's val loss is the float64 mean over every val token (switch
    dropless, so that its loss cannot depend on which windows share a batch)."""
    fields = {f.name for f in dataclasses.fields(models.get(name).Config)}
    extra = {"eval_capacity_factor": 0} if name == "switch" else {}
    extra.update({"n_kv_head": 2} if "n_kv_head" in fields else {})
    train.main(train_args(corpus, tmp_path, name, model=name, max_iters=4, eval_interval=4, eval_full_val=True,
                          dropout=None, **extra))
    reference, windows = whole_val_loss(tmp_path / name, corpus, tmp_path / "d", 32)
    assert windows % 4  # the last batch is part padding (ignored rows)
    assert read_log(tmp_path / name)[-1]["val_loss"] == pytest.approx(reference, rel=1e-5)


def test_eval_full_val_is_refused_where_there_is_no_text_split(corpus, tmp_path):
    with pytest.raises(runtime.UserError, match="--eval_full_val evaluates a text corpus"):
        train.main(train_args(corpus, tmp_path, "bad", eval_full_val=True, mm_images="digits"))


def test_max_time_stops_two_processes_at_the_same_step(corpus, tmp_path):
    """Under --max_time the processes follow rank 0's clock: they stop at one step with one learning
    rate (a process that stopped alone would leave the other waiting in its all-reduce); the final
    --eval_full_val, the windows dealt to the two processes, is the whole split's."""
    r = torchrun(*train_args(corpus, tmp_path, "ddp", max_iters=10**6, eval_interval=10**6, log_interval=1,
                             max_time=3, lr_decay_iters=None, eval_full_val=True, dropout=0.0))
    assert r.returncode == 0, r.stderr[-2000:]
    log = read_log(tmp_path / "ddp")
    assert "val_loss" in log[-1] and log[-1]["elapsed_s"] >= 3.0 and log[-1]["step"] > 5
    assert r.stdout.count(f"step {log[-1]['step']}: train loss") == 1
    assert log[-1]["val_loss"] == pytest.approx(whole_val_loss(tmp_path / "ddp", corpus, tmp_path / "d", 32)[0], rel=1e-5)


def test_weight_decay_only_on_matrices():
    model = tiny_model("gpt")
    opt = train.make_optimizer(model, {"weight_decay": 0.1, "learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.99}, "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_config_file_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('max_iters = 7\nlearning_rate = 1\nn_layer = 3\n')
    args, _ = train.parse_args(["--config", str(cfg), "--max_iters", "9"])
    assert args["max_iters"] == 9 and args["learning_rate"] == 1.0 and args["n_layer"] == 3
    cfg.write_text('max_itres = 7\n')
    with pytest.raises(runtime.UserError, match="unknown flag"):
        train.parse_args(["--config", str(cfg)])
    for config_file in (ROOT / "config").glob("*.toml"):  # the shipped configs parse
        train.parse_args(["--config", str(config_file)])


def test_fine_tune_from_a_hugging_face_directory(corpus, tmp_path):
    model = tiny_model("gpt")
    model.save_pretrained(tmp_path / "hf")
    data.prepare(corpus, "char", tmp_path / "d", quiet=True).tokenizer.save(tmp_path / "hf")
    train.main(train_args(corpus, tmp_path, "ft", init_from=tmp_path / "hf", max_iters=2, eval_interval=2))
    tuned = models.from_pretrained(tmp_path / "ft")
    assert tuned.config == model.config
    assert not torch.equal(tuned.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi"])
def test_train_from_scratch_and_fine_tune_a_hugging_face_checkpoint(corpus, tmp_path, family):
    name = {"llama": "llama", "qwen3": "qwen", "phi": "phi"}[family]
    train.main(train_args(corpus, tmp_path, "scratch", model=name, max_iters=2, eval_interval=2,
                          dropout=0.1 if name == "phi" else None, n_kv_head=1))
    assert type(models.from_pretrained(tmp_path / "scratch")).__module__ == f"omnitron.models.{name}"
    # a Hugging Face checkpoint: transformers' weights and a tokenizers-made tokenizer.json
    hf_dir = tmp_path / "hf"
    hf_model(family, vocab_size=512).save_pretrained(hf_dir)
    train_hf(split_then_byte_level(LLAMA3_SPLIT)).save(str(hf_dir / "tokenizer.json"))
    base = models.from_pretrained(hf_dir)
    train.main(train_args(corpus, tmp_path, "ft", init_from=hf_dir, max_iters=2, eval_interval=2))
    tuned, tok = sample.load(tmp_path / "ft")
    assert tuned.config == base.config and tok.spec == "hf:tokenizer.json"
    changed = [n for (n, p), q in zip(tuned.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(base.parameters()))
    text = "ROMEO: love, light"
    assert tok.decode(tok.encode(text)) == text


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


def test_fine_tune_a_mixture_of_experts_checkpoint_fully_and_with_lora(corpus, tmp_path):
    """--init_from a transformers Qwen2-MoE folder (a shared expert, a dense layer): full fine-tuning
    changes every parameter (experts, router, shared expert); LoRA on every linear layer (attention,
    the dense MLP, the shared expert; the stacked experts and the router stay frozen) trains an adapter
    that sample.py loads on its base."""
    hf_dir = tmp_path / "hf"
    hf_moe("qwen2_moe", vocab_size=512).save_pretrained(hf_dir)
    train_hf(split_then_byte_level(LLAMA3_SPLIT)).save(str(hf_dir / "tokenizer.json"))
    base = models.from_pretrained(hf_dir)
    common = dict(init_from=hf_dir, max_iters=2, eval_interval=2, n_layer=None, n_head=None, n_embd=None, dropout=None)
    train.run(**train_flags(corpus, tmp_path, "ft", **common))
    tuned = models.from_pretrained(tmp_path / "ft")
    assert tuned.config == base.config
    assert all(not torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters()))
    train.run(**train_flags(corpus, tmp_path, "lora", **common, lora_rank=2, lora_targets="all"))
    adapted = lora.load_adapter(models.from_pretrained(hf_dir), tmp_path / "lora")
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, lora.LoRALinear)}
    merged, _ = sample.load(tmp_path / "lora")  # what sample.py decodes with: the adapter merged into its base
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert "model.layers.0.mlp.shared_expert.up_proj" in wrapped and "model.layers.1.mlp.down_proj" in wrapped
    assert "model.layers.0.self_attn.q_proj" in wrapped and not any("experts." in n or n.endswith(".gate") for n in wrapped)


# ----------------------------------------------------------------------------- runs never lost, always resumable


def test_a_trained_run_is_not_replaced_without_overwrite(corpus, tmp_path):
    """A new run into a folder that holds a trained checkpoint stops in one line naming what is there and
    the three ways on, before writing anything; --overwrite replaces it; an empty folder is fine. The
    experiments' cached_run retrains into a folder whose settings changed (it passes --overwrite)."""
    from experiments.common import cached_run
    (tmp_path / "empty").mkdir()
    train.main(train_args(corpus, tmp_path, "empty", max_iters=4))
    before = (tmp_path / "empty" / "model.safetensors").read_bytes()
    val = read_log(tmp_path / "empty")[-1]["val_loss"]
    with pytest.raises(runtime.UserError) as e:
        train.main(train_args(corpus, tmp_path, "empty", max_iters=2))
    assert f"holds a trained run (step 4, val loss {val:.4f})" in str(e.value)
    assert all(way in str(e.value) for way in ("--resume", "another --out_dir", "--overwrite"))
    assert (tmp_path / "empty" / "model.safetensors").read_bytes() == before  # nothing written
    with pytest.raises(runtime.UserError, match="holds a trained run"):
        train.run(**train_flags(corpus, tmp_path, "empty", max_iters=2))
    train.main(train_args(corpus, tmp_path, "empty", max_iters=2, overwrite=True))
    assert torch.load(tmp_path / "empty" / "train_state.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in read_log(tmp_path / "empty") if "val_loss" in r] == [0, 2]
    flags = {k: v for k, v in train_flags(corpus, tmp_path, "empty", max_iters=3).items() if k != "out_dir"}
    log = cached_run(tmp_path / "empty", {"settings": "new"}, **flags)  # no settings.json: trained again
    assert log[-1]["step"] == 3 and json.loads((tmp_path / "empty" / "settings.json").read_text()) == {"settings": "new"}


def test_flags_are_never_taken_by_prefix():
    """argparse's prefix matching is off: `--max_iter 10` (a typo of --max_iters) is refused with the flag
    meant, in train.py, sample.py and bench.py's subcommands (the experiments' parsers too)."""
    import bench
    import sample
    with pytest.raises(runtime.UserError, match=r"unrecognized arguments: --max_iter 10 \(did you mean --max_iters\?\)"):
        train.parse_args(["--max_iter", "10"])
    with pytest.raises(runtime.UserError, match="did you mean --temperature"):
        sample.parser().parse_args(["--temp", "0"])
    for argv in (["speed", "--n_lay", "2"], ["switch", "--max_iter", "3"], ["icl", "--shot", "2"]):
        with pytest.raises(runtime.UserError, match="unrecognized arguments"):
            bench.parser(argv).parse_args(argv)


def test_init_from_takes_the_models_own_block_size(corpus, tmp_path):
    """--init_from DIR without --block_size trains at the model's own length (here 32, below the default
    128), and refuses a longer explicit one in a line that says what fits."""
    train.main(train_args(corpus, tmp_path, "base", max_iters=2, block_size=32))
    result = train.run(**train_flags(corpus, tmp_path, "tuned", init_from=tmp_path / "base", max_iters=2,
                                     block_size=None))
    assert result["step"] == 2
    assert torch.load(tmp_path / "tuned" / "train_state.pt", weights_only=True)["args"]["block_size"] == 32
    with pytest.raises(runtime.UserError, match="--block_size 64 exceeds the model's 32 positions: give --block_size 32"):
        train.run(**train_flags(corpus, tmp_path, "longer", init_from=tmp_path / "base", max_iters=2, block_size=64))


def test_resume_continues_the_log_and_the_cache_and_says_what_this_run_did(corpus, tmp_path, capsys):
    """A run killed after its checkpoint (step 4) had logged steps 5 and 6: resumed, the log holds each
    step once, elapsed_s never runs back, and the evaluation at step 4 is not repeated; the corpus is
    read from the cache the run was trained from (no second tokenized copy); the closing line gives this
    run's steps and time apart from the whole run's."""
    train.main(train_args(corpus, tmp_path, max_iters=4))
    log = tmp_path / "run" / "log.jsonl"
    last = read_log(tmp_path / "run")[-1]["elapsed_s"]
    with open(log, "a") as f:  # what the killed run wrote after its last checkpoint, the last line cut short
        f.write(json.dumps({"step": 5, "elapsed_s": last + 50, "train_loss": 9.0}) + "\n")
        f.write(json.dumps({"step": 6, "elapsed_s": last + 60, "train_loss": 9.0}) + "\n" + '{"step": 7, "ela')
    capsys.readouterr()
    train.main(train_args(corpus, tmp_path, max_iters=8) + ["--resume"])
    out = capsys.readouterr().out
    records = read_log(tmp_path / "run")
    training = [r["step"] for r in records if "val_loss" not in r]
    evaluations = [r["step"] for r in records if "val_loss" in r]
    assert training == list(range(1, 9)) and evaluations == [0, 4, 8]
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(records, records[1:]))
    assert all(r["train_loss"] != 9.0 for r in records)
    assert "step 4:" not in out and "this run: steps 4..8 in" in out and "of training in all" in out
    assert sorted(p.name for p in (tmp_path / "d").iterdir() for p in p.iterdir()) == ["char"]


def test_ctrl_c_checkpoints_says_where_and_the_resumed_log_runs_on(corpus, tmp_path):
    """SIGINT to a real run: it stops after the step in progress, checkpoints it, says in one line which
    step that is and the --resume command, and exits 130; resumed, log.jsonl's steps run on without
    repeats and its clock never goes back."""
    out = tmp_path / "run"
    args = train_args(corpus, tmp_path, max_iters=100000, eval_interval=10, log_interval=5, lr_decay_iters=None,
                      warmup_iters=None)
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not any(r["step"] >= 10 and "val_loss" in r for r in read_log_lines(out / "log.jsonl")):
            assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "slow"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert p.returncode == 130 and err.splitlines() == [
        f"interrupted at step {saved} of 100000: checkpoint saved in {out} (step {saved}); continue with: "
        f"python train.py --out_dir {out} --resume"]
    train.main([*args, f"--max_iters={saved + 6}", "--resume"])
    records = read_log(out)
    for kind in (lambda r: "val_loss" not in r, lambda r: "val_loss" in r):
        steps = [r["step"] for r in records if kind(r)]
        assert steps == sorted(set(steps)) and steps[-1] == saved + 6
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(records, records[1:]))


def read_log_lines(path):
    """The whole lines of a log.jsonl being written ([] before it exists)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("}\n")]
