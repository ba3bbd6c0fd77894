"""experiments/time_to_quality: each arm's steps sized to the budget from its probe, the table and results
file, and nothing trained again from the cache."""
import json

import bench


def test_arms_are_sized_to_the_budget_and_reused(tmp_path, corpus, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(f'model = "llama"\ndata = "{corpus}"\nn_layer = 1\nn_head = 2\nn_kv_head = 2\nn_embd = 16\n'
                      'block_size = 16\nbatch_size = 4\nwarmup_iters = 2\n')
    argv = ["time_to_quality", "--arms", "config,muon", "--config", str(config), "--seeds", "1", "--budget_s", "1",
            "--probe_steps", "4", "--eval_interval", "5", "--eval_iters", "1", "--data_dir", str(tmp_path / "d"),
            "--out", str(tmp_path / "t"), "--results", "", "--plot", "", "--device", "cpu"]
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": training") == 4  # a probe and a run per arm
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    rows = {r["arm"]: r for r in results["rows"]}
    assert set(rows) == {"config", "muon"} and all(r["steps"] >= 10 for r in rows.values())
    summary = {s["arm"]: s for s in results["summary"]}
    assert summary["config"]["change"] == 0
    assert summary["muon"]["change"] == summary["muon"]["mean"] - summary["config"]["mean"]
    for r in rows.values():  # the last evaluation inside the budget (else the first)
        inside = [v for t, v in r["curve"] if t <= 1] or [r["curve"][0][1]]
        assert r["val_at_budget"] == inside[-1] and r["val_loss"] == r["curve"][-1][1]
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": training") == 0
