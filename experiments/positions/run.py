"""Position interpolation (Chen et al. 2023) and YaRN (Peng et al. 2023) against plain RoPE fine-tuning (Su et al.
2021), measured as the papers measure a context window: passkey retrieval in miniature. A RoPE GPT pretrained at
length L on windows that state a pass key and ask for it up to max_distance characters later; fine-tuned at
eval_factor x L (plain, PI, YaRN) with checkpoints along the way; greedy passkey accuracy by distance and val
loss inside L at each checkpoint; the usable distance against fine-tuning steps per method.

  python bench.py positions         # or: python -m experiments.positions

The write-up, ours beside the papers': README.md beside this file; the numbers: results.json beside it."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

import train
from experiments.common import (add_training_run_flags, cached, cached_result, cached_run, comma_list, pyplot,
                                save_figure, write_results)
from omnitron import data, models, runtime, tokenization
from omnitron.runtime import UserError, print_table, resolve_device

HERE = Path(__file__).resolve().parent
STATEMENT, QUESTION = " The pass key is ", " What is the pass key? "  # the key's digits follow each
KEY_DIGITS = 5
# the text between the key's last digit and the question: ". " (so the key is a whole number in the text)
STATEMENT_END = ". "
MIN_DISTANCE = KEY_DIGITS + len(STATEMENT_END) + len(QUESTION)  # the question starts after the statement ends

# The fine-tuning methods: what each writes into the pretrained model's Config before fine-tuning at s x L
# (the formulas: models/gpt.py rope_frequencies). s: eval_factor.
METHODS = {
    "plain": lambda s: {},                                        # RoPE as pretrained (PI's baseline, "direct")
    "pi": lambda s: dict(rope_type="linear", rope_factor=s),      # position interpolation: every frequency / s
    "yarn": lambda s: dict(rope_type="yarn", rope_factor=s),      # YaRN: NTK-by-parts, beta 32 / 1, temperature
}
LABELS = {"plain": "plain RoPE", "pi": "PI (linear, s = 4)", "yarn": "YaRN (s = 4)"}


# ----------------------------------------------------------------------------- pass keys

def place_passkey(seq, key_pos, answer_pos, digits, ids):
    """Write a pass key into a token sequence in place: STATEMENT then the digits with the first digit at
    key_pos, ". ", and later QUESTION then the digits again with the first at answer_pos (the distance
    answer_pos - key_pos is at least MIN_DISTANCE). seq: int64 (T,); digits: a string of KEY_DIGITS digits;
    ids: the tokenizer's id of each character used. Returns seq."""
    def write(pos, text):
        seq[pos:pos + len(text)] = torch.tensor([ids[c] for c in text])
    write(key_pos - len(STATEMENT), STATEMENT + digits + STATEMENT_END)
    write(answer_pos - len(QUESTION), QUESTION + digits)
    return seq


def char_ids(tokenizer):
    """The ids of the characters the pass keys use; UserError when the corpus lacks one (a char tokenizer
    knows only its corpus's characters)."""
    chars = set(STATEMENT + QUESTION + STATEMENT_END + "0123456789")
    try:
        return {c: tokenizer.encode(c)[0] for c in chars}
    except (UserError, IndexError):
        raise UserError("the corpus lacks characters of the pass-key sentences (letters, digits, '?', '.')") from None


def random_digits(gen):
    """KEY_DIGITS random decimal digits as a string (a leading 0 allowed)."""
    return "".join(str(d) for d in torch.randint(10, (KEY_DIGITS,), generator=gen).tolist())


