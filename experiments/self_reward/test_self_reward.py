"""experiments/self_reward: the task's pieces and the run end to end at a tiny budget."""
import json
import random

import bench
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


def test_self_reward_iterates_scores_held_out_prompts_and_reuses_its_runs(tmp_path, capsys):
    argv = ["self_reward", "--seeds", "1", "--iterations", "1", "--conditions", "checker", "--sr_instructions", "30",
            "--sr_judge_examples", "30", "--prompts", "4", "--heldout", "5", "--n_layer", "1", "--n_embd", "16",
            "--m1_iters", "2", "--dpo_iters", "1", "--dpo_batch", "2", "--out_dir", str(tmp_path / "sr"), "--plot", "",
            "--device", "cpu"]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "sr" / "results.json").read_text())
    assert [(r["condition"], r["model"]) for r in results["rows"]] == [("checker", "M1"), ("checker", "M2")]
    for row in results["rows"]:
        assert 0 <= row["heldout_exact"] <= 1
    cached = json.loads((tmp_path / "sr" / "seed0" / "M1" / "heldout_exact.json").read_text())
    assert cached["result"] == results["rows"][0]["heldout_exact"]
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "supervised training from scratch" not in capsys.readouterr().out
