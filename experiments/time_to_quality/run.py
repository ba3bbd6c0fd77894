"""Time to quality on tinyshakespeare: nanoGPT's CPU recipe, our config (config/tinyshakespeare_cpu.toml)
and the speedrun's optimizer and schedule (KellerJordan/modded-nanogpt: Muon, the trapezoidal
schedule) alone and together, each arm at the same wall-time budget, over seeds.

  python bench.py time_to_quality   # or: python -m experiments.time_to_quality

Each run's step count is sized to the budget on this machine: a short probe run measures its seconds
per step (evaluations included; --probe_steps), then the run takes as many steps as fit in 90% of the budget, so
its learning-rate schedule ends inside the budget. Reported: the final val loss, the val loss at the
budget (the last evaluation before it), tokens/s and the change against our config, per arm over
seeds. The write-up: README.md beside this file."""
import statistics
import time
from pathlib import Path

from experiments.common import cached_run, comma_list, pyplot, save_figure
from omnitron import data, runtime
from omnitron.runtime import UserError, print_table

CONFIG = Path(__file__).resolve().parents[2] / "config" / "tinyshakespeare_cpu.toml"

ARMS = {  # name -> train.py flags over the config's
    # nanoGPT's README CPU run of config/train_shakespeare_char.py (its flags; our GPT file)
    # (without the config file: every flag given)
    "nanogpt_cpu": dict(model="gpt", data="tinyshakespeare", tokenizer="char", n_layer=4, n_head=4, n_embd=128,
                        block_size=64, batch_size=12, dropout=0.0, bias=False, learning_rate=1e-3, min_lr=1e-4,
                        warmup_iters=100, weight_decay=0.1, beta2=0.99),
    "config": {},
    "muon": dict(optimizer="muon"),
    "trapezoidal": dict(lr_schedule="trapezoidal"),
    "muon_trapezoidal": dict(optimizer="muon", lr_schedule="trapezoidal"),
}


def run_flags(args, arm, seed, **flags):
    """train.run's keyword arguments of an arm: --config's (but for nanogpt_cpu), the arm's flags, flags."""
    config = {} if arm == "nanogpt_cpu" else {"config": args.config}
    return {**config, "seed": seed, "sample_tokens": 0, "device": args.device, "data_dir": args.data_dir,
            **ARMS[arm], **flags}


def seconds_per_step(args, arm, seed):
    """The arm's training seconds per step on this machine, evaluations at the run's rate included: a
    --probe_steps run (cached by settings) timed from its log."""
    flags = run_flags(args, arm, seed, max_iters=args.probe_steps, eval_interval=args.probe_steps,
                      eval_iters=args.eval_iters, log_interval=args.probe_steps)
    log = cached_run(Path(args.out) / f"probe-{arm}", {"probe": arm, **flags}, f"probe {arm}", **flags)
    evals = [r for r in log if "val_loss" in r]
    step_s = (evals[-1]["elapsed_s"] - 2 * evals[0]["elapsed_s"]) / args.probe_steps  # less the two evaluations
    return step_s + evals[0]["elapsed_s"] / args.eval_interval


def train_arm(args, arm, seed):
    """One arm and seed with as many steps as fit in 90% of --budget_s (seconds_per_step). Returns its row."""
    steps = max(10, int(0.9 * args.budget_s / seconds_per_step(args, arm, seed)))
    flags = run_flags(args, arm, seed, max_iters=steps, lr_decay_iters=steps, eval_interval=args.eval_interval,
                      eval_iters=args.eval_iters, log_interval=args.eval_interval)
    log = cached_run(Path(args.out) / f"{arm}-s{seed}", {"arm": arm, "budget_s": args.budget_s, **flags},
                     f"{arm}, seed {seed}, {steps} steps", **flags)
    evals = [r for r in log if "val_loss" in r]
    inside = [r for r in evals if r["elapsed_s"] <= args.budget_s] or evals[:1]
    speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    return {"arm": arm, "seed": seed, "steps": steps, "val_loss": evals[-1]["val_loss"],
            "wall_s": evals[-1]["elapsed_s"], "val_at_budget": inside[-1]["val_loss"],
            "tokens_per_s": statistics.median(speeds) if speeds else None, "curve": [(r["elapsed_s"], r["val_loss"]) for r in evals]}


