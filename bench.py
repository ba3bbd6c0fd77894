"""Measurements. Every figure in the README comes from here, with the command that produced it.

  python bench.py attention                 # naive vs sdpa (vs triton on CUDA): time, memory, TFLOP/s
  python bench.py attention --json          # the same, one JSON object per measurement
  python bench.py attention --scaling       # softmax vs Performer vs a window, T = 512..32k: slopes, crossover
  python bench.py kvcache --model llama     # KV-cache bytes and decoding tokens/s: MHA vs GQA vs MQA
  python bench.py speed --model gpt         # training tokens/s, FLOP/s, MFU, memory; decoding tokens/s
  python bench.py curves out/a out/b        # val loss against wall time from runs' log.jsonl, plotted
  python bench.py lora                      # full fine-tuning vs LoRA: trainable params, optimizer state, memory, time
  python bench.py moe                       # dense vs MoE at equal active parameters; loop vs grouped_mm; expert load
  python bench.py switch                    # Switch Transformer vs dense at equal FLOPs: tokens to the same loss
  python bench.py performer                 # softmax vs Performer (FAVOR+) vs a sliding window: val loss, and the gap
  python bench.py icl                       # in-context learning: accuracy against K shots for 3 model sizes
  python bench.py positions                 # learned vs sinusoidal vs RoPE vs NoPE by position; PI, NTK, YaRN
  python bench.py decode                    # decoding vs transformers, int8/bf16 weights, speculative; the roofline
  python bench.py scaling                   # scaling laws: IsoFLOP grid, Kaplan's and Chinchilla's fits, a prediction
  python bench.py phi                       # the Phi recipe: curated data + exercises vs the unfiltered pool, 3 seeds
  python bench.py self_reward               # self-rewarding iterations on string sorting: M1..M4, judge, controls

Subcommands share one timer and one peak-memory probe: on CUDA, torch's max_memory_allocated;
on CPU, the process's resident high-water mark (VmHWM), reset before each measurement through
/proc/self/clear_refs, minus the resident size at the reset.
"""
import argparse
import copy
import ctypes
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import train
from experiments.common import pyplot, save_figure
from omnitron import data, generation, kernels, lora, models, quantize, runtime
from omnitron.generation import generate, speculative_decode
from omnitron.runtime import UserError, autocast, print_table, resolve_device, resolve_dtype

# The paper experiments: `bench.py NAME` runs experiments/NAME/run.py (its add_parser and run).
EXPERIMENTS = ("switch", "positions", "scaling", "performer", "icl", "phi", "self_reward", "multimodal",
               "time_to_quality")
# How long each subcommand takes with its defaults on this project's 2-core CPU (--help lists them):
# bench.py's own subcommands timed here (speed stopped at 30 min), the experiments' from their READMEs;
# trained arms are cached, so a second call only evaluates.
DURATIONS = {
    "attention": "about 2 min (--scaling: 6 to 18 min)",
    "kvcache": "about 5 s",
    "speed": "over 30 min (--dtypes float32 --compile false: about 7 min)",
    "lora": "about 15 s",
    "curves": "seconds",
    "moe": "about 20 s",
    "decode": "about 13 min",
    "switch": "about 30 min",
    "positions": "about 45 min",
    "scaling": "about 20 min",
    "performer": "about 30 min",
    "icl": "about 30 min",
    "phi": "30 min or more (not yet measured)",
    "self_reward": "about 30 min (not yet measured)",
    "multimodal": "about 20 min",
    "time_to_quality": "about 2 h (--arms config,muon_trapezoidal --seeds 1: about 16 min)",
}


# ----------------------------------------------------------------------------- measuring


def _proc_status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _release_freed_memory_to_the_os():
    """Ask glibc to serve big blocks from mmap and to give freed memory back, so that the
    resident high-water mark of one measurement is not hidden by memory freed by the last."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, no longer grows after frees
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device, reps=3):
    """(median seconds per call, peak bytes allocated during one call beyond what was live)."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # warm-up (and autotuning, compilation)
    sync()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _release_freed_memory_to_the_os()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        base = _proc_status_kib("VmRSS") * 1024
    fn()
    sync()
    peak = (torch.cuda.max_memory_allocated() if cuda else _proc_status_kib("VmHWM") * 1024) - base
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(peak, 0)


def first_call_seconds(fn, device):
    """Wall seconds of one call of fn, synchronised: run first in a process for a new shape, this is
    what a user waits for (a Triton kernel compiles and autotunes on its first call)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- attention


def attention_flops(B, Hq, T, S, D, causal, backward):
    """Matrix-product FLOPs: q k^T and p v are 2*T*S*D each per head (half under a causal mask);
    the backward is 2.5x the forward (five products instead of two), FlashAttention-2's convention."""
    fwd = 4 * B * Hq * T * S * D * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)


def attention_backend(spec, window, device):
    """The attention function fn(q, k, v, causal) of a --backends entry: a registry name, or NAME+window
    (that backend with a sliding window of `window`). UserError for an unknown or unusable one."""
    name, _, variant = spec.partition("+")
    if name not in kernels.BACKENDS or variant not in ("", "window"):
        raise UserError(f"unknown backend {spec!r}; choose from {', '.join(kernels.BACKENDS)}, each optionally +window")
    if not kernels.BACKENDS[name].usable(device):
        raise UserError(f"the {name} backend cannot run on {device} (triton: CUDA, or TRITON_INTERPRET=1 on CPU)")
    if variant and kernels.BACKENDS[name].stateful:
        raise UserError(f"{spec}: the {name} backend has no sliding window")
    w = window if variant else 0
    return lambda q, k, v, causal: kernels.attention(q, k, v, causal, backend=name, window=w)


def quadratic(spec):
    """Whether a --backends entry costs O(T^2) (softmax over every key: not performer, not a window)."""
    return not (kernels.BACKENDS[spec.partition("+")[0]].stateful or spec.endswith("+window"))