class PasskeyLoss:
    """A train.py loss_fn (train.run(loss_fn=...)): each batch of corpus windows (x, y), (B, T), gets one pass
    key per row, its distance uniform in [min_distance, max_distance] and its position uniform where both
    sentences fit; the loss is the language-model loss of the result plus key_weight times the mean
    cross-entropy of the KEY_DIGITS digits after the question (predictable only by retrieving them: 5 targets
    of T, whose gradient the plain loss dilutes). Logs lm_loss and passkey_loss (nats per digit; ln 10 = 2.30
    is chance). Draws are seeded by (seed, step): a resumed run continues the same stream; start_step is the
    step the run starts or resumes from."""

    def __init__(self, tokenizer, seed, min_distance, max_distance, start_step=0, key_weight=0.0):
        self.ids, self.seed, self.step = char_ids(tokenizer), seed, start_step
        self.min_distance, self.max_distance, self.key_weight = min_distance, max_distance, key_weight

    def __call__(self, model, batch):
        x, y = batch
        seq = torch.cat([x[:, :1], y], dim=1).cpu()  # the window, T + 1 tokens
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        answers = []
        for row in seq:
            d = int(torch.randint(self.min_distance, self.max_distance + 1, (), generator=gen))
            key_pos = len(STATEMENT) + int(torch.randint(len(row) - KEY_DIGITS - len(STATEMENT) - d + 1, (),
                                                         generator=gen))
            place_passkey(row, key_pos, key_pos + d, random_digits(gen), self.ids)
            answers.append(key_pos + d)
        seq = seq.to(x.device)
        logits, loss = model(seq[:, :-1], seq[:, 1:])
        rows = torch.arange(len(seq), device=x.device)[:, None]
        cols = torch.tensor(answers, device=x.device)[:, None] + torch.arange(KEY_DIGITS, device=x.device)
        key_loss = torch.nn.functional.cross_entropy(logits[rows, cols - 1].flatten(0, 1).float(),
                                                     seq[rows, cols].flatten())
        metrics = {"lm_loss": loss.detach(), "passkey_loss": key_loss.detach()}
        return loss + self.key_weight * key_loss, metrics


def passkey_prompts(dataset, ids, bins, per_bin, max_len, seed=0):
    """The evaluation's prompts, the same for every model: for each distance bin (a, b], per_bin windows of
    the val split (evenly spaced) with a pass key at a distance uniform in the bin (at least MIN_DISTANCE),
    its statement 0-15 characters after the window's start. Returns [(x int64 (per_bin, n), answer_pos
    int64 (per_bin,), distance int64 (per_bin,))] per bin, n = min(max_len, b + 40): every answer fits."""
    val = np.asarray(dataset.tokens("val"))
    gen, out = torch.Generator().manual_seed(seed), []
    for a, b in bins:
        n = min(max_len, b + 40)
        starts = np.linspace(0, len(val) - n - 1, per_bin).astype(np.int64)
        x = torch.from_numpy(np.stack([val[s:s + n] for s in starts]).astype(np.int64))
        answers, distances = [], []
        for row in x:
            key_pos = len(STATEMENT) + int(torch.randint(16, (), generator=gen))
            hi = min(b, n - KEY_DIGITS - key_pos)
            d = int(torch.randint(max(a + 1, MIN_DISTANCE), hi + 1, (), generator=gen))
            place_passkey(row, key_pos, key_pos + d, random_digits(gen), ids)
            answers.append(key_pos + d)
            distances.append(d)
        out.append((x, torch.tensor(answers), torch.tensor(distances)))
    return out


@torch.no_grad()
def passkey_correct(model, x, answer_pos):
    """Whether greedy decoding after each prompt's question gives its pass key: x (n, T) windows holding the
    key's digits at answer_pos (n,) .. + KEY_DIGITS - 1 -> bool (n,). One forward: greedy decoding writes the
    key exactly when the argmax at each of its positions, given the true digits before, is the true digit
    (it agrees with the key up to its first wrong digit)."""
    model.eval()
    logits, _ = model(x.to(next(model.parameters()).device))
    rows = torch.arange(len(x))[:, None]
    cols = answer_pos[:, None] + torch.arange(KEY_DIGITS)
    predicted = logits.argmax(-1).cpu()[rows, cols - 1]
    return (predicted == x[rows, cols]).all(-1)


