"""Switch Transformer (Fedus et al. 2021) against a dense model at equal FLOPs per token: val loss against
tokens over seeds, the tokens each needs to reach the dense model's final loss, and ablations.

  python bench.py switch            # or: python -m experiments.switch

The write-up, ours beside the paper's: README.md beside this file."""
import statistics
from pathlib import Path

import numpy as np
import torch

import train
from experiments.common import add_training_run_flags, cached_run, pyplot, save_figure
from omnitron import runtime
from omnitron.runtime import UserError, print_table

SWITCH_ARMS = {  # name -> models/switch.py Config overrides; the first two are the comparison, the rest ablations
    "dense": {"n_experts": 0},            # every layer a SwiGLU MLP of width intermediate_size (512)
    "switch": {},                         # 8 experts of width 512, top-1, capacity 1.25 / 2.0, alpha 1e-2, init 0.1
    "switch_alpha0": {"router_aux_loss_coef": 0.0},  # no load-balancing loss
    "switch_init1": {"init_scale": 1.0},  # the usual initialisation scale instead of Switch's 0.1
    "switch_top2": {"top_k": 2},          # two experts per token (twice the expert FLOPs)
    "switch_baseline": {},                # switch again, for the ablations to compare with (their length)
}


def switch_run(args, arm, seed):
    """Train one arm and seed with train.run into OUT/ARM-sSEED (cached_run). Returns its log.jsonl records."""
    steps = args.max_iters if arm in ("dense", "switch") or not args.ablation_iters else args.ablation_iters
    settings = {"arm": arm, "seed": seed, "max_iters": steps, "batch_size": args.batch_size,
                "block_size": args.block_size, "eval_interval": args.eval_interval, "eval_iters": args.eval_iters,
                **SWITCH_ARMS[arm]}
    return cached_run(Path(args.out) / f"{arm}-s{seed}", settings, f"{arm}, seed {seed}", model="switch", seed=seed,
                      max_iters=steps, batch_size=args.batch_size, block_size=args.block_size, eval_interval=args.eval_interval,
                      eval_iters=args.eval_iters, log_interval=args.eval_interval, sample_tokens=0, device=args.device,
                      data=args.data, data_dir=args.data_dir, **SWITCH_ARMS[arm])