def run(args):
    """Every arm (--arms) over --seeds at --budget_s each: the table (val loss at the budget, mean and
    spread over seeds, tokens/s, the change against `config`), results.json and the plot."""
    arms = comma_list(args.arms)
    if unknown := [a for a in arms if a not in ARMS]:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARMS)}")
    if args.budget_s <= 0:
        raise UserError(f"--budget_s must be positive, not {args.budget_s}")
    t0, rows = time.time(), []
    for seed in range(args.seeds):
        for arm in arms:
            rows.append(train_arm(args, arm, seed))
            print(f"[{len(rows)}/{len(arms) * args.seeds}] {arm} seed {seed}: val {rows[-1]['val_at_budget']:.4f} "
                  f"at {args.budget_s:.0f} s; {runtime.format_eta(time.time() - t0)} so far", flush=True)
    summary = []
    for arm in arms:
        vals = [r["val_at_budget"] for r in rows if r["arm"] == arm]
        summary.append({"arm": arm, "mean": statistics.mean(vals), "min": min(vals), "max": max(vals),
                        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rows if r["arm"] == arm),
                        "steps": statistics.mean(r["steps"] for r in rows if r["arm"] == arm)})
    base = next((s["mean"] for s in summary if s["arm"] == "config"), None)
    for s in summary:
        s["change"] = None if base is None else s["mean"] - base
    print_table(summary, [("arm", "arm", "{}"), ("mean", f"val at {args.budget_s:.0f} s", "{:.4f}"),
                          ("min", "min", "{:.4f}"), ("max", "max", "{:.4f}"), ("change", "vs config", "{:+.4f}"),
                          ("tokens_per_s", "tokens/s", "{:,.0f}"), ("steps", "steps", "{:.0f}")])
    results = {"budget_s": args.budget_s, "seeds": args.seeds, "summary": summary, "rows": rows}
    runtime.write_json(Path(args.out) / "results.json", results, indent=1)
    if args.results:
        runtime.write_json(args.results, results, indent=1)
    if args.plot:
        plot(rows, arms, args.budget_s, args.plot)
    return results


def plot(rows, arms, budget_s, path):
    """Val loss against wall time, one line per run, coloured by arm; nanoGPT's A100 figure (1.4697)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, arm in enumerate(arms):
        for r in (r for r in rows if r["arm"] == arm):
            t, v = zip(*r["curve"])
            ax.plot(t, v, color=f"C{i}", alpha=0.8, label=arm if r["seed"] == 0 else None)
    ax.axhline(1.4697, color="gray", linestyle=":", label="nanoGPT, A100, ~3 min (1.4697)")
    ax.axvline(budget_s, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xlabel="wall time (s)", ylabel="val loss (nats/char)", ylim=(1.3, 2.6),
           title="tinyshakespeare, 2-core CPU: val loss against wall time")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.time_to_quality)."""
    p = sub.add_parser("time_to_quality", help="tinyshakespeare at a wall-time budget: nanoGPT's CPU recipe, our "
                       "config, Muon and the trapezoidal schedule alone and together, over seeds (trains; cached)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated from {', '.join(ARMS)}")
    p.add_argument("--config", default=str(CONFIG.relative_to(CONFIG.parents[1])), help="the train.py config file "
                   "of every arm but nanogpt_cpu")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--budget_s", type=float, default=450.0, help="wall-time budget of each run, seconds")
    p.add_argument("--eval_interval", type=int, default=250, help="steps between evaluations")
    p.add_argument("--probe_steps", type=int, default=30, help="steps of the probe run that times an arm")
    p.add_argument("--eval_iters", type=int, default=20, help="batches per evaluation")
    p.add_argument("--data_dir", default=str(data.DEFAULT_DATA_DIR), help="where the corpus and its tokenized cache live")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--out", default="out/time_to_quality", help="the runs' folders and results.json")
    p.add_argument("--results", default=str(Path(__file__).parent / "results.json"),
                   help="also write the results here (empty: no)")
    p.add_argument("--plot", default=str(Path(__file__).parent / "time_to_quality_cpu.png"),
                   help="PNG plot path (empty: none)")
    p.set_defaults(run=run)
    return p
