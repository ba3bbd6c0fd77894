"""Self-rewarding language models (Yuan et al. 2024) in miniature: sorting short strings, M1 trained from
scratch, iterations with the model's own judge against random-pair and checker-pair controls, and the judge
kept alive by replaying its seed examples in every iteration's DPO objective (the remedy of Meta-Rewarding,
Wu et al. 2024), with about 200 or 1,000 prompts per iteration.

  python bench.py self_reward       # or: python -m experiments.self_reward

The write-up, ours beside the paper's: README.md beside this file; the numbers: results.json beside it."""
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import train
from experiments.common import cached_result, is_cached, pyplot, save_figure, write_results
from omnitron import checkpoints, generation, runtime, self_reward
from omnitron.runtime import UserError, print_table, resolve_device

SORT_JUDGE_TEMPLATE = "rate {prompt}{response}\n"  # the judge's prompt; it answers "Score: k" on the next line

# arm -> (pairs by: train.py --sr_pairs, replay the judge's seed examples, prompts per iteration: "base" --prompts
# or "large" --large_prompts, with DPO steps scaled by the same factor so that each pair is seen as often)
ARMS = {
    "judge": ("judge", False, "base"),                  # the paper's loop: the model's own judge
    "random": ("random", False, "base"),                # control: pairs at random (should not improve)
    "checker": ("checker", False, "base"),              # control: the exact checker's pairs (the upper bound)
    "judge+replay": ("judge", True, "base"),            # the judge's seed examples replayed in every DPO run
    "judge+replay+large": ("judge", True, "large"),     # the same with --large_prompts prompts per iteration
}


def sort_prompt(letters):
    return f"sort {letters}:"


def perturbed(letters, rng, alphabet):
    """A wrong or right response to sorting `letters`, for the judge's seed examples: the answer, the
    answer with two neighbours swapped, a letter dropped, a letter doubled, a letter replaced by one
    not in the input, the input unsorted, or random letters (each equally likely)."""
    answer = "".join(sorted(letters))
    i = rng.randrange(len(answer))
    kind = rng.randrange(7)
    if kind == 1 and len(answer) > 1:
        j = min(i, len(answer) - 2)
        return answer[:j] + answer[j + 1] + answer[j] + answer[j + 2:]
    if kind == 2:
        return answer[:i] + answer[i + 1:] or answer[::-1]
    if kind == 3:
        return answer[:i] + answer[i] + answer[i:]
    if kind == 4:
        others = [c for c in alphabet if c not in letters]
        return answer[:i] + rng.choice(others) + answer[i + 1:] if others else answer[::-1]
    if kind == 5:
        return letters
    if kind == 6:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, len(letters) + 1)))
    return answer


