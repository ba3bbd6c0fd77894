"""Switch Transformer (Fedus et al. 2021) against dense models where parameters, not data, limit the loss: a
small dense model, the same model with 8 experts per layer (same FLOPs per token), and a dense model with as
many parameters as the Switch model in all (the ceiling); val loss against tokens and wall clock over seeds,
the tokens the Switch model needs to reach the dense model's final loss, and ablations (initialisation scale
for both kinds, no balance loss, top-2).

  python bench.py switch            # or: python -m experiments.switch

The write-up, ours beside the paper's: README.md beside this file; the numbers: results.json beside it."""
import statistics
from pathlib import Path

import numpy as np
import torch

from experiments.common import (add_training_run_flags, cached_result, cached_run, comma_list, pyplot,
                                save_figure, write_results)
from omnitron import checkpoints, data, runtime
from omnitron.runtime import UserError, print_table

HERE = Path(__file__).resolve().parent
COMPARISON = ("dense", "switch")  # the arms that train args.seeds seeds; the others train one


def switch_arms(width, n_experts):
    """The arms: name -> models/switch.py Config overrides, for a dense SwiGLU MLP of `width` and `n_experts`
    experts of that width. Every arm takes the run's --init_scale unless it says otherwise."""
    return {
        "dense": {"n_experts": 0, "intermediate_size": width},                  # the baseline
        "switch": {"n_experts": n_experts, "moe_intermediate_size": width},     # top-1, capacity 1.25 / 2.0, alpha 1e-2
        "dense_wide": {"n_experts": 0, "intermediate_size": n_experts * width},  # the ceiling: Switch's total parameters
        "dense_init0.1": {"n_experts": 0, "intermediate_size": width, "init_scale": 0.1},  # Switch's initialisation
        "switch_init0.1": {"n_experts": n_experts, "moe_intermediate_size": width, "init_scale": 0.1},
        "switch_alpha0": {"n_experts": n_experts, "moe_intermediate_size": width, "router_aux_loss_coef": 0.0},
        "switch_top2": {"n_experts": n_experts, "moe_intermediate_size": width, "top_k": 2},  # 2x the expert FLOPs
    }


DEFAULT_ARMS = "dense,switch,dense_wide,dense_init0.1,switch_init0.1"


def model_settings(args, arm):
    """The models/switch.py Config flags of one arm: the shared shape and initialisation, then the arm's own."""
    return {"n_layer": args.n_layer, "n_head": args.n_head, "n_kv_head": args.n_head, "n_embd": args.n_embd,
            "init_scale": args.init_scale, **switch_arms(args.width, args.n_experts)[arm]}


def switch_run(args, arm, seed):
    """Train one arm and seed with train.run into OUT/ARM-sSEED (cached_run). Returns its log.jsonl records."""
    shape = model_settings(args, arm)
    flags = {"max_iters": args.max_iters, "batch_size": args.batch_size, "block_size": args.block_size,
             "learning_rate": args.learning_rate, "warmup_iters": args.warmup_iters,
             "eval_interval": args.eval_interval, "eval_iters": args.eval_iters, **shape}
    return cached_run(Path(args.out) / f"{arm}-s{seed}", {"arm": arm, "seed": seed, **flags}, f"{arm}, seed {seed}",
                      model="switch", seed=seed, log_interval=args.eval_interval, sample_tokens=0, device=args.device,
                      data=args.data, data_dir=args.data_dir, **flags)


@torch.no_grad()
def dropless_gap(folder, dataset, batches, batch_size, block_size):
    """How much the capacity moves a trained run's val loss: the mean loss (nats) over `batches` val batches
    drawn with a fixed seed (the same for every arm) without any capacity (an eval-mode forward without
    targets is dropless in models/switch.py; the cross-entropy taken here) minus the loss of the same batches
    at eval_capacity_factor (an eval-mode forward with targets). 0 for a dense model."""
    model, _ = checkpoints.load(folder)
    model.eval()
    gen, gap = torch.Generator().manual_seed(0), 0.0
    for _ in range(batches):
        x, y = dataset.get_batch("val", batch_size, block_size, gen)
        logits, capacity_loss = model(x, y)
        dropless = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        gap += (dropless - capacity_loss).item()
    return gap / batches


