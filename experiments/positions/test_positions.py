"""experiments/positions: pass keys placed and scored (against greedy decoding), the usable distance, the
README's table against results.json, and the run end to end at a tiny budget."""
import json
import random
from pathlib import Path

import pytest
import torch

import bench
from experiments.positions import run as positions_experiment
from omnitron import data
from omnitron.generation import generate
from tests.helpers import tiny_gpt

HERE = Path(__file__).resolve().parent


def passkey_corpus(path, n=20000):
    """A corpus with every character the pass-key sentences use: random words of letters, digits, '?', '.'."""
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzTW0123456789?."
    path.write_text(" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(n // 5)))
    return path


def test_place_passkey_writes_both_sentences_at_their_positions():
    ids = {c: ord(c) for c in set(positions_experiment.STATEMENT + positions_experiment.QUESTION + ". 0123456789")}
    seq = torch.zeros(120, dtype=torch.int64)
    positions_experiment.place_passkey(seq, 20, 90, "07319", ids)
    text = "".join(chr(c) if c else "_" for c in seq.tolist())
    assert text[20:25] == "07319" and text[90:95] == "07319"
    assert text[3:20] == " The pass key is " and text[25:27] == ". " and text[67:90] == " What is the pass key? "
    assert set(text[:3] + text[27:67] + text[95:]) == {"_"}  # nothing else written


class Recorder(torch.nn.Module):
    """A model that records the batch it is given: logits a fixed function of the input ids, the loss
    their mean cross-entropy (as models/gpt.py)."""

    def __init__(self, vocab):
        super().__init__()
        self.table, self.seen = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)), []

    def forward(self, x, y):
        self.seen.append((x, y))
        logits = self.table[x]
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_passkey_loss_places_one_key_per_row_and_weights_its_digits(tmp_path):
    """One key per row within the distances; seeded by (seed, step); the loss is the language-model loss plus
    key_weight times the digits' mean cross-entropy, each computed here from the text itself."""
    ds = data.prepare(str(passkey_corpus(tmp_path / "c.txt")), "char", str(tmp_path / "d"), quiet=True)
    loss_fn = positions_experiment.PasskeyLoss(ds.tokenizer, seed=3, min_distance=30, max_distance=50, key_weight=2.5)
    model = Recorder(ds.tokenizer.vocab_size)
    x, y = ds.get_batch("train", 4, 80, torch.Generator().manual_seed(0))
    loss, metrics = loss_fn(model, (x, y))
    bx, by = model.seen[0]
    assert torch.equal(bx[:, 1:], by[:, :-1])
    digit_losses = []
    for row in torch.cat([bx[:, :1], by], 1):
        text = ds.tokenizer.decode(row.tolist())
        key = text.index(" The pass key is ") + len(" The pass key is ")
        answer = text.index(" What is the pass key? ") + len(" What is the pass key? ")
        assert 30 <= answer - key <= 50 and text[key:key + 5] == text[answer:answer + 5] and text[key:key + 5].isdigit()
        logp = torch.log_softmax(model.table[row[answer - 1:answer + 4]].double(), -1)
        digit_losses += [-logp[i, row[answer + i]] for i in range(5)]
    lm = torch.nn.functional.cross_entropy(model.table[bx].flatten(0, 1).double(), by.flatten().long())
    key_loss = torch.stack(digit_losses).mean()
    assert metrics["passkey_loss"].item() == pytest.approx(key_loss.item(), rel=1e-5)
    assert metrics["lm_loss"].item() == pytest.approx(lm.item(), rel=1e-5)
    assert loss.item() == pytest.approx((lm + 2.5 * key_loss).item(), rel=1e-5)
    again = positions_experiment.PasskeyLoss(ds.tokenizer, seed=3, min_distance=30, max_distance=50)
    again(model, (x, y))
    assert torch.equal(model.seen[1][0], bx)  # seeded by (seed, step): the same draws again