def tokens_to_reach(curve, target):
    """The tokens at which a val-loss curve [(tokens, loss)] first reaches target, linearly
    interpolated between evaluations; None if it never does."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def run(args):
    """Switch Transformer's claim in miniature: at equal FLOPs per token, a model with 8 experts per
    layer (8x the MLP parameters) against the dense model, same tokens, several seeds; ablations
    without the balance loss, with initialisation scale 1.0, with top-2 routing."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens_per_step = args.batch_size * args.block_size
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in SWITCH_ARMS]:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(SWITCH_ARMS)}")
    runs = {arm: {seed: switch_run(args, arm, seed) for seed in range(args.seeds if arm in ("dense", "switch") else 1)}
            for arm in arms}
    rows, curves = [], {}
    for arm, by_seed in runs.items():
        for seed, log in by_seed.items():
            vals = [(r["step"] * tokens_per_step, r["val_loss"]) for r in log if "val_loss" in r]
            train_lines = [r for r in log if "train_loss" in r and "lr" in r]
            last = train_lines[-1]
            curves[arm, seed] = vals
            rows.append({"arm": arm, "seed": seed, "final_val_loss": round(vals[-1][1], 4),
                         "elapsed_s": round(last["elapsed_s"], 1),
                         "dropped_fraction": round(last.get("dropped_fraction", 0.0), 4),
                         "max_expert_load": round(last.get("max_expert_load", 1.0), 2),
                         "tokens": vals[-1][0]})
    summary = {"rows": rows}
    if {"dense", "switch"} <= set(arms):
        dense = [r["final_val_loss"] for r in rows if r["arm"] == "dense"]
        target = statistics.mean(dense)
        reach = [tokens_to_reach(curves["switch", s], target) for s in runs["switch"]]
        switch = [r["final_val_loss"] for r in rows if r["arm"] == "switch"]
        wall = statistics.mean(r["elapsed_s"] for r in rows if r["arm"] == "switch") / statistics.mean(
            r["elapsed_s"] for r in rows if r["arm"] == "dense")
        summary.update(dense_final=target, dense_band=[min(dense), max(dense)], switch_band=[min(switch), max(switch)],
                       bands_overlap=max(switch) >= min(dense), wall_clock_ratio=round(wall, 3),
                       tokens_to_dense_final=[None if t is None else round(t) for t in reach],
                       tokens_ratio=[None if t is None else round(t / next(r["tokens"] for r in rows if r["arm"] == "dense"), 3)
                                     for t in reach])
    print_table(rows, [("arm", "arm", "{}"), ("seed", "seed", "{}"), ("final_val_loss", "final val loss", "{:.4f}"),
                       ("dropped_fraction", "dropped (train)", "{:.2%}"), ("max_expert_load", "max load", "{:.2f}"),
                       ("elapsed_s", "wall s", "{:.0f}")])
    for key in ("dense_final", "dense_band", "switch_band", "bands_overlap", "tokens_ratio", "wall_clock_ratio"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runtime.write_json(Path(args.out) / "summary.json", summary, indent=1)
    if args.plot:
        plot_switch(runs, curves, tokens_per_step, args.plot)
    return summary


def plot_switch(runs, curves, tokens_per_step, path):
    """Val loss against tokens (each arm's seeds: mean line, min-max band) and the largest expert load
    against tokens (one seed per arm)."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        tokens = [t / 1e6 for t, _ in curves[arm, seeds[0]]]
        losses = np.array([[l for _, l in curves[arm, s]] for s in seeds])
        line, = ax.plot(tokens, losses.mean(0), label=f"{arm} ({len(seeds)} seed{'s' * (len(seeds) > 1)})",
                        linestyle="-" if arm in ("dense", "switch") else "--")
        ax.fill_between(tokens, losses.min(0), losses.max(0), alpha=0.2, color=line.get_color())
        loads = [(r["step"] * tokens_per_step / 1e6, r["max_expert_load"]) for r in by_seed[seeds[0]]
                 if "max_expert_load" in r]
        if loads:
            ax2.plot(*zip(*loads), label=arm, color=line.get_color())
    ax.set(xlabel="training tokens (millions)", ylabel="val loss (nats per char)", title="Switch vs dense, equal FLOPs per token")
    ax.set_ylim(top=min(ax.get_ylim()[1], 2.6))
    ax.legend()
    ax2.set(xlabel="training tokens (millions)", ylabel="E * largest expert share (1: balanced)", title="expert load")
    ax2.legend()
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.switch)."""
    p = sub.add_parser("switch", help="Switch Transformer vs dense at equal FLOPs per token: val loss against "
                       "tokens over seeds, tokens to reach the dense model's loss, ablations (trains; cached by settings)")
    p.add_argument("--arms", default=",".join(SWITCH_ARMS), help=f"comma-separated from {', '.join(SWITCH_ARMS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds of dense and switch (the ablations: one)")
    p.add_argument("--max_iters", type=int, default=train.flag_default("max_iters"), help="steps per run")
    p.add_argument("--ablation_iters", type=int, default=0, help="steps of the ablation runs (0: max_iters)")
    p.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    p.add_argument("--block_size", type=int, default=train.flag_default("block_size"), help="tokens per sequence")
    p.add_argument("--eval_interval", type=int, default=50, help="steps between val-loss evaluations")
    p.add_argument("--eval_iters", type=int, default=10, help="batches per evaluation")
    add_training_run_flags(p, "out/switch", "the runs' folders and summary.json", "out/switch.png")
    p.set_defaults(run=run)
    return p

