"""The Phi recipe (Gunasekar et al. 2023, Textbooks Are All You Need) in miniature: curated code
(curation.py) and templated exercises (exercises.py, checked in sandbox.py). Stage 1 trains on the
unfiltered or the filtered pool; stage 2 mixes exercises with replay of the arm's own stage-1 corpus:
wide exercises (thousands of distinct drawings per family) or today's narrow ones (the diversity
control); pass@1 on new instances of the trained families, two-step compositions and unseen families.

  python bench.py phi               # or: python -m experiments.phi

The write-up, ours beside the paper's: README.md beside this file; the numbers: results.json beside it."""
import json
import statistics
import time
from pathlib import Path

import torch

from experiments.common import cached, cached_result, cached_run, write_results
from omnitron import checkpoints, evaluation, generation, models, runtime, tokenization
from omnitron.runtime import UserError, format_eta, print_table

# the compared model: a small phi.py (3 layers, 96 wide, 0.34M non-embedding parameters), character level
PHI_MODEL = dict(n_layer=3, n_embd=96, n_head=4, n_kv_head=4, intermediate_size=384)


PHI_REFERENCE = dict(n_layer=2, n_embd=96, n_head=4, n_kv_head=4, intermediate_size=384)  # curation's scorers


PHI_ARMS = {  # arm -> (stage-1 corpus, stage-2 exercises): stage 2 continues stage 1 for --finetune_iters steps on
    # a mix of those exercises (--exercise_share of the characters) and replay of the stage-1 corpus
    "B+wide": ("filtered_B.txt", "wide"),      # filtered code, then wide exercises: the recipe
    "A+wide": ("pool_A.txt", "wide"),          # unfiltered code, then wide exercises: filtering measured on pass@1
    "B+narrow": ("filtered_B.txt", "narrow"),  # filtered code, then today's 355 narrow exercises: the diversity control
}
EVAL_SETS = {  # name -> (file in OUT/exercises, what it tests)
    "new_instances": ("new_instances.jsonl", "new wide drawings of the 33 training families"),
    "compositions": ("compositions.jsonl", "two-step compositions of training operations"),
    "unseen_families": ("unseen_families.jsonl", "the 8 held-out sibling families (min beside max, ...)"),
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


def _phi_train(args, out, init, corpus, iters, lr, seed, label, block_size=None, batch_size=None, optimizer="adamw"):
    import hashlib
    parent = Path(init) / "settings.json"  # a run continued: retrain when it was retrained
    settings = {"init": str(init), "corpus": str(corpus), "corpus_sha1": hashlib.sha1(Path(corpus).read_bytes()).hexdigest(),
                "parent": json.loads(parent.read_text()) if parent.is_file() else None, "iters": iters, "lr": lr,
                "seed": seed, "block_size": block_size or args.block_size, "batch_size": batch_size or args.batch_size}
    if optimizer != "adamw":  # (curation's reference models keep AdamW and their settings)
        settings["optimizer"] = optimizer
    cached_run(out, settings, label, init_from=str(init), data=str(corpus), data_dir=str(Path(args.out) / "tokens"),
               max_iters=iters, learning_rate=lr, min_lr=lr / 10, warmup_iters=max(1, iters // 10),
               block_size=settings["block_size"], batch_size=settings["batch_size"], eval_interval=iters,
               eval_iters=5, log_interval=max(1, iters // 5), sample_tokens=0, device="cpu", dtype="float32",
               seed=seed, optimizer=optimizer)
    return out


def phi_arm_run(args, arm, seed):
    """The folder name of an arm's final run: its budget and mix in it, so runs of other settings sit beside it."""
    return f"{arm}-{args.pretrain_iters}+{args.finetune_iters}-x{args.exercise_share:g}-s{seed}"


def phi_completion(text):
    """A generated function body: the lines up to the first one that is neither blank nor indented
    (the model went on to another definition)."""
    body = []
    for line in text.split("\n"):
        if line.strip() and not line.startswith((" ", "\t")):
            break
        body.append(line)
    return "\n".join(body).rstrip() + "\n"


def code_shape(body):
    """A function body with every identifier that is not a keyword, a builtin or an attribute (`.upper`)
    replaced by NAME, every number by 0 and every string by "S", as a tuple of tokens (None where it does not
    tokenize): the operation a body performs without the names and constants it copies from the prompt."""
    import builtins
    import io
    import keyword
    import tokenize
    skip = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT, tokenize.ENDMARKER)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(body).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    shape = []
    for t in tokens:
        if t.type == tokenize.ERRORTOKEN and t.string.strip():
            return None
        if t.type in skip or not t.string.strip():
            continue
        if t.type == tokenize.NAME and not keyword.iskeyword(t.string) and not hasattr(builtins, t.string) \
                and shape[-1:] != ["."]:
            shape.append("NAME")
        elif t.type == tokenize.NUMBER:
            shape.append("0")
        elif t.type == tokenize.STRING:
            shape.append('"S"')
        else:
            shape.append(t.string)
    return tuple(shape)


def _sandboxed_pass_at_1(tasks, programs):
    """pass@1 of programs against their tasks' tests in the sandbox; a program that does not compile
    (compile() parses, it runs nothing) fails without a sandboxed process, the verdict the sandbox would give.
    Returns (pass@1, [(passed, status)])."""
    from experiments.phi import sandbox
    verdicts, runnable = [None] * len(tasks), []
    for i, program in enumerate(programs):
        try:
            compile(program, "<sample>", "exec")
            runnable.append(i)
        except (SyntaxError, ValueError):
            verdicts[i] = (False, "syntax_error")
    _, results = sandbox.pass_at_1([programs[i] for i in runnable], [tasks[i].tests for i in runnable])
    for i, r in zip(runnable, results):
        verdicts[i] = (r.passed, r.status)
    return (sum(v[0] for v in verdicts) / len(verdicts) if verdicts else 0.0), verdicts


@torch.no_grad()
def phi_losses(run, curated, batch_size=32):
    """(1) body_loss: nats per character of held-out functions' bodies given their signature + docstring;
    (3) code_loss: nats per character of random windows of held-out modules."""
    model, tok = checkpoints.load(run)

    def loss(pairs):
        scores = evaluation.loglikelihoods(model, pairs, batch_size=batch_size, reuse_context=False)
        return -sum(scores) / sum(len(c) for _, c in pairs)
    rows = [json.loads(line) for line in curated.path("heldout_functions.jsonl").read_text().splitlines()]
    windows = [json.loads(line)["text"] for line in curated.path("heldout_code.jsonl").read_text().splitlines()]
    return {"body_loss": loss([(tok.encode(r["prompt"]), tok.encode(r["body"])) for r in rows]),
            "code_loss": loss([(tok.encode(w[:1]), tok.encode(w[1:])) for w in windows])}


@torch.no_grad()
def phi_evaluate(run, curated, exercise_dir, gen_tokens=64, batch_size=32):
    """The measures of a trained model: body_loss and code_loss (phi_losses), and pass@1 of greedy
    completions (gen_tokens characters, cut where the function ends: phi_completion) run with their tests
    in the sandbox, on each of EVAL_SETS (pass_at_1_NAME, and NAME: passed, exercises, by family, statuses,
    the first 8 samples); sandbox: sandbox.describe()'s line, the containment the programs ran under."""
    from experiments.phi import exercises, sandbox
    model, tok = checkpoints.load(run)
    result = phi_losses(run, curated, batch_size)
    for name, (file, _) in EVAL_SETS.items():
        tasks = exercises.load_jsonl(Path(exercise_dir) / file)
        outs = []
        for s in range(0, len(tasks), batch_size):
            chunk = tasks[s:s + batch_size]
            outs += generation.complete(model, tok, [tok.encode(t.prompt) for t in chunk], gen_tokens, stop="\n\n",
                                        temperature=0)
        p1, verdicts = _sandboxed_pass_at_1(tasks, [t.prompt + phi_completion(o) for t, o in zip(tasks, outs)])
        by_family = {}
        for t, (passed, _) in zip(tasks, verdicts):
            by_family.setdefault(t.family, []).append(passed)
        result[f"pass_at_1_{name}"] = p1
        # the operation right, names and constants aside: the body's shape is the reference solution's
        shapes = [code_shape(phi_completion(o)) for o in outs]
        result[f"shape_match_{name}"] = sum(s is not None and s == code_shape(t.solution)
                                            for s, t in zip(shapes, tasks)) / max(1, len(tasks))
        result[name] = {"passed": sum(v[0] for v in verdicts), "exercises": len(tasks),
                        "by_family": {f: sum(v) / len(v) for f, v in by_family.items()},
                        "statuses": {st: sum(v[1] == st for v in verdicts) for st in {v[1] for v in verdicts}},
                        "samples": [{"prompt": t.prompt, "completion": phi_completion(o)}
                                    for t, o in zip(tasks, outs)][:8]}
    result["sandbox"] = sandbox.describe()
    return result


def exercise_sets(args, out, curated):
    """The wide exercises and the three held-out sets in OUT/exercises (reused while their settings match):
    wide_train.txt (--wide_per_family distinct wide drawings of each training family, each checked against
    its tests: exercises.check), narrow_train.txt (curation's exercises_train.txt: today's 355), and
    EVAL_SETS' files, verified in the sandbox: new_instances.jsonl (--eval_instances new wide drawings per
    training family, none in the training texts), compositions.jsonl (--eval_compositions two-step
    exercises), unseen_families.jsonl (--eval_unseen wide drawings per held-out family). Returns the folder."""
    from experiments.phi import exercises
    folder = out / "exercises"
    settings = {"version": 1, **{k: getattr(args, k) for k in ("wide_per_family", "eval_instances",
                                                                "eval_compositions", "eval_unseen")}}

    def make():
        folder.mkdir(parents=True, exist_ok=True)
        wide = exercises.generate(args.wide_per_family, seed=100, held_out=False, wide=True)
        kept = [e for e in wide if exercises.check(e)]
        if len(kept) != len(wide):
            raise RuntimeError(f"{len(wide) - len(kept)} wide exercises fail their own tests: a template is broken")
        runtime.atomic_write(folder / "wide_train.txt", lambda tmp: Path(tmp).write_text("\n\n".join(e.text for e in kept)))
        runtime.atomic_write(folder / "narrow_train.txt", lambda tmp: Path(tmp).write_text(
            curated.path("exercises_train.txt").read_text()))
        trained = {e.text for e in kept}
        sets = {"new_instances": exercises.generate(args.eval_instances, 200, held_out=False, wide=True, exclude=trained),
                "compositions": exercises.compositions(args.eval_compositions, 300),
                "unseen_families": exercises.generate(args.eval_unseen, 400, held_out=True, wide=True)}
        counts = {"wide_train": len(kept), "wide_train_chars": sum(len(e.text) for e in kept)}
        for name, tasks in sets.items():
            ok, rejected = exercises.verify(tasks)
            if rejected:
                raise RuntimeError(f"{name}: {len(rejected)} reference solutions fail in the sandbox: {rejected[0]}")
            exercises.save_jsonl(ok, folder / EVAL_SETS[name][0])
            counts[name] = len(ok)
        runtime.write_json(folder / "counts.json", counts)
    cached(folder / "settings.json", settings, make, folder / "counts.json")
    return folder


def stage2_corpus(args, out, curated, exercise_dir, stage1_corpus, kind):
    """The stage-2 corpus of an arm (OUT/stage2/, reused while its settings match): --exercise_share of the
    characters from the exercises of `kind` (wide or narrow), the rest replay of the arm's stage-1 corpus
    (its paragraphs), mixed by curation.mix to the stage's tokens (finetune_iters x batch_size x block_size
    characters, 64 blocks at least), so that each wide exercise is read about once and the narrow ones many
    times."""
    from experiments.phi import curation
    path = out / "stage2" / f"{Path(stage1_corpus).stem}-{kind}-x{args.exercise_share:g}-{args.finetune_iters}.txt"
    total = max(args.finetune_iters * args.batch_size, 64) * args.block_size  # 64 blocks at least: a val split
    settings = {"stage1": stage1_corpus, "kind": kind, "share": args.exercise_share, "total": total,
                "exercises": json.loads((exercise_dir / "settings.json").read_text())}

    def make():
        ex = (exercise_dir / f"{kind}_train.txt").read_text().split("\n\n")
        replay = [t for t in curated.path(stage1_corpus).read_text().split("\n\n") if t.strip()]
        text, stats = curation.mix({"exercises": (ex, args.exercise_share), "replay": (replay, 1 - args.exercise_share)},
                                   total, seed=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        runtime.atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        runtime.write_json(path.with_suffix(".json"), stats)
    cached(path.with_suffix(".settings.json"), settings, make, path)
    return path


def run(args):
    """The Phi recipe at small scale (Gunasekar et al. 2023): the curated data (curation.build: pool, dedup,
    rubric, classifier, Moore-Lewis, exercises), the wide exercises and held-out sets (exercise_sets), then the
    arms of PHI_ARMS of one small phi.py at the same token budget, --seeds seeds each: stage 1 on the filtered
    or unfiltered pool, stage 2 on exercises mixed with replay of that pool; phi_evaluate's measures, and the
    stage-1 models' losses (forgetting = the change over stage 2). Writes OUT/summary-*.json and --results
    (with the README's table). Runs are cached by settings."""
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in PHI_ARMS for a in arms):
        raise UserError(f"--arms {args.arms!r}: choose from {', '.join(PHI_ARMS)}")
    if not 0 < args.exercise_share < 1:
        raise UserError(f"--exercise_share {args.exercise_share}: give a fraction between 0 and 1 (exclusive)")
    out, t0 = Path(args.out), time.time()
    curated = curate(args, out)
    longest = max(len(json.loads(line)[key]) for name, key in (("heldout_functions.jsonl", "body"),
                                                               ("heldout_code.jsonl", "text"))
                  for line in curated.path(name).read_text().splitlines())
    if args.block_size < longest:
        raise UserError(f"--block_size {args.block_size}: the held-out code is scored in pieces of up to {longest} "
                        "characters; give at least that")
    exercise_dir = exercise_sets(args, out, curated)
    train_arms(args, arms, out, curated, exercise_dir)
    rows = []
    for seed in range(args.seeds):
        for arm in arms:
            stage1 = out / _stage1_name(arm, seed)
            before = cached_result(stage1 / "losses.json", json.loads((stage1 / "settings.json").read_text()),
                                   lambda: phi_losses(stage1, curated))
            run = out / phi_arm_run(args, arm, seed)
            settings = {**json.loads((run / "settings.json").read_text()), "gen_tokens": args.gen_tokens,
                        "exercises": json.loads((exercise_dir / "settings.json").read_text())}
            print(f"evaluating {run.name} ({format_eta(time.time() - t0)} so far)", flush=True)
            result = cached_result(run / "eval.json", settings,
                                   lambda: phi_evaluate(run, curated, exercise_dir, args.gen_tokens))
            rows.append({"arm": arm, "seed": seed, **result, "forgetting_body": result["body_loss"] - before["body_loss"],
                         "forgetting_code": result["code_loss"] - before["code_loss"],
                         "stage1_body_loss": before["body_loss"], "stage1_code_loss": before["code_loss"]})
    summary = summarize(args, arms, rows, curated.manifest, json.loads((exercise_dir / "counts.json").read_text()))
    summary["elapsed_s"] = round(time.time() - t0, 1)
    path = out / f"summary-{args.pretrain_iters}+{args.finetune_iters}.json"
    runtime.write_json(path, summary, indent=1)
    write_results(args.results, summary, results_table)
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


def _stage1_name(arm, seed):
    return f"{PHI_ARMS[arm][0].split('_')[0]}-stage1-s{seed}"


def train_arms(args, arms, out, curated, exercise_dir):
    """Train every arm and seed: stage 1 from a shared initialisation (one stage-1 run serves every arm with the
    same corpus), then stage 2 on the arm's mix (stage2_corpus); cached by settings; progress with an ETA."""
    plan = []  # (name, seed, init name or stage-1 name, corpus path, iters, lr)
    for seed in range(args.seeds):
        for arm in arms:
            first, kind = PHI_ARMS[arm]
            stage1 = _stage1_name(arm, seed)
            if (stage1, seed) not in [(p[0], p[1]) for p in plan]:
                plan.append((stage1, seed, f"init-s{seed}", curated.path(first), args.pretrain_iters, args.learning_rate))
            corpus = stage2_corpus(args, out, curated, exercise_dir, first, kind)
            plan.append((phi_arm_run(args, arm, seed), seed, stage1, corpus, args.finetune_iters, args.finetune_lr))
    total_steps, done_steps, t_train = sum(p[4] for p in plan), 0, time.time()
    for i, (name, seed, parent, corpus, iters, lr) in enumerate(plan):
        init = phi_init(out / parent, seed, args.block_size, **PHI_MODEL) if parent.startswith("init") else out / parent
        _phi_train(args, out / name, init, corpus, iters, lr, seed, f"[{i + 1}/{len(plan)}] {name}",
                   optimizer=args.optimizer)
        done_steps += iters
        elapsed = time.time() - t_train
        print(f"[{i + 1}/{len(plan)} runs] {name} done; {format_eta(elapsed)} so far, ETA "
              f"{format_eta(elapsed / done_steps * (total_steps - done_steps))}", flush=True)


MEASURES = (*(f"{measure}_{name}" for measure in ("pass_at_1", "shape_match") for name in EVAL_SETS),
            "body_loss", "code_loss", "forgetting_body", "forgetting_code")


def summarize(args, arms, rows, manifest, counts):
    """Per arm, the mean, min and max of each of MEASURES over seeds, and the comparisons the README states
    (each a mean difference and whether the seeds' ranges separate); printed, and returned as the summary."""
    tokens = (args.pretrain_iters + args.finetune_iters) * args.batch_size * args.block_size
    print_table(rows, [("arm", "arm", "{}"), ("seed", "seed", "{}"),
                       ("pass_at_1_new_instances", "pass@1 new instances", "{:.3f}"),
                       ("pass_at_1_compositions", "pass@1 compositions", "{:.3f}"),
                       ("pass_at_1_unseen_families", "pass@1 unseen families", "{:.3f}"),
                       ("shape_match_new_instances", "operation right, new", "{:.3f}"),
                       ("shape_match_compositions", "compositions", "{:.3f}"),
                       ("shape_match_unseen_families", "unseen", "{:.3f}"),
                       ("body_loss", "(1) body loss", "{:.4f}"), ("forgetting_body", "vs stage 1", "{:+.4f}"),
                       ("code_loss", "(3) held-out code loss", "{:.4f}"), ("forgetting_code", "vs stage 1", "{:+.4f}")])
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "results", "threads", "stdlib", "out")}
    summary = {"settings": settings, "tokens_per_arm": tokens, "model": PHI_MODEL, "exercises": counts, "arms": {},
               "rows": [{k: v for k, v in r.items() if k not in EVAL_SETS} for r in rows],
               "samples": {r["arm"]: {name: r[name]["samples"][:3] for name in EVAL_SETS} for r in rows if r["seed"] == 0}}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        summary["arms"][arm] = {k: {"mean": statistics.mean(r[k] for r in mine), "min": min(r[k] for r in mine),
                                    "max": max(r[k] for r in mine)} for k in MEASURES}
    a, comparisons = summary["arms"], {}
    for (hi, lo, key) in (("B+wide", "B+narrow", "pass_at_1_new_instances"), ("B+wide", "A+wide", "pass_at_1_new_instances"),
                          ("B+wide", "B+narrow", "shape_match_new_instances"),
                          ("B+wide", "A+wide", "shape_match_new_instances"), ("A+wide", "B+wide", "body_loss")):
        if {hi, lo} <= set(a):
            comparisons[f"{hi} - {lo}: {key}"] = {"difference": a[hi][key]["mean"] - a[lo][key]["mean"],
                                                  "ranges_separate": a[hi][key]["min"] > a[lo][key]["max"]}
    summary["comparisons"] = comparisons
    summary["manifest"] = {k: manifest[k] for k in ("classifier", "selection_precision", "split") if k in manifest}
    for arm, m in a.items():
        print(f"{arm}: " + ", ".join(f"{k} {v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" for k, v in m.items()))
    for key, c in comparisons.items():
        print(f"{key}: {c['difference']:+.4f}, seed ranges separate: {c['ranges_separate']}")
    print(f"tokens per arm: {tokens:,}; exercises: {counts}")
    return summary


