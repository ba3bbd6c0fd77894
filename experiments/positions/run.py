"""Positions (Vaswani et al. 2017, RoFormer, NoPE) and RoPE's extensions (position interpolation, NTK-aware,
YaRN): val loss by position up to eval_factor x the training length, at evaluation and after a short fine-tune.

  python bench.py positions         # or: python -m experiments.positions

The write-up, ours beside the papers': README.md beside this file."""
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from experiments.common import add_training_run_flags, cached_result, cached_run, is_cached, pyplot, save_figure
from omnitron import data, models, runtime, tokenization
from omnitron.runtime import UserError, format_eta, print_table, resolve_device

POSITION_METHODS = ("learned", "sinusoidal", "rope", "none")  # models/gpt.py Config.pos


# RoPE extended to eval_factor x the training length: what `rope+NAME` changes in the trained rope model's
# Config (the formulas: models/gpt.py rope_frequencies). s: eval_factor.
ROPE_EXTENSIONS = {
    "linear": lambda s: dict(rope_type="linear", rope_factor=s),  # position interpolation (Chen et al. 2023)
    # NTK-aware (bloc97 2023) as transformers' dynamic rule with factor 1: base * (T / L)^(d / (d - 2)) for a
    # sequence of T > L tokens, recomputed for each length (Qwen's and Code Llama's practice)
    "dynamic": lambda s: dict(rope_type="dynamic", rope_factor=1.0),
    "yarn": lambda s: dict(rope_type="yarn", rope_factor=s),      # YaRN (Peng et al. 2023), beta 32 / 1
}


POSITION_LABELS = {"learned": "learned (GPT-2)", "sinusoidal": "sinusoidal", "rope": "RoPE", "none": "NoPE",
                   "rope+linear": "RoPE + PI (linear)", "rope+dynamic": "RoPE + NTK-aware (dynamic)",
                   "rope+yarn": "RoPE + YaRN", "rope+ft": "RoPE, fine-tuned long",
                   "rope+linear+ft": "RoPE + PI, fine-tuned long", "rope+yarn+ft": "RoPE + YaRN, fine-tuned long"}


def val_windows(dataset, length, n):
    """n windows of the val split, evenly spaced from its start (the same for every model): inputs and
    targets, int64 (n, length). UserError when the split is shorter than length + 1 tokens."""
    val = dataset.tokens("val")
    if len(val) < length + 1:
        raise UserError(f"the val split has {len(val)} tokens, fewer than {length + 1}: use a longer corpus "
                        "or a smaller --block_size / --eval_factor")
    starts = np.linspace(0, len(val) - length - 1, n).astype(np.int64)
    xy = torch.from_numpy(np.stack([val[i:i + length + 1] for i in starts]).astype(np.int64))
    return xy[:, :-1], xy[:, 1:]


@torch.no_grad()
def position_losses(model, x, y, batch_size=8):
    """The mean next-token loss (nats) at each position of windows x, y (n, T) of token ids: float64 (T,),
    entry t the mean over the n windows of -log p(y[:, t] | x[:, :t+1]), from one forward per batch of
    windows over the whole length (so a position's context is every token before it in its window)."""
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        logits, _ = model(x[i:i + batch_size].to(device))
        nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), y[i:i + batch_size].to(device),
                                          reduction="none")
        total += nll.double().sum(0).cpu()
    return total / len(x)


def bucket_means(losses, edges):
    """The mean of per-position losses over each bucket [edges[i], edges[i+1]); None for a bucket past
    the end of `losses` (a learned table shorter than the bucket)."""
    return [losses[a:b].mean().item() if len(losses) >= b else None for a, b in zip(edges, edges[1:])]


