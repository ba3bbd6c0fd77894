"""Performer (Choromanski et al. 2021) quality: the default Llama with softmax, FAVOR+ and sliding-window
attention, val loss and the gap over seeds; softmax swapped for FAVOR+ and fine-tuned.

  python bench.py performer         # or: python -m experiments.performer

The write-up, ours beside the paper's: README.md beside this file."""
import statistics
from pathlib import Path

import torch

import train
from experiments.common import add_training_run_flags, cached_run
from omnitron import runtime
from omnitron.runtime import UserError, print_table

PERFORMER_ARMS = {  # name -> train.py attention flags; the default Llama otherwise
    "softmax": {"attn": "sdpa"},
    "performer_m64": {"attn": "performer", "performer_features": 64},
    "performer_m256": {"attn": "performer", "performer_features": 256},
    "window64": {"attn": "sdpa", "attn_window": 64},
}


def run(args):
    """The default Llama (char level, default corpus) trained with softmax attention, FAVOR+ with m = 64
    and 256 random features, and a sliding window of 64, the same steps and seeds: the final val loss,
    and its gap to softmax. Then the Performer paper's backward-compatibility test (Choromanski et al.
    2021, section 4.2, Figure 4): the trained softmax model with FAVOR+ swapped in, its val loss before
    and after a short fine-tune. Runs are cached by settings (cached_run)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in PERFORMER_ARMS]:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(PERFORMER_ARMS)}")
    common = dict(max_iters=args.max_iters, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                  log_interval=args.eval_interval, sample_tokens=0, device=args.device, data=args.data,
                  data_dir=args.data_dir)
    rows = []
    for seed in range(args.seeds):  # seed by seed: a run stopped early still has every arm of its first seeds
        for arm in arms:
            settings = {"arm": arm, "seed": seed, **common, **PERFORMER_ARMS[arm]}
            log = cached_run(Path(args.out) / f"{arm}-s{seed}", settings, f"{arm}, seed {seed}", model="llama",
                             seed=seed, **common, **PERFORMER_ARMS[arm])
            vals = [r for r in log if "val_loss" in r]
            rows.append({"arm": arm, "seed": seed, "val_loss": vals[-1]["val_loss"], "elapsed_s": vals[-1]["elapsed_s"]})
    softmax = {r["seed"]: r["val_loss"] for r in rows if r["arm"] == "softmax"}
    summary = {"rows": rows, "arms": {}}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        losses = [r["val_loss"] for r in mine]
        gaps = [r["val_loss"] - softmax[r["seed"]] for r in mine if r["seed"] in softmax]
        summary["arms"][arm] = {"mean": statistics.mean(losses), "min": min(losses), "max": max(losses),
                                "gap_mean": statistics.mean(gaps) if gaps else None,
                                "gap_min": min(gaps) if gaps else None, "gap_max": max(gaps) if gaps else None,
                                "wall_s": statistics.mean(r["elapsed_s"] for r in mine)}
    table = [{"arm": arm, **v, "seeds": args.seeds} for arm, v in summary["arms"].items()]
    print(f"default Llama, {args.max_iters} steps, {args.seeds} seed(s); val loss (nats per char), gap = arm - softmax "
          "(same seed)")
    print_table(table, [("arm", "arm", "{}"), ("mean", "val loss", "{:.4f}"), ("min", "min", "{:.4f}"),
                        ("max", "max", "{:.4f}"), ("gap_mean", "gap", "{:+.4f}"), ("gap_min", "gap min", "{:+.4f}"),
                        ("gap_max", "gap max", "{:+.4f}"), ("wall_s", "wall s", "{:.0f}")])
    if args.finetune_iters and "softmax" in arms:
        base = Path(args.out) / "softmax-s0"
        swap = {"attn": "performer", "performer_features": args.finetune_features}
        ft = dict(max_iters=args.finetune_iters, learning_rate=args.finetune_lr, warmup_iters=args.finetune_iters // 10,
                  eval_interval=max(1, args.finetune_iters // 4), eval_iters=args.eval_iters,
                  log_interval=max(1, args.finetune_iters // 4), sample_tokens=0, device=args.device,
                  data=args.data, data_dir=args.data_dir, seed=0)
        log = cached_run(Path(args.out) / f"finetune-m{args.finetune_features}-{args.finetune_iters}",
                         {"base": str(base), **ft, **swap},
                         "softmax -> FAVOR+, fine-tune", model="llama", init_from=str(base), **ft, **swap)
        vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        summary["finetune"] = {"softmax": softmax[0], "favor_before": vals[0][1], "favor_after": vals[-1][1],
                               "curve": vals, "features": args.finetune_features, "steps": args.finetune_iters}
        print(f"backward compatibility (softmax seed 0 -> FAVOR+ m={args.finetune_features}): softmax {softmax[0]:.4f}, "
              f"FAVOR+ swapped in {vals[0][1]:.4f}, after {args.finetune_iters} fine-tuning steps {vals[-1][1]:.4f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runtime.write_json(Path(args.out) / "summary.json", summary, indent=1)
    return summary


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.performer)."""
    p = sub.add_parser("performer", help="the default Llama with softmax, FAVOR+ (m=64, 256) and window-64 attention: "
                       "val loss and the gap over seeds; softmax -> FAVOR+ swapped in and fine-tuned (trains; cached)")
    p.add_argument("--arms", default=",".join(PERFORMER_ARMS), help=f"comma-separated from {', '.join(PERFORMER_ARMS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--max_iters", type=int, default=200, help="steps per run (train.py's default is 750: see the README)")
    p.add_argument("--eval_interval", type=int, default=100, help="steps between val-loss evaluations")
    p.add_argument("--eval_iters", type=int, default=train.flag_default("eval_iters"), help="batches per evaluation")
    p.add_argument("--finetune_iters", type=int, default=50, help="steps of the backward-compatibility fine-tune (0: skip)")
    p.add_argument("--finetune_features", type=int, default=256, help="FAVOR+ features m swapped into the softmax model")
    p.add_argument("--finetune_lr", type=float, default=1e-3, help="peak learning rate of that fine-tune")
    add_training_run_flags(p, "out/performer", "the runs' folders and summary.json")
    p.set_defaults(run=run)
    return p

