"""experiments/switch: tokens to reach a loss, the summary, the README's table against results.json, and the
run end to end at a tiny budget (cached by settings)."""
import json
from pathlib import Path

import pytest

import bench
from experiments.switch import run as switch_experiment

HERE = Path(__file__).resolve().parent


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 4.0), (100, 3.0), (200, 2.0), (300, 1.5)]
    assert switch_experiment.tokens_to_reach(curve, 2.5) == 150 and switch_experiment.tokens_to_reach(curve, 1.5) == 300
    assert switch_experiment.tokens_to_reach(curve, 1.0) is None


def test_summary_ratios_and_ordering_by_hand():
    """Two dense seeds ending at 2.0 and 2.2 (target: their mean 2.1); the Switch seed passes 2.1 half-way
    between its evaluations at 100 and 200 tokens (150: 0.75 of the dense run's 200 tokens), and half-way
    between 10 s and 20 s (15 s: 0.75 of dense's mean 20 s); dense_wide ends lowest."""
    row = dict(params=10, active_params=10, dropless_minus_capacity=0.0, dropped_last=None, dropped_mean=None,
               max_expert_load=None, tokens=200, elapsed_s=20.0)
    rows = [dict(row, arm="dense", seed=0, final_val_loss=2.0), dict(row, arm="dense", seed=1, final_val_loss=2.2),
            dict(row, arm="switch", seed=0, final_val_loss=1.9), dict(row, arm="dense_wide", seed=0, final_val_loss=1.8)]
    curves = {("switch", 0): [(0, 3.0), (100, 2.2), (200, 2.0)]}
    clocks = {("switch", 0): [(0.0, 3.0), (10.0, 2.2), (20.0, 2.0)]}
    s = switch_experiment.summarise(rows, curves, clocks)
    c = s["comparison"]
    assert c["dense_final"] == pytest.approx(2.1) and c["tokens_to_dense_final"] == [pytest.approx(150)]
    assert c["tokens_ratio"] == [pytest.approx(0.75)] and c["seconds_ratio"] == [pytest.approx(0.75)]
    assert c["switch_below_dense"] and c["bands_separate"] and c["ordering_dense_switch_wide"]
    assert s["arms"]["dense"]["final_val_loss"] == {"mean": pytest.approx(2.1), "min": 2.0, "max": 2.2, "n": 2}


def test_readme_table_is_the_one_results_json_gives():
    """README.md shows the table that results_table makes from results.json (the run's numbers), line for line."""
    results = HERE / "results.json"
    if not results.is_file():
        pytest.skip("no results.json yet: the default run has not been recorded")
    table = switch_experiment.results_table(json.loads(results.read_text()))
    readme = (HERE / "README.md").read_text()
    assert "\n".join(table) in readme


def test_bench_switch_trains_its_arms_and_reuses_finished_runs(corpus, tmp_path, capsys):
    argv = ["switch", "--arms", "dense,switch,dense_wide", "--seeds", "1", "--max_iters", "2", "--eval_interval", "1",
            "--eval_iters", "1", "--batch_size", "2", "--block_size", "16", "--n_layer", "1", "--n_embd", "16",
            "--width", "8", "--n_experts", "2", "--warmup_iters", "1", "--data", str(corpus),
            "--data_dir", str(tmp_path / "d"), "--out", str(tmp_path / "sw"), "--results", str(tmp_path / "r.json"),
            "--plot", ""]
    bench.main(argv)
    first = capsys.readouterr().out
    assert first.count(": training 2 steps into") == 3 and "tokens_ratio" in first
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text()) == summary
    assert [r["arm"] for r in summary["rows"]] == ["dense", "switch", "dense_wide"]
    dense, switch, wide = summary["rows"]
    assert dense["tokens"] == 2 * 2 * 16 and switch["active_params"] == dense["params"] + 2 * 16  # + the router
    assert wide["params"] == switch["params"] - 2 * 16 and switch["dropped_mean"] is not None
    assert len(summary["curves"]["switch-s0"]) == 3 and summary["setup"]["n_experts"] == 2
    assert len(switch_experiment.results_table(summary)) == 7
    bench.main(argv)  # cached: nothing trains again
    assert capsys.readouterr().out.count(": training 2 steps into") == 0
    with pytest.raises(bench.UserError, match="^unknown arm"):
        bench.main(argv + ["--arms", "moe"])
