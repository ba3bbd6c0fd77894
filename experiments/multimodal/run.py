"""Query-based multimodal models in miniature (Perceiver IO, Flamingo's Perceiver Resampler and gated
cross-attention, BLIP-2's frozen language model with a soft prompt): a text-only decoder learns scenes
of digits written out, is frozen, and a bridge trained on image captions alone lets it answer
questions about images it has never been asked about (zero-shot).

  python bench.py multimodal        # or: python -m experiments.multimodal

Stage 0 trains models/gpt.py on `scene: 3 8 1. how many 8s? 1` lines (multimodal.text_corpus). Each
arm then trains a bridge (train.run with --mm_images digits) on captions of scenes made of train-split
images, and is scored on fixed scenes of held-out test images: the caption, and the questions count,
largest and sum, which the bridge never trained on. The write-up, ours beside the papers': README.md
beside this file."""
import statistics
import time
from pathlib import Path

import torch

from experiments.common import add_training_run_flags, cached, cached_result, cached_run, comma_list, pyplot, save_figure
from omnitron import checkpoints, multimodal, runtime
from omnitron.runtime import UserError, print_table

LM = dict(n_layer=2, n_head=4, n_embd=64, pos="rope")  # the stage-0 decoder (models/gpt.py), character level;
# RoPE: copying a scene digit is one relative offset; with learned positions, 1,200 steps copied 46% of captions
KINDS = ("caption",) + multimodal.QUESTIONS
# arm -> how it differs from a frozen language model with a prefix of N = --compare_queries queries
ARMS = {
    "frozen": {},                                   # BLIP-2's recipe: the language model frozen, a soft prompt
    "full": {"mm_freeze": False},                   # the language model fine-tuned with the bridge
    "scratch": {"mm_freeze": False, "scratch": True},  # no stage 0: a new language model trained with the bridge
    "xattn": {"mm_inject": "xattn"},                # Flamingo's gated cross-attention (equal trainable parameters)
    "patches": {"mm_queries": 0},                   # every patch token as the prefix, no resampler
}


# ----------------------------------------------------------------------------- steps

