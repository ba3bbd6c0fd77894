"""experiments/multimodal: equal trainable parameters for the xattn arm, and the run end to end at a tiny
budget (cached by settings)."""
import argparse
import json

import bench
from experiments.multimodal import run as mm_experiment


def test_xattn_arm_matches_the_prefix_arm_in_trainable_parameters():
    args = argparse.Namespace(scene_digits=3, patch=4, width=64, compare_queries=8, depth=2)
    depth, hidden = mm_experiment.xattn_size(args, 64, 2)
    assert depth == 1 and hidden > 0
    from omnitron import multimodal
    prefix = sum(p.numel() for p in multimodal.Bridge(multimodal.BridgeConfig(n_embd=64, queries=8, depth=2)).parameters())
    xattn = sum(p.numel() for p in multimodal.Bridge(multimodal.BridgeConfig(n_embd=64, queries=8, depth=1)).parameters())
    xattn += 2 * sum(p.numel() for p in multimodal.GatedCrossAttention(64, 4, hidden).parameters())
    assert abs(xattn - prefix) <= 2 * (2 * 64 + 1)  # within one unit of feed-forward width per gated layer


def test_bench_multimodal_trains_its_arms_and_reuses_finished_runs(digits_data_dir, tmp_path, capsys):
    argv = ["multimodal", "--queries", "2", "--compare_queries", "2", "--arms", "frozen,full,scratch,xattn,patches",
            "--seeds", "1", "--lm_lines", "200", "--lm_iters", "2", "--bridge_iters", "2", "--batch_size", "2",
            "--block_size", "32", "--eval_iters", "1", "--test_scenes", "8", "--data_dir", str(digits_data_dir),
            "--out", str(tmp_path / "mm"), "--plot", ""]
    bench.main(argv)
    first = capsys.readouterr().out
    assert first.count(": training 2 steps into") == 1 + 1 + 4  # stage 0, the N sweep, four more arms
    summary = json.loads((tmp_path / "mm" / "summary.json").read_text())
    rows = summary["rows"]
    assert [(r["arm"], r["queries"]) for r in rows] == [("frozen", 2), ("full", 2), ("scratch", 2), ("xattn", 2),
                                                         ("patches", 2)]
    assert rows[-1]["media_tokens"] == 12 and rows[0]["media_tokens"] == 2  # 8 x 24 pixels in 4 x 4 patches
    for r in rows:
        assert all(0 <= r[k] <= 1 for k in ("caption", "count", "largest", "sum", "questions", "text_questions"))
    frozen = [r for r in rows if r["arm"] == "frozen"]
    assert all(r["text_questions"] == summary["baselines"]["text_questions"] for r in frozen)  # a frozen model's skill
    bench.main(argv)  # cached: nothing trains again
    assert capsys.readouterr().out.count(": training 2 steps into") == 0
