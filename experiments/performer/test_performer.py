"""experiments/performer: the run end to end at a tiny budget: every arm trained and compared with softmax of
the same seed, the FAVOR+ swap fine-tuned, and nothing trained again from the cache."""
import json

import bench


def test_performer_trains_its_arms_compares_them_and_reuses_finished_runs(corpus, tmp_path, capsys):
    argv = ["performer", "--arms", "softmax,performer_m64,window64", "--seeds", "1", "--max_iters", "2",
            "--eval_interval", "1", "--eval_iters", "1", "--finetune_iters", "2", "--finetune_features", "16",
            "--data", str(corpus), "--data_dir", str(tmp_path / "d"), "--out", str(tmp_path / "pf"), "--device", "cpu"]
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": training 2 steps into") == 4  # three arms and the fine-tune
    summary = json.loads((tmp_path / "pf" / "summary.json").read_text())
    rows = {r["arm"]: r["val_loss"] for r in summary["rows"]}
    assert set(rows) == {"softmax", "performer_m64", "window64"}
    for arm, loss in rows.items():
        assert abs(summary["arms"][arm]["gap_mean"] - (loss - rows["softmax"])) < 1e-12
    finetune = summary["finetune"]
    assert finetune["softmax"] == rows["softmax"] and finetune["steps"] == 2 and finetune["features"] == 16
    assert finetune["curve"][0][1] == finetune["favor_before"] and finetune["curve"][-1][1] == finetune["favor_after"]
    config = json.loads((tmp_path / "pf" / "finetune-m16-2" / "attention.json").read_text())
    assert config["attn"] == "performer" and config["performer_features"] == 16
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": training") == 0