def stage0(args):
    """The text-only decoder: models/gpt.py trained on multimodal.text_corpus (the scene written out),
    cached by its settings. Returns its run folder."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "text.txt"
    settings = {"lines": args.lm_lines, "scene_digits": args.scene_digits}
    cached(out / "text.json", settings, lambda: runtime.atomic_write(
        corpus, lambda tmp: Path(tmp).write_text(multimodal.text_corpus(args.lm_lines, args.scene_digits))), corpus)
    flags = dict(model="gpt", **LM, data=str(corpus), data_dir=args.data_dir, block_size=args.block_size,
                 batch_size=args.batch_size, max_iters=args.lm_iters, learning_rate=3e-3,
                 warmup_iters=max(1, args.lm_iters // 10), eval_interval=args.lm_iters, eval_iters=args.eval_iters,
                 log_interval=max(1, args.lm_iters // 5), sample_tokens=0, device=args.device, dtype="float32", seed=0)
    cached_run(out / "lm", {**flags, "corpus": settings}, "stage 0: the text-only decoder", **flags)
    return out / "lm"


def xattn_size(args, n_embd, n_layer):
    """(resampler depth, gated layers' feed-forward width) of the xattn arm with as many trainable
    parameters as the prefix arm: one resampler layer fewer, its parameters given to the gated
    layers' feed-forward (the width rounded; at least 0)."""
    def count(depth, hidden, inject):
        cfg = multimodal.BridgeConfig(n_embd=n_embd, image_width=8 * args.scene_digits, patch=args.patch,
                                      width=args.width, queries=args.compare_queries, depth=depth, inject=inject)
        n = sum(p.numel() for p in multimodal.Bridge(cfg).parameters())
        if inject == "xattn":
            n += n_layer * sum(p.numel() for p in multimodal.GatedCrossAttention(n_embd, cfg.heads, hidden).parameters())
        return n
    target = count(args.depth, 0, "prefix")
    depth = max(1, args.depth - 1)
    slope = count(depth, 2, "xattn") - count(depth, 1, "xattn")  # parameters per unit of feed-forward width
    hidden = round((target - count(depth, 1, "xattn")) / slope) + 1
    return depth, max(0, hidden)


def bridge_run(args, lm, arm, queries, seed):
    """Train one bridge arm (train.run --mm_images digits, cached by its settings) into OUT/ARM-qN-sSEED.
    Returns the run folder."""
    spec = dict(ARMS[arm])
    scratch = spec.pop("scratch", False)
    flags = dict(mm_images="digits", mm_scene_digits=args.scene_digits, mm_texts="captions", mm_queries=queries,
                 mm_depth=args.depth, mm_width=args.width, mm_patch=args.patch, block_size=args.block_size,
                 batch_size=args.batch_size, max_iters=args.bridge_iters, learning_rate=args.bridge_lr,
                 warmup_iters=max(1, args.bridge_iters // 10), eval_interval=args.bridge_iters,
                 eval_iters=args.eval_iters, log_interval=max(1, args.bridge_iters // 5), sample_tokens=0,
                 device=args.device, dtype="float32", data_dir=args.data_dir, seed=seed)
    flags.update(spec)
    if arm == "xattn":
        flags["mm_depth"], flags["mm_xattn_hidden"] = xattn_size(args, LM["n_embd"], LM["n_layer"])
    if scratch:
        flags.update(model="gpt", **LM, init_from="scratch", data=str(Path(args.out) / "text.txt"))
    else:
        flags["init_from"] = str(lm)
    out = Path(args.out) / f"{arm}-q{queries}-s{seed}"
    cached_run(out, {**flags, "lm": runtime.read_json(Path(lm) / "settings.json")}, f"{arm}, N={queries}, seed {seed}",
               **flags)
    return out


def decode_ms(model, tokenizer, image, new_tokens=16):
    """Milliseconds per decoded token after the image and `digits:` (the prefix prefilled once; up to
    new_tokens, fewer where a learned position table ends), the best of three, and the prefill's:
    (per token, prefill)."""
    best = (float("inf"), float("inf"))
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            inner = model
            media = inner.bridge(image[None])
            prefix = media if inner.bridge.config.inject == "prefix" else None
            ids = torch.tensor([tokenizer.encode(multimodal.after_image("digits:"))])
            length = (0 if prefix is None else prefix.shape[1]) + ids.shape[1]
            new_tokens = min(new_tokens, (model.max_positions or length + new_tokens) - length)  # a learned table's end
            cache = model.init_cache(1, (0 if prefix is None else prefix.shape[1]) + ids.shape[1] + new_tokens)
            with multimodal.attend_to(inner, media):
                logits = model(ids, cache=cache, prefix=prefix)[0][:, -1]
                t1 = time.perf_counter()
                for _ in range(new_tokens):
                    logits = model(logits.argmax(-1)[:, None], cache=cache)[0][:, -1]
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) / new_tokens * 1000, (t1 - t0) * 1000))
    return best


def score(folder, args):
    """A trained arm's accuracies on the held-out scenes: each kind (the caption, which it trained on;
    the questions, zero-shot), the questions' mean, the text-only skill (the same questions with the
    scene written out: retention), decode speed, parameter counts."""
    model, tokenizer = checkpoints.load(folder)
    images, digits = multimodal.test_scenes(args.data_dir, args.scene_digits, args.test_scenes)
    result = {}
    for kind in KINDS:
        items = multimodal.eval_texts(digits, kind)
        result[kind] = statistics.mean(multimodal.exact_match(model, tokenizer, images,
                                                              [(multimodal.after_image(p), a) for p, a in items]))
        if kind != "caption":
            written = [(f"\n{multimodal.written_scene(d)}. {p}", a) for d, (p, a) in zip(digits, items)]
            result[f"text_{kind}"] = statistics.mean(multimodal.exact_match(model, tokenizer, None, written))
    result["questions"] = statistics.mean(result[k] for k in multimodal.QUESTIONS)
    result["text_questions"] = statistics.mean(result[f"text_{k}"] for k in multimodal.QUESTIONS)
    result["ms_per_token"], result["prefill_ms"] = decode_ms(model, tokenizer, images[0])
    result["bridge_params"], result["lm_params"] = multimodal.count_params(model)
    result["media_tokens"] = model.bridge.config.media_tokens
    return result