def bench_attention(args):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.startswith("cuda")
    args.n_head = args.n_head or (4 if args.scaling else 8)
    args.head_dim = args.head_dim or (32 if args.scaling else 64)
    backends = args.backends.split(",") if args.backends else (
        ["naive", "sdpa", "performer", "sdpa+window"] + (["triton+window"] if cuda else []) if args.scaling else
        ["naive", "sdpa", "sdpa_flash", "sdpa_cudnn", "triton"] if cuda else ["naive", "sdpa"])
    if args.window < 1:
        raise UserError(f"--window must be at least 1, not {args.window}")
    fns = {b: attention_backend(b, args.window, device) for b in backends}
    seq_lens = [int(t) for t in args.seq_lens.split(",")] if args.seq_lens else (
        [512, 1024, 2048, 4096, 8192, 16384, 32768] if args.scaling else
        [1024, 2048, 4096, 8192, 16384] if cuda else [128, 256, 512, 1024, 2048, 4096])
    H, D = args.n_head, args.head_dim
    cases = [("causal", True, H)] if args.scaling else [
        ("causal", True, H), ("full", False, H), ("causal GQA", True, max(1, H // args.gqa_group))]
    rows = []
    for case, causal, Hkv in cases:
        for T in seq_lens:
            for backend in backends:
                row = {"case": case, "T": T, "backend": backend, "heads": f"{H}/{Hkv}"}
                scores_bytes = args.batch * H * T * T * 4
                if backend == "naive" and scores_bytes * 3 > args.max_naive_gb * 2 ** 30:
                    rows.append({**row, "note": "too big"})
                    continue
                if quadratic(backend) and args.max_quadratic_T and T > args.max_quadratic_T:
                    rows.append({**row, "note": f"skipped: T > --max_quadratic_T {args.max_quadratic_T}"})
                    continue
                if backend.endswith("+window") and not causal:
                    continue
                g = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(args.batch, H, T, D, device=device, dtype=dtype, generator=g)
                k, v = (torch.randn(args.batch, Hkv, T, D, device=device, dtype=dtype, generator=g) for _ in "kv")
                fn = fns[backend]
                try:  # the first call of this shape in this process: compilation and autotuning included
                    row["first_call_s"] = first_call_seconds(lambda: fn(*(t.detach().requires_grad_() for t in (q, k, v)),
                                                                       causal).sum().backward(), device)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    rows.append({**row, "note": f"first call: {str(e).splitlines()[0][:60]}"})
                    continue
                for phase, backward in (("fwd", False), ("fwdbwd", True)):
                    qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))

                    def step():
                        with torch.set_grad_enabled(backward):
                            out = fn(qq, kk, vv, causal)
                            if backward:
                                out.backward(torch.ones_like(out))
                                qq.grad = kk.grad = vv.grad = None
                    try:
                        seconds, peak = measure(step, device, args.reps)
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # unsupported or out of memory
                        row["note"] = f"{phase}: {str(e).splitlines()[0][:60]}"
                        continue
                    row[f"{phase}_ms"] = seconds * 1e3
                    row[f"{phase}_tflops"] = attention_flops(args.batch, H, T, T, D, causal, backward) / seconds / 1e12
                    row[f"{phase}_mib"] = peak / 2 ** 20
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    if not args.json:
        print(f"attention on {device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), {str(dtype)[6:]}, "
              f"batch {args.batch}, {H} query heads, head_dim {D}; median of {args.reps}; "
              "memory = peak beyond the inputs")
        print_table(rows, [("case", "case", "{}"), ("heads", "heads", "{}"), ("T", "T", "{}"),
                           ("backend", "backend", "{}"), ("first_call_s", "first fwd+bwd s", "{:.2f}"),
                           ("fwd_ms", "fwd ms", "{:.2f}"), ("fwd_tflops", "fwd TFLOP/s", "{:.3f}"),
                           ("fwd_mib", "fwd MiB", "{:.1f}"), ("fwdbwd_ms", "fwd+bwd ms", "{:.2f}"),
                           ("fwdbwd_tflops", "fwd+bwd TFLOP/s", "{:.3f}"), ("fwdbwd_mib", "fwd+bwd MiB", "{:.1f}"),
                           ("note", "note", "{}")])
    if args.scaling:
        return attention_scaling(args, rows, device, dtype)
    if args.plot:
        plot_attention(rows, args.plot)
    return rows


def add_attention_parser(sub):
    """Register `bench.py attention` and its flags."""
    p = sub.add_parser("attention", help="naive vs sdpa vs triton attention: time, memory, TFLOP/s; --scaling: "
                       "softmax vs Performer vs a sliding window against length")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, or auto")
    p.add_argument("--backends", default="", help="comma-separated registry names, each optionally +window (a "
                   "sliding window of --window); empty: naive,sdpa on CPU, naive,sdpa,sdpa_flash,sdpa_cudnn,triton on "
                   "CUDA; with --scaling naive,sdpa,performer,sdpa+window (and triton+window on CUDA)")
    p.add_argument("--seq_lens", default="", help="comma-separated T; empty: 128..4096 on CPU, 1k..16k on CUDA; "
                   "with --scaling 512..32768")
    p.add_argument("--scaling", action="store_true", help="cost against length: causal only, fitted "
                   "log-log slopes, the crossover with sdpa, FAVOR+'s error against m")
    p.add_argument("--window", type=int, default=256, help="the +window backends' sliding window")
    p.add_argument("--max_quadratic_T", type=int, default=0, help="skip the O(T^2) backends above this T (0: none)")
    p.add_argument("--summary", default="", help="--scaling: write the rows, slopes and errors to this JSON file")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--n_head", type=int, default=0, help="query heads (0: 8, with --scaling 4)")
    p.add_argument("--gqa_group", type=int, default=4, help="query heads per key/value head in the GQA case")
    p.add_argument("--head_dim", type=int, default=0, help="head dimension (0: 64, with --scaling 32)")
    p.add_argument("--max_naive_gb", type=float, default=8.0, help="skip naive where its score matrices "
                   "would exceed this")
    p.add_argument("--plot", default="out/bench_attention.png", help="PNG plot path (empty: none)")
    add_run_flags(p, reps=3)
    p.set_defaults(run=bench_attention)
    return p


def loglog_slope(points):
    """The least-squares slope of log(y) against log(x) over points [(x, y)]: the exponent p of
    y ~ x^p (None with fewer than two points)."""
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def crossover(rows, fast, slow, key="fwdbwd_ms"):
    """The length T at which backend `fast` becomes cheaper than `slow` (key), interpolated in log-log
    between the two measured lengths around it; None if it never does in the range, 'below' if it is
    already cheaper at the shortest length."""
    a = {r["T"]: r[key] for r in rows if r["backend"] == fast and key in r}
    b = {r["T"]: r[key] for r in rows if r["backend"] == slow and key in r}
    common = sorted(set(a) & set(b))
    for i, T in enumerate(common):
        if a[T] < b[T]:
            if i == 0:
                return "below"
            T0 = common[i - 1]
            d0, d1 = np.log(a[T0] / b[T0]), np.log(a[T] / b[T])  # log ratio: > 0 at T0, < 0 at T
            return round(float(np.exp(np.log(T0) + (np.log(T) - np.log(T0)) * d0 / (d0 - d1))))
    return None


def favor_error_against_m(args, device, ms=(16, 32, 64, 128, 256, 512, 1024), scales=(0.25, 0.5, 1.0), draws=3,
                          T=1024):
    """Relative error (Frobenius) of FAVOR+ against exact softmax attention for m random features,
    averaged over `draws` draws (layer seeds): causal, T positions, the --n_head heads, q and k ~
    N(0, sigma^2) for each sigma of `scales` (the scores q.k / sqrt(D) then have standard deviation
    sigma^2; the estimator's variance grows like exp(|q + k|^2 / sqrt(D)): the paper's variance lemma).
    Returns [{"m", "sigma", "rel_error", "spread"}]."""
    from omnitron.kernels import performer
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, args.n_head, T, args.head_dim, device=device, generator=g) for _ in "qkv")
    out = []
    for sigma in scales:
        exact = kernels.attention(sigma * q, sigma * k, v, True, backend="sdpa", window=0)
        for m in ms:
            performer.configure(features=m)
            errs = [((kernels.attention(sigma * q, sigma * k, v, True, backend="performer", layer=layer) - exact).norm()
                     / exact.norm()).item() for layer in range(draws)]
            out.append({"m": m, "sigma": sigma, "rel_error": statistics.mean(errs), "spread": max(errs) - min(errs)})
    performer.configure()
    return out