def results_table(summary):
    """The README's results table (markdown) of a summary: per arm, pass@1 on the three held-out sets and the
    two losses with their change over stage 2 (mean [min, max] over seeds)."""
    s = summary["settings"]
    cell = lambda m, f: f"{f.format(m['mean'])} [{f.format(m['min'])}, {f.format(m['max'])}]"
    lines = ["| arm | pass@1 new instances | pass@1 compositions | pass@1 unseen families | operation right: new "
             "instances | compositions | unseen families | (1) body loss | change over stage 2 | (3) held-out code "
             "loss | change over stage 2 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, m in summary["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(cell(m[k], f) for k, f in (
            ("pass_at_1_new_instances", "{:.3f}"), ("pass_at_1_compositions", "{:.3f}"),
            ("pass_at_1_unseen_families", "{:.3f}"), ("shape_match_new_instances", "{:.3f}"),
            ("shape_match_compositions", "{:.3f}"), ("shape_match_unseen_families", "{:.3f}"),
            ("body_loss", "{:.3f}"), ("forgetting_body", "{:+.3f}"),
            ("code_loss", "{:.3f}"), ("forgetting_code", "{:+.3f}"))) + " |")
    ex = summary["exercises"]
    return "\n".join(lines) + (
        f"\n\nMean [min, max] over {s['seeds']} seeds; {s['pretrain_iters']} + {s['finetune_iters']} steps "
        f"({summary['tokens_per_arm']:,} characters per arm), stage 2 {s['exercise_share']:.0%} exercises; held-out "
        f"sets of {ex['new_instances']}, {ex['compositions']} and {ex['unseen_families']} exercises; "
        f"{s.get('optimizer', 'adamw')} for the compared model's runs; operation right: the body's tokens equal "
        "the reference's with names, numbers and strings masked (run.code_shape); "
        f"{summary['elapsed_s'] / 60:.1f} min for the command (cached runs reused).")


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.phi)."""
    p = sub.add_parser("phi", help="the Phi recipe (Textbooks Are All You Need) in miniature: curated stdlib code, "
                       "then wide or narrow templated exercises mixed with replay; pass@1 on new instances, "
                       "compositions and unseen families, 3 seeds (trains; cached by settings)")
    p.add_argument("--arms", default=",".join(PHI_ARMS), help="comma-separated from B+wide (filtered code, then wide "
                   "exercises), A+wide (unfiltered code, then wide exercises), B+narrow (filtered code, then the 355 "
                   "narrow exercises: the diversity control)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--pretrain_iters", type=int, default=400, help="stage-1 steps (every arm)")
    p.add_argument("--finetune_iters", type=int, default=300, help="stage-2 steps: exercises mixed with replay of the "
                   "arm's stage-1 corpus")
    p.add_argument("--exercise_share", type=float, default=0.5, help="stage 2: the exercises' share of the characters "
                   "(the rest: replay)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    p.add_argument("--block_size", type=int, default=192, help="characters per sequence")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="stage-1 peak learning rate (cosine to a tenth)")
    p.add_argument("--finetune_lr", type=float, default=2e-3, help="stage-2 peak learning rate (cosine to a tenth)")
    p.add_argument("--keep_fraction", type=float, default=0.3, help="share of the deduplicated functions the "
                   "quality classifier keeps for arm B")
    p.add_argument("--n_label", type=int, default=3000, help="rubric-labelled functions the classifier is fitted on")
    p.add_argument("--ref_iters", type=int, default=250, help="steps of each curation reference model")
    p.add_argument("--embed_tokens", type=int, default=64, help="characters of each function the reference models read")
    p.add_argument("--exercises_per_family", type=int, default=40, help="narrow training exercises drawn per family "
                   "(at most; distinct ones): the diversity control's")
    p.add_argument("--wide_per_family", type=int, default=300, help="wide training exercises per family (distinct)")
    p.add_argument("--eval_instances", type=int, default=6, help="held-out set 1: new wide drawings per training family")
    p.add_argument("--eval_compositions", type=int, default=100, help="held-out set 2: two-step compositions")
    p.add_argument("--eval_unseen", type=int, default=5, help="held-out set 3: wide drawings per unseen family")
    p.add_argument("--gen_tokens", type=int, default=64, help="greedy tokens generated per held-out exercise")
    p.add_argument("--stdlib", default="", help="the pool's folder (empty: this Python's standard library)")
    p.add_argument("--optimizer", default="muon", help="the compared model's stage-1 and stage-2 runs: muon "
                   "(train.py --optimizer muon) or adamw (curation's reference models keep adamw)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="out/phi", help="curated data, exercises, runs, summary-PRETRAIN+FINETUNE.json")
    p.add_argument("--results", default="experiments/phi/results.json", help="the numbers of the run (JSON; the "
                   "README beside it gets its results table); empty: none")
    p.set_defaults(run=run)
    return p
