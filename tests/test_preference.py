"""omnitron/dpo.py and omnitron/self_reward.py: the DPO loss against its formula, training through train.py,
self-rewarding iterations."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch

import train
from omnitron import data, dpo, lora, models, runtime, self_reward
from omnitron.tokenization import CharTokenizer
from tests.helpers import ROOT, read_log, torchrun

# ----------------------------------------------------------------------------- preference training: DPO and self-rewarding (dpo.py, self_reward.py)
# DPO (dpo.py, train.py --dpo) and self-rewarding iterations (self_reward.py, train.py --self_reward).


CHARS = "\n :abcdefghijklmnoprstuvwxyzS0123456789"
PAIRS = [{"prompt": "sort cab:", "chosen": "abc\n", "rejected": "acb\n"},
         {"prompt": "say hi:", "chosen": "hi there\n", "rejected": "no\n"},
         {"prompt": "count:", "chosen": "1 2 3\n", "rejected": "3 2 1 0\n"}]


def hf_gpt2_chars(seed, vocab=len(CHARS)):
    """A tiny transformers GPT-2 (width 32, 2 layers, 4 heads), every parameter random."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_dir(tmp_path, name, seed=0):
    """A tiny random HF GPT-2 saved as a model directory with the CHARS tokenizer; returns (dir, hf model)."""
    hf = hf_gpt2_chars(seed)
    hf.save_pretrained(tmp_path / name)
    CharTokenizer(CHARS).save(tmp_path / name)
    return tmp_path / name, hf


def hf_logprob(hf, tok, prompt, response):
    """log p(response | prompt) from transformers' forward of the whole sequence, in float64."""
    ctx, resp = tok.encode(prompt), tok.encode(response)
    ids = torch.tensor([ctx + resp])
    logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(resp))


# ----------------------------------------------------------------------------- the DPO loss


def test_dpo_loss_and_gradient_equal_transformers_in_float64(tmp_path):
    policy_dir, hf_policy = model_dir(tmp_path, "policy", seed=0)
    ref_dir, hf_ref = model_dir(tmp_path, "reference", seed=1)
    tok, beta = CharTokenizer(CHARS), 0.3
    ours, reference = models.from_pretrained(policy_dir).eval(), dpo.load_reference(ref_dir, "cpu")
    dataset = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tok)
    x, y = dataset.batch([0, 1, 2], block_size=64)
    assert x.shape[0] == 6
    for row, p in enumerate(PAIRS + PAIRS):  # the prompt's tokens are not scored, the response's are
        n, response = len(p["prompt"]), tok.encode(p["chosen" if row < 3 else "rejected"])
        assert (y[row, :n - 1] == -1).all() and y[row, n - 1:n - 1 + len(response)].tolist() == response
    loss, metrics = dpo.DPOLoss(reference, beta)(ours, (x, y))
    loss.backward()

    terms, chosen_lp, rejected_lp = [], [], []
    for p in PAIRS:
        pw, pl = hf_logprob(hf_policy, tok, p["prompt"], p["chosen"]), hf_logprob(hf_policy, tok, p["prompt"], p["rejected"])
        with torch.no_grad():
            rw, rl = hf_logprob(hf_ref, tok, p["prompt"], p["chosen"]), hf_logprob(hf_ref, tok, p["prompt"], p["rejected"])
        z = beta * ((pw - rw) - (pl - rl))
        terms.append(torch.log1p(torch.exp(-z)))  # -log sigmoid(z)
        chosen_lp.append(pw.item())
        rejected_lp.append(pl.item())
    expected = torch.stack(terms).mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5 and expected.item() > 0.1
    assert metrics["logp_chosen"].item() == pytest.approx(sum(chosen_lp) / 3, abs=1e-4)
    assert metrics["logp_rejected"].item() == pytest.approx(sum(rejected_lp) / 3, abs=1e-4)
    hf_grads = dict(hf_policy.named_parameters())
    transposed = type(ours).FAN_IN_FAN_OUT
    checked = 0
    for name, p in ours.named_parameters():
        ref = hf_grads[name].grad
        ref = ref.t() if name.endswith(transposed) and ref.dim() == 2 else ref
        assert torch.allclose(p.grad, ref.float(), atol=1e-5, rtol=1e-4), name
        checked += ref.abs().max().item() > 1e-4
    assert checked > 10  # real gradients, not zeros
    assert all(p.grad is None for p in reference.parameters())  # the reference is frozen


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference(tmp_path):
    directory, _ = model_dir(tmp_path, "m")
    model = models.from_pretrained(directory)
    dataset = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), CharTokenizer(CHARS))
    loss, metrics = dpo.DPOLoss(copy.deepcopy(model).requires_grad_(False), 0.1)(model, dataset.batch([0, 1, 2], 64))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"].item() == 0 and metrics["reward_accuracy"].item() == 0