def sort_task(folder, args, seed):
    """The sorting task's files in `folder` (written once per seed): corpus.txt (M1's supervised data:
    --sr_instructions correct `sort LETTERS:SORTED` lines and --sr_judge_examples judge lines `rate
    sort LETTERS:RESPONSE` + `Score: k`, the responses perturbed and scored by self_reward.sort_rubric),
    judge.txt (those judge lines alone: the replay corpus), prompts.jsonl (the self-rewarding prompts;
    the header names the judge template and the checker), prompts_N.jsonl (N = --large_prompts: the same
    prompts and more) and heldout.jsonl (the evaluation prompts). Every string of letters is used once
    across the corpus, the prompts and the held-out prompts."""
    folder = Path(folder)
    large = folder / f"prompts_{args.large_prompts}.jsonl"
    settings = task_settings(args, seed)
    if is_cached(folder / "settings.json", settings, folder / "heldout.jsonl", folder / "judge.txt", large):
        return folder
    rng = random.Random(seed)
    lo, hi = (int(x) for x in args.lengths.split("-"))
    n = args.sr_instructions + args.sr_judge_examples + args.prompts + args.heldout
    seen, strings = set(), []
    while len(strings) < n:
        s = "".join(rng.choice(args.alphabet) for _ in range(rng.randint(lo, hi)))
        if s not in seen:
            seen.add(s)
            strings.append(s)
    a, b, c = args.sr_instructions, args.sr_instructions + args.sr_judge_examples, n - args.heldout
    lines = [f"{sort_prompt(s)}{''.join(sorted(s))}" for s in strings[:a]]
    for s in strings[a:b]:
        response = perturbed(s, rng, args.alphabet)
        lines.append(SORT_JUDGE_TEMPLATE.replace("{prompt}", sort_prompt(s)).replace("{response}", response)
                     + f"Score: {self_reward.sort_rubric(s, response)}")
    judge_lines = lines[a:]
    rng.shuffle(lines)
    # the large prompt set: the base prompts, then new strings drawn with a generator of their own (so that
    # the files above, and the M1 trained on them, do not depend on --large_prompts)
    extra_rng, more = random.Random(seed + 10_000), []
    while len(more) < args.large_prompts - args.prompts:
        s = "".join(extra_rng.choice(args.alphabet) for _ in range(extra_rng.randint(lo, hi)))
        if s not in seen:
            seen.add(s)
            more.append(s)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"judge_template": SORT_JUDGE_TEMPLATE, "stop": "\n", "judge_stop": "\n", "checker": "sort"}
    for name, chunk in (("prompts.jsonl", strings[b:c]), (large.name, strings[b:c] + more),
                        ("heldout.jsonl", strings[c:])):
        runtime.write_jsonl(folder / name, [header] + [{"prompt": sort_prompt(s), "answer": "".join(sorted(s))}
                                                           for s in chunk])
    runtime.atomic_write(folder / "judge.txt", lambda tmp: Path(tmp).write_text("\n".join(judge_lines) + "\n"))
    runtime.atomic_write(folder / "corpus.txt", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    runtime.write_json(folder / "settings.json", settings)  # last: an interrupted task is written again
    return folder


def task_settings(args, seed):
    """What the task's files depend on (sort_task's settings.json)."""
    keys = ("alphabet", "lengths", "sr_instructions", "sr_judge_examples", "prompts", "large_prompts", "heldout")
    return {"seed": seed, **{k: getattr(args, k) for k in keys}}


def m1_settings(args, task_seed):
    """What a seed's M1 depends on: its task (drawn with task_seed) and its training flags
    (M1/experiment_settings.json)."""
    keys = ("n_layer", "n_head", "n_embd", "block_size", "m1_iters")
    return {"task": task_settings(args, task_seed), **{k: getattr(args, k) for k in keys}}


def fresh(folder, settings):
    """Make `folder` hold work of `settings`: a folder whose experiment_settings.json says otherwise (or that
    has none) is removed, then the file is written. Returns whether the folder was already of `settings`
    (its finished work, if any, can be reused)."""
    folder, marker = Path(folder), Path(folder) / "experiment_settings.json"
    if is_cached(marker, settings):
        return True
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    runtime.write_json(marker, settings)
    return False


@torch.no_grad()
def heldout_accuracy(model_dir, heldout, device, batch=100):
    """Exact match of greedy responses (up to the end of the line) to the held-out sorting prompts;
    cached in the model's folder (heldout_exact.json)."""
    def exact_match():
        model, tokenizer = checkpoints.load(model_dir, device=device, dtype=torch.float32)
        _, records = self_reward.read_prompts(heldout)
        right = 0
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            outs = generation.complete(model, tokenizer, [tokenizer.encode(r["prompt"]) for r in chunk], 16, stop="\n",
                                       temperature=0)
            right += sum(o == r["answer"] for o, r in zip(outs, chunk))
        return right / len(records)
    weights = (Path(model_dir) / "model.safetensors").stat()  # a retrained model is scored again
    return cached_result(Path(model_dir) / "heldout_exact.json",
                         {"heldout": str(heldout), "weights": [weights.st_size, weights.st_mtime_ns]}, exact_match)


def arm_settings(args, arm):
    """(pairs by, replay corpus name or None, prompts file name, DPO steps, run folder name) of an arm (ARMS)."""
    pairs_from, replay, prompts = ARMS[arm]
    large = prompts == "large"
    steps = args.dpo_iters * args.large_prompts // args.prompts if large else args.dpo_iters
    name = f"{arm}-lr{args.dpo_lr:g}-beta{args.dpo_beta:g}-{steps}steps"
    if replay:
        name += f"-replay{args.replay_weight:g}x{args.replay_batch}"
    return pairs_from, "judge.txt" if replay else None, \
        f"prompts_{args.large_prompts}.jsonl" if large else "prompts.jsonl", steps, name


def run(args):
    """Self-rewarding iterations on sorting short strings (checking is easier than producing): per seed,
    M1 trained from scratch on the instruction and judge seed data (cached: a finished M1 is reused),
    then --iterations rounds of self-rewarding DPO (train.py --self_reward) in each arm of --arms (ARMS:
    the model's own judge; the controls, pairs at random and pairs by the exact checker; the judge with
    its seed examples replayed in every DPO run, train.py --dpo_replay; the same with --large_prompts
    prompts). Held-out exact match of every M_t, and each iteration's judge accuracy, reward gap and
    pair precision; written to out_dir/results.json and --results (with the README's table). Every run
    is cached in its folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out, rows = Path(args.out_dir), []
    arms = [c for c in args.arms.split(",") if c]
    if not arms or any(c not in ARMS for c in arms):
        raise UserError(f"--arms {args.arms!r}: choose from {', '.join(ARMS)}")
    if args.large_prompts < args.prompts:
        raise UserError(f"--large_prompts {args.large_prompts} must be at least --prompts {args.prompts}")
    t0 = time.time()
    for seed in range(args.seeds):
        task_seed = 1000 + seed
        folder = sort_task(out / f"seed{seed}" / "task", args, task_seed)
        m1 = out / f"seed{seed}" / "M1"
        m1_config = m1_settings(args, task_seed)
        if not (fresh(m1, m1_config) and self_reward.finished(m1, args.m1_iters)):
            print(f"--- seed {seed}: M1, {args.m1_iters} steps of supervised training from scratch", flush=True)
            train.run(model="gpt", out_dir=str(m1), overwrite=True, data=str(folder / "corpus.txt"),
                      data_dir=str(out / "data"), tokenizer="char", n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, block_size=args.block_size, batch_size=32, max_iters=args.m1_iters,
                      learning_rate=3e-3, warmup_iters=50, eval_interval=args.m1_iters, eval_iters=5,
                      log_interval=max(1, args.m1_iters // 4), sample_tokens=0, seed=seed, device=device)
        m1_acc = heldout_accuracy(m1, folder / "heldout.jsonl", device)
        for arm in arms:
            pairs_from, replay, prompts, steps, name = arm_settings(args, arm)
            run_dir = out / f"seed{seed}" / name
            fresh(run_dir, {"M1": m1_config, "arm": arm, "iterations_of": name})  # another M1: its iterations go
            print(f"--- seed {seed}, {arm}: {args.iterations} iterations into {run_dir} "
                  f"({runtime.format_eta(time.time() - t0)} so far)", flush=True)
            replay_flags = dict(dpo_replay=str(folder / replay), dpo_replay_weight=args.replay_weight,
                                dpo_replay_batch=args.replay_batch, data_dir=str(out / "data")) if replay else {}
            result = train.run(init_from=str(m1), self_reward=args.iterations, prompts=str(folder / prompts),
                               sr_pairs=pairs_from, out_dir=str(run_dir), sr_max_new_tokens=16, sr_judge_tokens=12,
                               block_size=args.block_size, max_iters=steps, batch_size=args.dpo_batch,
                               learning_rate=args.dpo_lr, dpo_beta=args.dpo_beta, warmup_iters=0, min_lr=args.dpo_lr,
                               eval_interval=steps, eval_iters=2, log_interval=steps, seed=seed, device=device,
                               **replay_flags)
            accs = [m1_acc] + [heldout_accuracy(run_dir / f"M{t + 1}", folder / "heldout.jsonl", device)
                               for t in range(1, args.iterations + 1)]
            for t, acc in enumerate(accs, 1):
                it = result["iterations"][t - 1] if t <= len(result["iterations"]) else {}
                if it:  # the pairs' precision against the checker, from the iteration's files
                    folder_t = run_dir / f"M{t + 1}"
                    read = lambda name: [obj for _, obj in runtime.read_jsonl(folder_t / name)]
                    it["pairs_true_better"] = self_reward.pair_precision(read("judgements.jsonl"), read("pairs.jsonl"),
                                                                         "\n")[0]
                rows.append({"seed": seed, "arm": arm, "model": f"M{t}", "heldout_exact": acc,
                             "judge_accuracy": it.get("judge_pairwise_accuracy"), "reward_gap": it.get("reward_gap"),
                             "pairs_true_better": it.get("pairs_true_better"),
                             "pairs": it.get("pairs"), "mean_score": it.get("mean_score"),
                             "sample_exact": it.get("exact_match"), "malformed": it.get("malformed_judgements")})
    sweep = lr_sweep(args, out, device) if args.lr_sweep else []
    print_table(rows, [("seed", "seed", "{}"), ("arm", "arm", "{}"), ("model", "model", "{}"),
                       ("heldout_exact", "held-out exact", "{:.3f}"), ("sample_exact", "samples exact", "{:.3f}"),
                       ("judge_accuracy", "judge acc", "{:.3f}"), ("mean_score", "self-score", "{:.2f}"),
                       ("reward_gap", "gap", "{:+.2f}"), ("pairs", "pairs", "{}"),
                       ("pairs_true_better", "pairs right", "{:.2f}"), ("malformed", "malformed", "{}")])
    summary = summarize(rows, arms, args.iterations + 1)
    print()
    print_table(summary, [("arm", "arm", "{}"), ("model", "model", "{}"),
                          ("heldout_exact", "held-out exact (mean)", "{:.3f}"), ("heldout_exact_sd", "sd", "{:.3f}"),
                          ("gain", "vs M1 (mean)", "{:+.3f}"), ("gain_sd", "sd", "{:.3f}"), ("seeds_up", "seeds up", "{}"),
                          ("judge_accuracy", "judge acc (mean)", "{:.3f}"), ("judge_accuracy_sd", "sd", "{:.3f}"),
                          ("reward_gap", "gap (mean)", "{:+.2f}"), ("pairs_true_better", "pairs right (mean)", "{:.2f}")])
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "results", "plot", "threads", "device")}
    results = {"settings": settings, "elapsed_s": round(time.time() - t0, 1), "summary": summary, "rows": rows,
               "lr_sweep": sweep}
    runtime.write_json(out / "results.json", results, indent=1)
    write_results(args.results, results, results_table)
    if args.plot:
        plot_self_reward(rows, arms, args.iterations + 1, args.plot)
    return summary


def summarize(rows, arms, n_models):
    """Per arm and model M_t: the mean and sample standard deviation over seeds of the held-out exact
    match, the judge's accuracy, the reward gap and the pairs' precision; the change from the same
    seed's M1 (gain, its sd, and seeds_up: how many seeds went up)."""
    summary = []
    for arm in arms:
        first = {r["seed"]: r["heldout_exact"] for r in rows if r["arm"] == arm and r["model"] == "M1"}
        for t in range(1, n_models + 1):
            sel = [r for r in rows if r["arm"] == arm and r["model"] == f"M{t}"]
            row = {"arm": arm, "model": f"M{t}", "seeds": len(sel)}
            gains = [r["heldout_exact"] - first[r["seed"]] for r in sel]
            for key, vals in [(k, [r[k] for r in sel if r[k] is not None]) for k in
                              ("heldout_exact", "judge_accuracy", "reward_gap", "pairs_true_better")] + [("gain", gains)]:
                if vals:
                    row[key] = statistics.mean(vals)
                    row[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row["seeds_up"] = sum(g > 0 for g in gains)
            summary.append(row)
    return summary


def results_table(results):
    """The README's results table (markdown) of a results file: per arm, held-out exact match of M1 ..
    M_n (mean ± sd over seeds, %), the change from M1 with the seeds that went up, and the judge's
    accuracy of each iteration."""
    summary, s = results["summary"], results["settings"]
    n = max(int(r["model"][1:]) for r in summary)
    pct = lambda r, k: f"{100 * r[k]:.1f} ± {100 * r[k + '_sd']:.1f}" if k in r else "–"
    head = ["arm"] + [f"M{t}" for t in range(1, n + 1)] + [f"M{t} − M1 (seeds up)" for t in range(2, n + 1)] + \
        [f"judge acc M{t}" for t in range(1, n)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in dict.fromkeys(r["arm"] for r in summary):
        by = {r["model"]: r for r in summary if r["arm"] == arm}
        cells = [arm] + [pct(by[f"M{t}"], "heldout_exact") for t in range(1, n + 1)]
        cells += [f"{100 * by[f'M{t}']['gain']:+.1f} ± {100 * by[f'M{t}']['gain_sd']:.1f} ({by[f'M{t}']['seeds_up']} of "
                  f"{by[f'M{t}']['seeds']})" for t in range(2, n + 1)]
        cells += [pct(by[f"M{t}"], "judge_accuracy") for t in range(1, n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nHeld-out exact match and judge accuracy (%), mean ± sd over {s['seeds']} seeds; "
                               f"{s['prompts']} prompts per iteration ({s['large_prompts']} in the large arm), "
                               f"{s['iterations']} iterations; {results['elapsed_s'] / 60:.1f} min for the command "
                               "(cached runs reused).")


def plot_self_reward(rows, arms, n_models, path):
    """Held-out exact match of M1 .. M_n and the judge's pairwise accuracy of M1 .. M_{n-1}, per
    arm: the seeds' mean (line) and their range (band)."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        for ax, key, n in ((axes[0], "heldout_exact", n_models), (axes[1], "judge_accuracy", n_models - 1)):
            values = np.array([[r[key] for r in rows if r["arm"] == arm and r["model"] == f"M{t}"]
                               for t in range(1, n + 1)], dtype=float)  # (models, seeds)
            line, = ax.plot(range(1, n + 1), values.mean(1), marker="o", label=arm)
            ax.fill_between(range(1, n + 1), values.min(1), values.max(1), alpha=0.15, color=line.get_color())
    axes[0].set(xlabel="model M_t", ylabel="held-out exact match", title="sorting: the model's answers")
    axes[1].set(xlabel="model M_t (the judge of iteration t)", ylabel="pairwise accuracy vs the checker",
                title="the model as its own judge")
    for ax, n in zip(axes, (n_models, n_models - 1)):
        ax.set_xticks(range(1, n + 1))
        ax.legend()
    save_figure(fig, path)


def lr_sweep(args, out, device):
    """How the DPO learning rate was chosen: one DPO run (--dpo_iters steps) from seed 0's M1 per
    learning rate of --lr_sweep, on the first iteration's pairs by the judge and by the checker,
    scored on the self-rewarding prompts (never on the held-out ones)."""
    seed0, rows = out / "seed0", []
    settings = f"lr{args.dpo_lr:g}-beta{args.dpo_beta:g}-{args.dpo_iters}steps"
    prompts = seed0 / "task" / "prompts.jsonl"
    for lr in [float(x) for x in args.lr_sweep.split(",")]:
        for condition in ("judge", "checker"):
            folder = seed0 / "lr_sweep" / f"{condition}-lr{lr:g}"
            if not self_reward.finished(folder, args.dpo_iters):
                train.run(init_from=str(seed0 / "M1"), dpo=str(seed0 / f"{condition}-{settings}" / "M2" / "pairs.jsonl"),
                          out_dir=str(folder), overwrite=True, max_iters=args.dpo_iters, batch_size=args.dpo_batch,
                          block_size=args.block_size, learning_rate=lr, min_lr=lr, warmup_iters=0, dpo_beta=args.dpo_beta,
                          eval_interval=args.dpo_iters, eval_iters=2, log_interval=args.dpo_iters, sample_tokens=0,
                          seed=0, device=device)
            rows.append({"pairs by": condition, "lr": lr, "prompts_exact": heldout_accuracy(folder, prompts, device)})
    rows.append({"pairs by": "(M1)", "lr": None, "prompts_exact": heldout_accuracy(seed0 / "M1", prompts, device)})
    print_table(rows, [("pairs by", "pairs (iteration 1, seed 0)", "{}"), ("lr", "DPO lr", "{:g}"),
                       ("prompts_exact", "exact on the self-rewarding prompts", "{:.3f}")])
    return rows


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.self_reward)."""
    p = sub.add_parser("self_reward", help="self-rewarding language models (Yuan et al. 2024) in miniature: sorting "
                       "short strings, M1 trained from scratch, N iterations per seed with the model's own judge and "
                       "the random-pair and checker-pair controls; held-out exact match, judge accuracy, reward gap")
    p.add_argument("--seeds", type=int, default=5, help="seeds (task data, M1, iterations)")
    p.add_argument("--iterations", type=int, default=3, help="self-rewarding iterations (M2 .. M(N+1))")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated from judge (the model's own judge), "
                   "random and checker (the controls), judge+replay (the judge's seed examples replayed in each DPO "
                   "run), judge+replay+large (the same with --large_prompts prompts per iteration)")
    p.add_argument("--alphabet", default="abcdefgh", help="the letters of the strings")
    p.add_argument("--lengths", default="3-6", help="string lengths, LO-HI")
    p.add_argument("--sr_instructions", type=int, default=300, help="M1's instruction examples (correct sortings)")
    p.add_argument("--sr_judge_examples", type=int, default=3000, help="M1's judge examples (perturbed, rubric-scored)")
    p.add_argument("--prompts", type=int, default=200, help="self-rewarding prompts per iteration")
    p.add_argument("--large_prompts", type=int, default=1000, help="prompts per iteration of the large arm (its "
                   "DPO steps scaled by large_prompts / prompts)")
    p.add_argument("--heldout", type=int, default=300, help="held-out evaluation prompts")
    p.add_argument("--n_layer", type=int, default=3, help="M1: layers")
    p.add_argument("--n_head", type=int, default=4, help="M1: heads")
    p.add_argument("--n_embd", type=int, default=96, help="M1: width")
    p.add_argument("--block_size", type=int, default=64, help="M1: context (characters)")
    p.add_argument("--m1_iters", type=int, default=2000, help="M1: training steps (batch 32)")
    p.add_argument("--dpo_iters", type=int, default=40, help="DPO steps per iteration")
    p.add_argument("--dpo_batch", type=int, default=16, help="DPO pairs per step")
    p.add_argument("--dpo_lr", type=float, default=1e-5, help="DPO learning rate (constant)")
    p.add_argument("--dpo_beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--replay_weight", type=float, default=1.0, help="replay arms: weight of the judge examples' "
                   "language-model loss beside the DPO loss (train.py --dpo_replay_weight)")
    p.add_argument("--replay_batch", type=int, default=16, help="replay arms: windows of the judge examples per DPO "
                   "step (train.py --dpo_replay_batch)")
    p.add_argument("--lr_sweep", default="", help="comma-separated DPO learning rates to compare on seed 0's first "
                   "iteration (how --dpo_lr was chosen: 1e-5,3e-5,1e-4); empty: none")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--out_dir", default="out/self_reward", help="runs (cached) and results.json")
    p.add_argument("--results", default="experiments/self_reward/results.json", help="the numbers of the run (JSON; "
                   "the README beside it gets its results table); empty: none")
    p.add_argument("--plot", default="out/self_reward/self_reward.png", help="PNG plot path (empty: none)")
    p.set_defaults(run=run)
    return p