def tokens_to_reach(curve, target):
    """The x at which a curve [(x, loss)] (x: tokens or seconds) first reaches `target`, linearly
    interpolated between evaluations; None if it never does."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def band(values):
    """{mean, min, max, n} of a list of numbers (None left out); None when nothing is left."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)} if values else None


def summarise(rows, curves, clocks):
    """The comparison's numbers from the per-run rows and curves: each arm's band of final val losses (eval
    capacity, and dropless minus capacity on the same batches), wall time and drops; per Switch seed, the tokens and seconds at which it reaches
    the dense arms' mean final loss and their ratios to the dense run's tokens and mean seconds; whether
    dense < switch < dense_wide holds in quality (mean final losses, lower is better)."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by_arm = {arm: [r for r in rows if r["arm"] == arm] for arm in arms}
    summary = {"arms": {arm: {key: band([r[key] for r in rs]) for key in
                              ("final_val_loss", "dropless_minus_capacity", "elapsed_s", "dropped_last", "dropped_mean",
                               "max_expert_load")} | {"tokens": rs[0]["tokens"], "params": rs[0]["params"],
                                                      "active_params": rs[0]["active_params"]}
                        for arm, rs in by_arm.items()}}
    if {"dense", "switch"} <= set(arms):
        target = summary["arms"]["dense"]["final_val_loss"]["mean"]
        dense_tokens, dense_seconds = by_arm["dense"][0]["tokens"], summary["arms"]["dense"]["elapsed_s"]["mean"]
        reach = [tokens_to_reach(curves["switch", r["seed"]], target) for r in by_arm["switch"]]
        reach_s = [tokens_to_reach(clocks["switch", r["seed"]], target) for r in by_arm["switch"]]
        means = {arm: s["final_val_loss"]["mean"] for arm, s in summary["arms"].items()}
        summary["comparison"] = {
            "dense_final": target, "tokens_to_dense_final": reach, "seconds_to_dense_final": reach_s,
            "tokens_ratio": [None if t is None else t / dense_tokens for t in reach],
            "seconds_ratio": [None if t is None else t / dense_seconds for t in reach_s],
            "switch_below_dense": means["switch"] < means["dense"],
            "bands_separate": summary["arms"]["switch"]["final_val_loss"]["max"] < summary["arms"]["dense"]["final_val_loss"]["min"],
            "ordering_dense_switch_wide": (means["dense_wide"] < means["switch"] < means["dense"]) if "dense_wide" in means else None}
    return summary


def run(args):
    """Switch Transformer's claim in miniature, where the dense model is limited by its parameters: dense,
    Switch (the same active parameters, 8 experts per layer) and a dense model of Switch's total parameters,
    the same tokens and initialisation, several seeds; the ablations train one seed each. Writes the runs'
    summary to OUT/summary.json and to --results, and the plot to --plot."""
    if args.threads:
        torch.set_num_threads(args.threads)
    all_arms = switch_arms(args.width, args.n_experts)
    arms = comma_list(args.arms)
    if unknown := [a for a in arms if a not in all_arms]:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(all_arms)}")
    if min(args.seeds, args.n_experts, args.width, args.max_iters, args.eval_interval) < 1:
        raise UserError("--seeds, --n_experts, --width, --max_iters and --eval_interval must be at least 1")
    tokens_per_step = args.batch_size * args.block_size
    runs = {arm: {seed: switch_run(args, arm, seed) for seed in range(args.seeds if arm in COMPARISON else 1)}
            for arm in arms}
    dataset = data.prepare(args.data or None, "char", args.data_dir, quiet=True)
    rows, curves, clocks = [], {}, {}
    for arm, by_seed in runs.items():
        for seed, log in by_seed.items():
            folder = Path(args.out) / f"{arm}-s{seed}"
            evals = [r for r in log if "val_loss" in r]
            curves[arm, seed] = [(r["step"] * tokens_per_step, r["val_loss"]) for r in evals]
            clocks[arm, seed] = [(r["elapsed_s"], r["val_loss"]) for r in evals]
            steps = [r for r in log if "lr" in r]
            dropless = cached_result(folder / "dropless_gap.json", {"batches": args.eval_iters, "run": str(folder),
                                                                    "step": evals[-1]["step"], "seed": seed},
                                     lambda: dropless_gap(folder, dataset, args.eval_iters, args.batch_size,
                                                          args.block_size))
            model, _ = checkpoints.load(folder)
            rows.append({"arm": arm, "seed": seed, "tokens": evals[-1]["step"] * tokens_per_step,
                         "params": model.num_params(False), "active_params": model.num_active_params(False)
                         if hasattr(model, "num_active_params") and model.config.n_experts else model.num_params(False),
                         "final_val_loss": evals[-1]["val_loss"], "dropless_minus_capacity": dropless,
                         "elapsed_s": evals[-1]["elapsed_s"],
                         "dropped_last": steps[-1].get("dropped_fraction") if model.config.n_experts else None,
                         "dropped_mean": statistics.mean(r["dropped_fraction"] for r in steps[len(steps) // 2:])
                         if model.config.n_experts else None,
                         "max_expert_load": steps[-1].get("max_expert_load") if model.config.n_experts else None})
    summary = summarise(rows, curves, clocks)
    summary.update(setup={k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "width", "n_experts",
                                                         "init_scale", "max_iters", "batch_size", "block_size",
                                                         "learning_rate", "warmup_iters", "eval_iters", "seeds")},
                   rows=rows, curves={f"{a}-s{s}": c for (a, s), c in curves.items()},
                   clocks={f"{a}-s{s}": c for (a, s), c in clocks.items()})
    print_table(rows, [("arm", "arm", "{}"), ("seed", "seed", "{}"), ("params", "params", "{:,}"),
                       ("final_val_loss", "val loss", "{:.4f}"), ("dropless_minus_capacity", "dropless - cap.", "{:+.4f}"),
                       ("dropped_mean", "dropped (2nd half)", "{:.2%}"), ("elapsed_s", "wall s", "{:.0f}")])
    for key, value in summary.get("comparison", {}).items():
        print(f"{key}: {value}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runtime.write_json(Path(args.out) / "summary.json", summary, indent=1)
    write_results(args.results, summary, lambda summary: "\n".join(results_table(summary)))
    if args.plot:
        plot_switch(runs, curves, clocks, tokens_per_step, args.plot)
    return summary


def results_table(summary):
    """The README's results table (markdown lines) from a summary: per arm, parameters (total / active),
    tokens, final val loss (mean and seeds' range, at eval capacity), what dropless evaluation changes,
    drops, wall time; then one line: the Switch seeds' token and wall-time ratios to dense's final loss."""
    def loss(b):
        return "" if b is None else f"{b['mean']:.4f}" + (f" ({b['min']:.4f}–{b['max']:.4f})" if b["n"] > 1 else "")

    def pct(b):
        return "" if b is None else f"{b['mean']:.2%}" + (f" (max {b['max']:.2%})" if b["n"] > 1 else "")
    lines = ["| arm | seeds | params (active) | tokens | val loss at eval capacity (seeds' range) | dropless − "
             "capacity | dropped, 2nd half of training | wall s |", "|---|---|---|---|---|---|---|---|"]
    for arm, s in summary["arms"].items():
        gap = s["dropless_minus_capacity"]
        lines.append(f"| {arm} | {s['final_val_loss']['n']} | {s['params']:,} ({s['active_params']:,}) | "
                     f"{s['tokens'] / 1e6:.2f}M | {loss(s['final_val_loss'])} | {gap['mean']:+.4f} | "
                     f"{pct(s['dropped_mean'])} | {s['elapsed_s']['mean']:.0f} |")
    if c := summary.get("comparison"):
        ratios = lambda xs: ", ".join("never" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
        lines += ["", f"Switch reaches dense's mean final val loss ({c['dense_final']:.4f}) at {ratios(c['tokens_ratio'])}"
                  f" × dense's tokens and {ratios(c['seconds_ratio'])} × its wall time (per Switch seed); "
                  f"dense_wide < switch < dense: {c['ordering_dense_switch_wide']}; the seeds' bands of switch "
                  f"and dense separate: {c['bands_separate']}."]
    return lines


def plot_switch(runs, curves, clocks, tokens_per_step, path):
    """Val loss against tokens and against wall-clock seconds (each arm's seeds: mean line, min-max band),
    and the largest expert load against tokens (one seed per arm)."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        style = "-" if arm in (*COMPARISON, "dense_wide") else "--"
        losses = np.array([[l for _, l in curves[arm, s]] for s in seeds])
        tokens = [t / 1e6 for t, _ in curves[arm, seeds[0]]]
        line, = ax.plot(tokens, losses.mean(0), style, label=f"{arm} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
        ax.fill_between(tokens, losses.min(0), losses.max(0), alpha=0.2, color=line.get_color())
        seconds = np.array([[t for t, _ in clocks[arm, s]] for s in seeds]).mean(0)
        ax1.plot(seconds, losses.mean(0), style, color=line.get_color(), label=arm)
        loads = [(r["step"] * tokens_per_step / 1e6, r["max_expert_load"]) for r in by_seed[seeds[0]]
                 if "max_expert_load" in r]
        if loads:
            ax2.plot(*zip(*loads), style, label=arm, color=line.get_color())
    finals = [c[-1][1] for c in curves.values()]
    for a in (ax, ax1):
        a.set_ylim(min(finals) - 0.05, min(finals) + 0.6)
    ax.set(xlabel="training tokens (millions)", ylabel="val loss (nats per char)", title="val loss against tokens")
    ax1.set(xlabel="wall-clock seconds (mean over seeds)", title="val loss against wall clock")
    ax.legend(fontsize=8)
    ax2.set(xlabel="training tokens (millions)", ylabel="E * largest expert share (1: balanced)", title="expert load")
    if ax2.lines:
        ax2.legend(fontsize=8)
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.switch)."""
    p = sub.add_parser("switch", help="Switch Transformer vs dense where parameters limit the loss: dense, Switch "
                       "(same active parameters), dense of Switch's total parameters; val loss against tokens and "
                       "wall clock over seeds, tokens to reach the dense model's loss, ablations (trains; cached)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated from "
                   f"{', '.join(switch_arms(1, 1))}")
    p.add_argument("--seeds", type=int, default=3, help="seeds of dense and switch (the other arms: one)")
    p.add_argument("--n_layer", type=int, default=2, help="layers of every arm")
    p.add_argument("--n_head", type=int, default=4, help="attention heads of every arm")
    p.add_argument("--n_embd", type=int, default=48, help="width of every arm")
    p.add_argument("--width", type=int, default=192, help="the dense SwiGLU MLP's width, and each expert's")
    p.add_argument("--n_experts", type=int, default=8, help="experts per Switch layer (dense_wide: this many "
                   "times --width)")
    p.add_argument("--init_scale", type=float, default=1.0, help="initialisation scale of every arm but the "
                   "*_init0.1 ablations (Switch's is 0.1)")
    p.add_argument("--max_iters", type=int, default=1000, help="steps per run")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    p.add_argument("--block_size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate (cosine to a tenth)")
    p.add_argument("--warmup_iters", type=int, default=50, help="warmup steps")
    p.add_argument("--eval_interval", type=int, default=50, help="steps between val-loss evaluations")
    p.add_argument("--eval_iters", type=int, default=10, help="batches per evaluation")
    p.add_argument("--results", default=str(HERE / "results.json"), help="where the numbers go for the README "
                   "(empty: only OUT/summary.json)")
    add_training_run_flags(p, "out/switch", "the runs' folders and summary.json", str(HERE / "switch_cpu.png"))
    p.set_defaults(run=run, threads=1)
    return p