@torch.no_grad()
def val_loss_inside(model, x, y):
    """The mean next-token loss (nats) of val windows x, y (n, L): the loss inside the training length."""
    model.eval()
    logits, _ = model(x.to(next(model.parameters()).device))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float().cpu(), y.flatten()).item()


def usable_distance(accuracy, bins, threshold):
    """The upper edge of the last bin of the unbroken run of bins, from the first, whose passkey accuracy is
    at least threshold; 0 when the first bin is below it."""
    usable = 0
    for acc, (_, b) in zip(accuracy, bins):
        if acc < threshold:
            break
        usable = b
    return usable


# ----------------------------------------------------------------------------- runs

def pretrain(args, seed, tokenizer):
    """Train the seed's RoPE GPT at length L on pass-key windows (cached_run). Returns its folder."""
    out = Path(args.out) / f"pretrain-s{seed}"
    flags = dict(model="gpt", pos="rope", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, seed=seed,
                 max_iters=args.max_iters, batch_size=args.batch_size, block_size=args.block_size,
                 learning_rate=args.learning_rate, warmup_iters=args.warmup_iters, eval_iters=args.eval_iters,
                 eval_interval=args.max_iters, log_interval=max(1, args.max_iters // 10))
    settings = {**flags, "data": args.data, "passkey": [MIN_DISTANCE, args.max_distance], "key_weight": args.key_weight}
    cached_run(out, settings, f"pretraining, seed {seed}", sample_tokens=0, device=args.device, data=args.data,
               data_dir=args.data_dir, loss_fn=PasskeyLoss(tokenizer, seed, MIN_DISTANCE, args.max_distance, key_weight=args.key_weight),
               **flags)
    return out, settings


def finetune(args, method, seed, base, base_settings, tokenizer, evaluate):
    """Fine-tune the seed's pretrained model at eval_factor x L with `method`'s RoPE scaling, checkpoint by
    checkpoint (the steps of --checkpoints; a constant learning rate after warmup, so that resuming to the next
    checkpoint continues one run), and evaluate at each: step 0 is the scaled model before any training.
    Returns {step: evaluate(model)}, each cached in the run folder."""
    s, L = args.eval_factor, args.block_size
    out, init = Path(args.out) / f"{method}-s{seed}", Path(args.out) / f"{method}-s{seed}" / "init"
    flags = dict(seed=seed, batch_size=max(1, args.batch_size // s), block_size=s * L,
                 learning_rate=args.finetune_lr, warmup_iters=args.finetune_warmup, lr_schedule="trapezoidal",
                 cooldown_frac=0.0, eval_iters=args.eval_iters, eval_interval=max(args.checkpoints),
                 log_interval=max(1, min(args.checkpoints[1:] or [1])))
    settings = {"base": base_settings, "method": method, "rope": METHODS[method](s), **flags,
                "passkey": [MIN_DISTANCE, args.finetune_max_distance], "key_weight": args.key_weight}

    def write_init():
        model = models.from_pretrained(base)
        model.config = dataclasses.replace(model.config, **METHODS[method](s))
        model.save_pretrained(init)
        tokenization.tokenizer_for_model(base, model.config.vocab_size).save(init)
    cached(out / "init.json", settings, write_init, init / "config.json")
    results, previous = {}, 0
    for step in [k for k in args.checkpoints if k > 0]:
        def train_to(step=step, previous=previous):
            print(f"--- {method}, seed {seed}: fine-tuning to step {step}", flush=True)
            train.run(out_dir=str(out), init_from=str(init) if previous == 0 else "resume", overwrite=True,
                      max_iters=step, sample_tokens=0, device=args.device, data=args.data, data_dir=args.data_dir,
                      loss_fn=PasskeyLoss(tokenizer, seed, MIN_DISTANCE, args.finetune_max_distance, previous,
                                          args.key_weight),
                      **flags)
            model = models.from_pretrained(out)
            model.save_pretrained(out / f"step-{step}")
        cached(out / f"trained-{step}.json", {**settings, "step": step}, train_to, out / f"step-{step}" / "config.json")
        previous = step
    for step in args.checkpoints:
        folder = init if step == 0 else out / f"step-{step}"
        results[step] = cached_result(out / f"eval-{step}.json", {**settings, "step": step, "eval": args.eval_key},
                                      lambda: evaluate(models.from_pretrained(folder)))
    return results


def run(args):
    """PI's and YaRN's claim in miniature, as passkey retrieval: pretrain RoPE GPTs at L on pass-key windows,
    fine-tune each at eval_factor x L with each method, and measure at every checkpoint the greedy passkey
    accuracy by distance bin up to eval_factor x L and the val loss inside L. Writes the summary to
    OUT/summary.json and --results, the plot to --plot."""
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = comma_list(args.methods)
    if unknown := [m for m in methods if m not in METHODS]:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)}")
    try:
        args.checkpoints = sorted({0, *(int(k) for k in comma_list(args.checkpoints))})
    except ValueError:
        raise UserError(f"--checkpoints: expected comma-separated step numbers, not {args.checkpoints!r}") from None
    L, s = args.block_size, args.eval_factor
    longest = L - KEY_DIGITS - len(STATEMENT)
    if not MIN_DISTANCE <= args.max_distance <= longest:
        raise UserError(f"--max_distance must be between {MIN_DISTANCE} and {longest} (a pass key fits in {L} "
                        f"tokens), not {args.max_distance}")
    if not MIN_DISTANCE <= args.finetune_max_distance <= s * L - KEY_DIGITS - len(STATEMENT):
        raise UserError(f"--finetune_max_distance must be between {MIN_DISTANCE} and "
                        f"{s * L - KEY_DIGITS - len(STATEMENT)}, not {args.finetune_max_distance}")
    if min(args.seeds, s - 1, args.bin - MIN_DISTANCE, args.per_bin, args.checkpoints[-1]) < 1:
        raise UserError(f"--seeds, --per_bin and the last --checkpoints must be at least 1, --eval_factor at "
                        f"least 2 and --bin more than {MIN_DISTANCE}")
    if L % args.bin:
        raise UserError(f"--bin ({args.bin}) must divide --block_size ({L}): the distance buckets are multiples of it")
    dataset = data.prepare(args.data or None, "char", args.data_dir, quiet=True)
    ids = char_ids(dataset.tokenizer)
    bins = [(a, min(a + args.bin, s * L)) for a in range(0, s * L, args.bin)]
    prompts = passkey_prompts(dataset, ids, bins, args.per_bin, s * L)
    val = np.asarray(dataset.tokens("val"))
    starts = np.linspace(0, len(val) - L - 1, args.val_windows).astype(np.int64)
    xy = torch.from_numpy(np.stack([val[i:i + L + 1] for i in starts]).astype(np.int64))
    device = resolve_device(args.device)
    args.eval_key = {"bins": bins, "per_bin": args.per_bin, "val_windows": args.val_windows}

    def evaluate(model):
        model.to(device)
        correct = [passkey_correct(model, x, answers).float().mean().item() for x, answers, _ in prompts]
        return {"accuracy": correct, "val_loss": val_loss_inside(model, xy[:, :-1], xy[:, 1:])}

    runs = {}
    for seed in range(args.seeds):
        base, base_settings = pretrain(args, seed, dataset.tokenizer)
        for method in methods:
            runs[method, seed] = finetune(args, method, seed, base, base_settings, dataset.tokenizer, evaluate)
    buckets = [(0, L)] + [(L * 2 ** i, min(L * 2 ** (i + 1), s * L)) for i in range(int(math.log2(s)) + 1)
                          if L * 2 ** i < s * L]
    rows = []
    for method in methods:
        for step in args.checkpoints:
            per_seed = [runs[method, seed][step] for seed in range(args.seeds)]
            accuracy = np.array([r["accuracy"] for r in per_seed])  # (seeds, bins)
            usable = [usable_distance(a, bins, args.usable_accuracy) for a in accuracy]
            by_bucket = [accuracy[:, [i for i, (a, b) in enumerate(bins) if lo <= a and b <= hi]].mean(1)
                         for lo, hi in buckets]
            rows.append({"method": method, "step": step, "tokens": step * flags_tokens(args),
                         "usable": usable, "val_loss": [r["val_loss"] for r in per_seed],
                         "buckets": [b.tolist() for b in by_bucket], "accuracy": accuracy.tolist()})
    summary = {"setup": {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "eval_factor",
                                                        "max_iters", "batch_size", "learning_rate", "max_distance",
                                                        "finetune_lr", "finetune_max_distance", "checkpoints",
                                                        "per_bin", "bin", "usable_accuracy", "seeds")},
               "bins": bins, "buckets": buckets, "rows": rows}
    print(f"greedy passkey accuracy by distance (mean over {args.seeds} seeds; {args.per_bin} prompts per bin of "
          f"{args.bin}) and val loss inside {L}, after each fine-tuning step count at {s * L}:")
    print_table([{"method": LABELS[r["method"]], "step": r["step"], "usable": f"{np.mean(r['usable']):.0f}",
                  "val": f"{np.mean(r['val_loss']):.3f}",
                  **{f"b{i}": f"{np.mean(b):.0%}" for i, b in enumerate(r["buckets"])}} for r in rows],
                [("method", "method", "{}"), ("step", "steps", "{}"), ("usable", "usable distance", "{}"),
                 ("val", f"val loss <= {L}", "{}")] +
                [(f"b{i}", f"acc {lo}-{hi}", "{}") for i, (lo, hi) in enumerate(buckets)])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runtime.write_json(Path(args.out) / "summary.json", summary, indent=1)
    write_results(args.results, summary, lambda summary: "\n".join(results_table(summary)))
    if args.plot:
        plot_positions(summary, methods, args.plot)
    return summary


