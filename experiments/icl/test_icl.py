"""experiments/icl: the episodes, the reference curves against independent calculations, the aligned
targets, the run end to end at a tiny budget, and the README's tables against the results file."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

import bench
from experiments.icl import run as icl
from omnitron import runtime

HERE = Path(__file__).parent


def test_tasks_are_bijections_onto_disjoint_letters():
    """Each demonstration's answer then reveals the task that produced it, which bayes_accuracy assumes."""
    answers = [{f(c) for c in icl.TASK_INPUTS} for f in icl.TASKS.values()]
    assert all(len(a) == len(icl.TASK_INPUTS) for a in answers)
    assert len(set().union(*answers)) == len(icl.TASK_INPUTS) * len(icl.TASKS)


def monte_carlo_bayes(k, q, n, seed=0):
    """The Bayes-optimal accuracy estimated from noisy_episode's own episodes: for each hypothesis t,
    the likelihood of every demonstration (q when t maps its input to its output, else (1 - q) /
    (tasks - 1) times the number of other tasks that do), the posterior's best task answering the
    query, ties split evenly; returns the mean and its standard error."""
    names, rng = list(icl.TASKS), random.Random(seed)
    total = 0.0
    for _ in range(n):
        ep = icl.noisy_episode(rng, k, q, names)
        post = {}
        for t in names:
            like = 1.0
            for d in ep["demos"]:
                if icl.TASKS[t](d["input"]) == d["output"]:
                    like *= q
                else:
                    like *= (1 - q) / (len(names) - 1) * sum(icl.TASKS[o](d["input"]) == d["output"]
                                                              for o in names if o != t)
            post[t] = like
        best = [t for t in names if math.isclose(post[t], max(post.values()), rel_tol=1e-9)]
        total += sum(icl.TASKS[t](ep["input"]) == ep["output"] for t in best) / len(best)
    mean = total / n
    return mean, math.sqrt(max(mean * (1 - mean), 1e-4) / n)


@pytest.mark.parametrize("q", [0.5, 0.1])
def test_bayes_accuracy_matches_a_monte_carlo_of_the_episodes(q):
    for k in (0, 1, 2, 4, 8, 16):
        exact = icl.bayes_accuracy(k, q, len(icl.TASKS))
        mc, se = monte_carlo_bayes(k, q, 3000, seed=k)
        assert abs(exact - mc) < 4 * se + 1e-9, (k, q, exact, mc)


def test_bayes_accuracy_known_values():
    """q = 0.5, four tasks: the issue's 0.50, 0.64, 0.77, 0.90 at K = 1, 4, 8, 16; chance at K = 0;
    K = 2 no better than K = 1 (a 1-1 tie is a coin flip); q = 1/tasks: demonstrations say nothing;
    q = 1: one demonstration is enough."""
    values = {k: icl.bayes_accuracy(k, 0.5, 4) for k in (0, 1, 2, 4, 8, 16)}
    assert values[0] == pytest.approx(0.25) and values[1] == pytest.approx(0.5) and values[2] == pytest.approx(0.5)
    assert [round(values[k], 2) for k in (4, 8, 16)] == [0.64, 0.77, 0.90]
    assert icl.bayes_accuracy(8, 0.25, 4) == pytest.approx(0.25)
    assert icl.bayes_accuracy(3, 1.0, 4) == 1.0 and icl.bayes_accuracy(0, 1.0, 4) == 0.25


def test_cipher_ceiling_matches_the_episodes():
    rng = random.Random(0)
    for k in (0, 1, 4, 16):
        seen = sum(icl.cipher_episode(rng, k)["seen"] for _ in range(4000)) / 4000
        assert abs(seen - icl.cipher_ceiling(k)) < 0.03
        ep = icl.cipher_episode(rng, k)
        assert [d["output"] for d in ep["demos"] if d["input"] == ep["input"]] in ([], [ep["output"]] * sum(
            d["input"] == ep["input"] for d in ep["demos"]))


def test_episode_text_and_its_length():
    ep = {"demos": [{"input": "a", "output": "H"}, {"input": "b", "output": "C"}], "input": "c", "output": "K"}
    assert icl.context(ep) + icl.continuation(ep) == "~a = H\n\nb = C\n\nc = K\n"
    assert icl.episode_chars(2) == len(icl.context(ep) + icl.continuation(ep) + "\n")


def test_aligned_targets_mask_what_precedes_the_first_episode_start():
    x = torch.tensor([[5, 6, 0, 7, 8, 0, 9], [5, 6, 7, 8, 9, 5, 6], [0, 5, 6, 7, 8, 9, 5]])
    y = x + 100
    out = icl.aligned_targets(x, y, 0)
    assert out.tolist() == [[-1, -1, 100, 107, 108, 100, 109], [-1] * 7, (x[2] + 100).tolist()]


