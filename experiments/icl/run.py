"""In-context learning (Brown et al. 2020, GPT-3's Figure 1.2) in miniature, on synthetic episodes designed
so that accuracy can rise with the number of demonstrations K at this scale. Two arms:

  python bench.py icl                  # or python -m experiments.icl: arm `tasks`, evidence accumulation
  python bench.py icl --arm cipher     # arm `cipher`: the task-learning go/no-go

- `tasks`: implicit Bayesian task inference (Xie et al. 2021). Four fixed substitutions of a letter
  (TASKS: they disagree on every letter); in an episode each demonstration follows the
  episode's task with probability q, else one of the other tasks, and the query always follows the
  episode's task. The Bayes-optimal accuracy (bayes_accuracy) rises with K: the reference curve.
  Three GPT sizes (RoPE), three seeds, exact match at every K, no task description.
- `cipher`: task learning. Every episode draws a fresh random letter cipher (12 lowercase -> 12
  uppercase letters), which exists only in its context; demonstrations and query are single
  letters. Trained in stages, scored at every stage: exact match against K beside the ceiling (the query's letter
  among the demonstrations'), and the answer's loss against the plateau ln 12 of a model that
  ignores the demonstrations.

Training windows are aligned to episodes (AlignedLoss: no target is trained without the start of its
episode in the window). The run writes its numbers to --results (experiments/icl/results.json, one key
per arm); README.md beside this file is the write-up and its tables are markdown_tables(results)."""
import json
import math
import random
import time
from pathlib import Path

import torch

import train
from experiments.common import cached, cached_result, cached_run, comma_list, layer_width_pairs, pyplot, save_figure
from omnitron import checkpoints, data, evaluation, runtime
from omnitron.evaluation import TARGET_DELIMITER
from omnitron.runtime import UserError, format_eta, resolve_device

ALPHABET = "abcdefghijkl"  # the cipher's plaintext letters
UPPER = "ABCDEFGHIJKL"  # the answers' letters (and the cipher's ciphertext letters)
SEP = " ="  # between a demonstration's input and output (then TARGET_DELIMITER), as the word tasks' files
START = "~"  # the first character of every episode: aligned_loss finds episodes by it
ARMS = ("tasks", "cipher")
ARM_DEFAULTS = {  # flags whose default depends on the arm
    "tasks": {"sizes": "1x32,2x64,3x96", "seeds": "1,2,3", "max_iters": 1200, "learning_rate": 1.5e-3,
              "optimizer": "muon"},
    "cipher": {"sizes": "2x64", "seeds": "1", "max_iters": 2500, "learning_rate": 3e-3,
               "optimizer": "muon"},
}


# ----------------------------------------------------------------------------- the tasks and the episodes

TASK_INPUTS = "abcdef"  # the `tasks` arm's input letters
TASK_TABLE = {  # task -> its answers to TASK_INPUTS in order: each task writes into its own six capitals
    "sub0": "DAFCEB", "sub1": "JGLIHK", "sub2": "NQMPRO", "sub3": "VTXSWU"}


def substitution(answers):
    """The task that writes letter i of TASK_INPUTS as answers[i]."""
    return lambda letter: answers[TASK_INPUTS.index(letter)]


TASKS = {name: substitution(answers) for name, answers in TASK_TABLE.items()}  # four fixed letter substitutions


def random_letter(rng, letters=ALPHABET):
    """One letter of `letters`, uniformly: an input of either arm."""
    return rng.choice(letters)


def noisy_episode(rng, k, q, names):
    """One episode of the `tasks` arm: its task uniform over `names` (keys of TASKS); k
    demonstrations, each following the episode's task with probability q, else one of the other
    tasks (uniformly); the query always follows the episode's task. Returns {"task", "demos":
    [{"input", "output", "task"}], "input", "output"}."""
    task = rng.choice(names)
    others = [n for n in names if n != task]
    demos = []
    for _ in range(k):
        t = task if rng.random() < q else rng.choice(others)
        w = random_letter(rng, TASK_INPUTS)
        demos.append({"input": w, "output": TASKS[t](w), "task": t})
    w = random_letter(rng, TASK_INPUTS)
    return {"task": task, "demos": demos, "input": w, "output": TASKS[task](w)}