def attention_scaling(args, rows, device, dtype):
    """--scaling: log-log slopes of time and memory against T per backend (fitted over T >= 2048,
    where fixed costs no longer dominate), the crossover lengths against sdpa, FAVOR+'s error
    against m; a plot. Returns the summary."""
    from omnitron.kernels import performer
    summary = {"rows": rows, "slopes": {}, "crossover": {}}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend and r["T"] >= 2048]
        summary["slopes"][backend] = {key: loglog_slope([(r["T"], r[key]) for r in mine if r.get(key)])
                                      for key in ("fwd_ms", "fwdbwd_ms", "fwdbwd_mib")}
        if backend != "sdpa" and not quadratic(backend):
            summary["crossover"][backend] = {key: crossover(rows, backend, "sdpa", key)
                                             for key in ("fwd_ms", "fwdbwd_ms")}
    summary["error_vs_m"] = favor_error_against_m(args, device)
    m_default = performer.num_features(args.head_dim)
    print(f"\nfitted log-log slopes over T >= 2048 (time ~ T^slope); performer: m = {m_default} (D ln D), "
          f"chunks of {performer.CHUNK}; window: W = {args.window}")
    print_table([{"backend": b, **v} for b, v in summary["slopes"].items()],
                [("backend", "backend", "{}"), ("fwd_ms", "fwd time slope", "{:.2f}"),
                 ("fwdbwd_ms", "fwd+bwd time slope", "{:.2f}"), ("fwdbwd_mib", "fwd+bwd memory slope", "{:.2f}")])
    if all(v is None for row in summary["slopes"].values() for v in row.values()):
        print("(no slope: the fit needs at least two lengths T >= 2048)")
    for backend, where in summary["crossover"].items():
        said = [f"{'the shortest length' if where[k] == 'below' else where[k]} ({what})" for k, what in (("fwd_ms", "forward"), ("fwdbwd_ms", "forward + backward"))
                if where[k] is not None]
        print(f"{backend} is faster than sdpa from T = {', '.join(said)}" if said else
              f"{backend} is not faster than sdpa at any length measured")
    print(f"\nFAVOR+ relative error against softmax attention (causal, T = 1024, head_dim {args.head_dim}, "
          "q and k ~ N(0, sigma^2), mean of 3 draws)")
    by_m = {}  # m -> {"m": m, "sigma S": error, ...}: one row per m, one column per sigma
    for e in summary["error_vs_m"]:
        by_m.setdefault(e["m"], {"m": e["m"]})[f"sigma {e['sigma']}"] = e["rel_error"]
    sigmas = dict.fromkeys(e["sigma"] for e in summary["error_vs_m"])
    print_table(list(by_m.values()), [("m", "m", "{}")] + [(f"sigma {s}", f"sigma {s}", "{:.4f}") for s in sigmas])
    if args.plot:
        plot_attention(rows, args.plot, summary["error_vs_m"])
    if args.summary:
        runtime.write_json(Path(args.summary), summary, indent=1)
    return summary


