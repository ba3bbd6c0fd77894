"""experiments/self_reward: the task's pieces and the run end to end at a tiny budget."""
import json
import random
from pathlib import Path

import bench
from experiments import common
from experiments.self_reward import run as self_reward_experiment


def test_perturbed_responses_cover_right_and_wrong_answers():
    """The judge's seed responses: the answer itself, and wrong ones of every kind (swapped neighbours, a
    letter dropped or doubled, a letter from outside the input, the input as it is, random letters), all
    from the alphabet."""
    rng, right, lengths, outside = random.Random(0), 0, set(), 0
    for _ in range(700):
        letters = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
        response = self_reward_experiment.perturbed(letters, rng, "abcdefgh")
        assert response and set(response) <= set("abcdefgh")
        right += response == "".join(sorted(letters))
        lengths.add(len(response) - len(letters))
        outside += bool(set(response) & set("gh"))  # never in the input: a replaced letter or random letters
    assert 50 < right < 250 and {-1, 0, 1} <= lengths and outside > 50  # about 1/7 right (more for short inputs)
    assert self_reward_experiment.sort_prompt("cab") == "sort cab:"


def test_self_reward_iterates_scores_held_out_prompts_and_reuses_its_runs(tmp_path, capsys, monkeypatch):
    """The run end to end at a tiny budget: a control, and replay with the large prompt set (its DPO steps
    scaled, the replay logged; random pairs, since a 2-step M1 writes no parseable judgement); results.json
    and the README table rendered from it beside; a second call trains nothing."""
    monkeypatch.setitem(self_reward_experiment.ARMS, "random+replay+large", ("random", True, "large"))
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "README.md").write_text(f"# x\n{common.RESULTS_BEGIN}\npending\n{common.RESULTS_END}\ntail\n")
    argv = ["self_reward", "--seeds", "1", "--iterations", "1", "--arms", "checker,random+replay+large",
            "--sr_instructions", "30", "--sr_judge_examples", "30", "--prompts", "4", "--large_prompts", "8",
            "--heldout", "5", "--n_layer", "1", "--n_embd", "16", "--m1_iters", "2", "--dpo_iters", "1",
            "--dpo_batch", "2", "--replay_batch", "2", "--out_dir", str(tmp_path / "sr"), "--plot", "",
            "--results", str(tmp_path / "res" / "results.json"), "--device", "cpu"]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert [(r["arm"], r["model"]) for r in results["rows"]] == [("checker", "M1"), ("checker", "M2"),
                                                                 ("random+replay+large", "M1"), ("random+replay+large", "M2")]
    for row in results["rows"]:
        assert 0 <= row["heldout_exact"] <= 1
    assert results == json.loads((tmp_path / "sr" / "results.json").read_text())
    task = tmp_path / "sr" / "seed0" / "task"
    assert len((task / "prompts_8.jsonl").read_text().splitlines()) == 9  # header + 8 prompts, the 4 base ones first
    assert (task / "prompts_8.jsonl").read_text().splitlines()[:5] == (task / "prompts.jsonl").read_text().splitlines()
    assert all(line.startswith("rate sort ") or line.startswith("Score: ") for line in
               (task / "judge.txt").read_text().splitlines())
    large = tmp_path / "sr" / "seed0" / "random+replay+large-lr1e-05-beta0.1-2steps-replay1x2" / "M2"
    logged = [json.loads(line) for line in (large / "log.jsonl").read_text().splitlines()]
    assert any("replay_loss" in r for r in logged) and max(r["step"] for r in logged) == 2
    assert common.readme_results_block(tmp_path / "res" / "README.md") == \
        self_reward_experiment.results_table(results).strip()
    cached = json.loads((tmp_path / "sr" / "seed0" / "M1" / "heldout_exact.json").read_text())
    assert cached["result"] == results["rows"][0]["heldout_exact"]
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "supervised training from scratch" not in capsys.readouterr().out
    # another M1 width: M1 is trained again, its iterations are not reused, its held-out score is recomputed
    old_m2 = (large / "model.safetensors").stat().st_mtime_ns
    assert bench.main(argv[:argv.index("--n_embd") + 1] + ["8"] + argv[argv.index("--n_embd") + 2:]) == 0
    assert "supervised training from scratch" in capsys.readouterr().out
    assert (large / "model.safetensors").stat().st_mtime_ns != old_m2
    assert json.loads((tmp_path / "sr" / "seed0" / "M1" / "config.json").read_text())["n_embd"] == 8


def test_the_readme_table_is_the_results_file():
    """The README's results table is the one rendered from results.json beside it (or, before the first default
    run, a line saying the numbers are pending)."""
    folder = Path(self_reward_experiment.__file__).parent
    block = common.readme_results_block(folder / "README.md")
    assert block is not None
    if (folder / "results.json").is_file():
        assert block == self_reward_experiment.results_table(json.loads((folder / "results.json").read_text())).strip()
    else:
        assert "pending" in block