def unigram_entropy(dataset):
    """Entropy (nats) of the train split's token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(dataset.tokens("train")), minlength=dataset.tokenizer.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def positions_jobs(args):
    """The runs, seed by seed: (name, seed, folder, settings, train.run flags, None or, for a fine-tune,
    (the rope run's folder, the Config overrides of its extension))."""
    L, T = args.block_size, args.block_size * args.eval_factor
    common = dict(model="gpt", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                  learning_rate=args.learning_rate, eval_iters=args.eval_iters, sample_tokens=0, device=args.device,
                  data=args.data, data_dir=args.data_dir)
    jobs = []
    for seed in range(args.seeds):
        for method in args.methods:
            flags = dict(common, pos=method, seed=seed, max_iters=args.max_iters, batch_size=args.batch_size,
                         block_size=L, warmup_iters=args.warmup_iters, eval_interval=args.max_iters,
                         log_interval=max(1, args.max_iters // 5))
            settings = {k: v for k, v in flags.items() if k not in ("device", "data_dir", "sample_tokens")}
            jobs.append((method, seed, Path(args.out) / f"{method}-s{seed}", settings, flags, None))
        base = next((j for j in jobs if j[:2] == ("rope", seed)), None)
        for ext in args.finetune if args.finetune_iters and base else ():  # after the seed's rope run
            name = "rope+ft" if ext == "none" else f"rope+{ext}+ft"
            overrides = {} if ext == "none" else ROPE_EXTENSIONS[ext](args.eval_factor)
            # the same tokens per step as pretraining, in sequences of T
            flags = dict(common, seed=seed, max_iters=args.finetune_iters, batch_size=max(1, args.batch_size * L // T),
                         block_size=T, learning_rate=args.finetune_lr, warmup_iters=max(1, args.finetune_iters // 10),
                         eval_interval=args.finetune_iters, log_interval=max(1, args.finetune_iters // 5))
            for k in ("n_layer", "n_head", "n_embd"):  # the loaded model keeps its config.json
                del flags[k]
            settings = {"base": base[3], "rope": overrides, **{k: v for k, v in flags.items()
                                                               if k not in ("device", "data_dir", "sample_tokens")}}
            jobs.append((name, seed, Path(args.out) / f"{name}-s{seed}", settings, flags, (base[2], overrides)))
    return jobs


def positions_train(args, jobs):
    """Train (or reuse: cached_run) every job, printing the overall progress and ETA (from the seconds
    per step of the runs trained so far in this call, fine-tuning steps weighted by their length)."""
    L, T = args.block_size, args.block_size * args.eval_factor
    cost = lambda job: job[4]["max_iters"] * job[4]["batch_size"] * job[4]["block_size"] * (  # ~ attention's share
        1.0 if job[4]["block_size"] == L else 1.0 + 0.5 * (T / L - 1))
    def cached(job):
        return is_cached(job[2] / "settings.json", job[3])
    seconds, done_cost = 0.0, 0.0
    for i, job in enumerate(jobs):
        name, seed, out, settings, flags, base = job
        if not cached(job):
            left = sum(cost(j) for j in jobs[i:] if not cached(j))
            print(f"[{i + 1}/{len(jobs)}] {name}, seed {seed}; ETA of the training left: "
                  f"{format_eta(seconds / done_cost * left) if done_cost else 'after the first run'}", flush=True)
        if base is not None:  # start from the trained rope model, the extension written into its config.json
            source, overrides = base
            init = out / "init"
            if not cached(job):
                model = models.from_pretrained(source)
                model.config = dataclasses.replace(model.config, **overrides)
                model.save_pretrained(init)
                tokenization.tokenizer_for_model(source, model.config.vocab_size).save(init)
            flags = dict(flags, init_from=str(init))
        if cached(job):
            cached_run(out, settings, f"{name}, seed {seed}", **flags)
            continue
        started = time.time()
        cached_run(out, settings, f"{name}, seed {seed}", **flags)
        seconds, done_cost = seconds + time.time() - started, done_cost + cost(job)


def positions_curves(args, jobs, x, y, device):
    """Per-position val losses of every trained model and evaluated variant: {(name, seed): float64 (T,)}
    (a learned table: its first max_positions positions). Cached in each run folder against the run's
    settings and the windows."""
    curves = {}
    key = {"windows": len(x), "length": x.shape[1], "first": x[0, :16].tolist()}
    for name, seed, out, settings, _, _ in jobs:
        def losses_by_variant():
            model = models.from_pretrained(out).to(device)
            limit = model.max_positions or x.shape[1]  # learned: no position past its table
            variants = {name: {}}
            if name == "rope":
                variants.update({f"rope+{ext}": fn(args.eval_factor) for ext, fn in ROPE_EXTENSIONS.items()})
            losses, trained = {}, model.config
            for variant, overrides in variants.items():
                model.config = dataclasses.replace(trained, **overrides)
                losses[variant] = position_losses(model, x[:, :limit], y[:, :limit]).tolist()
            return losses
        stored = cached_result(out / "position_losses.json", {**key, "run": settings}, losses_by_variant)
        for variant, losses in stored.items():
            curves[variant, seed] = torch.tensor(losses, dtype=torch.float64)
    return curves


def run(args):
    """RoFormer's point and what came after, in miniature: the same small GPT trained at block_size L
    with learned, sinusoidal, rotary and no positions (several seeds), then the val loss at each
    position up to eval_factor * L; RoPE extended without training (linear interpolation, NTK-aware
    dynamic, YaRN) and after a short fine-tune at the longer length."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.methods = [m for m in args.methods.split(",") if m]
    args.finetune = [m for m in args.finetune.split(",") if m]
    if unknown := [m for m in args.methods if m not in POSITION_METHODS]:
        raise UserError(f"unknown position method(s) {', '.join(unknown)}; methods: {', '.join(POSITION_METHODS)}")
    if unknown := [m for m in args.finetune if m not in ("none", *ROPE_EXTENSIONS)]:
        raise UserError(f"unknown --finetune extension(s) {', '.join(unknown)}; from: none, {', '.join(ROPE_EXTENSIONS)}")
    if args.eval_factor < 1 or args.bucket < 1 or args.seeds < 1 or args.eval_windows < 1:
        raise UserError("--eval_factor, --bucket, --seeds and --eval_windows must be at least 1")
    L, T = args.block_size, args.block_size * args.eval_factor
    jobs = positions_jobs(args)
    positions_train(args, jobs)
    dataset = data.prepare(args.data or None, "char", args.data_dir, quiet=True)
    x, y = val_windows(dataset, T, args.eval_windows)
    device = resolve_device(args.device)
    curves = positions_curves(args, jobs, x, y, device)
    edges = [0] + [L * 2 ** i for i in range(T.bit_length()) if L * 2 ** i < T] + [T]  # 0, L, 2L, 4L, ..., T
    names = list(dict.fromkeys(name for name, _ in curves))
    rows = []
    for name in names:
        seeds = sorted(s for n, s in curves if n == name)
        per_seed = np.array([[np.nan if v is None else v for v in bucket_means(curves[name, s], edges)] for s in seeds])
        row = {"method": name, "label": POSITION_LABELS[name], "seeds": len(seeds),
               "buckets": [None if np.isnan(c).any() else {"mean": float(c.mean()), "min": float(c.min()),
                                                           "max": float(c.max())} for c in per_seed.T]}
        for (a, b), bucket in zip(zip(edges, edges[1:]), row["buckets"]):
            row[f"{a}-{b}"] = None if bucket is None else (
                f"{bucket['mean']:.3f} ±{(bucket['max'] - bucket['min']) / 2:.3f}")
        rows.append(row)
    unigram = unigram_entropy(dataset)
    columns = [("label", "method", "{}"), ("seeds", "seeds", "{}")] + [
        (f"{a}-{b}", f"pos {a}-{b - 1} ({b // L}x)", "{}") for a, b in zip(edges, edges[1:])]
    print(f"val loss (nats per char) by position bucket, mean ±half the seeds' range; trained at {L} tokens, "
          f"evaluated on {len(x)} windows of {T}; '-': past the learned table. Unigram entropy {unigram:.3f}.")
    print_table(rows, columns)
    summary = {"block_size": L, "eval_length": T, "eval_windows": len(x), "edges": edges, "unigram_entropy": unigram,
               "rows": [{k: v for k, v in r.items() if k in ("method", "label", "seeds", "buckets")} for r in rows],
               "curves": {f"{n}-s{s}": c.tolist() for (n, s), c in curves.items()}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runtime.write_json(Path(args.out) / "summary.json", summary)
    if args.plot:
        plot_positions(curves, names, L, T, args.bucket, unigram, args.plot)
    return summary


def plot_positions(curves, names, L, T, bucket, unigram, path):
    """Val loss against position (means over buckets of `bucket` positions; line: the seeds' mean, band:
    their range): the four position methods on the left, RoPE and its extensions on the right."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, group in zip(axes, ([n for n in names if n in POSITION_METHODS],
                                [n for n in names if n.startswith("rope")])):
        for name in group:
            seeds = sorted(s for n, s in curves if n == name)
            length = len(curves[name, seeds[0]]) // bucket * bucket
            binned = np.array([curves[name, s][:length].view(-1, bucket).mean(-1).numpy() for s in seeds])
            centres = np.arange(length // bucket) * bucket + bucket / 2
            style = "--" if name in ("rope+linear", "rope+dynamic", "rope+yarn") else "-"
            line, = ax.plot(centres, binned.mean(0), style, label=f"{POSITION_LABELS[name]} ({len(seeds)} seeds)")
            ax.fill_between(centres, binned.min(0), binned.max(0), alpha=0.2, color=line.get_color())
            if length < T:
                ax.plot([length], [binned.mean(0)[-1]], "x", color=line.get_color(), markersize=9)
        ax.axvline(L, color="gray", linewidth=0.8)
        ax.axhline(unigram, color="gray", linestyle=":", linewidth=0.8)
        ax.set(xlabel=f"position in the sequence (training length {L})", xlim=(0, T))
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.87))  # under PI's line
    axes[0].set(ylabel="val loss (nats per char)", title="position methods (x: the learned table ends)")
    axes[1].set(title="RoPE past its training length: dashed, at evaluation only")
    top = max(np.nanmax([c.mean().item() for c in curves.values()]), unigram) + 0.3
    axes[0].set_ylim(min(c.min().item() for c in curves.values()) - 0.1, min(top, unigram + 1.5))
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.positions)."""
    p = sub.add_parser("positions", help="learned vs sinusoidal vs RoPE vs no positions: val loss by position up to "
                       "eval_factor x the training length; RoPE with PI, NTK-aware and YaRN, at evaluation and "
                       "after a short fine-tune (trains; cached by settings)")
    p.add_argument("--methods", default=",".join(POSITION_METHODS), help="comma-separated from "
                   f"{', '.join(POSITION_METHODS)} (models/gpt.py --pos; none: NoPE)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method")
    p.add_argument("--max_iters", type=int, default=600, help="training steps per run")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    p.add_argument("--block_size", type=int, default=256, help="training length L")
    p.add_argument("--n_layer", type=int, default=4, help="the GPT's layers")
    p.add_argument("--n_head", type=int, default=4, help="the GPT's heads")
    p.add_argument("--n_embd", type=int, default=128, help="the GPT's width")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup_iters", type=int, default=30, help="warmup steps")
    p.add_argument("--eval_iters", type=int, default=10, help="batches of train.py's own final evaluation")
    p.add_argument("--eval_factor", type=int, default=4, help="evaluate up to this many times L (the extensions' s)")
    p.add_argument("--eval_windows", type=int, default=64, help="val windows of eval_factor * L tokens")
    p.add_argument("--bucket", type=int, default=32, help="positions per point of the plot")
    p.add_argument("--finetune", default="none,linear,yarn", help="RoPE fine-tuned at eval_factor * L, comma-separated "
                   f"from none (plain RoPE: PI's direct fine-tuning baseline), {', '.join(ROPE_EXTENSIONS)}")
    p.add_argument("--finetune_iters", type=int, default=50, help="fine-tuning steps (0: none)")
    p.add_argument("--finetune_lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    add_training_run_flags(p, "out/positions", "the runs' folders and summary.json", "out/positions.png")
    p.set_defaults(run=run)
    return p