def plot_attention(rows, path, error_vs_m=None):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3 if error_vs_m else 2, figsize=(16 if error_vs_m else 11, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend and r["case"] == "causal" and "fwdbwd_ms" in r]
        for ax, key in zip(axes, ("fwdbwd_ms", "fwdbwd_mib")):
            ax.plot([r["T"] for r in mine], [r[key] for r in mine], marker="o", label=backend)
    seq_lens = sorted({r["T"] for r in rows})
    for ax, label in zip(axes, ("forward + backward time (ms)", "peak memory beyond inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seq_lens, [str(t) for t in seq_lens], minor=False)
        ax.minorticks_off()
        ax.set(xlabel="sequence length T", ylabel=label, title=f"causal attention: {label}")
        ax.legend()
    if error_vs_m:
        ax = axes[2]
        for sigma in dict.fromkeys(e["sigma"] for e in error_vs_m):
            mine = [e for e in error_vs_m if e["sigma"] == sigma]
            line, = ax.plot([e["m"] for e in mine], [e["rel_error"] for e in mine], marker="o",
                            label=f"FAVOR+, q, k ~ N(0, {sigma}^2)")
            ax.plot([e["m"] for e in mine], [mine[0]["rel_error"] * (mine[0]["m"] / e["m"]) ** 0.5 for e in mine],
                    linestyle=":", color=line.get_color())
        ax.plot([], [], linestyle=":", color="gray", label="1 / sqrt(m)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="random features m", ylabel="relative error vs softmax", title="FAVOR+ error against m")
        ax.legend()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- models and decoding


def build_model(args, device, **overrides):
    """A randomly initialised model of models/<args.model>.py from the model flags in args (and
    the attention backend of --attn)."""
    runtime.configure_attention(args)
    module = models.get(args.model)
    fields = {f[0] for f in train.model_flags(module)}
    config = module.Config(**{**{k: v for k, v in vars(args).items() if k in fields}, **overrides},
                           vocab_size=args.vocab_size, block_size=args.block_size)
    torch.manual_seed(0)
    return module.Model(config).to(device).eval()


def cache_bytes(cache):
    """Bytes held by a KV cache (every tensor it keeps)."""
    return sum(t.nbytes for v in vars(cache).values() if isinstance(v, list) for t in v if torch.is_tensor(t))


def decode_tokens_per_s(model, batch, prompt_len, new_tokens, use_cache, device, dtype=torch.float32, compile=False,
                        reps=1):
    """Greedy decoding throughput (new tokens per second, all rows together) after a prompt, from
    the median of reps runs. With compile, an untimed run first compiles the decoding step."""
    idx = torch.randint(model.config.vocab_size, (batch, prompt_len), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    def run():
        with autocast(device, dtype):
            for _ in generate(model, idx, new_tokens, temperature=0, use_cache=use_cache, compile=compile):
                pass
    if compile:
        run()
    seconds, _ = measure(run, device, reps=reps)
    return batch * new_tokens / seconds


def bench_kvcache(args):
    """The same model with n_head (MHA), fewer (GQA) and one (MQA) key/value heads."""
    device = resolve_device(args.device)
    kv_heads = [int(k) for k in args.kv_heads.split(",")] if args.kv_heads else \
        sorted({args.n_head, max(1, args.n_head // 4), 1}, reverse=True)
    rows = []
    for k in kv_heads:
        model = build_model(args, device, n_kv_head=k)
        cache = model.init_cache(args.batch, args.block_size)
        name = "MHA" if k == args.n_head else "MQA" if k == 1 else f"GQA-{k}"
        rows.append({"attention": name, "kv_heads": k, "params_M": model.num_params() / 1e6,
                     "cache_mib": cache_bytes(cache) / 2 ** 20,
                     "tok_s": decode_tokens_per_s(model, args.batch, args.prompt_len, args.new_tokens, True, device)})
        del cache
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"{args.model} on {device}: {args.n_layer} layers, width {args.n_embd}, {args.n_head} query heads; "
              f"KV cache for batch {args.batch} x {args.block_size} positions (fp32); greedy decoding of "
              f"{args.new_tokens} tokens after {args.prompt_len}")
        print_table(rows, [("attention", "attention", "{}"), ("kv_heads", "kv heads", "{}"),
                           ("params_M", "params (M)", "{:.2f}"), ("cache_mib", "KV cache MiB", "{:.1f}"),
                           ("tok_s", "decode tok/s", "{:.1f}")])
    return rows


def add_kvcache_parser(sub, model_name):
    """Register `bench.py kvcache` and its flags."""
    p = sub.add_parser("kvcache", help="KV-cache bytes and decoding tokens/s for MHA, GQA and MQA")
    add_model_flags(p, model_name, block_size=1024)
    p.add_argument("--kv_heads", default="", help="comma-separated key/value head counts; empty: n_head, "
                   "n_head/4, 1")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--prompt_len", type=int, default=64, help="prompt tokens")
    p.add_argument("--new_tokens", type=int, default=256, help="generated tokens")
    add_run_flags(p)
    p.set_defaults(run=bench_kvcache)
    return p


def gemm_peak_flops(device, dtype, sizes=None, slow_s=0.1):
    """The matrix-multiply peak of this device in this dtype: the best FLOP/s over a few shapes
    (m, k, n), smallest first; a shape slower than slow_s seconds ends the search (a dtype this
    device has no fast kernel for, such as bf16 on a CPU without AVX-512 BF16, reaches its peak on
    small products, and a big one would take minutes). Default shapes: 8192^3 on CUDA (a GPU needs
    big products to reach its peak: 2048^3 reads well below it on an H100); 64^3 up to 2048^3 on a CPU."""
    if sizes is None:
        on_cuda = torch.device(device).type == "cuda"
        sizes = ((8192, 8192, 8192),) if on_cuda else tuple((n, n, n) for n in (64, 128, 256, 512, 1024)) + (
            (4096, 512, 2048), (2048, 2048, 2048))
    best = 0.0
    for m, k, n in sizes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        seconds, _ = measure(lambda: a @ b, device, reps=5)
        best = max(best, 2 * m * k * n / seconds)
        if seconds > slow_s:
            break
    return best


def train_step_timings(model, args, device, dtype, compiled):
    """Median seconds of forward, backward and optimizer step, the peak memory of a whole step
    (beyond the weights and the optimizer state, which are live before it) and the optimizer state's size."""
    step_model = torch.compile(model) if compiled else model
    optimizer = train.make_optimizer(model, {"weight_decay": 0.1, "learning_rate": 1e-4, "beta1": 0.9,
                                             "beta2": 0.99}, device)
    g = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randint(args.vocab_size, (args.batch_size, args.block_size), device=device, generator=g)
            for _ in "xy")
    model.train()
    holder = {}

    def forward():
        with autocast(device, dtype):
            holder["loss"] = step_model(x, y)[1]

    def backward():
        forward()  # a backward needs a fresh graph; its forward time is subtracted below
        holder["loss"].backward()

    def step():
        backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(2):  # compile, autotune, allocate optimizer state
        step()
    t_fwd, _ = measure(forward, device, args.reps)
    t_fwd_bwd, _ = measure(backward, device, args.reps)
    t_opt, _ = measure(optimizer.step, device, args.reps)  # on the gradients the last backward left
    optimizer.zero_grad(set_to_none=True)
    t_step, peak = measure(step, device, args.reps)
    state_bytes = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {"fwd_ms": t_fwd * 1e3, "bwd_ms": max(t_fwd_bwd - t_fwd, 0.0) * 1e3, "opt_ms": t_opt * 1e3,
            "step_ms": t_step * 1e3, "peak_mib": peak / 2 ** 20, "opt_state_mib": state_bytes / 2 ** 20}


def batch_seconds(args, device, n_tokens=5_000_000):
    """Median time of data.get_batch drawing one training batch from a memmap of n_tokens random
    tokens (about the default corpus), moved to the device."""
    with tempfile.TemporaryDirectory() as folder:
        np.random.default_rng(0).integers(0, args.vocab_size, n_tokens, dtype=np.uint16).tofile(Path(folder) / "train.bin")
        dataset, g = data.Dataset(folder, None, {"dtype": "uint16"}), torch.Generator().manual_seed(0)
        seconds, _ = measure(lambda: dataset.get_batch("train", args.batch_size, args.block_size, g, device),
                             device, args.reps)
    return seconds


def bench_speed(args):
    device = resolve_device(args.device)
    peaks = {name: gemm_peak_flops(device, resolve_dtype(name, device)) for name in args.dtypes.split(",")}
    rows = []
    for name in args.dtypes.split(","):
        for compiled in [False, True] if args.compile == "both" else [args.compile == "true"]:
            model = build_model(args, device)
            tokens = args.batch_size * args.block_size
            row = {"dtype": name, "compile": compiled,
                   **train_step_timings(model, args, device, resolve_dtype(name, device), compiled)}
            row["tok_s"] = tokens / (row["step_ms"] / 1e3)
            row["tflops"] = model.flops_per_token(args.block_size) * row["tok_s"] / 1e12
            row["peak_tflops"] = peaks[name] / 1e12
            row["mfu"] = row["tflops"] / row["peak_tflops"]
            rows.append(row)
            if args.json:
                print(json.dumps({"kind": "train", **row}), flush=True)
    batch_ms = batch_seconds(args, device) * 1e3
    if args.json:
        print(json.dumps({"kind": "batch", "batch_ms": batch_ms}), flush=True)
    model = build_model(args, device).eval()
    decode = []
    modes = [("recompute", False, False), ("KV cache", True, False)]
    if args.compile != "false":
        modes.append(("KV cache + compile", True, True))
    for batch in [int(b) for b in args.decode_batches.split(",")]:
        for mode, use_cache, compiled in modes:
            decode.append({"batch": batch, "mode": mode, "tok_s": decode_tokens_per_s(
                model, batch, args.prompt_len, args.new_tokens, use_cache, device, compile=compiled,
                reps=args.decode_reps)})
            decode[-1]["speedup"] = decode[-1]["tok_s"] / next(r["tok_s"] for r in decode if r["batch"] == batch)
            if args.json:
                print(json.dumps({"kind": "decode", **decode[-1]}), flush=True)
    if not args.json:
        print(f"{args.model} on {device}: {model.num_params() / 1e6:.2f}M parameters, "
              f"{model.flops_per_token(args.block_size) / 1e6:.1f} MFLOP per token (fwd+bwd), batch "
              f"{args.batch_size} x {args.block_size} tokens; attention {kernels.get_backend(device)}; median of "
              f"{args.reps}; MFU against this device's measured GEMM peak in the same dtype")
        print_table(rows, [("dtype", "dtype", "{}"), ("compile", "compile", "{}"), ("tok_s", "tokens/s", "{:,.0f}"),
                           ("step_ms", "step ms", "{:.1f}"), ("fwd_ms", "fwd ms", "{:.1f}"),
                           ("bwd_ms", "bwd ms", "{:.1f}"), ("opt_ms", "opt ms", "{:.1f}"),
                           ("tflops", "TFLOP/s", "{:.3f}"), ("peak_tflops", "GEMM peak TFLOP/s", "{:.3f}"),
                           ("mfu", "MFU", "{:.1%}"), ("peak_mib", "peak MiB", "{:.0f}")])
        fastest = min(r["step_ms"] for r in rows)
        print(f"\ndrawing a batch (data.get_batch, {args.batch_size} x {args.block_size} tokens from a memmap): "
              f"{batch_ms:.2f} ms, {batch_ms / fastest:.2%} of the fastest step above")
        print(f"\ndecoding {args.new_tokens} tokens after a {args.prompt_len}-token prompt (greedy, fp32, median of "
              f"{args.decode_reps}; speed-up against recomputing the context at every step, same batch)")
        print_table(decode, [("batch", "batch", "{}"), ("mode", "decoding", "{}"), ("tok_s", "tokens/s", "{:,.0f}"),
                             ("speedup", "vs recompute", "{:.1f}x")])
    return rows, decode


def add_speed_parser(sub, model_name):
    """Register `bench.py speed` and its flags."""
    p = sub.add_parser("speed", help="training tokens/s, FLOP/s, MFU, fwd/bwd/opt split, peak memory; "
                       "decoding tokens/s with and without the KV cache")
    add_model_flags(p, model_name)
    p.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--compile", default="both", choices=("false", "true", "both"), help="torch.compile the model")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens for decoding")
    p.add_argument("--new_tokens", type=int, default=512, help="decoded tokens")
    p.add_argument("--decode_batches", default="1,8", help="comma-separated batch sizes for decoding")
    p.add_argument("--decode_reps", type=int, default=3, help="timed decoding runs (the median is reported)")
    add_run_flags(p, reps=5)
    p.set_defaults(run=bench_speed)
    return p


def bench_lora(args):
    """Full fine-tuning against LoRA (lora.py) on the same model and batch, measured in one run: what
    each trains and stores (trainable parameters, weights, AdamW state) and a training step's time
    and peak memory (activations, gradients and temporaries beyond the weights and the optimizer
    state); training memory = weights + optimizer state + step peak."""
    device = resolve_device(args.device)
    rows = []
    for method in ("full", "LoRA"):
        model = build_model(args, device)
        if method == "LoRA":
            targets = lora.resolve_targets(model, args.lora_targets)
            lora.apply(model, lora.LoRAConfig(args.lora_rank, args.lora_alpha, targets))
        trainable, total = lora.count_params(model)
        base_params = total - trainable if method == "LoRA" else total  # the model without adapters
        row = {"method": method, "trainable": trainable, "trainable_pct": 100 * trainable / base_params,
               "weights_mib": sum(p.nbytes for p in model.parameters()) / 2 ** 20,
               **train_step_timings(model, args, device, torch.float32, compiled=False)}
        row["train_mib"] = row["weights_mib"] + row["opt_state_mib"] + row["peak_mib"]
        rows.append(row)
        del model
        if args.json:
            print(json.dumps(row), flush=True)
    full, low = rows
    ratios = {k: full[k] / low[k] if low[k] else None
              for k in ("trainable", "opt_state_mib", "peak_mib", "train_mib", "step_ms")}
    if args.json:
        print(json.dumps({"method": "full / LoRA", **ratios}), flush=True)
        return rows, ratios
    print(f"{args.model} on {device}: {base_params / 1e6:.2f}M parameters, batch {args.batch_size} x {args.block_size} "
          f"tokens, fp32, AdamW; LoRA rank {args.lora_rank} on {', '.join(targets)}; median of {args.reps}")
    print_table(rows, [("method", "method", "{}"), ("trainable", "trainable params", "{:,}"),
                       ("trainable_pct", "% of the model", "{:.2f}"), ("weights_mib", "weights MiB", "{:.1f}"),
                       ("opt_state_mib", "optimizer state MiB", "{:.2f}"), ("peak_mib", "step peak MiB", "{:.1f}"),
                       ("train_mib", "training MiB", "{:.1f}"), ("step_ms", "step ms", "{:.1f}")])
    fmt = lambda k: f"{ratios[k]:.1f}x" if ratios[k] is not None else "-"
    print(f"full fine-tuning / LoRA: {fmt('trainable')} the trainable parameters, {fmt('opt_state_mib')} the optimizer "
          f"state, {fmt('peak_mib')} the step peak, {fmt('train_mib')} the training memory, {fmt('step_ms')} the step time")
    return rows, ratios


def add_lora_parser(sub, model_name):
    """Register `bench.py lora` and its flags."""
    p = sub.add_parser("lora", help="full fine-tuning vs LoRA on the same model and batch: trainable "
                       "parameters, optimizer state, peak memory, step time")
    add_model_flags(p, model_name)
    p.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=train.flag_default("lora_alpha"), help="LoRA alpha")
    p.add_argument("--lora_targets", default=train.flag_default("lora_targets"), help="layers to adapt: q, k, v, "
                   "o, mlp or all")
    add_run_flags(p, reps=3)
    p.set_defaults(run=bench_lora)
    return p


def bench_curves(args):
    """Val loss against wall time (and step) of training runs, read from their log.jsonl."""
    runs = {}
    for run in args.runs:
        path = Path(run) / "log.jsonl"
        if not path.is_file():
            raise UserError(f"no log.jsonl in {run}")
        runs[run] = [r for r in map(json.loads, path.read_text().splitlines()) if "val_loss" in r]
        for r in runs[run]:
            print(f"{run}\tstep {r['step']}\t{r['elapsed_s']:.0f} s\tval loss {r['val_loss']:.4f}")
    plt = pyplot()
    if plt is None:
        return runs
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, records in runs.items():
        ax.plot([r["elapsed_s"] for r in records], [r["val_loss"] for r in records], marker="o", label=run)
    if args.target:
        ax.axhline(args.target, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="wall time (s)", ylabel="val loss", title="val loss against wall time")
    ax.legend()
    save_figure(fig, args.plot)
    return runs


def add_curves_parser(sub):
    """Register `bench.py curves` and its flags."""
    p = sub.add_parser("curves", help="val loss against wall time of training runs (their log.jsonl)")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--target", type=float, default=0.0, help="draw a horizontal line at this loss (0: none)")
    p.add_argument("--plot", default="out/curves.png", help="PNG plot path")
    p.set_defaults(run=bench_curves)
    return p


# ----------------------------------------------------------------------------- flags the subcommands share


def add_run_flags(p, reps=None):
    """--device and --json (and --reps, where the subcommand repeats its timings)."""
    runtime.add_device_flags(p, dtype=False, attn=False)
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    if reps:
        p.add_argument("--reps", type=int, default=reps, help="timed repetitions (the median is reported)")


def add_model_flags(p, model_name, block_size=None):
    """--model and the model file's Config fields, as train.py has them (same defaults)."""
    p.add_argument("--model", default=model_name, help="the model file models/NAME.py")
    p.add_argument("--vocab_size", type=int, default=84, help="vocabulary size of the random model (84: the "
                   "default corpus in char tokens)")
    p.add_argument("--block_size", type=int, default=block_size or train.flag_default("block_size"),
                   help="positions per sequence (and KV-cache length)")
    runtime.add_attention_flags(p)
    for name, default, help_text in train.model_flags(models.get(model_name)):
        kind = runtime.str2bool if isinstance(default, bool) else type(default)
        p.add_argument(f"--{name}", type=kind, default=default, help=help_text)


# ----------------------------------------------------------------------------- decoding against the roofline

# the decoding table's model: a Llama of 55.3M parameters (221 MB in fp32), untied output head
DECODE_MODEL = dict(vocab_size=32000, block_size=2048, n_layer=8, n_embd=512, n_head=8, n_kv_head=2,
                    intermediate_size=1408, tie_embeddings=False)
DECODE_MODES = ("hf_dynamic", "hf_static", "cache", "compile", "bf16", "bf16_compile", "int8", "int8_compile",
                "speculative", "speculative_compile", "speculative_int8draft_compile")


def memory_bandwidth(device, nbytes=256 * 2 ** 20, reps=5):
    """The machine's memory bandwidth in bytes/s as this process sees it: a copy of nbytes (larger
    than any CPU cache) into another buffer, counted as 2 * nbytes moved (read + write: STREAM's
    Copy convention), median of reps."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds, _ = measure(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / seconds


def step_bytes(model, batch, kv_slots):
    """Bytes one decoding step of `batch` rows reads: every parameter and buffer once
    (quantize.weight_bytes; an embedding table only for its `batch` looked-up rows, unless a layer
    multiplies by it: a tied output head), plus the keys and values of kv_slots cache slots of
    every layer and row (the dtype of generation.compute_dtype)."""
    matrices = {id(m.weight) for m in model.modules() if not isinstance(m, nn.Embedding) and hasattr(m, "weight")}
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    total = quantize.weight_bytes(model)
    total -= sum(w.nbytes - batch * w[0].nbytes for key, w in tables.items() if key not in matrices)
    cfg = model.config
    element = torch.finfo(generation.compute_dtype(model)).bits // 8
    return total + 2 * cfg.n_layer * batch * cfg.n_kv_head * kv_slots * cfg.head_dim * element


def self_draft(model, n_layer):
    """A draft model for speculative decoding made from model itself (LayerSkip's early exit,
    Elhoushi et al. 2024, without its training): its first n_layer blocks, its final norm and
    output head, the same weight tensors (shared, no copy)."""
    config = copy.deepcopy(model.config)
    config.n_layer = n_layer
    with torch.device("meta"):
        draft = type(model)(config)
    draft.load_state_dict(model.state_dict(), strict=False, assign=True)  # blocks past n_layer: not loaded
    return draft.eval()


def hf_twin(model):
    """The same weights as a transformers model (save_pretrained, then AutoModelForCausalLM), or
    None when transformers is not installed (a test-only dependency)."""
    try:
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None  # never stop early
    hf.generation_config.pad_token_id = 0
    return hf


def decode_modes(args, model, device):
    """(label, run(idx) -> tokens (B, N), bytes_per_step(B) or None, model) for each of
    args.modes; speculative modes fill a stats dict that the caller reads."""
    N, P = args.new_tokens, args.prompt_len
    dynamic_slots, static_slots = P + N // 2, min(model.config.block_size, 1 << (P + N - 1).bit_length())
    fp32 = model
    variants = {"none": model}
    modes = []
    hf = hf_twin(model) if {"hf_dynamic", "hf_static"} & set(args.modes) else None

    def ours(m, **kw):
        def run(idx):
            with torch.no_grad():
                return torch.stack(list(generate(m, idx, N, temperature=0, **kw)), dim=1)
        return run

    def quantized(scheme):
        if scheme not in variants:
            variants[scheme] = quantize.quantize(copy.deepcopy(model), scheme)
        return variants[scheme]
    for mode in args.modes:
        if mode.startswith("hf_"):
            if hf is None:
                print(f"{mode}: skipped (transformers is not installed)")
                continue
            kw = {"cache_implementation": "static"} if mode == "hf_static" else {}

            def run(idx, kw=kw):
                with torch.no_grad():
                    return hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=N,
                                       **kw)[:, P:]
            slots = P + N if mode == "hf_static" else dynamic_slots
            # transformers compiles a static cache's forward by itself on cuda/xpu/neuron/tpu only (GenerationMixin.
            # _valid_auto_compile_criteria): on CPU its static cache runs eager
            label = "transformers generate, " + ("static cache" if mode == "hf_static" else "dynamic cache")
            modes.append((mode, label, run, lambda B, s=slots: step_bytes(fp32, B, s)))
        elif mode.startswith("speculative"):
            compiled = mode.endswith("compile")
            if "int8draft" in mode:  # gpt-fast's pairing: the model's own weights, quantized, draft for it
                draft, name = quantized("int8"), "the model in int8"
            else:
                draft, name = self_draft(model, args.draft_layers), f"its first {args.draft_layers} layers"
            stats = {}
            slots = static_slots if compiled else dynamic_slots

            def run(idx, draft=draft, stats=stats, compiled=compiled):
                stats.clear()
                with torch.no_grad():
                    return torch.stack(list(speculative_decode(model, draft, idx, N, args.speculate_k, compile=compiled,
                                                               stats=stats, temperature=0)), dim=1)

            def per_step(B, draft=draft, stats=stats, slots=slots):  # a round: k draft steps and one verification
                rounds = stats.get("rounds")
                return rounds and rounds * (args.speculate_k * step_bytes(draft, B, slots) + step_bytes(model, B, slots)) / N
            label = f"speculative, draft = {name}, k={args.speculate_k}" + (" + compile" if compiled else "")
            modes.append((mode, label, run, per_step, stats))
        else:
            compiled = mode.endswith("compile")
            scheme = mode.split("_")[0] if mode.split("_")[0] in quantize.SCHEMES else "none"
            m = quantized(scheme)
            label = "ours, KV cache" + (f", {scheme} weights" if scheme != "none" else "") + (" + compile" if compiled else "")
            slots = static_slots if compiled else dynamic_slots
            modes.append((mode, label, ours(m, compile=compiled), lambda B, m=m, s=slots: step_bytes(m, B, s)))
    return [m if len(m) == 5 else m + (None,) for m in modes]  # (name, label, run, bytes, stats or None)


def bench_decode(args):
    """Greedy decoding of args.new_tokens after args.prompt_len on one random model (DECODE_MODEL
    by default): transformers' generate and ours in every mode, timed round-robin (each repetition
    runs every mode once, so a change in the machine's load hits every mode alike), with the bytes
    read per token, the achieved bytes/s and its fraction of the measured copy bandwidth, and the
    greedy tokens compared with ours in fp32."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in DECODE_MODES]
    if unknown:
        raise UserError(f"unknown --modes {', '.join(unknown)}; choose from {', '.join(DECODE_MODES)}")
    device = resolve_device(args.device)
    bandwidth = memory_bandwidth(device)
    model = build_model(args, device)
    rows = bench_step_variants(args, model, device) if args.step_variants and device == "cpu" else []
    for batch in [int(b) for b in args.batches.split(",")]:
        idx = torch.randint(model.config.vocab_size, (batch, args.prompt_len), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
        modes = decode_modes(args, model, device)
        tokens, first = {}, {}
        for name, label, run, _, _ in modes:  # warm-up: compiles, and the tokens
            started = time.perf_counter()
            tokens[name] = run(idx)
            first[name] = time.perf_counter() - started
            print(f"batch {batch}, {label}: first call {first[name]:.0f} s", file=sys.stderr, flush=True)
        reference = tokens.get("cache")
        times = {name: [] for name, *_ in modes}
        for _ in range(args.reps):
            for name, label, run, _, _ in modes:
                started = time.perf_counter()
                run(idx)
                times[name].append(time.perf_counter() - started)
        static = statistics.median(times["hf_static"]) if "hf_static" in times else None
        for name, label, run, bytes_fn, stats in modes:
            seconds = statistics.median(times[name])
            tok_s = batch * args.new_tokens / seconds
            per_token = bytes_fn(batch)
            per_token = None if per_token is None else per_token / batch
            row = {"batch": batch, "mode": name, "label": label, "tok_s": tok_s, "first_s": first[name],
                   "vs_static": None if static is None else static / seconds,
                   "mb_per_token": None if per_token is None else per_token / 1e6,
                   "gb_s": None if per_token is None else per_token * tok_s / 1e9,
                   "bandwidth_gb_s": bandwidth / 1e9,
                   "same_tokens": None if reference is None else (tokens[name] == reference).float().mean().item(),
                   "acceptance": stats["accepted"] / stats["drafted"] if stats else None}
            row["roofline"] = None if row["gb_s"] is None else row["gb_s"] / row["bandwidth_gb_s"]
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        if not args.json:  # each batch size as soon as it is measured
            print_decode_table(args, model, device, bandwidth, [r for r in rows if r.get("batch") == batch])
    if args.run_dir:
        rows.append(quantized_perplexity(args, device))
    if args.run_dir and args.draft_dir:
        rows.append(speculative_on_run(args, device))
    return rows


def add_decode_parser(sub, model_name):
    """Register `bench.py decode` and its flags."""
    p = sub.add_parser("decode", help="greedy decoding against transformers' generate: tokens/s, bytes read per token "
                       "and the fraction of the measured memory bandwidth; int8/bf16 weights; speculative decoding")
    add_model_flags(p, model_name)
    p.set_defaults(**{k: v for k, v in DECODE_MODEL.items() if k in {a.dest for a in p._actions}})
    p.add_argument("--modes", default=",".join(DECODE_MODES), help="comma-separated, from: " + ", ".join(DECODE_MODES))
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens")
    p.add_argument("--new_tokens", type=int, default=128, help="generated tokens")
    p.add_argument("--draft_layers", type=int, default=2, help="the speculative modes' draft: the model's first N "
                   "layers (bench.self_draft)")
    p.add_argument("--speculate_k", type=int, default=4, help="tokens drafted per verification")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--step_variants", type=runtime.str2bool, default=True, help="on CPU, first time the compiled "
                   "one-token step with each candidate setting (bench.STEP_VARIANTS)")
    p.add_argument("--run_dir", default="", help="a trained run folder: val perplexity and greedy agreement with "
                   "fp32, bf16 and int8 weights (empty: skip)")
    p.add_argument("--draft_dir", default="", help="a trained draft run folder for --run_dir (same tokenizer): "
                   "speculative decoding's acceptance and speed-up on real text (empty: skip)")
    p.add_argument("--data", default="", help="--run_dir's corpus (empty: the default corpus)")
    p.add_argument("--eval_batches", type=int, default=10, help="val batches of 8 sequences for the perplexity")
    add_run_flags(p, reps=3)
    p.set_defaults(run=bench_decode)
    return p


STEP_VARIANTS = {  # candidates for the compiled one-token step: (inductor options, cache slots: 0 = rounded)
    "compiled (cpp_wrapper, cache rounded to a power of two)": ({"cpp_wrapper": True}, 0),
    "+ freezing (weights constant-folded, prepacked)": ({"cpp_wrapper": True, "freezing": True}, 0),
    "without cpp_wrapper": ({}, 0),
    "cache of exactly prompt + new tokens slots": ({"cpp_wrapper": True}, -1),
}


def bench_step_variants(args, model, device, steps=40):
    """The one-token step at batch 1 eager and compiled with each of STEP_VARIANTS: median ms of
    `steps` steps timed round-robin (one step of every variant in turn), each against its own cache
    rewound to the prompt plus a few tokens."""
    P, N = args.prompt_len, args.new_tokens
    idx = torch.randint(model.config.vocab_size, (1, P), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    variants = {"eager": (model, P + N, False)}
    for name, (options, slots) in STEP_VARIANTS.items():
        slots = P + N if slots else min(model.config.block_size, 1 << (P + N - 1).bit_length())
        variants[name] = (torch.compile(model.forward, dynamic=False, options=options), slots, True)
    states, times = {}, {name: [] for name in variants}
    with torch.no_grad():
        for name, (step, slots, static) in variants.items():
            logits, cache = generation.prefill(model, idx, None, slots, static=static)
            states[name] = (step, cache, logits.argmax(-1))
            generation.decode_one_token(step, states[name][2], cache)  # compiles
        for i in range(steps):
            for name, (step, cache, token) in states.items():
                generation._rewind(cache, P + i % 8)
                started = time.perf_counter()
                generation.decode_one_token(step, token, cache)
                times[name].append(time.perf_counter() - started)
    rows = [{"step": name, "ms": statistics.median(t) * 1e3} for name, t in times.items()]
    if args.json:
        for row in rows:
            print(json.dumps({"kind": "step", **row}), flush=True)
    else:
        print(f"the one-token step at batch 1 ({torch.get_num_threads()} threads), median of {steps} round-robin steps:")
        print_table(rows, [("step", "step", "{}"), ("ms", "ms", "{:.1f}")])
        print(flush=True)
    return rows


def print_decode_table(args, model, device, bandwidth, rows):
    """The table of one batch size's rows (bench_decode), with the settings it was measured under."""
    cfg = model.config
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads): {model.num_params(False) / 1e6:.1f}M parameters "
          f"({quantize.weight_bytes(model) / 1e6:.0f} MB in fp32), {cfg.n_layer} layers, width {cfg.n_embd}, "
          f"vocabulary {cfg.vocab_size}; greedy, {args.new_tokens} new tokens after {args.prompt_len}; median of "
          f"{args.reps} round-robin repetitions")
    print(f"memory bandwidth (a 256 MiB copy, read + write): {bandwidth / 1e9:.1f} GB/s; MB/token = weights "
          f"(int8/bf16 where quantized; per row of the batch) + KV cache read per generated token")
    print_table(rows, [("batch", "batch", "{}"), ("label", "decoding", "{}"), ("tok_s", "tokens/s", "{:,.1f}"),
                       ("vs_static", "vs transformers static", "{:.2f}x"), ("mb_per_token", "MB/token", "{:.1f}"),
                       ("gb_s", "GB/s", "{:.1f}"), ("roofline", "of bandwidth", "{:.0%}"),
                       ("same_tokens", "tokens = ours fp32", "{:.1%}"), ("acceptance", "accepted", "{:.0%}"),
                       ("first_s", "first call s", "{:.0f}")])
    print(flush=True)


def speculative_on_run(args, device, n_prompts=4, new_tokens=128):
    """Speculative decoding of a trained run (args.run_dir) with a trained draft (args.draft_dir,
    the same tokenizer), greedy at batch 1 from n_prompts val windows of 16 tokens: acceptance
    (drafted tokens kept; the same in every repetition), tokens/s of the model alone and with the draft (eager), median of
    args.reps round-robin repetitions, and whether the tokens are the model's own."""
    from omnitron.checkpoints import load, load_draft
    model, tokenizer = load(args.run_dir, device=device)
    draft = load_draft(args.draft_dir, model, tokenizer, device)
    dataset = data.prepare(args.data or None, tokenizer.spec, quiet=True)
    g = torch.Generator().manual_seed(1)
    prompts = dataset.get_batch("val", n_prompts, 16, g, device)[0]
    new_tokens = min(new_tokens, min(model.config.block_size, draft.config.block_size) - 16 - args.speculate_k - 1)
    stats, times = {}, {"alone": [], "speculative": []}
    outputs = {}
    for rep in range(args.reps + 1):  # the first: warm-up
        for name in times:
            kw = {"draft": draft, "speculate_k": args.speculate_k, "stats": stats} if name == "speculative" else {}
            started = time.perf_counter()
            with torch.no_grad():
                outputs[name] = [torch.stack(list(generate(model, p[None], new_tokens, temperature=0, **kw)), dim=1)
                                 for p in prompts]
            if rep:
                times[name].append(time.perf_counter() - started)
    alone, spec = (statistics.median(times[n]) for n in ("alone", "speculative"))
    result = {"draft_dir": args.draft_dir, "acceptance": stats["accepted"] / stats["drafted"],
              "tok_s_alone": n_prompts * new_tokens / alone, "tok_s_speculative": n_prompts * new_tokens / spec,
              "speedup": alone / spec, "identical": all(torch.equal(a, b) for a, b in
                                                         zip(outputs["alone"], outputs["speculative"]))}
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"\nspeculative decoding of {args.run_dir} ({model.num_params() / 1e6:.2f}M) with the draft "
              f"{args.draft_dir} ({draft.num_params() / 1e6:.2f}M), k={args.speculate_k}, greedy, batch 1, "
              f"{n_prompts} val prompts x {new_tokens} tokens, eager: {stats['accepted'] / stats['drafted']:.0%} of "
              f"drafted tokens kept; {result['tok_s_alone']:.0f} tokens/s alone, {result['tok_s_speculative']:.0f} "
              f"with the draft ({result['speedup']:.2f}x); tokens identical: {result['identical']}")
    return result


def quantized_perplexity(args, device):
    """Val-split perplexity of a trained run folder (args.run_dir, its own corpus and tokenizer)
    with fp32, bf16 and int8 weights, on the same args.eval_batches batches; and the greedy-token
    agreement of the quantized models with fp32 over 8 x 128 tokens continuing val windows."""
    from omnitron.checkpoints import load
    model, tokenizer = load(args.run_dir, device=device)
    dataset = data.prepare(args.data or None, tokenizer.spec, quiet=True)
    if dataset.tokenizer.key() != tokenizer.key():
        raise UserError(f"--data tokenizes to another vocabulary than {args.run_dir}'s: give the run's corpus")
    g = torch.Generator().manual_seed(0)
    block = min(model.config.block_size, 256)
    batches = [dataset.get_batch("val", 8, block, g, device) for _ in range(args.eval_batches)]
    prompts = batches[0][0][:, :16]
    result, reference = {"run_dir": args.run_dir}, None
    for scheme in ("none", "bf16", "int8"):
        m = quantize.quantize(copy.deepcopy(model), scheme)
        with torch.no_grad():
            loss = statistics.fmean(m(x, y)[1].item() for x, y in batches)
            greedy = torch.stack(list(generate(m, prompts, min(128, block - 16), temperature=0)), dim=1)
        reference = greedy if reference is None else reference
        result[scheme] = {"val_loss": loss, "perplexity": float(np.exp(loss)),
                          "same_tokens": (greedy == reference).float().mean().item()}
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"\nval split of {args.run_dir} ({args.eval_batches} batches of 8 x {block} tokens); greedy tokens "
              f"compared over 8 prompts x {min(128, block - 16)} tokens:")
        print_table([{"weights": k, **v} for k, v in result.items() if k != "run_dir"],
                    [("weights", "weights", "{}"), ("val_loss", "val loss", "{:.4f}"),
                     ("perplexity", "perplexity", "{:.3f}"), ("same_tokens", "greedy tokens = fp32", "{:.1%}")])
    return result


