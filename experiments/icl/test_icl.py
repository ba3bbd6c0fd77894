"""experiments/icl: the run end to end at a tiny budget."""
import json

import pytest

import bench
from omnitron import evaluation, runtime


def test_bench_icl_end_to_end(tmp_path, shakespeare_texts, capsys):
    """bench.py icl at a toy size: the mixture holds no test item, every (size, description, K)
    is scored, results.json has them all; K_max not above the largest K is refused."""
    data_dir = tmp_path / "d"
    (data_dir / "shakespeare").mkdir(parents=True)
    (data_dir / "shakespeare" / "texts").symlink_to(shakespeare_texts, target_is_directory=True)
    argv = ["icl", "--sizes", "1x16,1x32", "--max_iters", "2", "--mixture_chars", "30000", "--block_size", "96",
            "--batch_size", "2", "--limit", "3", "--shots", "0,2", "--k_max", "3", "--eval_tasks", "reversed_words",
            "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "icl"), "--plot", "", "--device", "cpu"]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "icl" / "results.json").read_text())["results"]
    assert len(results) == 2 * 2 * 2 * 2 and {r["n"] for r in results} == {3}
    assert {(r["size"], r["description"], r["shots"], r["metric"]) for r in results} == {
        (s, d, k, m) for s in ("1x16", "1x32") for d in (True, False) for k in (0, 2)
        for m in ("exact_match", "perplexity")}
    mixture = (tmp_path / "icl" / "mixture.txt").read_text()
    test_words = {r["output"] for r in evaluation.read_task(data_dir / "tasks" / "reversed_words.jsonl").test}
    assert not any(f"{w[::-1]} = {w}\n" in mixture for w in test_words)
    assert "K=2" in capsys.readouterr().out
    with pytest.raises(runtime.UserError, match="k_max"):
        bench.main([*argv[:-2], "--k_max", "2", "--train", "false"])
