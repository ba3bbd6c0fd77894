"""experiments/positions: losses by position, buckets, and the run end to end at a tiny budget."""
import copy
import json
import math

import numpy as np
import pytest
import torch

import bench
from experiments.positions import run as positions_experiment
from tests.helpers import pos_tokens, tiny_gpt

# ----------------------------------------------------------------------------- bench.py positions


def test_position_losses_equal_prefix_forwards_in_float64():
    """positions_experiment.position_losses (one forward per batch of windows) against -log softmax computed in float64
    from a separate forward of each prefix x[:, :t+1]; bucket_means against plain means, None past a
    learned table."""
    model = tiny_gpt(pos="rope")
    x, y = pos_tokens(5, 12, seed=2), pos_tokens(5, 12, seed=3)
    got = positions_experiment.position_losses(model, x, y, batch_size=2)  # 3 batches, the last of 1
    model = copy.deepcopy(model).double()
    want = torch.zeros(12, dtype=torch.float64)
    with torch.no_grad():
        for t in range(12):
            logp = torch.log_softmax(model(x[:, :t + 1])[0][:, -1].double(), -1)
            want[t] = -logp.gather(1, y[:, t:t + 1]).mean()
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert positions_experiment.bucket_means(got, [0, 4, 8, 12]) == pytest.approx([want[0:4].mean().item(), want[4:8].mean().item(), want[8:].mean().item()])
    assert positions_experiment.bucket_means(got[:8], [0, 4, 8, 12])[2] is None


def test_val_windows_and_unigram_entropy(tmp_path):
    from omnitron import data
    (tmp_path / "c.txt").write_text("abcab" * 400)
    ds = data.prepare(str(tmp_path / "c.txt"), "char", str(tmp_path / "d"), quiet=True)
    x, y = positions_experiment.val_windows(ds, 30, 4)
    val = np.asarray(ds.tokens("val"))
    assert x.shape == (4, 30) and torch.equal(x[:, 1:], y[:, :-1])
    assert x[0].tolist() == val[:30].tolist() and y[-1].tolist() == val[-30:].tolist()
    with pytest.raises(bench.UserError, match="fewer than"):
        positions_experiment.val_windows(ds, len(val), 1)
    counts = np.bincount(np.asarray(ds.tokens("train")))
    p = counts[counts > 0] / counts.sum()
    assert positions_experiment.unigram_entropy(ds) == pytest.approx(-(p * np.log(p)).sum()) and 1.0 < positions_experiment.unigram_entropy(ds) < math.log(3) + 1e-9


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