# ----------------------------------------------------------------------------- mixture of experts


def bench_moe(args):
    """Dense vs mixture of experts (models/switch.py) at equal active parameters per token: training
    tokens/s and peak memory; the experts computed by a per-expert loop vs torch's grouped_mm; and the
    expert-load histogram of a trained run (--run_dir) or of the random model."""
    device = resolve_device(args.device)
    rows = []
    for name, overrides in [("dense", {"n_experts": 0}), (f"MoE E={args.n_experts} k={args.top_k}", {})]:
        model = build_model(args, device, **overrides)
        t = train_step_timings(model, args, device, torch.float32, compiled=False)
        rows.append({"model": name, "params": model.num_params() / 1e6, "active": model.num_active_params() / 1e6,
                     "tok_s": args.batch_size * args.block_size / (t["step_ms"] / 1e3), **t})
        del model
    print_table(rows, [("model", "model", "{}"), ("params", "params (M)", "{:.2f}"), ("active", "active (M)", "{:.2f}"),
                       ("tok_s", "train tok/s", "{:,.0f}"), ("step_ms", "step ms", "{:.0f}"), ("peak_mib", "peak MiB", "{:.0f}"),
                       ("opt_state_mib", "optimizer MiB", "{:.1f}")])
    print(f"MoE / dense: {rows[1]['tok_s'] / rows[0]['tok_s']:.2f}x the tokens/s, {rows[1]['params'] / rows[0]['params']:.2f}x "
          f"the parameters at {rows[1]['active'] / rows[0]['active']:.3f}x the active parameters")
    layer_rows = bench_experts(args, device)
    loads = expert_loads(args, device)
    if args.plot:
        plot_expert_loads(loads, args.plot, args.run_dir or "a random model")
    return rows, layer_rows, loads