def flags_tokens(args):
    """Tokens per fine-tuning step: the fine-tune's batch of eval_factor x L sequences."""
    return max(1, args.batch_size // args.eval_factor) * args.eval_factor * args.block_size


def results_table(summary):
    """The README's results table (markdown lines) from a summary: per method and checkpoint, the usable
    distance, the passkey accuracy by bucket and the val loss inside L, as the seeds' mean (min–max)."""
    def cell(values, fmt):
        values = np.asarray(values, dtype=float)
        return fmt.format(values.mean()) + (f" ({fmt.format(values.min())}–{fmt.format(values.max())})"
                                            if len(values) > 1 else "")
    L = summary["setup"]["block_size"]
    head = ["method", "fine-tuning steps", "usable distance"] + [
        f"accuracy, distance {lo}–{hi}" if lo else f"accuracy, distance ≤ {hi}" for lo, hi in summary["buckets"]] + [
        f"val loss inside {L}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        lines.append("| " + " | ".join([LABELS[r["method"]], str(r["step"]), cell(r["usable"], "{:.0f}")] +
                                       [cell(b, "{:.0%}") for b in r["buckets"]] + [cell(r["val_loss"], "{:.3f}")])
                     + " |")
    return lines


def plot_positions(summary, methods, path):
    """Left: the usable distance against fine-tuning steps per method (line: the seeds' mean, band: their
    range). Right: passkey accuracy against distance after the last checkpoint."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    centres = [(a + b) / 2 for a, b in summary["bins"]]
    for method in methods:
        rows = [r for r in summary["rows"] if r["method"] == method]
        steps = [r["step"] for r in rows]
        usable = np.array([r["usable"] for r in rows], dtype=float)
        line, = ax.plot(steps, usable.mean(1), "o-", label=LABELS[method])
        ax.fill_between(steps, usable.min(1), usable.max(1), alpha=0.2, color=line.get_color())
        accuracy = np.array(rows[-1]["accuracy"])
        ax2.plot(centres, accuracy.mean(0), "o-", color=line.get_color(), label=f"{LABELS[method]}, step {steps[-1]}")
        ax2.fill_between(centres, accuracy.min(0), accuracy.max(0), alpha=0.2, color=line.get_color())
    L = summary["setup"]["block_size"]
    for a in (ax, ax2):
        a.axhline(L, color="gray", linewidth=0.8) if a is ax else a.axvline(L, color="gray", linewidth=0.8)
    ax.set(xlabel="fine-tuning steps at the longer length", ylabel="usable distance (characters)",
           title=f"usable distance (accuracy >= {summary['setup']['usable_accuracy']:.0%} in every bin up to it)")
    ax2.set(xlabel="distance from the pass key to the question (characters)", ylabel="greedy passkey accuracy",
            title="accuracy by distance after fine-tuning", ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.positions)."""
    p = sub.add_parser("positions", help="passkey retrieval in miniature: a RoPE GPT pretrained at L, fine-tuned "
                       "at eval_factor x L plain, with position interpolation and with YaRN; usable distance against "
                       "fine-tuning steps (trains; cached by settings)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds (a pretraining run and every method's fine-tune each)")
    p.add_argument("--n_layer", type=int, default=2, help="the GPT's layers")
    p.add_argument("--n_head", type=int, default=4, help="the GPT's heads")
    p.add_argument("--n_embd", type=int, default=64, help="the GPT's width")
    p.add_argument("--block_size", type=int, default=256, help="pretraining length L")
    p.add_argument("--max_iters", type=int, default=2500, help="pretraining steps")
    p.add_argument("--batch_size", type=int, default=8, help="pretraining sequences per step (fine-tuning: this / "
                   "eval_factor, the same tokens per step)")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="pretraining peak learning rate (cosine)")
    p.add_argument("--warmup_iters", type=int, default=30, help="pretraining warmup steps")
    p.add_argument("--max_distance", type=int, default=220, help=f"pretraining pass keys' longest distance (the "
                   f"shortest: {MIN_DISTANCE})")
    p.add_argument("--key_weight", type=float, default=3.0, help="weight of the pass key's digits' mean loss "
                   "added to the language-model loss (pretraining and fine-tuning)")
    p.add_argument("--eval_factor", type=int, default=4, help="fine-tuning and evaluation length, times L (the "
                   "methods' s)")
    p.add_argument("--checkpoints", default="25,50,100,200", help="fine-tuning steps at which to evaluate (and 0)")
    p.add_argument("--finetune_lr", type=float, default=1e-3, help="fine-tuning learning rate (constant after warmup)")
    p.add_argument("--finetune_warmup", type=int, default=10, help="fine-tuning warmup steps")
    p.add_argument("--finetune_max_distance", type=int, default=220, help="fine-tuning pass keys' longest distance "
                   "(default: pretraining's, so longer distances are never trained)")
    p.add_argument("--bin", type=int, default=128, help="distance bin of the passkey evaluation")
    p.add_argument("--per_bin", type=int, default=16, help="passkey prompts per bin")
    p.add_argument("--usable_accuracy", type=float, default=0.5, help="accuracy a bin needs to count as usable")
    p.add_argument("--val_windows", type=int, default=32, help="val windows of L for the loss inside L")
    p.add_argument("--eval_iters", type=int, default=5, help="batches of train.py's own evaluations")
    p.add_argument("--results", default=str(HERE / "results.json"), help="where the numbers go for the README "
                   "(empty: only OUT/summary.json)")
    add_training_run_flags(p, "out/positions", "the runs' folders and summary.json", str(HERE / "positions_cpu.png"))
    p.set_defaults(run=run, threads=1)
    return p
