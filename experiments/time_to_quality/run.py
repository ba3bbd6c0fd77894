"""Time to quality on tinyshakespeare: nanoGPT's CPU recipe, the config before the speedrun's changes
(`baseline`), each change alone, and the shipped config (config/tinyshakespeare_cpu.toml), every run at
the same wall time, over seeds.

  python bench.py time_to_quality   # or: python -m experiments.time_to_quality

Every run trains for --budget_s seconds (train.py --max_time: its schedule follows the clock, so it ends
its decay on time at this machine's speed that hour) and ends with the val loss over every val token
(--eval_full_val: no sampling noise). Reported per arm over seeds: that val loss, the steps done,
tokens/s and the change against `baseline`. The write-up: README.md beside this file."""
import statistics
import time
from pathlib import Path

from experiments.common import cached_run, comma_list, pyplot, save_figure
from omnitron import data, runtime
from omnitron.runtime import UserError, print_table

CONFIG = Path(__file__).resolve().parents[2] / "config" / "tinyshakespeare_cpu.toml"
BASELINE = CONFIG.with_name("tinyshakespeare_cpu_baseline.toml")  # AdamW, cosine, context 128 x batch 32, eager

ARMS = {  # name -> (the config file: --config's, --baseline_config's, or none; train.py flags over it)
    # nanoGPT's README CPU run of config/train_shakespeare_char.py (its flags; our GPT file)
    "nanogpt_cpu": (None, dict(model="gpt", data="tinyshakespeare", tokenizer="char", n_layer=4, n_head=4,
                               n_embd=128, block_size=64, batch_size=12, dropout=0.0, bias=False, learning_rate=1e-3,
                               min_lr=1e-4, warmup_iters=100, weight_decay=0.1, beta2=0.99)),
    "baseline": ("baseline", {}),
    "muon": ("baseline", dict(optimizer="muon")),
    "trapezoidal": ("baseline", dict(lr_schedule="trapezoidal")),
    "compile": ("baseline", dict(compile=True)),
    "block256": ("baseline", dict(block_size=256, batch_size=16)),
    "config_without_weight_decay": ("config", dict(muon_weight_decay=0.0)),
    "config": ("config", {}),
}
DEFAULT_ARMS = "nanogpt_cpu,baseline,config"


def run_flags(args, arm, seed):
    """train.run's keyword arguments of an arm: its config file (--config or --baseline_config; nanogpt_cpu:
    none), its flags, the budget (max_time; steps uncapped) and the evaluation."""
    config_file, arm_flags = ARMS[arm]
    config = {} if config_file is None else {"config": {"config": args.config, "baseline": args.baseline_config}[config_file]}
    return {**config, "seed": seed, "sample_tokens": 0, "device": args.device, "data_dir": args.data_dir,
            **arm_flags, "max_time": args.budget_s, "max_iters": 10**7, "eval_interval": args.eval_interval,
            "log_interval": args.log_interval, "eval_full_val": True}


def train_arm(args, arm, seed):
    """One arm and seed for --budget_s seconds of training. Returns its row."""
    flags = run_flags(args, arm, seed)
    log = cached_run(Path(args.out) / f"{arm}-s{seed}", {"arm": arm, **flags},
                     f"{arm}, seed {seed}, {args.budget_s:g} s", **flags)
    evals = [r for r in log if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    return {"arm": arm, "seed": seed, "steps": evals[-1]["step"], "val_loss": evals[-1]["val_loss"],
            "wall_s": evals[-1]["elapsed_s"], "tokens_per_s": statistics.median(speeds) if speeds else None,
            "curve": [(r["elapsed_s"], r["val_loss"]) for r in evals]}


def run(args):
    """Every arm (--arms) over --seeds at --budget_s each: the table (val loss at the budget, mean and
    spread over seeds, tokens/s, the change against `baseline`), results.json and the plot."""
    arms = comma_list(args.arms)
    if unknown := [a for a in arms if a not in ARMS]:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARMS)}")
    if args.budget_s <= 0:
        raise UserError(f"--budget_s must be positive, not {args.budget_s}")
    t0, rows = time.time(), []
    for seed in range(args.seeds):
        for arm in arms:
            rows.append(train_arm(args, arm, seed))
            print(f"[{len(rows)}/{len(arms) * args.seeds}] {arm} seed {seed}: val {rows[-1]['val_loss']:.4f} "
                  f"after {rows[-1]['steps']} steps; {runtime.format_eta(time.time() - t0)} so far", flush=True)
    summary = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        vals, speeds = [r["val_loss"] for r in mine], [r["tokens_per_s"] for r in mine if r["tokens_per_s"]]
        summary.append({"arm": arm, "mean": statistics.mean(vals), "min": min(vals), "max": max(vals),
                        "tokens_per_s": statistics.mean(speeds) if speeds else None,
                        "steps": statistics.mean(r["steps"] for r in mine)})
    base = next((s["mean"] for s in summary if s["arm"] == "baseline"), None)
    for s in summary:
        s["change"] = None if base is None else s["mean"] - base
    print_table(summary, [("arm", "arm", "{}"), ("mean", f"val at {args.budget_s:.0f} s", "{:.4f}"),
                          ("min", "min", "{:.4f}"), ("max", "max", "{:.4f}"), ("change", "vs baseline", "{:+.4f}"),
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
    p = sub.add_parser("time_to_quality", help="tinyshakespeare at a wall-time budget: nanoGPT's CPU recipe, the "
                       "baseline, the speedrun's changes alone and the shipped config, over seeds (trains; cached)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated from {', '.join(ARMS)} (the full "
                   "ablation: all of them, about 8 minutes per arm and seed)")
    p.add_argument("--config", default=str(CONFIG.relative_to(CONFIG.parents[1])), help="the train.py config file "
                   "of the config arms")
    p.add_argument("--baseline_config", default=str(BASELINE.relative_to(BASELINE.parents[1])),
                   help="the config file of baseline and its one-change arms")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--budget_s", type=float, default=430.0, help="seconds of training per run (train.py --max_time; "
                   "startup and the last evaluation add about 15 s to the whole command)")
    p.add_argument("--eval_interval", type=int, default=500, help="steps between evaluations (the plot's points)")
    p.add_argument("--log_interval", type=int, default=50, help="steps between log lines (tokens/s)")
    p.add_argument("--data_dir", default=str(data.DEFAULT_DATA_DIR), help="where the corpus and its tokenized cache live")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--out", default="out/time_to_quality", help="the runs' folders and results.json")
    p.add_argument("--results", default=str(Path(__file__).parent / "results.json"),
                   help="also write the results here (empty: no)")
    p.add_argument("--plot", default=str(Path(__file__).parent / "time_to_quality_cpu.png"),
                   help="PNG plot path (empty: none)")
    p.set_defaults(run=run)
    return p
