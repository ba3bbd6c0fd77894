"""Scaling laws measured (Kaplan et al. 2020; Hoffmann et al. 2022): an IsoFLOP grid of GPT sizes, both papers'
fits (fits.py beside this file), and a run at the predicted compute-optimal size to test them.

  python bench.py scaling           # or: python -m experiments.scaling

The write-up, ours beside the papers': README.md beside this file."""
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

import train
from experiments.common import add_training_run_flags, comma_floats, layer_width_pairs, pyplot, save_figure
from experiments.scaling import fits as scaling
from omnitron import data, models, runtime
from omnitron.runtime import UserError, format_eta, print_table, resolve_device

SCALING_PRESETS = {
    # ladder: the GPT shapes (n_layer, n_embd) to choose from, smallest first; head_dim: n_embd // n_head.
    # budgets: training FLOPs C per run (forward + backward, the model's flops_per_token times D tokens).
    # window: at each budget, only the shapes whose tokens per parameter D / N fall in [lo, hi] train (IsoFLOP
    # profiles need the sizes around each budget's optimum, not the whole ladder). lr: the peak learning rate of
    # n_embd 128; the others get lr * sqrt(128 / n_embd).
    "cpu": dict(ladder=[(1, 16), (1, 24), (1, 32), (2, 32), (2, 40), (2, 48), (3, 48), (3, 56), (4, 64), (4, 80),
                        (5, 96)],
                budgets=[1e11, 2.15e11, 4.64e11, 1e12], window=(3.0, 1000.0), head_dim=8,
                batch_size=16, block_size=64, lr=3e-3, eval_iters=20),
    # gpu: for a corpus of about 10^9 characters (--data); on the default corpus its runs repeat their data
    # up to 100 times (the sweep says so). Untested on a GPU so far.
    "gpu": dict(ladder=[(2, 64), (2, 96), (3, 96), (3, 128), (4, 128), (4, 192), (6, 192), (6, 256), (8, 256),
                        (8, 320), (8, 384), (10, 512)],
                budgets=[1e14, 3.16e14, 1e15, 3.16e15], window=(10.0, 1000.0), head_dim=32,
                batch_size=64, block_size=256, lr=2e-3, eval_iters=50),
}