def test_passkey_correct_is_greedy_decodings_exact_match(tmp_path):
    """passkey_correct (one forward, argmax under the true digits) against greedy decoding with
    generation.generate from the prompt up to the question: the same verdict for every prompt."""
    ds = data.prepare(str(passkey_corpus(tmp_path / "c.txt")), "char", str(tmp_path / "d"), quiet=True)
    torch.manual_seed(0)
    model = tiny_gpt(pos="rope", vocab_size=ds.tokenizer.vocab_size, block_size=128)  # no cache refill
    ids = positions_experiment.char_ids(ds.tokenizer)
    (x, answers, distances), = positions_experiment.passkey_prompts(ds, ids, [(30, 60)], 6, 100)
    assert ((distances > 30) & (distances <= 60)).all() and x.shape == (6, 100)
    got = positions_experiment.passkey_correct(model, x, answers)
    for row, a, ok in zip(x, answers.tolist(), got.tolist()):
        out = torch.stack(list(generate(model, row[None, :a], 5, temperature=0.0)), 1)[0]
        assert (out.tolist() == row[a:a + 5].tolist()) == ok
    # and a case where it is right: the digits the model itself prefers become the key
    row, a = x[0].clone(), int(answers[0])
    greedy = torch.stack(list(generate(model, row[None, :a], 5, temperature=0.0)), 1)[0]
    row[a:a + 5] = greedy
    assert positions_experiment.passkey_correct(model, row[None], torch.tensor([a])).tolist() == [True]


def test_usable_distance_is_the_unbroken_run_from_the_first_bin():
    bins = [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert positions_experiment.usable_distance([0.9, 0.6, 0.4, 0.9], bins, 0.5) == 256
    assert positions_experiment.usable_distance([0.4, 0.9, 0.9, 0.9], bins, 0.5) == 0
    assert positions_experiment.usable_distance([1, 1, 1, 0.5], bins, 0.5) == 512


def test_readme_table_is_the_one_results_json_gives():
    results = HERE / "results.json"
    if not results.is_file():
        pytest.skip("no results.json yet: the default run has not been recorded")
    table = positions_experiment.results_table(json.loads(results.read_text()))
    assert "\n".join(table) in (HERE / "README.md").read_text()


def test_bench_positions_end_to_end(tmp_path, capsys):
    """A miniature bench.py positions: pretrains, fine-tunes each method checkpoint by checkpoint, evaluates;
    a second call reuses every run and evaluation (cached by settings) and gives the same summary."""
    corpus = passkey_corpus(tmp_path / "c.txt")
    argv = ["positions", "--seeds", "1", "--n_layer", "1", "--n_embd", "16", "--block_size", "64", "--max_iters", "2",
            "--batch_size", "4", "--max_distance", "40", "--finetune_max_distance", "40", "--checkpoints", "1,2",
            "--bin", "32", "--per_bin", "2", "--val_windows", "2", "--eval_iters", "1", "--data", str(corpus),
            "--data_dir", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--results", str(tmp_path / "r.json"),
            "--plot", "", "--device", "cpu"]
    assert bench.main(argv) == 0
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["buckets"] == [[0, 64], [64, 128], [128, 256]] and len(summary["bins"]) == 8
    assert [(r["method"], r["step"]) for r in summary["rows"]] == [(m, k) for m in ("plain", "pi", "yarn") for k in (0, 1, 2)]
    assert all(len(r["accuracy"][0]) == 8 and len(r["buckets"]) == 3 for r in summary["rows"])
    pi = json.loads((tmp_path / "out" / "pi-s0" / "step-2" / "config.json").read_text())
    assert pi["rope_parameters"]["rope_type"] == "linear" and pi["rope_parameters"]["factor"] == 4
    assert len(positions_experiment.results_table(summary)) == 2 + 9
    capsys.readouterr()
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "training" not in out and "fine-tuning to" not in out
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == summary["rows"]
    with pytest.raises(bench.UserError, match="^unknown method[(]s[)] alibi; methods: plain, pi, yarn$"):
        bench.main(argv + ["--methods", "alibi"])
    with pytest.raises(bench.UserError, match="^--max_distance must be between"):
        bench.main(argv + ["--max_distance", "60"])
