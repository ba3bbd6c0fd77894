"""In-context learning (Brown et al. 2020, GPT-3's Figure 1.2) in miniature: GPT models of three sizes
trained on the corpus mixed with task episodes, exact match against K shots.

  python bench.py icl               # or: python -m experiments.icl

The write-up, ours beside the paper's: README.md beside this file."""
import random
import time
from pathlib import Path

import torch

import train
from experiments.common import comma_list, layer_width_pairs, pyplot, save_figure
from omnitron import checkpoints, data, evaluation, runtime
from omnitron.runtime import UserError, format_eta, print_table, resolve_device


def icl_mixture(args, path):
    """The training text of bench.py icl: the corpus's train part (its first 90%) in chunks of about
    1,000 characters, interleaved with task episodes, corpus_fraction of the characters being corpus.
    An episode is one task of --train_tasks (uniformly), K uniform in 0..k_max demonstrations and a
    query from the task's train split, the task's description before them half of the time (GPT-3's
    format: evaluation.fewshot_prompt), then the answer; episodes end with a blank line.
    Test items are never in it (the tasks' splits hold out words). Written temp-then-rename."""
    rng = random.Random(args.seed)
    text = data.read_corpus(data.corpus_files(data.shakespeare_dir(args.data_dir)))[0]
    corpus = text[:int(len(text) * (1 - data.VAL_FRACTION))]
    train_tasks = [evaluation.read_task(evaluation.find_task(name, args.data_dir)) for name in comma_list(args.train_tasks)]
    parts, n_corpus, n_tasks = [], 0, 0
    while n_corpus + n_tasks < args.mixture_chars:
        if n_corpus < args.corpus_fraction * (n_corpus + n_tasks + 1):
            start = rng.randrange(len(corpus) - 1000)
            blank = corpus.find("\n\n", start)  # start at a paragraph when there is one after
            start = blank + 2 if blank >= 0 else start
            chunk = corpus[start:start + 1000].rsplit("\n", 1)[0] + "\n\n"
            n_corpus += len(chunk)
            parts.append(chunk)
        else:
            task = rng.choice(train_tasks)
            query, k = rng.choice(task.train), rng.randint(0, args.k_max)
            demos = [d for d in rng.sample(task.train, k + 1) if d is not query][:k]
            description = task.description if rng.random() < 0.5 else None
            episode = (evaluation.fewshot_prompt(demos, query["input"], description, task.sep)
                       + evaluation.TARGET_DELIMITER + query["output"] + "\n\n")
            n_tasks += len(episode)
            parts.append(episode)
    body = "".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    runtime.atomic_write(path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
    return n_corpus, n_tasks


def run(args):
    """GPT-3's Figure 1.2 in miniature: models of --sizes trained on the corpus mixed with task
    episodes of 0..k_max demonstrations (icl_mixture), then scored (evaluation.evaluate, exact
    match on held-out items) at every K of --shots, with and without the task description."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    shots, sizes = [int(k) for k in comma_list(args.shots)], layer_width_pairs(args.sizes)
    if max(shots) >= args.k_max:
        raise UserError(f"--k_max {args.k_max} must be above the largest K evaluated ({max(shots)}), so that the "
                        "answer after the last demonstration was a training target")
    eval_tasks = [evaluation.read_task(evaluation.find_task(n, args.data_dir)) for n in comma_list(args.eval_tasks)]
    mixture = out / "mixture.txt"
    if args.train:
        n_corpus, n_tasks = icl_mixture(args, mixture)
        print(f"training mixture {mixture}: {n_corpus:,} corpus + {n_tasks:,} task characters "
              f"({', '.join(comma_list(args.train_tasks))}; K in 0..{args.k_max})", flush=True)
    rows, t0 = [], time.time()
    for n_layer, n_embd in sizes:
        run = out / f"gpt_{n_layer}x{n_embd}"
        if args.train:
            train.run(model="gpt", data=str(mixture), data_dir=str(args.data_dir), out_dir=str(run), n_layer=n_layer,
                      n_head=args.n_head, n_embd=n_embd, block_size=args.block_size, batch_size=args.batch_size,
                      max_iters=args.max_iters, warmup_iters=args.max_iters // 10, learning_rate=args.learning_rate,
                      dropout=0.0, eval_interval=args.max_iters, eval_iters=5, log_interval=max(args.max_iters // 5, 1),
                      sample_tokens=0, device=device, dtype="float32", seed=args.seed)
        if not (run / "config.json").is_file():
            raise UserError(f"no trained model in {run}: run without --train false first")
        model, tokenizer = checkpoints.load(run, device=device)
        params = model.num_params()
        for task in eval_tasks:
            for described in (True, False):
                for k in shots:
                    for row in evaluation.evaluate(model, tokenizer, task, k, seed=args.seed, limit=args.limit,
                                                   batch_size=args.eval_batch_size, use_description=described):
                        rows.append({**row, "size": f"{n_layer}x{n_embd}", "params_m": params / 1e6})
    elapsed = time.time() - t0
    print_icl(rows, shots)
    meta = {**{k: v for k, v in vars(args).items() if k != "run"}, "elapsed_s": round(elapsed, 1)}
    runtime.write_json(out / "results.json", {"meta": meta, "results": rows}, indent=1)
    print(f"results: {out / 'results.json'}")
    if args.plot:
        plot_icl(rows, shots, args.plot)
    print(f"bench icl: {format_eta(elapsed)} ({elapsed:.0f} s) in all")
    return rows


def print_icl(rows, shots):
    """Per metric, one line per (task, size, description) with its value at every K: exact match
    in % ± standard error, and the reference answers' perplexity."""
    for metric, title, fmt in (("exact_match", "exact match (%) on held-out items, ± standard error",
                                lambda r: f"{100 * r['value']:.0f} ±{100 * (r['stderr'] or 0):.0f}"),
                               ("perplexity", "perplexity of the reference answers (lm-eval's lambada metric)",
                                lambda r: f"{r['value']:.3g}")):
        table = {}
        for r in (r for r in rows if r["metric"] == metric):
            key = (r["task"], r["size"], r["description"])
            table.setdefault(key, {"task": r["task"], "size": r["size"], "params": r["params_m"],
                                   "description": "yes" if r["description"] else "no", "n": r["n"]})
            table[key][f"k{r['shots']}"] = fmt(r)
        if table:
            columns = [("task", "task", "{}"), ("size", "layers x width", "{}"), ("params", "params (M)", "{:.2f}"),
                       ("description", "description", "{}")] + [(f"k{k}", f"K={k}", "{}") for k in shots]
            print(title)
            print_table(list(table.values()), columns + [("n", "n", "{}")])


def plot_icl(rows, shots, path):
    """Exact match (top) and the answers' perplexity (bottom, log scale) against K (symlog axis:
    K = 0 shown), per task and size: solid with the description, dashed without."""
    plt = pyplot()
    if plt is None:
        return
    names = list(dict.fromkeys(r["task"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    metrics = [m for m in ("exact_match", "perplexity") if any(r["metric"] == m for r in rows)]
    fig, axes = plt.subplots(len(metrics), len(names), figsize=(5.5 * len(names), 4 * len(metrics)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row_axes, metric in zip(axes, metrics):
        scale = 100 if metric == "exact_match" else 1
        for ax, name in zip(row_axes, names):
            for c, size in enumerate(sizes):
                for described, style in ((True, "-"), (False, "--")):
                    mine = sorted((r for r in rows if r["task"] == name and r["size"] == size and r["metric"] == metric
                                   and r["description"] == described), key=lambda r: r["shots"])
                    if mine:
                        ax.plot([r["shots"] for r in mine], [scale * r["value"] for r in mine], style, marker="o",
                                color=colors[c % len(colors)],
                                label=f"{size} ({mine[0]['params_m']:.2f}M){'' if described else ', no description'}")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(shots, [str(k) for k in shots])
            ax.minorticks_off()
            if metric == "exact_match":
                ax.set(ylabel="exact match (%)", ylim=(-2, 102))
            else:
                ax.set(ylabel="perplexity of the answer", yscale="log")
            ax.set(xlabel="number of examples in context (K)", title=f"{name}: {metric}")
            ax.legend(fontsize=7)
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.icl)."""
    p = sub.add_parser("icl", help="in-context learning (GPT-3's Figure 1.2 in miniature): models of 3 sizes trained "
                       "on the corpus mixed with task episodes, exact match against K shots, with and without "
                       "the task description")
    p.add_argument("--sizes", default="2x64,3x96,4x128", help="GPT models to train, n_layer x n_embd, comma-separated")
    p.add_argument("--n_head", type=int, default=4, help="attention heads of every size")
    p.add_argument("--train_tasks", default="cycle_letters,anagrams1,random_insertion,reversed_words",
                   help="tasks of the training episodes (tasks.NAMES or .jsonl files)")
    p.add_argument("--eval_tasks", default="reversed_words,random_insertion", help="tasks scored (held-out items)")
    p.add_argument("--shots", default="0,1,2,4,8,16", help="the K evaluated, comma-separated")
    p.add_argument("--k_max", type=int, default=20, help="training episodes have 0..k_max demonstrations")
    p.add_argument("--corpus_fraction", type=float, default=0.25, help="share of corpus characters in the mixture")
    p.add_argument("--mixture_chars", type=int, default=3_000_000, help="characters of training text")
    p.add_argument("--block_size", type=int, default=384, help="tokens (characters) per training sequence and context")
    p.add_argument("--batch_size", type=int, default=16, help="training sequences per step")
    p.add_argument("--max_iters", type=int, default=400, help="training steps of every size")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--limit", type=int, default=80, help="test items per task and K")
    p.add_argument("--eval_batch_size", type=int, default=50, help="items per evaluation batch")
    p.add_argument("--train", type=runtime.str2bool, default=True, help="train (false: evaluate the runs already "
                   "in --out_dir)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the mixture, training and demonstrations")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data_dir", default=str(data.DEFAULT_DATA_DIR), help="where the corpus and data/tasks/ live")
    p.add_argument("--out_dir", default="out/icl", help="runs, the mixture and results.json")
    p.add_argument("--plot", default="out/icl/icl.png", help="PNG plot path (empty: none)")
    runtime.add_device_flags(p, dtype=False, attn=False)
    p.set_defaults(run=run)
    return p