@functools.lru_cache(maxsize=None)
def scaling_shape_counts(n_layer, n_embd, vocab_size, block_size, head_dim):
    """(N total, N non-embedding, training FLOPs per token) of the GPT shape, from the model itself on
    the meta device: num_params(False), scaling.non_embedding_params and flops_per_token(block_size)."""
    module = models.get("gpt")
    with torch.device("meta"):
        model = module.Model(module.Config(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                                           n_head=n_embd // head_dim, n_embd=n_embd))
    return model.num_params(False), scaling.non_embedding_params(model), model.flops_per_token(block_size)


def scaling_grid(preset, vocab_size, n_train):
    """The runs of a sweep: for each budget C, each ladder shape whose D / N falls in the window, with
    D = C / flops_per_token rounded to whole steps (the cosine schedule ends exactly there). One dict per
    run: its settings (what the cache compares) and its counts."""
    tokens_per_step = preset["batch_size"] * preset["block_size"]
    runs = []
    for budget in preset["budgets"]:
        for n_layer, n_embd in preset["ladder"]:
            n, n_ne, fpt = scaling_shape_counts(n_layer, n_embd, vocab_size, preset["block_size"], preset["head_dim"])
            steps = round(budget / fpt / tokens_per_step)
            if not preset["window"][0] <= steps * tokens_per_step / n <= preset["window"][1]:
                continue
            runs.append(scaling_run_spec(preset, n_layer, n_embd, budget, steps, n, n_ne, fpt, n_train))
    return runs


def scaling_run_spec(preset, n_layer, n_embd, budget, steps, n, n_ne, fpt, n_train):
    """One run's settings (everything that changes its result) and its counts (N, D, C)."""
    tokens = steps * preset["batch_size"] * preset["block_size"]
    settings = {"model": "gpt", "n_layer": n_layer, "n_embd": n_embd, "n_head": n_embd // preset["head_dim"],
                "batch_size": preset["batch_size"], "block_size": preset["block_size"], "max_iters": steps,
                "warmup_iters": max(1, steps // 20), "learning_rate": preset["lr"] * (128 / n_embd) ** 0.5,
                "eval_iters": preset["eval_iters"], "seed": preset["seed"], "data": preset["data"]}
    return {"name": f"{n_layer}x{n_embd}-C{budget:.3g}", "budget": budget, "settings": settings,
            "N": n, "N_non_embedding": n_ne, "flops_per_token": fpt, "D": tokens, "C": fpt * tokens,
            "tokens_per_param": tokens / n, "epochs": tokens / n_train}


def scaling_train(run, folder, device, dtype, data_dir):
    """Train one run with train.run into folder/NAME in `dtype`, or reuse it when folder/NAME/result.json
    holds a finished run of the same settings and dtype (scaling_cached). Returns the run with its result:
    val and train loss (nats per char and bits per char), wall seconds, and whether it was trained now."""
    if cached := scaling_cached(run, folder, dtype):
        return {**cached, "trained_now": False}
    out, s = Path(folder) / run["name"], run["settings"]
    result = train.run(**s, out_dir=str(out), overwrite=True, lr_decay_iters=-1, min_lr=-1.0,
                       eval_interval=s["max_iters"], log_interval=s["max_iters"], sample_tokens=0, device=str(device),
                       dtype=dtype, tokenizer="char", dropout=0.0, data_dir=str(data_dir))
    record = {**run, "dtype": dtype, "val_loss": result["val_loss"], "train_loss": result["train_loss"],
              "val_bpc": result["val_loss"] / np.log(2), "elapsed_s": round(result["elapsed_s"], 2)}
    runtime.write_json(out / "result.json", record, indent=1)
    return {**record, "trained_now": True}


def scaling_sweep(runs, folder, device, dtype, data_dir):
    """Train (or take from the cache) every run, printing progress with an ETA in FLOPs: the seconds per
    FLOP of the runs trained so far times the FLOPs left."""
    todo = [r for r in runs if not scaling_cached(r, folder, dtype)]
    total = sum(r["C"] for r in todo)
    if repeated := [r["name"] for r in runs if r["epochs"] > 4]:
        print(f"note: {', '.join(repeated)} see their corpus more than 4 times (repeated data bends the laws, "
              "Muennighoff et al. 2023): give --data a larger corpus", flush=True)
    print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} cached, {len(todo)} to train "
          f"({total:.3g} FLOPs)", flush=True)
    done_flops, t0, results = 0.0, time.time(), []
    for run in runs:
        trained = run in todo
        if trained:
            k = todo.index(run) + 1
            eta = f", ETA {format_eta((time.time() - t0) / done_flops * (total - done_flops))}" if done_flops else ""
            print(f"--- [{k}/{len(todo)}] {run['name']}: N {run['N']:,}, D {run['D']:,} tokens "
                  f"({run['tokens_per_param']:.1f} per parameter), {run['settings']['max_iters']} steps{eta}", flush=True)
        results.append(scaling_train(run, folder, device, dtype, data_dir))
        if trained:
            done_flops += run["C"]
    if todo:
        print(f"sweep: trained {len(todo)} runs in {format_eta(time.time() - t0)} ({time.time() - t0:.0f} s)", flush=True)
    return results


def scaling_cached(run, folder, dtype):
    """The finished run's record in folder/NAME/result.json when it was trained with the same settings and
    dtype (float32 when the record does not say), else None."""
    done = Path(folder) / run["name"] / "result.json"
    record = json.loads(done.read_text()) if done.is_file() else {}
    same = record.get("settings") == run["settings"] and record.get("dtype", "float32") == dtype
    return record if same else None


def run(args):
    """Kaplan et al. 2020 and Hoffmann et al. 2022 measured here: a grid of GPT sizes at several compute
    budgets (IsoFLOP profiles), char-level on the corpus; Kaplan's power laws, Chinchilla's approaches 2 and
    3 (scaling.py); the loss of a compute-optimal model at 4x the largest budget predicted, and with
    --verify trained and compared."""
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = {**SCALING_PRESETS[args.preset], "seed": args.seed, "data": args.data}
    if args.budgets:
        preset["budgets"] = comma_floats(args.budgets, "--budgets")
    if args.sizes:
        preset["ladder"] = layer_width_pairs(args.sizes)
    for n_layer, n_embd in preset["ladder"]:
        if n_layer < 1 or n_embd < preset["head_dim"] or n_embd % preset["head_dim"]:
            raise UserError(f"--sizes {n_layer}x{n_embd}: n_layer >= 1 and n_embd a multiple of the head size "
                            f"{preset['head_dim']} (the {args.preset} preset's)")
    if args.window:
        preset["window"] = tuple(comma_floats(args.window, "--window", count=2))
    device = resolve_device(args.device)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dataset = data.prepare(args.data or None, "char", args.data_dir, quiet=True)
    vocab, n_train = dataset.tokenizer.vocab_size, dataset.manifest["n_train"]
    folder = Path(args.out) / args.preset
    runs = scaling_grid(preset, vocab, n_train)
    if not runs:
        raise UserError("no run of the ladder falls in the window at these budgets")
    results = scaling_sweep(runs, folder, device, dtype, args.data_dir)
    return scaling_report(results, preset, args, vocab, n_train, folder, device, dtype)


def scaling_report(results, preset, args, vocab, n_train, folder, device, dtype):
    """The runs' table and runs.json; the fits (scaling.fit_all), their table beside the papers', the
    leave-one-budget-out errors, the plot; the loss of the compute-optimal model at 4x the largest budget
    predicted and, with --verify, trained and compared. Writes fits.json. Returns {"runs", "fits", "prediction"}."""
    print_table(results, [("name", "run", "{}"), ("N", "N", "{:,}"), ("N_non_embedding", "N non-emb", "{:,}"),
                          ("D", "D tokens", "{:,}"), ("tokens_per_param", "D/N", "{:.1f}"), ("C", "C FLOPs", "{:.3g}"),
                          ("val_loss", "val nats/char", "{:.4f}"), ("val_bpc", "val bits/char", "{:.4f}"),
                          ("elapsed_s", "wall s", "{:.0f}")])
    runtime.write_json(folder / "runs.json", {"preset": preset, "runs": results}, indent=1)
    print(f"runs: {folder / 'runs.json'}")
    column = lambda key: np.array([r[key] for r in results], float)
    if len(set(column("budget"))) < 2 or min(np.unique(column("budget"), return_counts=True)[1]) < 3:
        print("(the fits need 2 or more budgets with 3 or more sizes each)")
        return {"runs": results}
    fits = scaling.fit_all(column("N"), column("D"), column("C"), column("val_loss"), column("budget"),
                           column("N_non_embedding"), n_boot=args.bootstrap, seed=args.seed)
    print_scaling_fits(fits)
    prediction = scaling_prediction(fits, preset, vocab, n_train)
    if args.verify:
        cached = scaling_cached(prediction["run"], folder, dtype)
        print(f"--- verify: {prediction['run']['name']} " + ("from the cache" if cached else
              f"training {prediction['run']['settings']['max_iters']} steps"), flush=True)
        trained = scaling_train(prediction["run"], folder, device, dtype, args.data_dir)
        prediction["measured"] = trained["val_loss"]
        prediction["error"] = {k: prediction[k] / trained["val_loss"] - 1 for k in ("approach3", "kaplan", "frontier")}
        print(f"verify: measured {trained['val_loss']:.4f} nats/char ({trained['val_bpc']:.4f} bits/char); predicted "
              + ", ".join(f"{k} {prediction[k]:.4f} ({100 * e:+.2f}%)" for k, e in prediction["error"].items()))
    runtime.write_json(folder / "fits.json", {"fits": fits, "prediction": prediction}, indent=1, default=float)
    print(f"fits: {folder / 'fits.json'}")
    if args.plot:
        plot_scaling(results, fits, prediction, args.plot)
    return {"runs": results, "fits": fits, "prediction": prediction}


def scaling_prediction(fits, preset, vocab, n_train):
    """The compute-optimal model at 4x the largest budget: approach 2's N_opt(C), rounded to the nearest
    ladder shape (in log N), trained on C / flops_per_token tokens; its loss predicted by approach 3's
    L(N, D), Kaplan's L(N, D) and the frontier L_opt(C) (nats per char)."""
    budget = 4 * max(preset["budgets"])
    n_target = scaling.optimal_n(fits["approach2"], budget)
    shapes = [(abs(np.log(scaling_shape_counts(*s, vocab, preset["block_size"], preset["head_dim"])[0] / n_target)), s)
              for s in preset["ladder"]]
    n_layer, n_embd = min(shapes)[1]
    n, n_ne, fpt = scaling_shape_counts(n_layer, n_embd, vocab, preset["block_size"], preset["head_dim"])
    steps = round(budget / fpt / (preset["batch_size"] * preset["block_size"]))
    run = scaling_run_spec(preset, n_layer, n_embd, budget, steps, n, n_ne, fpt, n_train)
    out = {"budget": budget, "N_opt": n_target, "run": run,
           "approach3": float(scaling.predict_chinchilla(fits["approach3"], n, run["D"])),
           "kaplan": float(scaling.predict_kaplan(fits["kaplan"], n_ne, run["D"])),
           "frontier": float(scaling.frontier_loss(fits["approach2"], run["C"]))}
    print(f"prediction at C = {budget:.3g} (4x the largest budget): N_opt {n_target:,.0f} -> {run['name']} "
          f"(N {n:,}, D {run['D']:,} tokens, {run['tokens_per_param']:.0f} per parameter, {run['epochs']:.2f} epochs); "
          f"val loss {out['approach3']:.4f} nats/char ({out['approach3'] / np.log(2):.4f} bits/char) by approach 3, "
          f"{out['kaplan']:.4f} by Kaplan's L(N, D), {out['frontier']:.4f} by the frontier L(C)")
    return out


def print_scaling_fits(fits):
    """Approach 2's minima per budget, the fitted constants with their 95% intervals beside Kaplan's and
    Chinchilla's, R², the leave-one-budget-out errors."""
    bits = 1 / np.log(2)
    two, three, kap = fits["approach2"], fits["approach3"], fits["kaplan"]
    print("approach 2: IsoFLOP minima (parabolas through the 5 sizes nearest each budget's lowest loss)")
    print_table([{**m, "ratio": m["D_opt"] / m["N_opt"], "L_bits": m["L_opt"] * bits,
                  "interior": "yes" if m["interior"] else "NO (at the edge: extrapolated)"} for m in two["budgets"]],
                [("C", "C FLOPs", "{:.3g}"), ("N_opt", "N_opt", "{:,.0f}"), ("D_opt", "D_opt", "{:,.0f}"),
                 ("ratio", "D/N", "{:.0f}"), ("L_bits", "L_opt bits/char", "{:.4f}"), ("r2", "parabola R²", "{:.3f}"),
                 ("interior", "minimum inside the sizes", "{}")])
    ci = lambda fit, key, fmt="{:.3f}": f"{fmt.format(fit[key])} [{fmt.format(fit[key + '_ci'][0])}, {fmt.format(fit[key + '_ci'][1])}]"
    rows = [("N_opt ∝ C^a (approach 2)", ci(two, "a"), f"{two['a_r2']:.3f} (log N_opt)", scaling.KAPLAN["N_opt_exponent"], "0.49 (approach 2), ~0.50"),
            *([(f"  a, the {len(two['interior_budgets'])} interior minima only", ci(two, "a_interior"), "", "", "")]
              if "a_interior" in two else []),
            ("D_opt ∝ C^b (approach 2)", ci(two, "b"), "", round(1 - scaling.KAPLAN["N_opt_exponent"], 2), "0.51 (approach 2)"),
            ("L_opt ∝ C^-alpha_C (frontier)", ci(two, "alpha_C"), f"{two['frontier_r2']:.3f}", scaling.KAPLAN["alpha_C"], "-"),
            ("a = beta/(alpha+beta) (approach 3)", ci(three, "a"), f"{three['r2']:.3f}", "-", "0.46 (approach 3)"),
            ("alpha (approach 3)", ci(three, "alpha"), "", "-", scaling.CHINCHILLA["alpha"]),
            ("beta (approach 3)", ci(three, "beta"), "", "-", scaling.CHINCHILLA["beta"]),
            ("E nats (approach 3)", ci(three, "E"), "", "-", f"{scaling.CHINCHILLA['E']} (per BPE token)"),
            ("A (approach 3)", ci(three, "A", "{:.3g}"), "", "-", scaling.CHINCHILLA["A"]),
            ("B (approach 3)", ci(three, "B", "{:.3g}"), "", "-", scaling.CHINCHILLA["B"]),
            ("alpha_N (Kaplan L(N, D))", ci(kap, "alpha_N"), f"{kap['r2']:.3f}", scaling.KAPLAN["alpha_N"], "-"),
            ("alpha_D (Kaplan L(N, D))", ci(kap, "alpha_D"), "", scaling.KAPLAN["alpha_D"], "-"),
            ("N_c (Kaplan, non-embedding N)", ci(kap, "N_c", "{:.3g}"), "", f"{scaling.KAPLAN['N_c']:.2g}", "-"),
            ("D_c (Kaplan)", ci(kap, "D_c", "{:.3g}"), "", f"{scaling.KAPLAN['D_c']:.2g}", "-")]
    print("fitted constants (95% bootstrap intervals) beside the papers' (theirs: nats per BPE token, ours: per char)")
    print_table([dict(zip(("q", "ours", "r2", "kaplan", "chinchilla"), r)) for r in rows],
                [("q", "quantity", "{}"), ("ours", "ours [95% CI]", "{}"), ("r2", "R²", "{}"),
                 ("kaplan", "Kaplan 2020", "{}"), ("chinchilla", "Chinchilla 2022", "{}")])
    print("leave-one-budget-out: each budget predicted by the fits of the others (mean |relative error|)")
    print_table([{**r, **{k: 100 * abs(r[k]) for k in ("approach3", "kaplan", "N_opt", "L_opt") if k in r}}
                 for r in fits["leave_one_budget_out"]],
                [("budget", "held-out C", "{:.3g}"), ("approach3", "approach 3 L %", "{:.2f}"),
                 ("kaplan", "Kaplan L %", "{:.2f}"), ("N_opt", "N_opt %", "{:.1f}"), ("L_opt", "frontier L_opt %", "{:.2f}")])


def plot_scaling(results, fits, prediction, path):
    """Three panels: the IsoFLOP profiles (loss against N per budget, with approach 2's parabolas and
    approach 3's curves), N_opt against C (approach 2's line, Kaplan's and Chinchilla's slopes through our
    middle budget, the prediction), the frontier L_opt against C (and the verify run when trained)."""
    plt = pyplot()
    if plt is None:
        return
    bits = 1 / np.log(2)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    two = fits["approach2"]
    for i, m in enumerate(two["budgets"]):
        mine = sorted((r for r in results if r["budget"] == m["budget"]), key=lambda r: r["N"])
        color = colors[i % len(colors)]
        n = np.array([r["N"] for r in mine], float)
        ax1.plot(n, [r["val_bpc"] for r in mine], "o", color=color, label=f"C = {m['C']:.2g}")
        grid = np.geomspace(min(m["sizes"]), max(m["sizes"]), 100)
        ax1.plot(grid, np.polyval(m["coef"], np.log(grid)) * bits, "-", color=color, linewidth=1)
        grid = np.geomspace(n.min(), n.max(), 100)
        d_of_n = np.exp(np.polyval(np.polyfit(np.log(n), np.log([r["D"] for r in mine]), 1), np.log(grid)))
        ax1.plot(grid, scaling.predict_chinchilla(fits["approach3"], grid, d_of_n) * bits, ":", color=color, linewidth=1)
        ax1.plot(m["N_opt"], m["L_opt"] * bits, "*", color=color, markersize=12,
                 markeredgecolor="black" if m["interior"] else "red")
    ax1.set(xscale="log", xlabel="parameters N", ylabel="val loss (bits per char)",
            title="IsoFLOP profiles: parabolas (approach 2), dotted: approach 3")
    ax1.legend(fontsize=8)
    c = np.array([m["C"] for m in two["budgets"]])
    n_opt = np.array([m["N_opt"] for m in two["budgets"]])
    grid = np.geomspace(c.min() / 1.5, prediction["budget"] * 1.5, 50)
    ax2.plot(c, n_opt, "o", color="black", label="IsoFLOP minima")
    ax2.plot(grid, scaling.optimal_n(two, grid), "-", label=f"ours: N_opt ∝ C^{two['a']:.2f} [{two['a_ci'][0]:.2f}, {two['a_ci'][1]:.2f}]")
    mid = len(c) // 2
    for slope, name, style in ((scaling.KAPLAN["N_opt_exponent"], "Kaplan", "--"), (scaling.CHINCHILLA["a"], "Chinchilla", ":")):
        ax2.plot(grid, n_opt[mid] * (grid / c[mid]) ** slope, style, color="gray", label=f"{name}: C^{slope}")
    ax2.plot(prediction["budget"], prediction["run"]["N"], "s", color="red", label=f"prediction: {prediction['run']['name']}")
    ax2.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal N", title="N_opt against C")
    ax2.legend(fontsize=8)
    ax3.plot(c, [m["L_opt"] * bits for m in two["budgets"]], "o", color="black", label="IsoFLOP minima")
    ax3.plot(grid, scaling.frontier_loss(two, grid) * bits, "-",
             label=f"frontier: L ∝ C^-{two['alpha_C']:.3f}")
    for r in results:
        ax3.plot(r["C"], r["val_bpc"], ".", color="lightgray", zorder=0)
    ax3.plot(prediction["budget"], prediction["approach3"] * bits, "s", color="red", fillstyle="none",
             label=f"predicted (approach 3): {prediction['approach3'] * bits:.3f}")
    if "measured" in prediction:
        ax3.plot(prediction["budget"], prediction["measured"] * bits, "x", color="red", markersize=10,
                 label=f"trained: {prediction['measured'] * bits:.3f} (approach 3 off by {100 * prediction['error']['approach3']:+.1f}%)")
    ax3.set(xscale="log", xlabel="training FLOPs C", ylabel="val loss (bits per char)", title="compute frontier")
    ax3.legend(fontsize=8)
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.scaling)."""
    p = sub.add_parser("scaling", help="scaling laws measured: a grid of GPT sizes at several compute budgets, "
                       "Kaplan's and Chinchilla's fits, a prediction at 4x the largest budget (trains; cached by settings)")
    p.add_argument("--preset", default="cpu", choices=sorted(SCALING_PRESETS), help="the grid: cpu (within 20 "
                   "minutes on 2 CPU cores) or gpu (bench.SCALING_PRESETS)")
    p.add_argument("--budgets", default="", help="training FLOPs per run, comma-separated (empty: the preset's)")
    p.add_argument("--sizes", default="", help="the ladder of GPT shapes, n_layer x n_embd, comma-separated "
                   "(empty: the preset's)")
    p.add_argument("--window", default="", help="lo,hi: train the shapes whose tokens per parameter fall in "
                   "[lo, hi] at each budget (empty: the preset's)")
    p.add_argument("--verify", action="store_true", help="also train the predicted compute-optimal model at 4x the "
                   "largest budget and report the prediction's error")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=1337, help="seed of every run (and of the bootstrap)")
    add_training_run_flags(p, "out/scaling", "the sweep folder: OUT/PRESET holds every run, runs.json, fits.json",
                           "out/scaling/scaling.png")
    p.set_defaults(run=run)
    return p

