"""experiments/switch: tokens to reach a loss, and the run end to end at a tiny budget (cached by settings)."""
import json

import bench
from experiments.switch import run as switch_experiment


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 4.0), (100, 3.0), (200, 2.0), (300, 1.5)]
    assert switch_experiment.tokens_to_reach(curve, 2.5) == 150 and switch_experiment.tokens_to_reach(curve, 1.5) == 300
    assert switch_experiment.tokens_to_reach(curve, 1.0) is None


def test_bench_switch_trains_its_arms_and_reuses_finished_runs(corpus, tmp_path, capsys):
    argv = ["switch", "--arms", "dense,switch", "--seeds", "1", "--max_iters", "2", "--eval_interval", "1",
            "--eval_iters", "1", "--batch_size", "2", "--block_size", "16", "--data", str(corpus),
            "--data_dir", str(tmp_path / "d"), "--out", str(tmp_path / "sw"), "--plot", ""]
    bench.main(argv)
    first = capsys.readouterr().out
    assert first.count(": training 2 steps into") == 2 and "bands_overlap" in first
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert [r["arm"] for r in summary["rows"]] == ["dense", "switch"] and summary["rows"][0]["tokens"] == 2 * 2 * 16
    bench.main(argv)  # cached: nothing trains again
    assert capsys.readouterr().out.count(": training 2 steps into") == 0
