"""experiments/time_to_quality: each arm trains for the budget (train.py --max_time) and is evaluated on the
whole val split, the table and results file, and nothing trained again from the cache."""
import json

import bench


def test_arms_train_for_the_budget_and_are_reused(tmp_path, corpus, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(f'model = "llama"\ndata = "{corpus}"\nn_layer = 1\nn_head = 2\nn_kv_head = 2\nn_embd = 16\n'
                      'block_size = 16\nbatch_size = 4\nwarmup_iters = 2\neval_iters = 1\n')
    argv = ["time_to_quality", "--arms", "baseline,muon", "--config", str(config), "--baseline_config", str(config), "--seeds", "1", "--budget_s", "4",
            "--eval_interval", "10", "--log_interval", "5", "--data_dir", str(tmp_path / "d"),
            "--out", str(tmp_path / "t"), "--results", "", "--plot", "", "--device", "cpu"]
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": training 4 s") == 2
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    rows = {r["arm"]: r for r in results["rows"]}
    assert set(rows) == {"baseline", "muon"}
    for r in rows.values():  # ended by the clock, after many steps, on the last evaluation
        assert 4 <= r["wall_s"] < 4 + 5 and r["steps"] > 10 and r["val_loss"] == r["curve"][-1][1]
    settings = json.loads((tmp_path / "t" / "muon-s0" / "settings.json").read_text())
    assert settings["optimizer"] == "muon" and settings["max_time"] == 4 and settings["eval_full_val"] is True
    summary = {s["arm"]: s for s in results["summary"]}
    assert summary["baseline"]["change"] == 0
    assert summary["muon"]["change"] == summary["muon"]["mean"] - summary["baseline"]["mean"]
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": training") == 0
