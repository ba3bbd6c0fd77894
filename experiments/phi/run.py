"""The Phi recipe (Gunasekar et al. 2023, Textbooks Are All You Need) in miniature: curated code
(curation.py) and templated exercises (exercises.py, checked in sandbox.py) against the unfiltered pool.

  python bench.py phi               # or: python -m experiments.phi

The write-up, ours beside the paper's: README.md beside this file."""
import json
import statistics
import time
from pathlib import Path

import torch

from experiments.common import cached, cached_result, cached_run
from omnitron import checkpoints, evaluation, generation, models, runtime, tokenization
from omnitron.runtime import UserError, format_eta, print_table

# the compared model: a small phi.py (3 layers, 96 wide, 0.34M non-embedding parameters), character level
PHI_MODEL = dict(n_layer=3, n_embd=96, n_head=4, n_kv_head=4, intermediate_size=384)


PHI_REFERENCE = dict(n_layer=2, n_embd=96, n_head=4, n_kv_head=4, intermediate_size=384)  # curation's scorers


PHI_ARMS = {  # arm -> (stage-1 corpus, stage-2 corpus): stage 2 continues stage 1 for --finetune_iters steps
    "A": ("pool_A.txt", "pool_A.txt"),              # the unfiltered pool throughout
    "B": ("filtered_B.txt", "filtered_B.txt"),      # the filtered pool throughout (repeated epochs)
    "C": ("filtered_B.txt", "exercises_train.txt"),  # B, then a fine-tune on the synthetic exercises
}


def phi_init(folder, seed, block_size, **config):
    """A freshly initialised phi.py model (seed) with the comparison's character tokenizer
    (curation.VOCAB) saved as a model directory, so that every arm starts from the same weights
    and vocabulary (train.run's --init_from). Reused when it holds the same settings (settings.json)."""
    folder = Path(folder)
    settings = {"seed": seed, "block_size": block_size, **config}

    def make():
        from experiments.phi import curation
        torch.manual_seed(seed)
        module = models.get("phi")
        model = module.Model(module.Config(vocab_size=len(curation.VOCAB), block_size=block_size, **config))
        model.save_pretrained(folder)
        tokenization.CharTokenizer(curation.VOCAB).save(folder)
    cached(folder / "settings.json", settings, make, folder / "model.safetensors")  # settings last: runs see them
    return folder