def test_lora_reference_is_the_base_model_exactly(tmp_path):
    directory, _ = model_dir(tmp_path, "m")
    base = models.from_pretrained(directory).eval()
    model = lora.apply(models.from_pretrained(directory), lora.LoRAConfig(4, 8.0, ["c_attn", "c_fc"], lora_dropout=0.1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)  # adapters that change the output
    dataset = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), CharTokenizer(CHARS))
    x, y = dataset.batch([0, 1, 2], 64)
    with torch.no_grad():
        base_lp = dpo.sequence_logprobs(base, x, y)
        model.train()  # dropout on: the reference still runs in eval mode
        ref_lp = dpo.DPOLoss(None, 0.1).reference_logprobs(model, x, y)
        assert model.training and torch.equal(ref_lp, base_lp)
        model.eval()
        assert not torch.allclose(dpo.sequence_logprobs(model, x, y), base_lp, atol=1e-3)  # adapters back on
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with lora.disable_adapter(base):
            pass


# ----------------------------------------------------------------------------- training through train.py


def dpo_flags(tmp_path, init, out, **kw):
    return {"init_from": str(init), "dpo": str(tmp_path / "pairs.jsonl"), "out_dir": str(tmp_path / out),
            "max_iters": 4, "batch_size": 2, "block_size": 32, "eval_interval": 2, "eval_iters": 1, "log_interval": 1,
            "learning_rate": 1e-3, "warmup_iters": 0, "sample_tokens": 0, "device": "cpu", "dtype": "float32", **kw}


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_dpo_trains_through_train_py_and_resumes(tmp_path, lora_rank, capsys):
    init, _ = model_dir(tmp_path, "init")
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    result = train.run(**dpo_flags(tmp_path, init, "straight", lora_rank=lora_rank, lr_decay_iters=4))
    # the evaluations' language-model loss and the steps' DPO loss go by different names
    out = capsys.readouterr().out
    assert "step 2: train lm loss" in out and ", val lm loss" in out and "iter 2/4 | dpo loss" in out
    evaluations = [r for r in read_log(tmp_path / "straight") if "val_loss" in r]
    assert evaluations and all("train_lm_loss" in r and "train_loss" not in r for r in evaluations)
    logged = [r for r in read_log(tmp_path / "straight") if "reward_margin" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # first step: policy = reference
    assert logged[-1]["reward_margin"] > 0 and result["reward_accuracy"] == logged[-1]["reward_accuracy"]
    # stopped at step 2, then resumed: the same steps (the reference stays the starting model)
    train.run(**dpo_flags(tmp_path, init, "resumed", lora_rank=lora_rank, max_iters=2, lr_decay_iters=4))
    train.run(**dpo_flags(tmp_path, init, "resumed", lora_rank=lora_rank, lr_decay_iters=4), resume=True)
    resumed = [r for r in read_log(tmp_path / "resumed") if "reward_margin" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, logged):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=1e-6)