def cipher_episode(rng, k):
    """One episode of the `cipher` arm: a fresh bijection ALPHABET -> UPPER, k demonstrations and a
    query, letters drawn uniformly (with replacement) and written through the bijection. "seen":
    whether the query's letter is the input of some demonstration. Returns {"task", "demos", "input",
    "output", "seen"}."""
    key = dict(zip(ALPHABET, rng.sample(UPPER, len(UPPER))))
    letters = [random_letter(rng) for _ in range(k + 1)]
    demos = [{"input": c, "output": key[c]} for c in letters[:k]]
    return {"task": "cipher", "demos": demos, "input": letters[k], "output": key[letters[k]],
            "seen": letters[k] in letters[:k]}


def context(episode):
    """The prompt of an episode: START, then GPT-3's format without a description
    (evaluation.fewshot_prompt): `input = output` per demonstration, then `query =`."""
    return START + evaluation.fewshot_prompt(episode["demos"], episode["input"], None, SEP)


def continuation(episode):
    """What follows the prompt: TARGET_DELIMITER, the answer and the end of its line."""
    return TARGET_DELIMITER + episode["output"] + "\n"


def episode_chars(k):
    """Characters of an episode with k demonstrations, with the blank line that ends it."""
    return len(START) + k * (2 + len(SEP) + len(TARGET_DELIMITER) + 2) + 2 + len(SEP) + 3