def _phi_train(args, out, init, corpus, iters, lr, seed, label, block_size=None, batch_size=None):
    import hashlib
    parent = Path(init) / "settings.json"  # a run continued: retrain when it was retrained
    settings = {"init": str(init), "corpus": str(corpus), "corpus_sha1": hashlib.sha1(Path(corpus).read_bytes()).hexdigest(),
                "parent": json.loads(parent.read_text()) if parent.is_file() else None, "iters": iters, "lr": lr,
                "seed": seed, "block_size": block_size or args.block_size, "batch_size": batch_size or args.batch_size}
    cached_run(out, settings, label, init_from=str(init), data=str(corpus), data_dir=str(Path(args.out) / "tokens"),
               max_iters=iters, learning_rate=lr, min_lr=lr / 10, warmup_iters=max(1, iters // 10),
               block_size=settings["block_size"], batch_size=settings["batch_size"], eval_interval=iters,
               eval_iters=5, log_interval=max(1, iters // 5), sample_tokens=0, device="cpu", dtype="float32",
               seed=seed)
    return out


def phi_arm_run(args, arm, seed):
    """The folder name of an arm's final run: its budget in it, so runs of other lengths sit beside it."""
    return f"{arm}-{args.pretrain_iters}+{args.finetune_iters}-s{seed}"


def phi_completion(text):
    """A generated function body: the lines up to the first one that is neither blank nor indented
    (the model went on to another definition)."""
    body = []
    for line in text.split("\n"):
        if line.strip() and not line.startswith((" ", "\t")):
            break
        body.append(line)
    return "\n".join(body).rstrip() + "\n"


@torch.no_grad()
def phi_evaluate(run, curated, gen_tokens=64, batch_size=32):
    """The three measures of a trained model: (1) body_loss, nats per character of held-out
    functions' bodies given their signature + docstring; (2) pass_at_1 of greedy completions of the
    held-out exercise families, run with their tests in the sandbox (and pass_at_1_seen_families:
    the same on new drawings of the training families); (3) code_loss, nats per character of
    random windows of held-out modules; sandbox: sandbox.describe()'s line, the containment the
    programs ran under."""
    from experiments.phi import exercises, sandbox
    model, tok = checkpoints.load(run)

    def loss(pairs):
        scores = evaluation.loglikelihoods(model, pairs, batch_size=batch_size, reuse_context=False)
        return -sum(scores) / sum(len(c) for _, c in pairs)
    rows = [json.loads(line) for line in curated.path("heldout_functions.jsonl").read_text().splitlines()]
    body = loss([(tok.encode(r["prompt"]), tok.encode(r["body"])) for r in rows])
    windows = [json.loads(line)["text"] for line in curated.path("heldout_code.jsonl").read_text().splitlines()]
    code = loss([(tok.encode(w[:1]), tok.encode(w[1:])) for w in windows])

    def solve(tasks):
        outs = []
        for s in range(0, len(tasks), batch_size):
            chunk = tasks[s:s + batch_size]
            outs += generation.complete(model, tok, [tok.encode(t.prompt) for t in chunk], gen_tokens, stop="\n\n",
                                        temperature=0)
        programs = [t.prompt + phi_completion(o) for t, o in zip(tasks, outs)]
        p1, results = sandbox.pass_at_1(programs, [t.tests for t in tasks])
        by_family = {}
        for t, r in zip(tasks, results):
            by_family.setdefault(t.family, []).append(r.passed)
        return p1, {"passed": sum(r.passed for r in results), "exercises": len(tasks),
                    "by_family": {f: sum(v) / len(v) for f, v in by_family.items()},
                    "statuses": {st: sum(r.status == st for r in results) for st in {r.status for r in results}},
                    "samples": [{"prompt": t.prompt, "completion": phi_completion(o)} for t, o in zip(tasks, outs)][:8]}
    p1, unseen = solve(exercises.load_jsonl(curated.path("heldout_exercises.jsonl")))
    p1_seen, seen = solve(exercises.load_jsonl(curated.path("heldout_instances.jsonl")))
    return {"body_loss": body, "code_loss": code, "pass_at_1": p1, "pass_at_1_seen_families": p1_seen,
            "unseen_families": unseen, "seen_families": seen, "sandbox": sandbox.describe()}


def run(args):
    """The Phi recipe at small scale (Gunasekar et al. 2023): the curated data (curation.build:
    pool, dedup, rubric, classifier, Moore-Lewis, exercises), then arms A (unfiltered pool), B
    (filtered pool) and C (B + a fine-tune on the exercises) of one small phi.py at the same token
    budget, --seeds seeds each; the three measures of phi_evaluate. Runs are cached by settings."""
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in PHI_ARMS for a in arms):
        raise UserError(f"--arms {args.arms!r}: choose from {', '.join(PHI_ARMS)}")
    out, t0 = Path(args.out), time.time()
    curated = curate(args, out)
    longest = max(len(json.loads(line)[key]) for name, key in (("heldout_functions.jsonl", "body"),
                                                               ("heldout_code.jsonl", "text"))
                  for line in curated.path(name).read_text().splitlines())
    if args.block_size < longest:
        raise UserError(f"--block_size {args.block_size}: the held-out code is scored in pieces of up to {longest} "
                        "characters; give at least that")
    train_arms(args, arms, out, curated)
    rows = []
    for seed in range(args.seeds):
        for arm in arms:
            run = out / phi_arm_run(args, arm, seed)
            settings = json.loads((run / "settings.json").read_text())
            result = cached_result(run / "eval.json", settings, lambda: phi_evaluate(run, curated, args.gen_tokens))
            rows.append({"arm": arm, "seed": seed, **result})
    summary = summarize(args, arms, rows, curated.manifest)
    path = out / f"summary-{args.pretrain_iters}+{args.finetune_iters}.json"
    runtime.write_json(path, summary, indent=1)
    print(f"bench phi: {format_eta(time.time() - t0)} in all; {path}", flush=True)
    return summary




def curate(args, out):
    """The curated data (curation.build, with two small reference models trained here), reused while its
    settings match. Returns curation.Curated."""
    from experiments.phi import curation
    t0 = time.time()
    data_folder = out / "data"
    data_settings = {"version": 2, **{k: getattr(args, k) for k in ("keep_fraction", "n_label", "ref_iters",
                                                                     "embed_tokens", "exercises_per_family", "stdlib")}}
    curated = curation.Curated(data_folder)

    def build():
        def train_reference(corpus, name):
            init = phi_init(data_folder / f"{name}-init", 0, 128, **PHI_REFERENCE)
            run = _phi_train(args, data_folder / name, init, corpus, args.ref_iters, 3e-3, 0, f"reference {name}",
                             block_size=128, batch_size=16)
            return checkpoints.load(run)
        curation.build(data_folder, train_reference, embed_tokens=args.embed_tokens, keep_fraction=args.keep_fraction,
                       n_label=args.n_label, exercises_per_family=args.exercises_per_family, stdlib=args.stdlib or None)
    if cached(data_folder / "settings.json", data_settings, build, data_folder / "manifest.json"):
        print(f"curation: {format_eta(time.time() - t0)}", flush=True)
    return curated


def train_arms(args, arms, out, curated):
    """Train every arm and seed: stage 1 from a shared initialisation (one stage-1 run serves every arm with the
    same corpus), then stage 2; cached by settings; progress with an ETA."""
    plan = []  # (name, seed, init name or stage-1 name, corpus, iters, lr)
    for seed in range(args.seeds):
        for arm in arms:
            first, second = PHI_ARMS[arm]
            stage1 = f"{first.split('_')[0]}-stage1-s{seed}"
            if (stage1, seed) not in [(p[0], p[1]) for p in plan]:
                plan.append((stage1, seed, f"init-s{seed}", first, args.pretrain_iters, args.learning_rate))
            plan.append((phi_arm_run(args, arm, seed), seed, stage1, second, args.finetune_iters, args.finetune_lr))
    total_steps, done_steps, t_train = sum(p[4] for p in plan), 0, time.time()
    for i, (name, seed, parent, corpus, iters, lr) in enumerate(plan):
        init = phi_init(out / parent, seed, args.block_size, **PHI_MODEL) if parent.startswith("init") else out / parent
        _phi_train(args, out / name, init, curated.path(corpus), iters, lr, seed, f"[{i + 1}/{len(plan)}] {name}")
        done_steps += iters
        elapsed = time.time() - t_train
        print(f"[{i + 1}/{len(plan)} runs] {name} done; {format_eta(elapsed)} so far, ETA "
              f"{format_eta(elapsed / done_steps * (total_steps - done_steps))}", flush=True)


def summarize(args, arms, rows, manifest):
    """Per arm, the mean, min and max of each measure over seeds; whether B beats A (body loss) and C beats B
    (pass@1) beyond the spread; printed, and returned as the summary."""
    tokens = (args.pretrain_iters + args.finetune_iters) * args.batch_size * args.block_size
    print_table(rows, [("arm", "arm", "{}"), ("seed", "seed", "{}"), ("body_loss", "(1) body loss", "{:.4f}"),
                       ("pass_at_1", "(2) pass@1 unseen families", "{:.3f}"),
                       ("pass_at_1_seen_families", "pass@1 new instances", "{:.3f}"),
                       ("code_loss", "(3) held-out code loss", "{:.4f}")])
    summary = {"tokens_per_arm": tokens, "model": PHI_MODEL, "rows": rows, "arms": {}}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        summary["arms"][arm] = {k: {"mean": statistics.mean(r[k] for r in mine), "min": min(r[k] for r in mine),
                                    "max": max(r[k] for r in mine)}
                               for k in ("body_loss", "pass_at_1", "pass_at_1_seen_families", "code_loss")}
    a = summary["arms"]
    if {"A", "B"} <= set(a):
        summary["B_beats_A_on_body_loss_beyond_spread"] = a["B"]["body_loss"]["max"] < a["A"]["body_loss"]["min"]
    if {"B", "C"} <= set(a):
        summary["C_beats_B_on_pass_at_1_beyond_spread"] = a["C"]["pass_at_1"]["min"] > a["B"]["pass_at_1"]["max"]
    summary["manifest"] = {k: manifest[k] for k in ("classifier", "selection_precision", "split") if k in manifest}
    for arm, m in a.items():
        print(f"{arm}: " + ", ".join(f"{k} {v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" for k, v in m.items()))
    for key in ("B_beats_A_on_body_loss_beyond_spread", "C_beats_B_on_pass_at_1_beyond_spread"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(f"tokens per arm: {tokens:,}; classifier: {manifest.get('classifier')}")
    return summary


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.phi)."""
    p = sub.add_parser("phi", help="the Phi recipe (Textbooks Are All You Need) in miniature: curated stdlib code and "
                       "templated exercises vs the unfiltered pool at equal tokens, 3 seeds (trains; cached by settings)")
    p.add_argument("--arms", default=",".join(PHI_ARMS), help="comma-separated from A (unfiltered pool), B (filtered "
                   "pool), C (B + fine-tune on the synthetic exercises)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--pretrain_iters", type=int, default=400, help="stage-1 steps (every arm)")
    p.add_argument("--finetune_iters", type=int, default=60, help="stage-2 steps: A and B continue on their own "
                   "data, C fine-tunes on the exercises (so every arm sees the same tokens)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    p.add_argument("--block_size", type=int, default=192, help="characters per sequence")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="stage-1 peak learning rate (cosine to a tenth)")
    p.add_argument("--finetune_lr", type=float, default=1e-3, help="stage-2 peak learning rate (cosine to a tenth)")
    p.add_argument("--keep_fraction", type=float, default=0.3, help="share of the deduplicated functions the "
                   "quality classifier keeps for arm B")
    p.add_argument("--n_label", type=int, default=3000, help="rubric-labelled functions the classifier is fitted on")
    p.add_argument("--ref_iters", type=int, default=250, help="steps of each curation reference model")
    p.add_argument("--embed_tokens", type=int, default=64, help="characters of each function the reference models read")
    p.add_argument("--exercises_per_family", type=int, default=40, help="training exercises drawn per family "
                   "(at most; distinct ones)")
    p.add_argument("--gen_tokens", type=int, default=64, help="greedy tokens generated per held-out exercise")
    p.add_argument("--stdlib", default="", help="the pool's folder (empty: this Python's standard library)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="out/phi", help="curated data, runs, summary-PRETRAIN+FINETUNE.json")
    p.set_defaults(run=run)
    return p