def test_dpo_replay_adds_the_weighted_language_model_loss_of_the_replay_windows(tmp_path):
    """ReplayLoss = DPO loss + weight * the cross-entropy of the replay windows, the latter recomputed
    by transformers' GPT-2 on the same windows (drawn again with the same generator seed); through
    train.py the replay is logged, and --dpo_replay without --dpo is one error line."""
    init, hf = model_dir(tmp_path, "init")
    (tmp_path / "judge.txt").write_text("rate sort cab:abc\nScore: 5\nrate sort ba:b\nScore: 2\n" * 20)
    tok = CharTokenizer(CHARS)
    replay = data.prepare(tmp_path / "judge.txt", tok, tmp_path / "data")
    model = models.from_pretrained(init).eval()
    pairs = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tok)
    objective = dpo.DPOLoss(copy.deepcopy(model).requires_grad_(False), 0.1)
    loss, metrics = dpo.ReplayLoss(objective, replay, 0.5, 3, 16, torch.Generator().manual_seed(7))(
        model, pairs.batch([0, 1, 2], 32))
    x, y = replay.get_batch("train", 3, 16, torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(x).logits.double().flatten(0, 1), y.flatten())
    assert metrics["dpo_loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert metrics["replay_loss"].item() == pytest.approx(expected.item(), abs=1e-4)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * expected.item(), abs=1e-4)
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    train.run(**dpo_flags(tmp_path, init, "replayed", dpo_replay=str(tmp_path / "judge.txt"), dpo_replay_weight=0.5,
                          data_dir=str(tmp_path / "data")))
    logged = [r for r in read_log(tmp_path / "replayed") if "replay_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(r["train_loss"] == pytest.approx(r["dpo_loss"] + 0.5 * r["replay_loss"], rel=1e-5) for r in logged)
    with pytest.raises(runtime.UserError, match="--dpo_replay adds a replay loss to DPO"):
        train.run(init_from=str(init), dpo_replay=str(tmp_path / "judge.txt"), out_dir=str(tmp_path / "x"),
                  max_iters=1, device="cpu")


def test_bad_preference_inputs_end_in_one_error_line(tmp_path):
    init, _ = model_dir(tmp_path, "init")
    cases = {"missing.jsonl": None, "bad.jsonl": '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n',
             "empty_response.jsonl": '{"prompt": "a", "chosen": "", "rejected": "c"}\n',
             "fields.jsonl": '{"prompt": "a", "chosen": "b"}\n'}
    messages = {"missing.jsonl": "not found", "bad.jsonl": "bad.jsonl:2: not JSON",
                "empty_response.jsonl": "chosen response is empty", "fields.jsonl": "three strings"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(runtime.UserError, match=messages[name]):
            train.run(**{**dpo_flags(tmp_path, init, "x"), "dpo": str(tmp_path / name)})
    write_jsonl(tmp_path / "prompts.jsonl", [{"stop": "\n"}])  # a header, no prompts
    with pytest.raises(runtime.UserError, match="no prompts"):
        train.run(**dpo_flags(tmp_path, init, "x", dpo="", self_reward=1, prompts=str(tmp_path / "prompts.jsonl")))
    with pytest.raises(runtime.UserError, match="--init_from"):
        train.run(**dpo_flags(tmp_path, init, "x", init_from="scratch"))
    r = subprocess.run([sys.executable, "train.py", "--init_from", str(init), "--dpo", str(tmp_path / "bad.jsonl"),
                        "--block_size", "32", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.jsonl'}:2: not JSON "
                                                                   "(Expecting property name enclosed in double quotes)"]
    help_text = train.build_parser(train.TRAIN_FLAGS).format_help()
    for flag in ("--dpo ", "--dpo_beta", "--self_reward", "--prompts", "--sr_candidates", "--sr_pairs"):
        assert flag in help_text


# ----------------------------------------------------------------------------- self-rewarding


def test_scores_parse_and_malformed_judgements_are_counted():
    assert self_reward.parse_score("Score: 4") == 4.0
    assert self_reward.parse_score("The response is fine.\nScore:3.5 because") == 3.5
    assert self_reward.parse_score("Score: 2 ... Score: 5") == 2.0  # the first
    for bad in ("", "score: 4", "Score: 7", "Score: x", "Points: 4"):
        assert self_reward.parse_score(bad) is None
    assert self_reward.mean_score(["Score: 4", "garbage", "Score: 1"]) == 2.5
    assert self_reward.mean_score(["garbage", "Score: 9"]) is None
    items = [{"prompt": "p", "candidates": ["a", "b"], "judgements": [["Score: 4", "oops"], ["Score: 9", "Score: 1"]],
              "scores": [4.0, 1.0]}]
    record = self_reward.summarize(items, [{}], 0)
    assert record["judgements"] == 4 and record["malformed_judgements"] == 2 and record["mean_score"] == 2.5


def test_pairs_take_the_highest_and_lowest_and_drop_ties():
    best = self_reward.best_and_worst
    assert best(["a", "b", "c", "d"], [1.0, 4.0, 4.0, 2.0]) == (1, 0)
    assert best(["a", "b", "c"], [3.0, 3.0, 3.0]) is None  # a tie
    assert best(["a", "b", "c"], [None, 2.0, None]) is None  # one scored candidate
    assert best(["a", "a", "b"], [5.0, 1.0, None]) is None  # the same text
    items = [{"prompt": "p1", "candidates": ["x", "y"], "scores": [2.0, 5.0]},
             {"prompt": "p2", "candidates": ["x", "y"], "scores": [3.0, 3.0]}]
    pairs, dropped = self_reward.make_pairs(items, "judge", "\n", seed=0)
    assert pairs == [{"prompt": "p1", "chosen": "y\n", "rejected": "x\n"}] and dropped == 1
    items[0]["true"], items[1]["true"] = [3, 2], [5, 5]  # the checker says the judge's pair is the wrong way round
    assert self_reward.pair_precision(items, pairs, "\n") == (0.0, 0.0)
    assert self_reward.pair_precision(items, [{"prompt": "p2", "chosen": "y\n", "rejected": "x\n"}] + pairs, "\n") == (0, 0.5)
    # the judge's pairwise accuracy: agreements over pairs whose true scores differ (judge ties: 1/2)
    assert self_reward.pairwise_accuracy([3.0, 1.0, 1.0, None], [5, 2, 4, 0]) == (2.5, 3)
    assert self_reward.sort_rubric("dca", "acd") == 5 and self_reward.sort_rubric("dca", "adc") == 4
    assert self_reward.sort_rubric("dca", "ac") == 3 and self_reward.sort_rubric("dca", "") == 0


def test_self_reward_iteration_end_to_end_writes_M2_with_its_pairs(tmp_path):
    # M1: a tiny model taught the two formats (answers and judgements) in a few steps
    lines = []
    for i, s in enumerate(["cab", "bca", "dab", "cda", "bad", "dcb", "acd", "dbc"] * 6):
        lines.append(f"sort {s}:{''.join(sorted(s))}")
        response = [s, "".join(sorted(s)), s[:2], s + s[0]][i % 4]  # judge examples of several scores
        lines.append(f"rate sort {s}:{response}\nScore: {self_reward.sort_rubric(s, response)}")
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    train.run(model="gpt", data=str(tmp_path / "corpus.txt"), data_dir=str(tmp_path / "d"), out_dir=str(tmp_path / "M1"),
              n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=16, max_iters=100, learning_rate=1e-2,
              warmup_iters=5, eval_interval=100, eval_iters=1, log_interval=100, sample_tokens=0, device="cpu")
    header = {"judge_template": "rate {prompt}{response}\n", "stop": "\n", "judge_stop": "\n", "checker": "sort"}
    prompts = [{"prompt": f"sort {s}:", "answer": "".join(sorted(s))} for s in ["cba", "dca", "bdc", "adb", "cbd", "dba"]]
    write_jsonl(tmp_path / "prompts.jsonl", [header] + prompts)
    argv = ["--init_from", str(tmp_path / "M1"), "--self_reward", "1", "--prompts", str(tmp_path / "prompts.jsonl"),
            "--out_dir", str(tmp_path / "sr"), "--max_iters", "2", "--batch_size", "2", "--block_size", "32",
            "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "1", "--sr_max_new_tokens", "6", "--sr_judge_tokens", "10",
            "--sr_temperature", "1.0", "--device", "cpu"]
    assert train.main(argv) == 0
    m2 = tmp_path / "sr" / "M2"
    record = json.loads((m2 / "iteration.json").read_text())
    pairs = [json.loads(line) for line in (m2 / "pairs.jsonl").read_text().splitlines()]
    items = [json.loads(line) for line in (m2 / "judgements.jsonl").read_text().splitlines()]
    assert len(items) == 6 and all(len(i["candidates"]) == 4 and all(len(j) == 3 for j in i["judgements"]) for i in items)
    assert record["pairs"] == len(pairs) >= 1 and record["pairs"] + record["ties_dropped"] == 6
    assert record["judgements"] == 72 and record["malformed_judgements"] < 72
    for pair in pairs:  # every pair: the judge's best over its worst, both with the stop appended
        item = next(i for i in items if i["prompt"] == pair["prompt"])
        scored = [s for s in item["scores"] if s is not None]
        best, worst = max(scored), min(scored)
        assert worst < best
        assert (pair["chosen"][:-1], best) in zip(item["candidates"], item["scores"]) and pair["chosen"][-1] == "\n"
        assert (pair["rejected"][:-1], worst) in zip(item["candidates"], item["scores"])
    assert all(i["true"] == [self_reward.sort_rubric(i["prompt"][5:-1], c) for c in i["candidates"]] for i in items)
    m1, new = models.from_pretrained(tmp_path / "M1"), models.from_pretrained(m2)
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), new.parameters()))  # M2 was trained
    assert [r["step"] for r in read_log(m2) if "reward_margin" in r] == [1, 2]
    log = [json.loads(line) for line in (tmp_path / "sr" / "self_reward.jsonl").read_text().splitlines()]
    assert log == [record] and {"judge_pairwise_accuracy", "reward_gap", "exact_match"} <= set(record)
    before = (m2 / "model.safetensors").stat().st_mtime_ns
    assert train.main(argv) == 0  # run again: the finished iteration is kept
    assert (m2 / "model.safetensors").stat().st_mtime_ns == before
    pairs_text = (m2 / "pairs.jsonl").read_text()
    steps = argv.index("--max_iters") + 1
    assert train.main(argv[:steps] + ["3"] + argv[steps + 1:]) == 0  # more steps: its DPO run resumes, same pairs
    assert [r["step"] for r in read_log(m2) if "reward_margin" in r] == [1, 2, 3]
    assert (m2 / "pairs.jsonl").read_text() == pairs_text


def test_attention_json_is_honoured_by_sample_and_init_from_and_an_explicit_choice_is_said(tmp_path):
    """A model trained with Performer or a window keeps that choice beside its weights (attention.json):
    flags left at their defaults take it, an explicit other choice wins with a note, softmax runs write none."""
    defaults = {name: default for name, default, _ in runtime.ATTENTION_FLAGS}
    runtime.save_attention(tmp_path, {**defaults, "attn": "performer", "performer_features": 64})
    notes = []
    assert runtime.trained_attention(defaults, tmp_path, notes.append) == {**defaults, "attn": "performer",
                                                                           "performer_features": 64}
    assert notes == []
    chosen = runtime.trained_attention({**defaults, "attn": "sdpa"}, tmp_path, notes.append)
    assert chosen["attn"] == "sdpa" and chosen["performer_features"] == 64 and "trained with attn performer" in notes[0]
    runtime.save_attention(tmp_path, {**defaults, "attn_window": 16})
    assert runtime.trained_attention(defaults, tmp_path)["attn_window"] == 16
    runtime.save_attention(tmp_path, defaults)  # softmax: the stale file goes
    assert not (tmp_path / runtime.ATTENTION_FILE).exists() and runtime.trained_attention(defaults, tmp_path) == defaults


def test_dpo_with_lora_under_fsdp_equals_one_process(tmp_path):
    init, _ = model_dir(tmp_path, "init")
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    flags = {k: v for k, v in dpo_flags(tmp_path, init, "fsdp", max_iters=2, lora_rank=2).items() if k != "batch_size"}
    args = [f"--{k}={v}" for k, v in flags.items()]
    r = torchrun(*args, "--batch_size=2", "--fsdp")
    assert r.returncode == 0, r.stderr[-2000:]
    train.run(**{**flags, "out_dir": str(tmp_path / "single"), "batch_size": 4})
    for a, b in zip(read_log(tmp_path / "fsdp"), read_log(tmp_path / "single"), strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "reward_margin", "logp_chosen", "logp_rejected"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-5, key


# ----------------------------------------------------------------------------- agreement with TRL
# TRL (1.16) is not a test dependency (it pulls in datasets, pyarrow and pandas): its definitions are
# written out below in float64, on the tokenizers library's encoding and transformers' forward.

def trl_tokenize_row(ref, eos, prompt, response):
    """trl/trainer/dpo_trainer.py, DPOTrainer.tokenize_row for a decoder-only model: prompt and
    response tokenized separately without special tokens, the EOS id appended to the response."""
    return ref.encode(prompt, add_special_tokens=False).ids, ref.encode(response, add_special_tokens=False).ids + [eos]


def trl_logp(hf, prompt_ids, response_ids, max_length=None, truncation_mode="keep_start"):
    """trl/trainer/dpo_trainer.py, DPOTrainer.concatenated_forward: input prompt + response (cut to
    max_length from the start or the end), labels the response's ids, the prompt's masked; the
    log-probabilities of the labels summed, here in float64. Returns (logp, input ids, labels)."""
    ids = prompt_ids + response_ids
    mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    if max_length is not None:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        ids, mask = ids[cut], mask[cut]
    logp = torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    labels = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    return sum(logp[i, t] for i, t in enumerate(labels) if t != -1), ids, labels


def trl_sigmoid_loss(pw, pl, rw, rl, beta):
    """trl/trainer/dpo_trainer.py, DPOTrainer.dpo_loss, loss_type="sigmoid" (the paper's eq. 7)."""
    return -torch.nn.functional.logsigmoid(beta * ((pw - rw) - (pl - rl)))


BPE_PAIRS = [{"prompt": "a", "chosen": " cat", "rejected": " dog"},
             {"prompt": "First Citi", "chosen": "zen: hear me", "rejected": "zen, die"},
             {"prompt": "You're all resol", "chosen": "ved rather", "rejected": "ved to famish"}]


def test_dpo_scores_separately_tokenized_response_and_eos_as_trl(tmp_path, gpt2_like):
    """Prompt and response tokenized separately and concatenated, EOS appended to the response and
    scored, the prompt masked: our batch rows are TRL's input ids and labels, and the loss and
    log-probs equal TRL's sigmoid loss in float64 (a BPE whose merges would cross the boundary)."""
    from tests.helpers import hf_gpt2
    from omnitron import tokenization
    ref = gpt2_like[1]
    folder = tmp_path / "policy"
    hf_policy, hf_ref = hf_gpt2(vocab=ref.get_vocab_size(), seed=0), hf_gpt2(vocab=ref.get_vocab_size(), seed=1)
    hf_policy.save_pretrained(folder)
    hf_ref.save_pretrained(tmp_path / "reference")
    ref.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok, eos = tokenization.hf_tokenizer(folder), ref.token_to_id("<|endoftext|>")
    assert tok.eos_token == eos
    merged = ref.encode("First Citizen: hear me").ids
    assert merged[:len(ref.encode("First Citi").ids)] != ref.encode("First Citi").ids  # a merge across the boundary
    dataset = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", BPE_PAIRS), tok)
    x, y = dataset.batch([0, 1, 2], block_size=64)
    beta, want, logps = 0.1, [], []
    with torch.no_grad():
        for row, p in enumerate(BPE_PAIRS):
            sides = []
            for which, offset in (("chosen", 0), ("rejected", 3)):
                pr, rs = trl_tokenize_row(ref, eos, p["prompt"], p[which])
                lp, ids, labels = trl_logp(hf_policy, pr, rs)
                n = len(ids) - 1
                assert x[row + offset, :n].tolist() == ids[:-1] and y[row + offset, :n].tolist() == labels
                assert (y[row + offset, n:] == -1).all()
                sides += [lp, trl_logp(hf_ref, pr, rs)[0]]
            logps.append(sides[0])
            want.append(trl_sigmoid_loss(sides[0], sides[2], sides[1], sides[3], beta))
    ours = models.from_pretrained(folder).eval()
    loss, metrics = dpo.DPOLoss(dpo.load_reference(tmp_path / "reference", "cpu"), beta)(ours, (x, y))
    assert loss.item() == pytest.approx(torch.stack(want).mean().item(), abs=1e-5)
    assert metrics["logp_chosen"].item() == pytest.approx(torch.stack(logps).mean().item(), abs=1e-4)


def test_dpo_turns_dropout_off_in_the_policy(tmp_path):
    """With policy = reference the loss is exactly log 2 although the policy is in train mode with
    dropout 0.1 on its residual branches and LoRA's adapters (TRL's disable_dropout=True), for a
    frozen reference copy and for the LoRA reference (adapters off)."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=len(CHARS), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "m")
    model = models.from_pretrained(tmp_path / "m")
    assert model.config.dropout == 0.1
    batch = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), CharTokenizer(CHARS)).batch([0, 1, 2], 64)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    loss, _ = dpo.DPOLoss(reference, 0.1)(model.train(), batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    adapted = lora.apply(models.from_pretrained(tmp_path / "m"), lora.LoRAConfig(4, 8.0, ["c_attn", "c_fc"],
                                                                                 lora_dropout=0.3)).train()
    loss, _ = dpo.DPOLoss(None, 0.1)(adapted, batch)  # B = 0: the adapted model is its base
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_truncation_of_pairs_longer_than_the_block(tmp_path):
    """drop_prompt_start (default): the prompt loses its start, the response and EOS stay whole, a
    response longer than the block is refused in one error naming the pair; keep_start: the row is
    the first block_size + 1 tokens, as TRL's truncation_mode="keep_start"."""
    tok = CharTokenizer(CHARS)
    tok.eos_token = CHARS.index("S")  # a character vocabulary with an end-of-sequence token
    pairs = [{"prompt": "abcdefghijklmnop:", "chosen": "rst uv", "rejected": "xyz"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    block = 12
    x, y = dpo.PairDataset(path, tok).batch([0], block)
    prompt, chosen = tok.encode(pairs[0]["prompt"]), tok.encode("rst uv") + [tok.eos_token]
    kept = (prompt + chosen)[-(block + 1):]
    assert x[0].tolist() == kept[:-1] and y[0].tolist() == [-1] * (block - len(chosen)) + chosen
    start = dpo.PairDataset(path, tok, truncation="keep_start")
    x, y = start.batch([0], 20)
    ids = (prompt + chosen)[:21]
    labels = [t if i >= len(prompt) else -1 for i, t in enumerate(ids)][1:]
    assert x[0].tolist() == ids[:-1] and y[0].tolist() == labels and labels[-1] != tok.eos_token
    with pytest.raises(runtime.UserError, match="pair 1.*does not fit block_size 5"):
        dpo.PairDataset(path, tok).check_block_size(5)
    with pytest.raises(runtime.UserError, match="pair 1.*no response token"):
        start.check_block_size(12)
    with pytest.raises(runtime.UserError, match="--dpo_truncation"):
        dpo.PairDataset(path, tok, truncation="keep_end")