def write_stream(path, arm, seed, n_chars, k_max, q_range, names):
    """The training text of an arm: episodes (K uniform in 0..k_max; for `tasks`, each episode's q
    uniform in q_range = (low, high)) one after the other, each ended by a blank line, until n_chars
    characters; seeded by (arm, seed). Written temp-then-rename. Returns the number of episodes."""
    rng = random.Random(f"train:{arm}:{seed}")
    parts, n = [], 0
    while n < n_chars:
        k = rng.randint(0, k_max)
        ep = noisy_episode(rng, k, rng.uniform(*q_range), names) if arm == "tasks" else cipher_episode(rng, k)
        parts.append(context(ep) + continuation(ep) + "\n")
        n += len(parts[-1])
    body = "".join(parts)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    runtime.atomic_write(path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
    return len(parts)


# ----------------------------------------------------------------------------- references

def compositions(total, parts):
    """Every tuple of `parts` non-negative integers summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


def evidence_sign(q, n_tasks):
    """How a demonstration of task t moves t's posterior, for q < 1: the posterior is proportional to
    r^(n_t), r = q (n_tasks - 1) / (1 - q), so 1 (r > 1: the most frequent task wins), -1 (r < 1: the
    least frequent) or 0 (r = 1: demonstrations say nothing)."""
    r = q * (n_tasks - 1) / (1 - q)
    return (r > 1) - (r < 1)


def bayes_accuracy(k, q, n_tasks):
    """The Bayes-optimal probability of answering a `tasks` query right after k demonstrations,
    exactly, when every demonstration reveals which task produced it (true of TASKS on
    letters, since they disagree on every letter): the posterior of task t is proportional to r^(n_t), n_t the demonstrations
    produced by t and r = q (n_tasks - 1) / (1 - q), so the best guess is the most frequent task
    (r > 1), the least frequent (r < 1) or any (r = 1; q = 1: every demonstration is right), ties
    broken uniformly. Sums the multinomial probability of every count vector (true task's count first).
    k >= 0, 0 <= q <= 1, n_tasks >= 2; returns a probability in [1/n_tasks, 1]. Xie et al. 2021 §2."""
    if q == 1:
        return 1.0 if k > 0 else 1 / n_tasks
    sign = evidence_sign(q, n_tasks)
    p_other = (1 - q) / (n_tasks - 1)
    total = 0.0
    for counts in compositions(k, n_tasks):
        prob = math.factorial(k) * q ** counts[0] * p_other ** (k - counts[0])
        for c in counts:
            prob /= math.factorial(c)
        scores = [sign * c for c in counts]
        winners = [i for i, s in enumerate(scores) if s == max(scores)]
        total += prob / len(winners) if 0 in winners else 0.0
    return total


def bayes_on_episodes(episodes, q, names):
    """The Bayes-optimal score on these very episodes (what bayes_accuracy's expectation is for an
    infinite sample): per episode, the tasks whose demonstration count maximises the posterior
    r^(n_t) (r = q (tasks - 1) / (1 - q); the most frequent task for r > 1), ties split. Returns a
    fraction."""
    if q == 1:
        return sum(1.0 if ep["demos"] else 1 / len(names) for ep in episodes) / len(episodes)
    sign = evidence_sign(q, len(names))
    total = 0.0
    for ep in episodes:
        scores = {t: sign * sum(d["task"] == t for d in ep["demos"]) for t in names}
        best = [t for t in names if scores[t] == max(scores.values())]
        total += (ep["task"] in best) / len(best)
    return total / len(episodes)


def cipher_ceiling(k, n_letters=len(ALPHABET)):
    """The probability that a cipher query's letter (uniform over n_letters) is the input of one of
    k demonstrations (each uniform, independent): 1 - (1 - 1/n_letters)^k. Beyond it no rule can be
    sure of the answer, only guess among the letters not yet used (one left when all others are seen)."""
    return 1 - (1 - 1 / n_letters) ** k


# ----------------------------------------------------------------------------- training and scoring

def aligned_targets(x, y, start_id):
    """y (B, T) with every target before the first START of its row's input x (B, T) set to -1 (a row
    without START: all): each trained target sees the start of its episode, as training on windows
    aligned to episodes does."""
    is_start = x == start_id
    first = torch.where(is_start.any(1), is_start.int().argmax(1), torch.full_like(is_start[:, 0], x.shape[1],
                                                                               dtype=torch.long))
    positions = torch.arange(x.shape[1], device=x.device)
    return y.masked_fill(positions[None, :] < first[:, None], -1)


class AlignedLoss:
    """train.run's loss_fn: the language-model loss (train.lm_loss) on aligned_targets, without the
    targets whose id is in `skip_ids` (the inputs' letters: uniform noise no model can predict, whose
    gradients only dilute the answers')."""

    def __init__(self, start_id, skip_ids=()):
        self.start_id, self.skip_ids = start_id, torch.tensor(sorted(skip_ids), dtype=torch.long)

    def __call__(self, model, batch):
        x, y = batch
        y = aligned_targets(x, y, self.start_id)
        if len(self.skip_ids):
            y = y.masked_fill(torch.isin(y, self.skip_ids.to(y.device)), -1)
        return train.lm_loss(model, (x, y))


def score(model, tokenizer, episodes, batch_size):
    """[(exact match 0/1, nats)] per episode: exact match when greedy decoding after the prompt gives
    the answer and the end of its line (is_greedy of continuation(), lm-eval's loglikelihood); nats:
    minus that continuation's log-likelihood (space, answer letter and newline; the two separators
    cost almost nothing once the format is learned)."""
    requests = [evaluation.encode_pair(tokenizer, context(ep), continuation(ep)) for ep in episodes]
    scored = evaluation.loglikelihoods(model, requests, batch_size, with_greedy=True)
    return [(float(greedy), -ll) for ll, greedy in scored]


def eval_episodes(arm, k, q, names, n):
    """n evaluation episodes with k demonstrations, the same for every model and seed (seeded by the
    arm, k and q; the training streams use other seeds)."""
    rng = random.Random(f"eval:{arm}:{k}:{q}")
    return [noisy_episode(rng, k, q, names) if arm == "tasks" else cipher_episode(rng, k) for _ in range(n)]


def evaluate_model(run_dir, arm, shots, q, names, args):
    """One row per K of shots (and, for `tasks`, the largest K with q = 1: clean demonstrations) for
    the model in run_dir: {"k", "q", "exact_match", "stderr", "nats", "n"} (+ "ceiling" for cipher)."""
    model, tokenizer = checkpoints.load(run_dir, device=resolve_device(args.device))
    cells = [(k, q) for k in shots] + ([(max(shots), 1.0)] if arm == "tasks" and q < 1 else [])
    rows = []
    with torch.no_grad():
        for k, qk in cells:
            episodes = eval_episodes(arm, k, qk, names, args.eval_episodes)
            scored = score(model, tokenizer, episodes, args.eval_batch_size)
            hits = [s for s, _ in scored]
            mean = sum(hits) / len(hits)
            row = {"k": k, "q": qk, "exact_match": mean, "stderr": math.sqrt(mean * (1 - mean) / len(hits)),
                   "nats": sum(n for _, n in scored) / len(scored), "n": len(hits)}
            if arm == "cipher":
                row["ceiling"] = sum(ep["seen"] for ep in episodes) / len(episodes)
            rows.append(row)
    return rows, model.num_params()


def spread(values):
    """(mean, sample standard deviation (0 for one value), min, max)."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd, min(values), max(values)


# ----------------------------------------------------------------------------- the arms

def train_flags(args, n_layer, n_embd, seed, stream, loss_fn):
    """train.run's flags for one model of an arm."""
    return dict(model="gpt", pos="rope", data=str(stream), data_dir=str(args.data_dir), n_layer=n_layer,
                n_head=args.n_head, n_embd=n_embd, block_size=args.block_size, batch_size=args.batch_size,
                learning_rate=args.learning_rate, warmup_iters=min(30, args.max_iters // 10 + 1),
                lr_schedule="trapezoidal", cooldown_frac=0.2, lr_decay_iters=args.max_iters, dropout=0.0, eval_iters=2, sample_tokens=0,
                device=resolve_device(args.device), dtype="float32", seed=seed, loss_fn=loss_fn,
                **({"optimizer": args.optimizer} if args.optimizer != "adamw" else {}))


def prepare_stream(args, arm, seed, names):
    """The seed's training stream of the arm (written once per settings) and the id of START."""
    out = Path(args.out_dir)
    stream = out / f"{arm}_stream_seed{seed}.txt"
    settings = {"arm": arm, "seed": seed, "chars": args.stream_chars, "k_max": args.k_max,
                "q": args.train_q, "tasks": names}
    cached(out / f"{arm}_stream_seed{seed}.json", settings,
           lambda: write_stream(stream, arm, seed, args.stream_chars, args.k_max, args.train_q, names), stream)
    tokenizer = data.prepare(str(stream), "char", args.data_dir, quiet=True).tokenizer
    inputs = TASK_INPUTS if arm == "tasks" else ALPHABET
    skip = () if args.train_inputs else [tokenizer.encode(c)[0] for c in inputs]
    settings = {**settings, "inputs_trained": args.train_inputs}
    return stream, settings, AlignedLoss(tokenizer.encode(START)[0], skip)


def run_tasks(args, shots, sizes, seeds, names):
    """Arm `tasks`: every size x seed trained (cached) and scored; per (size, K, q) the seeds' mean,
    standard deviation, min and max; the Bayes curve at every K."""
    rows, params = [], {}
    for seed in seeds:
        stream, stream_settings, loss_fn = prepare_stream(args, "tasks", seed, names)
        for n_layer, n_embd in sizes:
            size = f"{n_layer}x{n_embd}"
            run_dir = Path(args.out_dir) / f"tasks_{size}_seed{seed}"
            flags = train_flags(args, n_layer, n_embd, seed, stream, loss_fn)
            settings = {**{k: v for k, v in flags.items() if k not in ("loss_fn", "device", "data_dir")},
                        "stream": stream_settings}
            if args.train:
                cached_run(run_dir, settings, f"tasks {size} seed {seed}", max_iters=args.max_iters, eval_interval=args.max_iters,
                           log_interval=max(args.max_iters // 5, 1), **flags)
            if not (run_dir / "config.json").is_file():
                raise UserError(f"no trained model in {run_dir}: run without --train false first")
            eval_settings = {"train": settings, "max_iters": args.max_iters, "shots": shots,
                             "n": args.eval_episodes}
            result = cached_result(run_dir / "icl_eval.json", eval_settings,
                                   lambda: dict(zip(("rows", "params"),
                                                    evaluate_model(run_dir, "tasks", shots, args.q, names, args))))
            params[size] = result["params"]
            rows += [{"size": size, "seed": seed, **r} for r in result["rows"]]
    summary = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for k, q in dict.fromkeys((r["k"], r["q"]) for r in rows):
            mine = [r for r in rows if r["size"] == size and r["k"] == k and r["q"] == q]
            mean, sd, lo, hi = spread([r["exact_match"] for r in mine])
            summary.append({"size": size, "params": params[size], "k": k, "q": q, "exact_match": mean, "sd": sd,
                            "min": lo, "max": hi, "nats": spread([r["nats"] for r in mine])[0],
                            "seeds": len(mine), "n": mine[0]["n"]})
    bayes = {str(k): bayes_accuracy(k, args.q, len(names)) for k in shots}
    sample = {str(k): bayes_on_episodes(eval_episodes("tasks", k, args.q, names, args.eval_episodes), args.q, names)
              for k in shots}
    return {"rows": rows, "summary": summary, "bayes": bayes, "bayes_on_episodes": sample, "chance": 1 / len(names)}


def run_cipher(args, shots, sizes, seeds):
    """Arm `cipher`: every size x seed trained in --stages equal stages (resumed, one cosine schedule
    over all of them), scored after each stage: exact match and nats per answer against K,
    the ceiling, and the train loss curve (log.jsonl)."""
    rows, curves = [], {}
    stage_steps = [round(args.max_iters * (i + 1) / args.stages) for i in range(args.stages)]
    for seed in seeds:
        stream, stream_settings, loss_fn = prepare_stream(args, "cipher", seed, [])
        for n_layer, n_embd in sizes:
            size = f"{n_layer}x{n_embd}"
            run_dir = Path(args.out_dir) / f"cipher_{size}_seed{seed}"
            flags = train_flags(args, n_layer, n_embd, seed, stream, loss_fn)
            base = {**{k: v for k, v in flags.items() if k not in ("loss_fn", "device", "data_dir")},
                    "stream": stream_settings}
            for i, steps in enumerate(stage_steps):
                settings = {**base, "stage_steps": stage_steps[:i + 1]}
                stage_log = max((steps - (stage_steps[i - 1] if i else 0)) // 4, 1)

                def train_stage(i=i, steps=steps, stage_log=stage_log):
                    print(f"--- cipher {size} seed {seed}: training to step {steps} in {run_dir}", flush=True)
                    train.run(out_dir=str(run_dir), overwrite=True, max_iters=steps, eval_interval=steps,
                              log_interval=stage_log, **({"init_from": "resume"} if i else {}), **flags)
                if args.train:
                    cached(run_dir / f"stage_{i}.json", settings, train_stage)
                eval_settings = {"train": settings, "shots": shots, "n": args.eval_episodes}
                if not (run_dir / f"stage_{i}.json").is_file() and not (run_dir / f"eval_stage_{i}.json").is_file():
                    raise UserError(f"no trained model in {run_dir}: run without --train false first")
                result = cached_result(run_dir / f"eval_stage_{i}.json", eval_settings,
                                       lambda: dict(zip(("rows", "params"),
                                                        evaluate_model(run_dir, "cipher", shots, 1.0, [], args))))
                tokens = steps * args.batch_size * args.block_size
                rows += [{"size": size, "seed": seed, "step": steps, "tokens": tokens, "params": result["params"], **r}
                         for r in result["rows"]]
            log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
            curves[f"{size}_seed{seed}"] = [[r["step"] * args.batch_size * args.block_size, r["train_loss"]]
                                           for r in log if "lr" in r]  # the logged steps' aligned loss
    plateau = math.log(len(UPPER))
    k_top = max(shots)
    final = [r for r in rows if r["k"] == k_top and r["step"] == stage_steps[-1]]
    transition = [r["tokens"] for r in rows if r["k"] == k_top and r["nats"] < plateau - 1.0]
    verdict = {"plateau_nats": plateau, "threshold_nats": plateau - 1.0,
               "transition_tokens": min(transition) if transition else None,
               "final_nats": [r["nats"] for r in final], "final_exact_match": [r["exact_match"] for r in final],
               "tokens": stage_steps[-1] * args.batch_size * args.block_size}
    return {"rows": rows, "curves": curves, "ceiling": {str(k): cipher_ceiling(k) for k in shots},
            "verdict": verdict}


# ----------------------------------------------------------------------------- run

def resolve_arm_defaults(args):
    """The flags left at their arm-dependent default (empty or 0) set from ARM_DEFAULTS[args.arm]."""
    for name, value in ARM_DEFAULTS[args.arm].items():
        if not getattr(args, name):
            setattr(args, name, value)


def run(args):
    """One arm of the experiment (--arm): train (cached by settings), score, print the tables, write
    the arm's numbers into --results (its other arm's kept) and out_dir/results.json, and plot."""
    if args.arm not in ARMS:
        raise UserError(f"--arm must be one of {', '.join(ARMS)}, not {args.arm!r}")
    resolve_arm_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    shots, sizes = [int(k) for k in comma_list(args.shots)], layer_width_pairs(args.sizes)
    seeds = [int(s) for s in comma_list(str(args.seeds))]
    names = comma_list(args.tasks)
    if unknown := [n for n in names if n not in TASKS]:
        raise UserError(f"--tasks: unknown task(s) {', '.join(unknown)}; the tasks: {', '.join(TASKS)}")
    if args.arm == "tasks" and len(names) < 2:
        raise UserError("--tasks: at least two tasks, so that a demonstration can follow another task")
    if not 0 < args.q <= 1:
        raise UserError(f"--q must be in (0, 1], not {args.q}")
    train_q = [float(v) for v in comma_list(args.train_q)]
    if len(train_q) != 2 or not 0 < train_q[0] <= train_q[1] <= 1:
        raise UserError(f"--train_q must be low,high with 0 < low <= high <= 1, not {args.train_q!r}")
    args.train_q = train_q
    if max(shots) > args.k_max:
        raise UserError(f"--k_max {args.k_max} is below the largest K evaluated ({max(shots)}): the training "
                        "episodes must have as many demonstrations")
    if episode_chars(args.k_max) > args.block_size:
        raise UserError(f"--block_size {args.block_size} does not hold an episode of {args.k_max} demonstrations "
                        f"({episode_chars(args.k_max)} characters): raise it or lower --k_max")
    if args.arm == "cipher" and not 1 <= args.stages <= args.max_iters:
        raise UserError(f"--stages must be between 1 and --max_iters, not {args.stages}")
    t0 = time.time()
    if args.arm == "tasks":
        result = run_tasks(args, shots, sizes, seeds, names)
    else:
        result = run_cipher(args, shots, sizes, seeds)
    elapsed = time.time() - t0
    meta = {k: v for k, v in vars(args).items() if k not in ("run", "device", "data_dir", "out_dir", "plot",
                                                            "results", "train", "threads")}
    result = {"meta": {**meta, "elapsed_s": round(elapsed, 1)}, **result}
    runtime.write_json(Path(args.out_dir) / f"{args.arm}_results.json", result, indent=1)
    if args.results:
        path = Path(args.results)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        runtime.write_json(path, {**stored, args.arm: result}, indent=1)
        print(f"results: {path}")
    print(markdown_tables({args.arm: result}))
    if args.plot:
        args.plot = Path(args.out_dir) / f"{args.arm}.png" if args.plot == "auto" else args.plot
        (plot_tasks if args.arm == "tasks" else plot_cipher)(result, args.plot)
    print(f"bench icl --arm {args.arm}: {format_eta(elapsed)} ({elapsed:.0f} s) in all")
    return result


def markdown_tables(results):
    """The README's tables from a results file's contents ({arm: result}): for `tasks`, exact match (%)
    per size and K, the seeds' mean ± standard deviation, with the Bayes-optimal row and the clean
    demonstrations' column; for `cipher`, per stage exact match (%) and nats per answer at every
    K, with the ceiling row."""
    out = []
    if "tasks" in results:
        res = results["tasks"]
        ks = sorted({r["k"] for r in res["summary"] if r["q"] < 1} | {int(k) for k in res["bayes"]})
        clean = sorted({r["k"] for r in res["summary"] if r["q"] == 1})
        q = res["meta"]["q"]
        head = ["model (params)", *[f"K={k}" for k in ks], *[f"K={k}, q=1" for k in clean]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for size in dict.fromkeys(r["size"] for r in res["summary"]):
            cells = {(r["k"], r["q"]): r for r in res["summary"] if r["size"] == size}
            first = next(iter(cells.values()))
            row = [f"{size} ({first['params'] / 1e6:.2f}M)"]
            row += [f"{100 * cells[(k, q)]['exact_match']:.0f} ± {100 * cells[(k, q)]['sd']:.0f}" for k in ks]
            row += [f"{100 * cells[(k, 1.0)]['exact_match']:.0f} ± {100 * cells[(k, 1.0)]['sd']:.0f}" for k in clean]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("| Bayes-optimal | " + " | ".join(f"{100 * res['bayes'][str(k)]:.0f}" for k in ks)
                     + " |" + " 100 |" * len(clean))
        if "bayes_on_episodes" in res:
            lines.append("| Bayes-optimal on these episodes | " + " | ".join(
                f"{100 * res['bayes_on_episodes'][str(k)]:.0f}" for k in ks) + " |" + " 100 |" * len(clean))
        out.append("\n".join(lines))
    if "cipher" in results:
        res = results["cipher"]
        ks = sorted({r["k"] for r in res["rows"]})
        head = ["model, seed", "tokens", *[f"K={k}" for k in ks]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r0 in [r for r in res["rows"] if r["k"] == ks[0]]:
            cells = {r["k"]: r for r in res["rows"]
                     if (r["size"], r["seed"], r["step"]) == (r0["size"], r0["seed"], r0["step"])}
            lines.append(f"| {r0['size']}, {r0['seed']} | {r0['tokens'] / 1e6:.2f}M | "
                         + " | ".join(f"{100 * cells[k]['exact_match']:.0f} / {cells[k]['nats']:.2f}" for k in ks)
                         + " |")
        lines.append("| ceiling | | " + " | ".join(f"{100 * res['ceiling'][str(k)]:.0f}" for k in ks) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- plots

def plot_tasks(result, path):
    """Exact match (%) against K (symlog axis: K = 0 shown) per size, the seeds' mean with their min-max
    as error bars, beside the Bayes-optimal curve and chance."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    q = result["meta"]["q"]
    ks = sorted(int(k) for k in result["bayes"])
    ax.plot(ks, [100 * result["bayes"][str(k)] for k in ks], "k--", marker="s", label="Bayes-optimal")
    if "bayes_on_episodes" in result:
        ax.plot(ks, [100 * result["bayes_on_episodes"][str(k)] for k in ks], color="grey", ls="--", marker="x",
                label="Bayes-optimal on the evaluated episodes")
    ax.axhline(100 * result["chance"], color="grey", lw=0.8, ls=":", label="chance")
    for size in dict.fromkeys(r["size"] for r in result["summary"]):
        mine = sorted((r for r in result["summary"] if r["size"] == size and r["q"] == q), key=lambda r: r["k"])
        y = [100 * r["exact_match"] for r in mine]
        err = [[100 * (r["exact_match"] - r["min"]) for r in mine], [100 * (r["max"] - r["exact_match"]) for r in mine]]
        ax.errorbar([r["k"] for r in mine], y, yerr=err, marker="o", capsize=3,
                    label=f"{size} ({mine[0]['params'] / 1e6:.2f}M), {mine[0]['seeds']} seeds")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="number of examples in context (K)", ylabel="exact match (%)", ylim=(-2, 102),
           title=f"task inference from noisy demonstrations (q = {q})")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_cipher(result, path):
    """Left: exact match (%) against K after each stage, with the ceiling. Right: nats per answer
    letter at the largest K against training tokens, with the plateau ln 12."""
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    ks = sorted({r["k"] for r in result["rows"]})
    left.plot(ks, [100 * result["ceiling"][str(k)] for k in ks], "k--", marker="s", label="ceiling (all letters seen)")
    for key in dict.fromkeys((r["size"], r["seed"], r["tokens"]) for r in result["rows"]):
        mine = sorted((r for r in result["rows"] if (r["size"], r["seed"], r["tokens"]) == key), key=lambda r: r["k"])
        left.plot(ks, [100 * r["exact_match"] for r in mine], marker="o",
                  label=f"{key[0]} seed {key[1]}, {key[2] / 1e6:.1f}M tokens")
    left.set_xscale("symlog", linthresh=1)
    left.set_xticks(ks, [str(k) for k in ks])
    left.minorticks_off()
    left.set(xlabel="number of examples in context (K)", ylabel="exact match (%)", ylim=(-2, 102),
             title="fresh cipher per episode")
    left.legend(fontsize=7)
    for size, seed in dict.fromkeys((r["size"], r["seed"]) for r in result["rows"]):
        mine = sorted((r for r in result["rows"] if (r["size"], r["seed"]) == (size, seed) and r["k"] == ks[-1]),
                      key=lambda r: r["tokens"])
        right.plot([r["tokens"] / 1e6 for r in mine], [r["nats"] for r in mine], marker="o", label=f"{size} seed {seed}")
    right.axhline(result["verdict"]["plateau_nats"], color="grey", ls=":", label="ln 12: demonstrations ignored")
    right.set(xlabel="training tokens (M)", ylabel=f"nats per answer at K={ks[-1]}", ylim=(0, None))
    right.legend(fontsize=7)
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.icl)."""
    p = sub.add_parser("icl", help="in-context learning (GPT-3's Figure 1.2 in miniature): arm tasks, accuracy "
                       "against K from noisy demonstrations beside the Bayes-optimal curve; arm cipher, the "
                       "task-learning go/no-go on a fresh cipher per episode")
    p.add_argument("--arm", default="tasks", help="tasks (evidence accumulation) or cipher (task learning)")
    p.add_argument("--sizes", default="", help="GPT models (RoPE), n_layer x n_embd, comma-separated (empty: "
                   "tasks 1x32,2x64,3x96; cipher 2x64)")
    p.add_argument("--seeds", default="", help="training seeds, comma-separated (empty: tasks 1,2,3; cipher 1)")
    p.add_argument("--max_iters", type=int, default=0, help="training steps of every model (0: tasks 1200, "
                   "cipher 2500)")
    p.add_argument("--stages", type=int, default=5, help="cipher: scored after each of this many equal stages")
    p.add_argument("--tasks", default=",".join(TASKS), help="tasks arm: the transformations, comma-separated")
    p.add_argument("--q", type=float, default=0.5, help="tasks arm: probability that a demonstration follows the "
                   "episode's task")
    p.add_argument("--train_q", default="0.5,1", help="tasks arm: each training episode's q is uniform in this "
                   "range (low,high); the evaluation's is --q")
    p.add_argument("--train_inputs", type=runtime.str2bool, default=True, help="whether the loss also trains the "
                   "demonstrations' input letters (uniform noise)")
    p.add_argument("--shots", default="0,1,2,4,8,16", help="the K evaluated, comma-separated")
    p.add_argument("--k_max", type=int, default=16, help="training episodes have 0..k_max demonstrations")
    p.add_argument("--n_head", type=int, default=4, help="attention heads of every size")
    p.add_argument("--stream_chars", type=int, default=2_000_000, help="characters of each seed's training stream")
    p.add_argument("--block_size", type=int, default=128, help="tokens (characters) per training window")
    p.add_argument("--batch_size", type=int, default=32, help="training windows per step")
    p.add_argument("--learning_rate", type=float, default=0, help="peak learning rate (0: tasks 1.5e-3, cipher 3e-3)")
    p.add_argument("--optimizer", default="", help="train.py's --optimizer: adamw, or muon (the hidden "
                   "matrices at train.py's --muon_lr, the rest AdamW at --learning_rate; empty: muon)")
    p.add_argument("--eval_episodes", type=int, default=300, help="evaluation episodes per K")
    p.add_argument("--eval_batch_size", type=int, default=50, help="episodes per evaluation batch")
    p.add_argument("--train", type=runtime.str2bool, default=True, help="train (false: score the runs already "
                   "in --out_dir)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data_dir", default=str(data.DEFAULT_DATA_DIR), help="where the tokenized streams are cached")
    p.add_argument("--out_dir", default="out/icl", help="runs, streams and each arm's results")
    p.add_argument("--results", default="experiments/icl/results.json",
                   help="the results file the README quotes (one key per arm; empty: none)")
    p.add_argument("--plot", default="auto", help="PNG plot path (auto: OUT_DIR/ARM.png; empty: none)")
    runtime.add_device_flags(p, dtype=False, attn=False)
    p.set_defaults(run=run)
    return p