def add_moe_parser(sub):
    """Register `bench.py moe` and its flags."""
    p = sub.add_parser("moe", help="dense vs mixture of experts at equal active parameters: training tokens/s "
                       "and memory; per-expert loop vs grouped_mm; the expert-load histogram")
    add_model_flags(p, "switch")
    p.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    p.add_argument("--tokens", type=int, default=8192, help="tokens routed through one layer's experts")
    p.add_argument("--run_dir", default="", help="a trained switch run folder for the load histogram (empty: the random model)")
    p.add_argument("--data", default="", help="the run's corpus (empty: Shakespeare's complete works), char-level")
    p.add_argument("--eval_batches", type=int, default=8, help="val batches of 8 sequences for the load histogram")
    p.add_argument("--plot", default="out/bench_moe_load.png", help="PNG plot path of the load histogram (empty: none)")
    add_run_flags(p, reps=3)
    p.set_defaults(run=bench_moe)
    return p


def bench_experts(args, device):
    """Forward and forward + backward time of one layer's experts over args.tokens tokens routed top-k
    at random: the per-expert loop against grouped_mm (on CPU too: torch runs it there, slower or not)."""
    switch = models.get("switch")
    g = torch.Generator().manual_seed(0)
    N, k, E = args.tokens, args.top_k, args.n_experts
    x = torch.randn(N, args.n_embd, generator=g).to(device).requires_grad_()
    experts = torch.randint(0, E, (N * k,), generator=g).to(device)
    tokens, gates = torch.arange(N, device=device).repeat_interleave(k), torch.rand(N * k, generator=g).to(device)
    rows, weights = [], None
    for impl in ("loop", "grouped_mm"):
        cfg = switch.Config(n_embd=args.n_embd, n_experts=E, top_k=k, moe_intermediate_size=args.moe_intermediate_size,
                            experts_implementation=impl)
        layer = switch.Experts(cfg).to(device)
        weights = weights or {n: torch.randn(p.shape, generator=g).mul(0.02).to(device) for n, p in layer.state_dict().items()}
        layer.load_state_dict(weights)  # the same weights for both implementations
        fwd, _ = measure(lambda: layer(x, tokens, experts, gates), device, args.reps)
        both, _ = measure(lambda: layer(x, tokens, experts, gates).sum().backward(), device, args.reps)
        rows.append({"implementation": impl, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3})
    print(f"\none layer's experts: {E} experts, width {args.moe_intermediate_size}, d {args.n_embd}, {N:,} tokens, top-{k}")
    print_table(rows, [("implementation", "experts", "{}"), ("fwd_ms", "forward ms", "{:.1f}"),
                       ("fwd_bwd_ms", "forward + backward ms", "{:.1f}")])
    return rows