def baselines(args, lm):
    """What needs no image: the most common answer of each kind on the test items (chance), and the
    stage-0 decoder's accuracy with the scene written out (the ceiling of the zero-shot transfer)."""
    _, digits = multimodal.test_scenes(args.data_dir, args.scene_digits, args.test_scenes)
    model, tokenizer = checkpoints.load(lm)
    out = {}
    for kind in KINDS:
        items = multimodal.eval_texts(digits, kind)
        answers = [a for _, a in items]
        out[f"chance_{kind}"] = max(answers.count(a) for a in set(answers)) / len(answers)
        written = [(f"\n{multimodal.written_scene(d)}. {p}", a) for d, (p, a) in zip(digits, items)]
        out[f"text_{kind}"] = statistics.mean(multimodal.exact_match(model, tokenizer, None, written))
    out["chance_questions"] = statistics.mean(out[f"chance_{k}"] for k in multimodal.QUESTIONS)
    out["text_questions"] = statistics.mean(out[f"text_{k}"] for k in multimodal.QUESTIONS)
    return out


def run(args):
    """Stage 0, then every arm and seed (cached), each scored on the held-out scenes (cached with its
    run); prints the tables, writes OUT/summary.json and the plot."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return experiment(args)
    finally:
        torch.set_num_threads(threads)  # the caller's thread count back (bench.py, the tests)


def experiment(args):
    """run's body, under its thread count."""
    queries = [int(q) for q in comma_list(args.queries)]
    arms = comma_list(args.arms)
    if unknown := [a for a in arms if a not in ARMS]:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARMS)}")
    if any(q < 1 for q in queries) or args.compare_queries < 1:
        raise UserError("--queries and --compare_queries: 1 or more learned queries")
    lm = stage0(args)
    base = cached_result(Path(args.out) / "baselines.json",
                         {"lm": runtime.read_json(lm / "settings.json"), "test_scenes": args.test_scenes},
                         lambda: baselines(args, lm))
    rows = []

    def add(arm, n, seed):
        folder = bridge_run(args, lm, arm, n, seed)
        result = cached_result(folder / "scores.json", {"run": runtime.read_json(folder / "settings.json"),
                                                        "test_scenes": args.test_scenes}, lambda: score(folder, args))
        rows.append({"arm": arm, "queries": n, "seed": seed, **result})
    for n in queries:  # accuracy against N: the frozen prefix arm, every seed
        for seed in range(args.seeds):
            add("frozen", n, seed)
    for arm in arms:
        if arm != "frozen":
            for seed in range(args.seeds):
                add(arm, args.compare_queries, seed)
    print_table(rows, [("arm", "arm", "{}"), ("queries", "N", "{}"), ("seed", "seed", "{}"),
                       ("media_tokens", "media", "{}"), ("bridge_params", "bridge params", "{:,}"),
                       ("caption", "caption", "{:.1%}"), ("count", "count", "{:.1%}"), ("largest", "largest", "{:.1%}"),
                       ("sum", "sum", "{:.1%}"), ("questions", "questions", "{:.1%}"),
                       ("text_questions", "text-only", "{:.1%}"), ("ms_per_token", "ms/token", "{:.2f}")])
    summary = {"baselines": base, "rows": rows, "by_arm": {}}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        for n in dict.fromkeys(r["queries"] for r in rows if r["arm"] == arm):
            group = [r for r in rows if r["arm"] == arm and r["queries"] == n]
            summary["by_arm"][f"{arm}-q{n}"] = {k: [min(r[k] for r in group), statistics.mean(r[k] for r in group),
                                                    max(r[k] for r in group)]
                                                for k in ("caption", "questions", "text_questions", "ms_per_token")}
    print(f"baselines: chance (most common answer) questions {base['chance_questions']:.1%}, caption "
          f"{base['chance_caption']:.1%}; the text-only decoder with the scene written out: questions "
          f"{base['text_questions']:.1%}, caption {base['text_caption']:.1%}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runtime.write_json(Path(args.out) / "summary.json", summary, indent=1)
    if args.plot:
        plot(rows, base, args.compare_queries, args.plot)
    return summary


def plot(rows, base, compare, path):
    """Left: caption and zero-shot question accuracy against N (frozen prefix arm), chance and the
    text-only ceiling dashed. Right: each arm at the compared N (mean, min-max over seeds)."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    frozen = [r for r in rows if r["arm"] == "frozen"]
    ns = sorted({r["queries"] for r in frozen})
    for key, label in (("caption", "caption (trained)"), ("questions", "questions (zero-shot, mean)"),
                       ("largest", "largest? (zero-shot)")):
        means = [statistics.mean(r[key] for r in frozen if r["queries"] == n) for n in ns]
        ax.plot(ns, means, marker="o", label=label)
    ax.axhline(base["chance_questions"], linestyle=":", color="grey", label="questions: chance")
    ax.axhline(base["text_questions"], linestyle="--", color="grey", label="questions: scene written out")
    ax.set(xscale="log", xlabel="N learned queries", ylabel="exact-match accuracy (held-out scenes)",
           title="frozen decoder, prefix: accuracy against N")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.text(0.02, 0.5, "the papers: Flamingo 64 latents,\nBLIP-2 32 queries (no curve against N)",
            transform=ax.transAxes, fontsize=7, color="dimgrey")
    ax.legend(fontsize=8)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for i, key in enumerate(("caption", "questions", "text_questions")):
        vals = [[r[key] for r in rows if r["arm"] == a and r["queries"] == compare] for a in arms]
        means = [statistics.mean(v) for v in vals]
        err = [[m - min(v) for m, v in zip(means, vals)], [max(v) - m for m, v in zip(means, vals)]]
        ax2.bar([j + 0.27 * (i - 1) for j in range(len(arms))], means, 0.27, yerr=err, capsize=3,
                label={"text_questions": "text-only skill (retention)"}.get(key, key))
    ax2.legend(fontsize=8, ncol=3, loc="upper center")
    ax2.set_xticks(range(len(arms)), arms)
    ax2.set(ylabel="accuracy", ylim=(0, 1.25), title=f"arms at N = {compare} (mean, min-max over seeds)")
    ax2.set_xlabel("Flamingo (Table 3): the frozen LM beats fine-tuning it and training it from scratch;\n"
                   "the resampler beats other connectors; gated xattn beats other ways of conditioning",
                   fontsize=7, color="dimgrey")
    save_figure(fig, path)


def add_parser(sub):
    """Register this experiment's subcommand and its flags (bench.py's, and python -m experiments.multimodal)."""
    p = sub.add_parser("multimodal", help="query-based multimodal bridge (Perceiver resampler, Flamingo, BLIP-2): "
                       "accuracy against N queries, frozen vs fine-tuned vs scratch, prefix vs gated "
                       "cross-attention, every patch as the prefix (trains; cached by settings)")
    p.add_argument("--queries", default="1,2,4,8,16", help="the N of the accuracy-against-N sweep (frozen, prefix)")
    p.add_argument("--compare_queries", type=int, default=8, help="N of the arms' comparison")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated from {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each arm and of each N of the sweep")
    p.add_argument("--scene_digits", type=int, default=3, help="digits side by side in a scene")
    p.add_argument("--lm_lines", type=int, default=20000, help="lines of the text-only corpus (stage 0)")
    p.add_argument("--lm_iters", type=int, default=3000, help="steps of the text-only decoder (stage 0)")
    p.add_argument("--bridge_iters", type=int, default=1600, help="steps of each bridge run")
    p.add_argument("--bridge_lr", type=float, default=3e-3, help="peak learning rate of the bridge runs")
    p.add_argument("--depth", type=int, default=2, help="resampler layers (the xattn arm: one fewer, see xattn_size)")
    p.add_argument("--width", type=int, default=64, help="the patch encoder's and the resampler's width")
    p.add_argument("--patch", type=int, default=4, help="patches of p x p pixels")
    p.add_argument("--batch_size", type=int, default=32, help="sequences (scenes) per step")
    p.add_argument("--block_size", type=int, default=64, help="the decoder's context (learned positions)")
    p.add_argument("--eval_iters", type=int, default=5, help="batches per loss evaluation")
    p.add_argument("--test_scenes", type=int, default=multimodal.TEST_SCENES, help="held-out scenes scored")
    add_training_run_flags(p, "out/multimodal", "the runs' folders and summary.json", "out/multimodal.png")
    # one torch thread: these models are so small that a second thread costs more than it gives (the
    # stage-0 step took 41 ms on one thread, over 300 ms on two, on the shared 2-core CPU)
    p.set_defaults(run=run, threads=1)
    return p