def test_bench_icl_end_to_end(tmp_path, capsys):
    """Both arms at a toy size: every (size, K, q) summarised over the seeds, the Bayes curve, the
    stages of the cipher arm, one results file with both arms whose tables print; a second call
    trains nothing; K beyond k_max and a block too small for an episode are refused."""
    results = tmp_path / "results.json"
    common = ["--shots", "0,2", "--k_max", "2", "--stream_chars", "20000", "--block_size", "32", "--batch_size",
              "2", "--eval_episodes", "6", "--data_dir", str(tmp_path / "d"), "--out_dir", str(tmp_path / "icl"),
              "--results", str(results), "--plot", "", "--device", "cpu"]
    argv = ["icl", "--sizes", "1x16,1x24", "--seeds", "1,2", "--max_iters", "2", *common]
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": training 2 steps") == 4
    tasks = json.loads(results.read_text())["tasks"]
    assert {(r["size"], r["k"], r["q"], r["seeds"]) for r in tasks["summary"]} == {
        (s, k, q, 2) for s in ("1x16", "1x24") for k, q in ((0, 0.5), (2, 0.5), (2, 1.0))}
    assert len(tasks["rows"]) == 2 * 2 * 3 and {r["n"] for r in tasks["rows"]} == {6}
    assert tasks["bayes"] == {"0": pytest.approx(0.25), "2": pytest.approx(0.5)}
    for r in tasks["summary"]:
        mine = [x["exact_match"] for x in tasks["rows"] if (x["size"], x["k"], x["q"]) == (r["size"], r["k"], r["q"])]
        assert r["exact_match"] == pytest.approx(sum(mine) / 2) and r["min"] == min(mine) and r["max"] == max(mine)
    assert bench.main(argv) == 0  # cached: trains and scores nothing again
    out = capsys.readouterr().out
    assert ": training" not in out and "| Bayes-optimal | 25 | 50 | 100 |" in out
    tasks = json.loads(results.read_text())["tasks"]

    assert bench.main(["icl", "--arm", "cipher", "--max_iters", "2", "--stages", "2", "--sizes", "1x16",
                       *common]) == 0
    stored = json.loads(results.read_text())
    cipher = stored["cipher"]
    assert set(stored) == {"tasks", "cipher"} and stored["tasks"] == tasks
    assert sorted({(r["step"], r["k"]) for r in cipher["rows"]}) == [(1, 0), (1, 2), (2, 0), (2, 2)]
    assert cipher["verdict"]["plateau_nats"] == pytest.approx(math.log(12))
    assert cipher["ceiling"]["2"] == pytest.approx(1 - (11 / 12) ** 2)
    assert "| ceiling |" in icl.markdown_tables(stored)

    with pytest.raises(runtime.UserError, match="k_max"):
        bench.main([*argv, "--k_max", "1", "--train", "false"])
    with pytest.raises(runtime.UserError, match="block_size"):
        bench.main([*argv, "--block_size", "16", "--train", "false"])


def test_readme_tables_are_the_results_files():
    """The README quotes markdown_tables of experiments/icl/results.json, arm by arm."""
    path = HERE / "results.json"
    if not path.is_file():
        pytest.skip("no results.json yet")
    readme = (HERE / "README.md").read_text()
    for arm, result in json.loads(path.read_text()).items():
        assert icl.markdown_tables({arm: result}) in readme, arm


def test_bayes_on_episodes_is_majority_vote_and_converges_to_bayes_accuracy():
    """On hand-made episodes: the majority task scores 1, a two-way tie 1/2, a wrong majority 0; on many
    generated episodes it approaches bayes_accuracy."""
    names = list(icl.TASKS)
    demo = lambda t: {"input": "a", "output": icl.TASKS[t]("a"), "task": t}  # noqa: E731
    eps = [{"task": "sub0", "demos": [demo("sub0"), demo("sub0"), demo("sub1")]},
           {"task": "sub0", "demos": [demo("sub0"), demo("sub1")]},
           {"task": "sub0", "demos": [demo("sub2"), demo("sub2"), demo("sub0")]}]
    assert icl.bayes_on_episodes(eps, 0.5, names) == pytest.approx((1 + 0.5 + 0) / 3)
    rng = random.Random(1)
    many = [icl.noisy_episode(rng, 8, 0.5, names) for _ in range(4000)]
    assert icl.bayes_on_episodes(many, 0.5, names) == pytest.approx(icl.bayes_accuracy(8, 0.5, 4), abs=0.025)