@torch.no_grad()
def expert_loads(args, device):
    """Per sparse layer, the share of the routing assignments (the router's top-k, before the capacity)
    that each expert gets over `args.eval_batches` batches of the default corpus's val split (char level;
    a run of bench.py switch or train.py --model switch)."""
    if args.run_dir:
        model = models.from_pretrained(args.run_dir).to(device).eval()
        dataset = data.prepare(args.data or None, "char", quiet=True)
        batches = [dataset.get_batch("val", 8, args.block_size, torch.Generator().manual_seed(i), device)[0]
                   for i in range(args.eval_batches)]
    else:
        model = build_model(args, device)
        batches = [torch.randint(args.vocab_size, (8, args.block_size), generator=torch.Generator().manual_seed(i)).to(device)
                   for i in range(args.eval_batches)]
    counts = {}

    def count(layer):
        def hook(module, inputs):
            _, probs = module.route(inputs[0].reshape(-1, inputs[0].shape[-1]))
            top = probs.topk(module.config.top_k, dim=-1).indices.reshape(-1)
            counts[layer] = counts.get(layer, 0) + torch.bincount(top, minlength=module.config.n_experts).cpu()
        return hook
    handles = [block.mlp.register_forward_pre_hook(count(i)) for i, block in enumerate(model.model.layers) if block.sparse]
    for x in batches:
        model(x)
    for h in handles:
        h.remove()
    loads = {layer: (c / c.sum()).tolist() for layer, c in counts.items()}
    print(f"\nexpert load ({args.run_dir or 'random model'}): each expert's share of a layer's assignments "
          f"(uniform: {1 / model.config.n_experts:.3f})")
    for layer, share in loads.items():
        print(f"layer {layer}: " + " ".join(f"{s:.3f}" for s in share) + f"   max / uniform {max(share) * len(share):.2f}")
    return loads


def plot_expert_loads(loads, path, title):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(loads), 1)
    for i, (layer, share) in enumerate(loads.items()):
        ax.bar([e + i * width for e in range(len(share))], share, width, label=f"layer {layer}")
    n = len(next(iter(loads.values())))
    ax.axhline(1 / n, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="expert", ylabel="share of assignments", title=f"expert load: {title}")
    ax.set_xticks([e + 0.4 - width / 2 for e in range(n)], [str(e) for e in range(n)])
    ax.legend(fontsize=8)
    save_figure(fig, path)


class RawEpilogFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default, and the description and epilog (the durations' table) as written."""


def parser(argv=()):
    """The command line; the model flags are those of the file named by --model in argv."""
    pre = runtime.ArgumentParser(add_help=False)  # its errors too are one line
    pre.add_argument("--model", default="llama" if list(argv[:1]) in (["kvcache"], ["decode"]) else "gpt")  # kv heads
    model_name = pre.parse_known_args(argv)[0].model
    width = max(map(len, DURATIONS))
    p = runtime.ArgumentParser(description="Measure speed and memory, and run the paper experiments.",
                               formatter_class=RawEpilogFormatter,
                               epilog="how long each subcommand takes with its defaults on a 2-core CPU\n"
                                      "(trained arms are cached: a second call only evaluates):\n"
                                      + "\n".join(f"  {name:<{width}}  {time}" for name, time in DURATIONS.items())
                                      + "\n`python bench.py NAME --help` lists a subcommand's flags.")
    sub = p.add_subparsers(dest="command", required=True)
    add_attention_parser(sub)
    add_kvcache_parser(sub, model_name)
    add_speed_parser(sub, model_name)
    add_lora_parser(sub, model_name)
    add_curves_parser(sub)
    add_moe_parser(sub)
    add_decode_parser(sub, model_name)
    for name in EXPERIMENTS:
        importlib.import_module(f"experiments.{name}.run").add_parser(sub)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser(argv).parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
