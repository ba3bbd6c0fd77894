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
import copy
import ctypes
import dataclasses
import functools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from omnitron import data
from omnitron import evaluation
from omnitron import generation
from omnitron import kernels
from omnitron import lora
from omnitron import models
from omnitron import quantize
from experiments.scaling import fits as scaling
from omnitron import tokenization
import train
from omnitron import runtime
from omnitron import self_reward
from omnitron.runtime import UserError, autocast, format_eta, print_table, resolve_device, resolve_dtype
from omnitron.generation import generate, speculative_decode


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


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (and a one-line hint) when
    matplotlib, an optional dependency, is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for the plot)")
        return None
    return plt


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
        runtime.atomic_write(Path(args.summary), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
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
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


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
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")
    return runs


# ----------------------------------------------------------------------------- in-context learning

def icl_mixture(args, path):
    """The training text of bench.py icl: the corpus's train part (its first 90%) in chunks of about
    1,000 characters, interleaved with task episodes, corpus_fraction of the characters being corpus.
    An episode is one task of --train_tasks (uniformly), K uniform in 0..k_max demonstrations and a
    query from the task's train split, the task's description before them half of the time (GPT-3's
    format: evaluation.fewshot_prompt), then the answer; episodes end with a blank line.
    Test items are never in it (the tasks' splits hold out words). Written temp-then-rename."""
    rng = random.Random(args.seed)
    text = data.read_corpus(data.corpus_files(data.shakespeare_dir(args.data_dir)))[0]
    corpus = text[:int(len(text) * (1 - data.VAL_FRACTION))]
    train_tasks = [evaluation.read_task(evaluation.find_task(name, args.data_dir)) for name in _names(args.train_tasks)]
    parts, n_corpus, n_tasks = [], 0, 0
    while n_corpus + n_tasks < args.mixture_chars:
        if n_corpus < args.corpus_fraction * (n_corpus + n_tasks + 1):
            start = rng.randrange(len(corpus) - 1000)
            blank = corpus.find("\n\n", start)  # start at a paragraph when there is one after
            start = blank + 2 if blank >= 0 else start
            chunk = corpus[start:start + 1000].rsplit("\n", 1)[0] + "\n\n"
            n_corpus += len(chunk)
            parts.append(chunk)
        else:
            task = rng.choice(train_tasks)
            query, k = rng.choice(task.train), rng.randint(0, args.k_max)
            demos = [d for d in rng.sample(task.train, k + 1) if d is not query][:k]
            description = task.description if rng.random() < 0.5 else None
            episode = (evaluation.fewshot_prompt(demos, query["input"], description, task.sep)
                       + evaluation.TARGET_DELIMITER + query["output"] + "\n\n")
            n_tasks += len(episode)
            parts.append(episode)
    body = "".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    runtime.atomic_write(path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
    return n_corpus, n_tasks


def _names(csv):
    return [s.strip() for s in csv.split(",") if s.strip()]


def _sizes(spec):
    """"2x64,4x128" -> [(2, 64), (4, 128)] (n_layer x n_embd)."""
    try:
        return [tuple(int(v) for v in s.split("x")) for s in _names(spec)]
    except ValueError:
        raise UserError(f"--sizes: expected n_layer x n_embd pairs such as 2x64,4x128, not {spec!r}") from None


def bench_icl(args):
    """GPT-3's Figure 1.2 in miniature: models of --sizes trained on the corpus mixed with task
    episodes of 0..k_max demonstrations (icl_mixture), then scored (evaluation.evaluate, exact
    match on held-out items) at every K of --shots, with and without the task description."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    shots, sizes = [int(k) for k in _names(args.shots)], _sizes(args.sizes)
    if max(shots) >= args.k_max:
        raise UserError(f"--k_max {args.k_max} must be above the largest K evaluated ({max(shots)}), so that the "
                        "answer after the last demonstration was a training target")
    eval_tasks = [evaluation.read_task(evaluation.find_task(n, args.data_dir)) for n in _names(args.eval_tasks)]
    mixture = out / "mixture.txt"
    if args.train:
        n_corpus, n_tasks = icl_mixture(args, mixture)
        print(f"training mixture {mixture}: {n_corpus:,} corpus + {n_tasks:,} task characters "
              f"({', '.join(_names(args.train_tasks))}; K in 0..{args.k_max})", flush=True)
    rows, t0 = [], time.time()
    for n_layer, n_embd in sizes:
        run = out / f"gpt_{n_layer}x{n_embd}"
        if args.train:
            train.run(model="gpt", data=str(mixture), data_dir=str(args.data_dir), out_dir=str(run), n_layer=n_layer,
                      n_head=args.n_head, n_embd=n_embd, block_size=args.block_size, batch_size=args.batch_size,
                      max_iters=args.max_iters, warmup_iters=args.max_iters // 10, learning_rate=args.learning_rate,
                      dropout=0.0, eval_interval=args.max_iters, eval_iters=5, log_interval=max(args.max_iters // 5, 1),
                      sample_tokens=0, device=device, dtype="float32", seed=args.seed)
        if not (run / "config.json").is_file():
            raise UserError(f"no trained model in {run}: run without --train false first")
        model = models.from_pretrained(run, device=device).eval()
        tokenizer = tokenization.tokenizer_for_model(run, model.config.vocab_size)
        params = model.num_params()
        for task in eval_tasks:
            for described in (True, False):
                for k in shots:
                    for row in evaluation.evaluate(model, tokenizer, task, k, seed=args.seed, limit=args.limit,
                                                   batch_size=args.eval_batch_size, use_description=described):
                        rows.append({**row, "size": f"{n_layer}x{n_embd}", "params_m": params / 1e6})
    elapsed = time.time() - t0
    print_icl(rows, shots)
    meta = {**{k: v for k, v in vars(args).items() if k != "run"}, "elapsed_s": round(elapsed, 1)}
    body = json.dumps({"meta": meta, "results": rows}, indent=1) + "\n"
    runtime.atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(body))
    print(f"results: {out / 'results.json'}")
    if args.plot:
        plot_icl(rows, shots, args.plot)
    print(f"bench icl: {format_eta(elapsed)} ({elapsed:.0f} s) in all")
    return rows


def print_icl(rows, shots):
    """Per metric, one line per (task, size, description) with its value at every K: exact match
    in % ± standard error, and the reference answers' perplexity."""
    for metric, title, fmt in (("exact_match", "exact match (%) on held-out items, ± standard error",
                                lambda r: f"{100 * r['value']:.0f} ±{100 * (r['stderr'] or 0):.0f}"),
                               ("perplexity", "perplexity of the reference answers (lm-eval's lambada metric)",
                                lambda r: f"{r['value']:.3g}")):
        table = {}
        for r in (r for r in rows if r["metric"] == metric):
            key = (r["task"], r["size"], r["description"])
            table.setdefault(key, {"task": r["task"], "size": r["size"], "params": r["params_m"],
                                   "description": "yes" if r["description"] else "no", "n": r["n"]})
            table[key][f"k{r['shots']}"] = fmt(r)
        if table:
            columns = [("task", "task", "{}"), ("size", "layers x width", "{}"), ("params", "params (M)", "{:.2f}"),
                       ("description", "description", "{}")] + [(f"k{k}", f"K={k}", "{}") for k in shots]
            print(title)
            print_table(list(table.values()), columns + [("n", "n", "{}")])


def plot_icl(rows, shots, path):
    """Exact match (top) and the answers' perplexity (bottom, log scale) against K (symlog axis:
    K = 0 shown), per task and size: solid with the description, dashed without."""
    plt = pyplot()
    if plt is None:
        return
    names = list(dict.fromkeys(r["task"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    metrics = [m for m in ("exact_match", "perplexity") if any(r["metric"] == m for r in rows)]
    fig, axes = plt.subplots(len(metrics), len(names), figsize=(5.5 * len(names), 4 * len(metrics)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row_axes, metric in zip(axes, metrics):
        scale = 100 if metric == "exact_match" else 1
        for ax, name in zip(row_axes, names):
            for c, size in enumerate(sizes):
                for described, style in ((True, "-"), (False, "--")):
                    mine = sorted((r for r in rows if r["task"] == name and r["size"] == size and r["metric"] == metric
                                   and r["description"] == described), key=lambda r: r["shots"])
                    if mine:
                        ax.plot([r["shots"] for r in mine], [scale * r["value"] for r in mine], style, marker="o",
                                color=colors[c % len(colors)],
                                label=f"{size} ({mine[0]['params_m']:.2f}M){'' if described else ', no description'}")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(shots, [str(k) for k in shots])
            ax.minorticks_off()
            if metric == "exact_match":
                ax.set(ylabel="exact match (%)", ylim=(-2, 102))
            else:
                ax.set(ylabel="perplexity of the answer", yscale="log")
            ax.set(xlabel="number of examples in context (K)", title=f"{name}: {metric}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def add_run_flags(p, reps=None):
    """--device and --json (and --reps, where the subcommand repeats its timings)."""
    runtime.add_device_flags(p, dtype=False, attn=False)
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    if reps:
        p.add_argument("--reps", type=int, default=reps, help="timed repetitions (the median is reported)")


def add_training_run_flags(p, out, out_help, plot=None):
    """--data, --data_dir, --threads, --device, --out and (unless plot is None) --plot: the flags of the
    subcommands that train runs (switch, scaling, positions, performer)."""
    p.add_argument("--data", default="", help="corpus (empty: Shakespeare's complete works), char-level")
    p.add_argument("--data_dir", default=str(data.DEFAULT_DATA_DIR), help="where corpora and their tokenized caches live")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--out", default=out, help=out_help)
    if plot is not None:
        p.add_argument("--plot", default=plot, help="PNG plot path (empty: none)")


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


# ----------------------------------------------------------------------------- decoding against the roofline (issue 19)

# the model of issue 19's table: a Llama of 55.3M parameters (221 MB in fp32), untied output head
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


STEP_VARIANTS = {  # issue 19's candidates for the compiled one-token step: (inductor options, cache slots: 0 = rounded)
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
    from sample import load, load_draft
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
    from sample import load
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


# ----------------------------------------------------------------------------- Switch vs dense (Fedus et al. 2021)

SWITCH_ARMS = {  # name -> models/switch.py Config overrides; the first two are the comparison, the rest ablations
    "dense": {"n_experts": 0},            # every layer a SwiGLU MLP of width intermediate_size (512)
    "switch": {},                         # 8 experts of width 512, top-1, capacity 1.25 / 2.0, alpha 1e-2, init 0.1
    "switch_alpha0": {"router_aux_loss_coef": 0.0},  # no load-balancing loss
    "switch_init1": {"init_scale": 1.0},  # the usual initialisation scale instead of Switch's 0.1
    "switch_top2": {"top_k": 2},          # two experts per token (twice the expert FLOPs)
    "switch_baseline": {},                # switch again, for the ablations to compare with (their length)
}


def cached_run(out, settings, label="", **flags):
    """train.run(out_dir=out, **flags), or nothing when `out` holds a finished run of the same
    settings (its settings.json, written last). Returns the run's log.jsonl records."""
    out = Path(out)
    done = out / "settings.json"
    if not (done.is_file() and json.loads(done.read_text()) == settings):
        print(f"--- {label or out.name}: training {flags.get('max_iters')} steps into {out}", flush=True)
        train.run(out_dir=str(out), **flags)
        runtime.atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(settings)))
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


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


def bench_switch(args):
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
    runtime.atomic_write(Path(args.out) / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
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
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------- positions (RoFormer, NoPE, PI, YaRN)

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
        done = job[2] / "settings.json"
        return done.is_file() and json.loads(done.read_text()) == job[3]
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
        cache = out / "position_losses.json"
        stored = json.loads(cache.read_text()) if cache.is_file() else {}
        if stored.get("key") != {**key, "run": settings}:
            model = models.from_pretrained(out).to(device)
            limit = model.max_positions or x.shape[1]  # learned: no position past its table
            variants = {name: {}}
            if name == "rope":
                variants.update({f"rope+{ext}": fn(args.eval_factor) for ext, fn in ROPE_EXTENSIONS.items()})
            stored = {"key": {**key, "run": settings}, "curves": {}}
            trained = model.config
            for variant, overrides in variants.items():
                model.config = dataclasses.replace(trained, **overrides)
                stored["curves"][variant] = position_losses(model, x[:, :limit], y[:, :limit]).tolist()
            runtime.atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps(stored)))
        for variant, losses in stored["curves"].items():
            curves[variant, seed] = torch.tensor(losses, dtype=torch.float64)
    return curves


def bench_positions(args):
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
    runtime.atomic_write(Path(args.out) / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary)))
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
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------- Performer and the window: quality (issue 15)

PERFORMER_ARMS = {  # name -> train.py attention flags; the default Llama otherwise
    "softmax": {"attn": "sdpa"},
    "performer_m64": {"attn": "performer", "performer_features": 64},
    "performer_m256": {"attn": "performer", "performer_features": 256},
    "window64": {"attn": "sdpa", "attn_window": 64},
}


def bench_performer(args):
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
    runtime.atomic_write(Path(args.out) / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    return summary


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
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------- scaling laws (Kaplan et al. 2020; Hoffmann et al. 2022)

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
    result = train.run(**s, out_dir=str(out), lr_decay_iters=-1, min_lr=-1.0, eval_interval=s["max_iters"],
                       log_interval=s["max_iters"], sample_tokens=0, device=str(device), dtype=dtype, tokenizer="char",
                       dropout=0.0, data_dir=str(data_dir))
    record = {**run, "dtype": dtype, "val_loss": result["val_loss"], "train_loss": result["train_loss"],
              "val_bpc": result["val_loss"] / np.log(2), "elapsed_s": round(result["elapsed_s"], 2)}
    runtime.atomic_write(out / "result.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
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


def _floats(csv, flag, count=None):
    """"1e11,2e11" -> [1e11, 2e11]: positive numbers, `count` of them if given; else UserError."""
    try:
        values = [float(v) for v in _names(csv)]
    except ValueError:
        values = []
    if not values or any(not v >= 0 for v in values) or (count and len(values) != count):
        raise UserError(f"{flag}: expected {count or 'one or more'} comma-separated numbers, not {csv!r}")
    return values


def bench_scaling(args):
    """Kaplan et al. 2020 and Hoffmann et al. 2022 measured here: a grid of GPT sizes at several compute
    budgets (IsoFLOP profiles), char-level on the corpus; Kaplan's power laws, Chinchilla's approaches 2 and
    3 (scaling.py); the loss of a compute-optimal model at 4x the largest budget predicted, and with
    --verify trained and compared."""
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = {**SCALING_PRESETS[args.preset], "seed": args.seed, "data": args.data}
    if args.budgets:
        preset["budgets"] = _floats(args.budgets, "--budgets")
    if args.sizes:
        preset["ladder"] = _sizes(args.sizes)
    for n_layer, n_embd in preset["ladder"]:
        if n_layer < 1 or n_embd < preset["head_dim"] or n_embd % preset["head_dim"]:
            raise UserError(f"--sizes {n_layer}x{n_embd}: n_layer >= 1 and n_embd a multiple of the head size "
                            f"{preset['head_dim']} (the {args.preset} preset's)")
    if args.window:
        preset["window"] = tuple(_floats(args.window, "--window", count=2))
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
    runtime.atomic_write(folder / "runs.json", lambda tmp: Path(tmp).write_text(
        json.dumps({"preset": preset, "runs": results}, indent=1) + "\n"))
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
    runtime.atomic_write(folder / "fits.json", lambda tmp: Path(tmp).write_text(
        json.dumps({"fits": fits, "prediction": prediction}, indent=1, default=float) + "\n"))
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
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------- the Phi recipe (issue 18)

# the compared model: a small phi.py (3 layers, 96 wide, 0.34M non-embedding parameters), character level
PHI_MODEL = dict(n_layer=3, n_embd=96, n_head=4, n_kv_head=4, intermediate_size=384)
PHI_REFERENCE = dict(n_layer=2, n_embd=96, n_head=4, n_kv_head=4, intermediate_size=384)  # curation's scorers
PHI_ARMS = {  # arm -> (stage-1 corpus, stage-2 corpus): stage 2 continues stage 1 for --finetune_iters steps
    "A": ("pool_A.txt", "pool_A.txt"),              # the unfiltered pool throughout
    "B": ("filtered_B.txt", "filtered_B.txt"),      # the filtered pool throughout (repeated epochs)
    "C": ("filtered_B.txt", "exercises_train.txt"),  # B, then a fine-tune on the synthetic exercises
}


def phi_init(folder, seed, block_size, **config):
    """A freshly initialised phi.py model (seed) with the comparison's character tokenizer
    (curation.VOCAB) saved as a model directory, so that every arm starts from the same weights
    and vocabulary (train.run's --init_from). Reused when it holds the same settings (settings.json)."""
    folder = Path(folder)
    settings, done = {"seed": seed, "block_size": block_size, **config}, folder / "settings.json"
    if not ((folder / "model.safetensors").is_file() and done.is_file() and json.loads(done.read_text()) == settings):
        from experiments.phi import curation
        torch.manual_seed(seed)
        module = models.get("phi")
        model = module.Model(module.Config(vocab_size=len(curation.VOCAB), block_size=block_size, **config))
        model.save_pretrained(folder)
        tokenization.CharTokenizer(curation.VOCAB).save(folder)
        runtime.atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(settings)))  # last: the runs from it see it
    return folder


def _phi_train(args, out, init, corpus, iters, lr, seed, label, block_size=None, batch_size=None):
    import hashlib
    parent = Path(init) / "settings.json"  # a run continued: retrain when it was retrained
    settings = {"init": str(init), "corpus": str(corpus), "corpus_sha1": hashlib.sha1(Path(corpus).read_bytes()).hexdigest(),
                "parent": json.loads(parent.read_text()) if parent.is_file() else None, "iters": iters, "lr": lr,
                "seed": seed, "block_size": block_size or args.block_size, "batch_size": batch_size or args.batch_size}
    cached_run(out, settings, label, init_from=str(init), data=str(corpus), data_dir=str(Path(args.out) / "tokens"),
               max_iters=iters, learning_rate=lr, min_lr=lr / 10, warmup_iters=max(1, iters // 10),
               block_size=settings["block_size"], batch_size=settings["batch_size"], eval_interval=iters,
               eval_iters=5, log_interval=max(1, iters // 5), sample_tokens=0, device="cpu", dtype="float32",
               seed=seed)
    return out


def phi_arm_run(args, arm, seed):
    """The folder name of an arm's final run: its budget in it, so runs of other lengths sit beside it."""
    return f"{arm}-{args.pretrain_iters}+{args.finetune_iters}-s{seed}"


def phi_completion(text):
    """A generated function body: the lines up to the first one that is neither blank nor indented
    (the model went on to another definition)."""
    body = []
    for line in text.split("\n"):
        if line.strip() and not line.startswith((" ", "\t")):
            break
        body.append(line)
    return "\n".join(body).rstrip() + "\n"


@torch.no_grad()
def phi_evaluate(run, curated, gen_tokens=64, batch_size=32):
    """The three measures of a trained model: (1) body_loss, nats per character of held-out
    functions' bodies given their signature + docstring; (2) pass_at_1 of greedy completions of the
    held-out exercise families, run with their tests in the sandbox (and pass_at_1_seen_families:
    the same on new drawings of the training families); (3) code_loss, nats per character of
    random windows of held-out modules."""
    from experiments.phi import exercises
    from experiments.phi import sandbox
    model = models.from_pretrained(run).eval()
    tok = tokenization.tokenizer_for_model(run, model.config.vocab_size)

    def loss(pairs):
        scores = evaluation.loglikelihoods(model, pairs, batch_size=batch_size, reuse_context=False)
        return -sum(scores) / sum(len(c) for _, c in pairs)
    rows = [json.loads(line) for line in curated.path("heldout_functions.jsonl").read_text().splitlines()]
    body = loss([(tok.encode(r["prompt"]), tok.encode(r["body"])) for r in rows])
    windows = [json.loads(line)["text"] for line in curated.path("heldout_code.jsonl").read_text().splitlines()]
    code = loss([(tok.encode(w[:1]), tok.encode(w[1:])) for w in windows])

    def solve(tasks):
        outs = []
        for s in range(0, len(tasks), batch_size):
            chunk = tasks[s:s + batch_size]
            outs += generation.complete(model, tok, [tok.encode(t.prompt) for t in chunk], gen_tokens, stop="\n\n",
                                        temperature=0)
        programs = [t.prompt + phi_completion(o) for t, o in zip(tasks, outs)]
        p1, results = sandbox.pass_at_1(programs, [t.tests for t in tasks])
        by_family = {}
        for t, r in zip(tasks, results):
            by_family.setdefault(t.family, []).append(r.passed)
        return p1, {"passed": sum(r.passed for r in results), "exercises": len(tasks),
                    "by_family": {f: sum(v) / len(v) for f, v in by_family.items()},
                    "statuses": {st: sum(r.status == st for r in results) for st in {r.status for r in results}},
                    "samples": [{"prompt": t.prompt, "completion": phi_completion(o)} for t, o in zip(tasks, outs)][:8]}
    p1, unseen = solve(exercises.load_jsonl(curated.path("heldout_exercises.jsonl")))
    p1_seen, seen = solve(exercises.load_jsonl(curated.path("heldout_instances.jsonl")))
    return {"body_loss": body, "code_loss": code, "pass_at_1": p1, "pass_at_1_seen_families": p1_seen,
            "unseen_families": unseen, "seen_families": seen}


def bench_phi(args):
    """The Phi recipe at small scale (Gunasekar et al. 2023): the curated data (curation.build:
    pool, dedup, rubric, classifier, Moore-Lewis, exercises), then arms A (unfiltered pool), B
    (filtered pool) and C (B + a fine-tune on the exercises) of one small phi.py at the same token
    budget, --seeds seeds each; the three measures of phi_evaluate. Runs are cached by settings."""
    from experiments.phi import curation
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in PHI_ARMS for a in arms):
        raise UserError(f"--arms {args.arms!r}: choose from {', '.join(PHI_ARMS)}")
    out, t0 = Path(args.out), time.time()
    data_folder = out / "data"
    data_settings = {"version": 2, **{k: getattr(args, k) for k in ("keep_fraction", "n_label", "ref_iters",
                                                                     "embed_tokens", "exercises_per_family", "stdlib")}}
    curated = curation.Curated(data_folder)
    done = data_folder / "settings.json"
    if not (done.is_file() and json.loads(done.read_text()) == data_settings and (data_folder / "manifest.json").is_file()):
        def train_reference(corpus, name):
            init = phi_init(data_folder / f"{name}-init", 0, 128, **PHI_REFERENCE)
            run = _phi_train(args, data_folder / name, init, corpus, args.ref_iters, 3e-3, 0, f"reference {name}",
                             block_size=128, batch_size=16)
            model = models.from_pretrained(run).eval()
            return model, tokenization.tokenizer_for_model(run, model.config.vocab_size)
        curated = curation.build(data_folder, train_reference, embed_tokens=args.embed_tokens,
                                 keep_fraction=args.keep_fraction, n_label=args.n_label,
                                 exercises_per_family=args.exercises_per_family, stdlib=args.stdlib or None)
        runtime.atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(data_settings)))
        print(f"curation: {format_eta(time.time() - t0)}", flush=True)
    manifest = curated.manifest
    longest = max(len(json.loads(line)[key]) for name, key in (("heldout_functions.jsonl", "body"),
                                                               ("heldout_code.jsonl", "text"))
                  for line in curated.path(name).read_text().splitlines())
    if args.block_size < longest:
        raise UserError(f"--block_size {args.block_size}: the held-out code is scored in pieces of up to {longest} "
                        "characters; give at least that")
    plan = []  # (name, seed, init name or stage-1 name, corpus, iters, lr)
    for seed in range(args.seeds):
        for arm in arms:
            first, second = PHI_ARMS[arm]
            stage1 = f"{first.split('_')[0]}-stage1-s{seed}"
            if (stage1, seed) not in [(p[0], p[1]) for p in plan]:
                plan.append((stage1, seed, f"init-s{seed}", first, args.pretrain_iters, args.learning_rate))
            plan.append((phi_arm_run(args, arm, seed), seed, stage1, second, args.finetune_iters, args.finetune_lr))
    total_steps, done_steps, t_train = sum(p[4] for p in plan), 0, time.time()
    for i, (name, seed, parent, corpus, iters, lr) in enumerate(plan):
        init = phi_init(out / parent, seed, args.block_size, **PHI_MODEL) if parent.startswith("init") else out / parent
        _phi_train(args, out / name, init, curated.path(corpus), iters, lr, seed, f"[{i + 1}/{len(plan)}] {name}")
        done_steps += iters
        elapsed = time.time() - t_train
        print(f"[{i + 1}/{len(plan)} runs] {name} done; {format_eta(elapsed)} so far, ETA "
              f"{format_eta(elapsed / done_steps * (total_steps - done_steps))}", flush=True)
    rows = []
    for seed in range(args.seeds):
        for arm in arms:
            run = out / phi_arm_run(args, arm, seed)
            cache = run / "eval.json"
            settings = json.loads((run / "settings.json").read_text())
            if cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
                result = json.loads(cache.read_text())["result"]
            else:
                result = phi_evaluate(run, curated, args.gen_tokens)
                body = json.dumps({"settings": settings, "result": result}, indent=1)
                runtime.atomic_write(cache, lambda tmp: Path(tmp).write_text(body))
            rows.append({"arm": arm, "seed": seed, **result})
    tokens = (args.pretrain_iters + args.finetune_iters) * args.batch_size * args.block_size
    print_table(rows, [("arm", "arm", "{}"), ("seed", "seed", "{}"), ("body_loss", "(1) body loss", "{:.4f}"),
                       ("pass_at_1", "(2) pass@1 unseen families", "{:.3f}"),
                       ("pass_at_1_seen_families", "pass@1 new instances", "{:.3f}"),
                       ("code_loss", "(3) held-out code loss", "{:.4f}")])
    summary = {"tokens_per_arm": tokens, "model": PHI_MODEL, "rows": rows, "arms": {}}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        summary["arms"][arm] = {k: {"mean": statistics.mean(r[k] for r in mine), "min": min(r[k] for r in mine),
                                    "max": max(r[k] for r in mine)}
                               for k in ("body_loss", "pass_at_1", "pass_at_1_seen_families", "code_loss")}
    a = summary["arms"]
    if {"A", "B"} <= set(a):
        summary["B_beats_A_on_body_loss_beyond_spread"] = a["B"]["body_loss"]["max"] < a["A"]["body_loss"]["min"]
    if {"B", "C"} <= set(a):
        summary["C_beats_B_on_pass_at_1_beyond_spread"] = a["C"]["pass_at_1"]["min"] > a["B"]["pass_at_1"]["max"]
    summary["manifest"] = {k: manifest[k] for k in ("classifier", "selection_precision", "split") if k in manifest}
    for arm, m in a.items():
        print(f"{arm}: " + ", ".join(f"{k} {v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" for k, v in m.items()))
    for key in ("B_beats_A_on_body_loss_beyond_spread", "C_beats_B_on_pass_at_1_beyond_spread"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(f"tokens per arm: {tokens:,}; classifier: {manifest.get('classifier')}")
    path = out / f"summary-{args.pretrain_iters}+{args.finetune_iters}.json"
    runtime.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(f"bench phi: {format_eta(time.time() - t0)} in all; {path}", flush=True)
    return summary


# ----------------------------------------------------------------------------- self-rewarding (Yuan et al. 2024) in miniature

SORT_JUDGE_TEMPLATE = "rate {prompt}{response}\n"  # the judge's prompt; it answers "Score: k" on the next line


def sort_prompt(letters):
    return f"sort {letters}:"


def perturbed(letters, rng, alphabet):
    """A wrong or right response to sorting `letters`, for the judge's seed examples: the answer, the
    answer with two neighbours swapped, a letter dropped, a letter doubled, a letter replaced by one
    not in the input, the input unsorted, or random letters (each equally likely)."""
    answer = "".join(sorted(letters))
    i = rng.randrange(len(answer))
    kind = rng.randrange(7)
    if kind == 1 and len(answer) > 1:
        j = min(i, len(answer) - 2)
        return answer[:j] + answer[j + 1] + answer[j] + answer[j + 2:]
    if kind == 2:
        return answer[:i] + answer[i + 1:] or answer[::-1]
    if kind == 3:
        return answer[:i] + answer[i] + answer[i:]
    if kind == 4:
        others = [c for c in alphabet if c not in letters]
        return answer[:i] + rng.choice(others) + answer[i + 1:] if others else answer[::-1]
    if kind == 5:
        return letters
    if kind == 6:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, len(letters) + 1)))
    return answer


def sort_task(folder, args, seed):
    """The sorting task's files in `folder` (written once per seed): corpus.txt (M1's supervised data:
    --sr_instructions correct `sort LETTERS:SORTED` lines and --sr_judge_examples judge lines `rate
    sort LETTERS:RESPONSE` + `Score: k`, the responses perturbed and scored by self_reward.sort_rubric),
    prompts.jsonl (the self-rewarding prompts; the header names the judge template and the checker)
    and heldout.jsonl (the evaluation prompts). Every string of letters is used once across all of them."""
    folder = Path(folder)
    if (folder / "heldout.jsonl").is_file():
        return folder
    rng = random.Random(seed)
    lo, hi = (int(x) for x in args.lengths.split("-"))
    n = args.sr_instructions + args.sr_judge_examples + args.prompts + args.heldout
    seen, strings = set(), []
    while len(strings) < n:
        s = "".join(rng.choice(args.alphabet) for _ in range(rng.randint(lo, hi)))
        if s not in seen:
            seen.add(s)
            strings.append(s)
    a, b, c = args.sr_instructions, args.sr_instructions + args.sr_judge_examples, n - args.heldout
    lines = [f"{sort_prompt(s)}{''.join(sorted(s))}" for s in strings[:a]]
    for s in strings[a:b]:
        response = perturbed(s, rng, args.alphabet)
        lines.append(SORT_JUDGE_TEMPLATE.replace("{prompt}", sort_prompt(s)).replace("{response}", response)
                     + f"Score: {self_reward.sort_rubric(s, response)}")
    rng.shuffle(lines)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"judge_template": SORT_JUDGE_TEMPLATE, "stop": "\n", "judge_stop": "\n", "checker": "sort"}
    for name, chunk in (("prompts.jsonl", strings[b:c]), ("heldout.jsonl", strings[c:])):
        runtime.write_jsonl(folder / name, [header] + [{"prompt": sort_prompt(s), "answer": "".join(sorted(s))}
                                                           for s in chunk])
    runtime.atomic_write(folder / "corpus.txt", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return folder


@torch.no_grad()
def heldout_accuracy(model_dir, heldout, device, batch=100):
    """Exact match of greedy responses (up to the end of the line) to the held-out sorting prompts;
    cached in the model's folder (heldout_exact.json)."""
    cache = Path(model_dir) / "heldout_exact.json"
    if cache.is_file() and json.loads(cache.read_text())["heldout"] == str(heldout):
        return json.loads(cache.read_text())["exact_match"]
    model = models.from_pretrained(model_dir, dtype=torch.float32, device=device).eval()
    tokenizer = tokenization.tokenizer_for_model(model_dir, model.config.vocab_size)
    _, records = self_reward.read_prompts(heldout)
    right = 0
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        outs = generation.complete(model, tokenizer, [tokenizer.encode(r["prompt"]) for r in chunk], 16, stop="\n",
                                   temperature=0)
        right += sum(o == r["answer"] for o, r in zip(outs, chunk))
    runtime.atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps(
        {"heldout": str(heldout), "exact_match": right / len(records)})))
    return right / len(records)


def bench_self_reward(args):
    """Self-rewarding iterations on sorting short strings (checking is easier than producing): per seed,
    M1 trained from scratch on the instruction and judge seed data, then --iterations rounds of
    self-rewarding DPO (train.py --self_reward) with the model's own judge, and the controls: pairs at
    random, pairs by the exact checker (the upper bound). Held-out exact match of every M_t, and each
    iteration's judge accuracy and reward gap. Every run is cached in its folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out, rows = Path(args.out_dir), []
    conditions = [c for c in args.conditions.split(",") if c]
    if unknown := [c for c in conditions if c not in self_reward.PAIRS_FROM]:
        raise UserError(f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(self_reward.PAIRS_FROM)}")
    t0 = time.time()
    for seed in range(args.seeds):
        folder = sort_task(out / f"seed{seed}" / "task", args, 1000 + seed)
        m1 = out / f"seed{seed}" / "M1"
        if not self_reward.finished(m1, args.m1_iters):
            print(f"--- seed {seed}: M1, {args.m1_iters} steps of supervised training from scratch", flush=True)
            train.run(model="gpt", out_dir=str(m1), data=str(folder / "corpus.txt"), data_dir=str(out / "data"),
                      tokenizer="char", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      block_size=args.block_size, batch_size=32, max_iters=args.m1_iters, learning_rate=3e-3,
                      warmup_iters=50, eval_interval=args.m1_iters, eval_iters=5, log_interval=max(1, args.m1_iters // 4),
                      sample_tokens=0, seed=seed, device=device)
        m1_acc = heldout_accuracy(m1, folder / "heldout.jsonl", device)
        for condition in conditions:
            run_dir = out / f"seed{seed}" / f"{condition}-lr{args.dpo_lr:g}-beta{args.dpo_beta:g}-{args.dpo_iters}steps"
            print(f"--- seed {seed}, pairs by {condition}: {args.iterations} iterations into {run_dir} "
                  f"({runtime.format_eta(time.time() - t0)} so far)", flush=True)
            result = train.run(init_from=str(m1), self_reward=args.iterations, prompts=str(folder / "prompts.jsonl"),
                               sr_pairs=condition, out_dir=str(run_dir), sr_max_new_tokens=16, sr_judge_tokens=12, block_size=args.block_size,
                               max_iters=args.dpo_iters, batch_size=args.dpo_batch, learning_rate=args.dpo_lr,
                               dpo_beta=args.dpo_beta, warmup_iters=0, min_lr=args.dpo_lr, eval_interval=args.dpo_iters,
                               eval_iters=2, log_interval=args.dpo_iters, seed=seed, device=device)
            accs = [m1_acc] + [heldout_accuracy(run_dir / f"M{t + 1}", folder / "heldout.jsonl", device)
                               for t in range(1, args.iterations + 1)]
            for t, acc in enumerate(accs, 1):
                it = result["iterations"][t - 1] if t <= len(result["iterations"]) else {}
                if it:  # the pairs' precision against the checker, from the iteration's files
                    folder_t = run_dir / f"M{t + 1}"
                    read = lambda name: [obj for _, obj in runtime.read_jsonl(folder_t / name)]
                    it["pairs_true_better"] = self_reward.pair_precision(read("judgements.jsonl"), read("pairs.jsonl"),
                                                                         "\n")[0]
                rows.append({"seed": seed, "condition": condition, "model": f"M{t}", "heldout_exact": acc,
                             "judge_accuracy": it.get("judge_pairwise_accuracy"), "reward_gap": it.get("reward_gap"),
                             "pairs_true_better": it.get("pairs_true_better"),
                             "pairs": it.get("pairs"), "mean_score": it.get("mean_score"),
                             "sample_exact": it.get("exact_match"), "malformed": it.get("malformed_judgements")})
    sweep = lr_sweep(args, out, device) if args.lr_sweep else []
    print_table(rows, [("seed", "seed", "{}"), ("condition", "pairs by", "{}"), ("model", "model", "{}"),
                       ("heldout_exact", "held-out exact", "{:.3f}"), ("sample_exact", "samples exact", "{:.3f}"),
                       ("judge_accuracy", "judge acc", "{:.3f}"), ("mean_score", "self-score", "{:.2f}"),
                       ("reward_gap", "gap", "{:+.2f}"), ("pairs", "pairs", "{}"),
                       ("pairs_true_better", "pairs right", "{:.2f}"), ("malformed", "malformed", "{}")])
    summary = []
    for condition in conditions:
        for t in range(1, args.iterations + 2):
            sel = [r for r in rows if r["condition"] == condition and r["model"] == f"M{t}"]
            row = {"condition": condition, "model": f"M{t}"}
            for key in ("heldout_exact", "judge_accuracy", "reward_gap", "pairs_true_better"):
                vals = [r[key] for r in sel if r[key] is not None]
                if vals:
                    row[key] = statistics.mean(vals)
                    row[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary.append(row)
    print()
    print_table(summary, [("condition", "pairs by", "{}"), ("model", "model", "{}"),
                          ("heldout_exact", "held-out exact (mean)", "{:.3f}"), ("heldout_exact_sd", "sd", "{:.3f}"),
                          ("judge_accuracy", "judge acc (mean)", "{:.3f}"), ("judge_accuracy_sd", "sd", "{:.3f}"),
                          ("reward_gap", "gap (mean)", "{:+.2f}"), ("reward_gap_sd", "sd", "{:.2f}"),
                          ("pairs_true_better", "pairs right (mean)", "{:.2f}")])
    runtime.atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(
        json.dumps({"rows": rows, "summary": summary, "lr_sweep": sweep, "args": vars(args) | {"run": None}}, indent=1)))
    if args.plot:
        plot_self_reward(rows, conditions, args.iterations + 1, args.plot)
    return summary


def plot_self_reward(rows, conditions, n_models, path):
    """Held-out exact match of M1 .. M_n and the judge's pairwise accuracy of M1 .. M_{n-1}, per
    condition: the seeds' mean (line) and their range (band)."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for condition in conditions:
        for ax, key, n in ((axes[0], "heldout_exact", n_models), (axes[1], "judge_accuracy", n_models - 1)):
            values = np.array([[r[key] for r in rows if r["condition"] == condition and r["model"] == f"M{t}"]
                               for t in range(1, n + 1)], dtype=float)  # (models, seeds)
            line, = ax.plot(range(1, n + 1), values.mean(1), marker="o", label=f"pairs by {condition}")
            ax.fill_between(range(1, n + 1), values.min(1), values.max(1), alpha=0.15, color=line.get_color())
    axes[0].set(xlabel="model M_t", ylabel="held-out exact match", title="sorting: the model's answers")
    axes[1].set(xlabel="model M_t (the judge of iteration t)", ylabel="pairwise accuracy vs the checker",
                title="the model as its own judge")
    for ax, n in zip(axes, (n_models, n_models - 1)):
        ax.set_xticks(range(1, n + 1))
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def lr_sweep(args, out, device):
    """How the DPO learning rate was chosen: one DPO run (--dpo_iters steps) from seed 0's M1 per
    learning rate of --lr_sweep, on the first iteration's pairs by the judge and by the checker,
    scored on the self-rewarding prompts (never on the held-out ones)."""
    seed0, rows = out / "seed0", []
    settings = f"lr{args.dpo_lr:g}-beta{args.dpo_beta:g}-{args.dpo_iters}steps"
    prompts = seed0 / "task" / "prompts.jsonl"
    for lr in [float(x) for x in args.lr_sweep.split(",")]:
        for condition in ("judge", "checker"):
            folder = seed0 / "lr_sweep" / f"{condition}-lr{lr:g}"
            if not self_reward.finished(folder, args.dpo_iters):
                train.run(init_from=str(seed0 / "M1"), dpo=str(seed0 / f"{condition}-{settings}" / "M2" / "pairs.jsonl"),
                          out_dir=str(folder), max_iters=args.dpo_iters, batch_size=args.dpo_batch,
                          block_size=args.block_size, learning_rate=lr, min_lr=lr, warmup_iters=0, dpo_beta=args.dpo_beta,
                          eval_interval=args.dpo_iters, eval_iters=2, log_interval=args.dpo_iters, sample_tokens=0,
                          seed=0, device=device)
            rows.append({"pairs by": condition, "lr": lr, "prompts_exact": heldout_accuracy(folder, prompts, device)})
    rows.append({"pairs by": "(M1)", "lr": None, "prompts_exact": heldout_accuracy(seed0 / "M1", prompts, device)})
    print_table(rows, [("pairs by", "pairs (iteration 1, seed 0)", "{}"), ("lr", "DPO lr", "{:g}"),
                       ("prompts_exact", "exact on the self-rewarding prompts", "{:.3f}")])
    return rows


def parser(argv=()):
    """The command line; the model flags are those of the file named by --model in argv."""
    pre = runtime.ArgumentParser(add_help=False)  # its errors too are one line
    pre.add_argument("--model", default="llama" if list(argv[:1]) in (["kvcache"], ["decode"]) else "gpt")  # kv heads
    model_name = pre.parse_known_args(argv)[0].model
    p = runtime.ArgumentParser(description="Measure speed and memory.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="naive vs sdpa vs triton attention: time, memory, TFLOP/s; --scaling: "
                       "softmax vs Performer vs a sliding window against length")
    a.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, or auto")
    a.add_argument("--backends", default="", help="comma-separated registry names, each optionally +window (a "
                   "sliding window of --window); empty: naive,sdpa on CPU, naive,sdpa,sdpa_flash,sdpa_cudnn,triton on "
                   "CUDA; with --scaling naive,sdpa,performer,sdpa+window (and triton+window on CUDA)")
    a.add_argument("--seq_lens", default="", help="comma-separated T; empty: 128..4096 on CPU, 1k..16k on CUDA; "
                   "with --scaling 512..32768")
    a.add_argument("--scaling", action="store_true", help="cost against length: causal only, fitted "
                   "log-log slopes, the crossover with sdpa, FAVOR+'s error against m")
    a.add_argument("--window", type=int, default=256, help="the +window backends' sliding window")
    a.add_argument("--max_quadratic_T", type=int, default=0, help="skip the O(T^2) backends above this T (0: none)")
    a.add_argument("--summary", default="", help="--scaling: write the rows, slopes and errors to this JSON file")
    a.add_argument("--batch", type=int, default=1, help="batch size")
    a.add_argument("--n_head", type=int, default=0, help="query heads (0: 8, with --scaling 4)")
    a.add_argument("--gqa_group", type=int, default=4, help="query heads per key/value head in the GQA case")
    a.add_argument("--head_dim", type=int, default=0, help="head dimension (0: 64, with --scaling 32)")
    a.add_argument("--max_naive_gb", type=float, default=8.0, help="skip naive where its score matrices "
                   "would exceed this")
    a.add_argument("--plot", default="out/bench_attention.png", help="PNG plot path (empty: none)")
    add_run_flags(a, reps=3)
    a.set_defaults(run=bench_attention)

    kv = sub.add_parser("kvcache", help="KV-cache bytes and decoding tokens/s for MHA, GQA and MQA")
    add_model_flags(kv, model_name, block_size=1024)
    kv.add_argument("--kv_heads", default="", help="comma-separated key/value head counts; empty: n_head, "
                    "n_head/4, 1")
    kv.add_argument("--batch", type=int, default=1, help="batch size")
    kv.add_argument("--prompt_len", type=int, default=64, help="prompt tokens")
    kv.add_argument("--new_tokens", type=int, default=256, help="generated tokens")
    add_run_flags(kv)
    kv.set_defaults(run=bench_kvcache)

    sp = sub.add_parser("speed", help="training tokens/s, FLOP/s, MFU, fwd/bwd/opt split, peak memory; "
                        "decoding tokens/s with and without the KV cache")
    add_model_flags(sp, model_name)
    sp.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    sp.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    sp.add_argument("--compile", default="both", choices=("false", "true", "both"), help="torch.compile the model")
    sp.add_argument("--prompt_len", type=int, default=16, help="prompt tokens for decoding")
    sp.add_argument("--new_tokens", type=int, default=512, help="decoded tokens")
    sp.add_argument("--decode_batches", default="1,8", help="comma-separated batch sizes for decoding")
    sp.add_argument("--decode_reps", type=int, default=3, help="timed decoding runs (the median is reported)")
    add_run_flags(sp, reps=5)
    sp.set_defaults(run=bench_speed)

    lo = sub.add_parser("lora", help="full fine-tuning vs LoRA on the same model and batch: trainable "
                        "parameters, optimizer state, peak memory, step time")
    add_model_flags(lo, model_name)
    lo.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    lo.add_argument("--lora_rank", type=int, default=8, help="LoRA rank")
    lo.add_argument("--lora_alpha", type=float, default=train.flag_default("lora_alpha"), help="LoRA alpha")
    lo.add_argument("--lora_targets", default=train.flag_default("lora_targets"), help="layers to adapt: q, k, v, "
                    "o, mlp or all")
    add_run_flags(lo, reps=3)
    lo.set_defaults(run=bench_lora)

    cv = sub.add_parser("curves", help="val loss against wall time of training runs (their log.jsonl)")
    cv.add_argument("runs", nargs="+", help="run folders")
    cv.add_argument("--target", type=float, default=0.0, help="draw a horizontal line at this loss (0: none)")
    cv.add_argument("--plot", default="out/curves.png", help="PNG plot path")
    cv.set_defaults(run=bench_curves)

    mo = sub.add_parser("moe", help="dense vs mixture of experts at equal active parameters: training tokens/s "
                        "and memory; per-expert loop vs grouped_mm; the expert-load histogram")
    add_model_flags(mo, "switch")
    mo.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    mo.add_argument("--tokens", type=int, default=8192, help="tokens routed through one layer's experts")
    mo.add_argument("--run_dir", default="", help="a trained switch run folder for the load histogram (empty: the random model)")
    mo.add_argument("--data", default="", help="the run's corpus (empty: Shakespeare's complete works), char-level")
    mo.add_argument("--eval_batches", type=int, default=8, help="val batches of 8 sequences for the load histogram")
    mo.add_argument("--plot", default="out/bench_moe_load.png", help="PNG plot path of the load histogram (empty: none)")
    add_run_flags(mo, reps=3)
    mo.set_defaults(run=bench_moe)

    de = sub.add_parser("decode", help="greedy decoding against transformers' generate: tokens/s, bytes read per token "
                        "and the fraction of the measured memory bandwidth; int8/bf16 weights; speculative decoding")
    add_model_flags(de, model_name)
    de.set_defaults(**{k: v for k, v in DECODE_MODEL.items() if k in {a.dest for a in de._actions}})
    de.add_argument("--modes", default=",".join(DECODE_MODES), help="comma-separated, from: " + ", ".join(DECODE_MODES))
    de.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    de.add_argument("--prompt_len", type=int, default=32, help="prompt tokens")
    de.add_argument("--new_tokens", type=int, default=128, help="generated tokens")
    de.add_argument("--draft_layers", type=int, default=2, help="the speculative modes' draft: the model's first N "
                    "layers (bench.self_draft)")
    de.add_argument("--speculate_k", type=int, default=4, help="tokens drafted per verification")
    de.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    de.add_argument("--step_variants", type=runtime.str2bool, default=True, help="on CPU, first time the compiled "
                    "one-token step with each of issue 19's candidate settings (bench.STEP_VARIANTS)")
    de.add_argument("--run_dir", default="", help="a trained run folder: val perplexity and greedy agreement with "
                    "fp32, bf16 and int8 weights (empty: skip)")
    de.add_argument("--draft_dir", default="", help="a trained draft run folder for --run_dir (same tokenizer): "
                    "speculative decoding's acceptance and speed-up on real text (empty: skip)")
    de.add_argument("--data", default="", help="--run_dir's corpus (empty: the default corpus)")
    de.add_argument("--eval_batches", type=int, default=10, help="val batches of 8 sequences for the perplexity")
    add_run_flags(de, reps=3)
    de.set_defaults(run=bench_decode)

    sw = sub.add_parser("switch", help="Switch Transformer vs dense at equal FLOPs per token: val loss against "
                        "tokens over seeds, tokens to reach the dense model's loss, ablations (trains; cached by settings)")
    sw.add_argument("--arms", default=",".join(SWITCH_ARMS), help=f"comma-separated from {', '.join(SWITCH_ARMS)}")
    sw.add_argument("--seeds", type=int, default=3, help="seeds of dense and switch (the ablations: one)")
    sw.add_argument("--max_iters", type=int, default=train.flag_default("max_iters"), help="steps per run")
    sw.add_argument("--ablation_iters", type=int, default=0, help="steps of the ablation runs (0: max_iters)")
    sw.add_argument("--batch_size", type=int, default=train.flag_default("batch_size"), help="sequences per step")
    sw.add_argument("--block_size", type=int, default=train.flag_default("block_size"), help="tokens per sequence")
    sw.add_argument("--eval_interval", type=int, default=50, help="steps between val-loss evaluations")
    sw.add_argument("--eval_iters", type=int, default=10, help="batches per evaluation")
    add_training_run_flags(sw, "out/switch", "the runs' folders and summary.json", "out/switch.png")
    sw.set_defaults(run=bench_switch)

    po = sub.add_parser("positions", help="learned vs sinusoidal vs RoPE vs no positions: val loss by position up to "
                        "eval_factor x the training length; RoPE with PI, NTK-aware and YaRN, at evaluation and "
                        "after a short fine-tune (trains; cached by settings)")
    po.add_argument("--methods", default=",".join(POSITION_METHODS), help="comma-separated from "
                    f"{', '.join(POSITION_METHODS)} (models/gpt.py --pos; none: NoPE)")
    po.add_argument("--seeds", type=int, default=3, help="seeds per method")
    po.add_argument("--max_iters", type=int, default=600, help="training steps per run")
    po.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    po.add_argument("--block_size", type=int, default=256, help="training length L")
    po.add_argument("--n_layer", type=int, default=4, help="the GPT's layers")
    po.add_argument("--n_head", type=int, default=4, help="the GPT's heads")
    po.add_argument("--n_embd", type=int, default=128, help="the GPT's width")
    po.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate")
    po.add_argument("--warmup_iters", type=int, default=30, help="warmup steps")
    po.add_argument("--eval_iters", type=int, default=10, help="batches of train.py's own final evaluation")
    po.add_argument("--eval_factor", type=int, default=4, help="evaluate up to this many times L (the extensions' s)")
    po.add_argument("--eval_windows", type=int, default=64, help="val windows of eval_factor * L tokens")
    po.add_argument("--bucket", type=int, default=32, help="positions per point of the plot")
    po.add_argument("--finetune", default="none,linear,yarn", help="RoPE fine-tuned at eval_factor * L, comma-separated "
                    f"from none (plain RoPE: PI's direct fine-tuning baseline), {', '.join(ROPE_EXTENSIONS)}")
    po.add_argument("--finetune_iters", type=int, default=50, help="fine-tuning steps (0: none)")
    po.add_argument("--finetune_lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    add_training_run_flags(po, "out/positions", "the runs' folders and summary.json", "out/positions.png")
    po.set_defaults(run=bench_positions)

    sc = sub.add_parser("scaling", help="scaling laws measured: a grid of GPT sizes at several compute budgets, "
                        "Kaplan's and Chinchilla's fits, a prediction at 4x the largest budget (trains; cached by settings)")
    sc.add_argument("--preset", default="cpu", choices=sorted(SCALING_PRESETS), help="the grid: cpu (within 20 "
                    "minutes on 2 CPU cores) or gpu (bench.SCALING_PRESETS)")
    sc.add_argument("--budgets", default="", help="training FLOPs per run, comma-separated (empty: the preset's)")
    sc.add_argument("--sizes", default="", help="the ladder of GPT shapes, n_layer x n_embd, comma-separated "
                    "(empty: the preset's)")
    sc.add_argument("--window", default="", help="lo,hi: train the shapes whose tokens per parameter fall in "
                    "[lo, hi] at each budget (empty: the preset's)")
    sc.add_argument("--verify", action="store_true", help="also train the predicted compute-optimal model at 4x the "
                    "largest budget and report the prediction's error")
    sc.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    sc.add_argument("--seed", type=int, default=1337, help="seed of every run (and of the bootstrap)")
    add_training_run_flags(sc, "out/scaling", "the sweep folder: OUT/PRESET holds every run, runs.json, fits.json",
                           "out/scaling/scaling.png")
    sc.set_defaults(run=bench_scaling)

    pf = sub.add_parser("performer", help="the default Llama with softmax, FAVOR+ (m=64, 256) and window-64 attention: "
                        "val loss and the gap over seeds; softmax -> FAVOR+ swapped in and fine-tuned (trains; cached)")
    pf.add_argument("--arms", default=",".join(PERFORMER_ARMS), help=f"comma-separated from {', '.join(PERFORMER_ARMS)}")
    pf.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    pf.add_argument("--max_iters", type=int, default=200, help="steps per run (train.py's default is 750: see the README)")
    pf.add_argument("--eval_interval", type=int, default=100, help="steps between val-loss evaluations")
    pf.add_argument("--eval_iters", type=int, default=train.flag_default("eval_iters"), help="batches per evaluation")
    pf.add_argument("--finetune_iters", type=int, default=50, help="steps of the backward-compatibility fine-tune (0: skip)")
    pf.add_argument("--finetune_features", type=int, default=256, help="FAVOR+ features m swapped into the softmax model")
    pf.add_argument("--finetune_lr", type=float, default=1e-3, help="peak learning rate of that fine-tune")
    add_training_run_flags(pf, "out/performer", "the runs' folders and summary.json")
    pf.set_defaults(run=bench_performer)

    ic = sub.add_parser("icl", help="in-context learning (GPT-3's Figure 1.2 in miniature): models of 3 sizes trained "
                        "on the corpus mixed with task episodes, exact match against K shots, with and without "
                        "the task description")
    ic.add_argument("--sizes", default="2x64,3x96,4x128", help="GPT models to train, n_layer x n_embd, comma-separated")
    ic.add_argument("--n_head", type=int, default=4, help="attention heads of every size")
    ic.add_argument("--train_tasks", default="cycle_letters,anagrams1,random_insertion,reversed_words",
                    help="tasks of the training episodes (tasks.NAMES or .jsonl files)")
    ic.add_argument("--eval_tasks", default="reversed_words,random_insertion", help="tasks scored (held-out items)")
    ic.add_argument("--shots", default="0,1,2,4,8,16", help="the K evaluated, comma-separated")
    ic.add_argument("--k_max", type=int, default=20, help="training episodes have 0..k_max demonstrations")
    ic.add_argument("--corpus_fraction", type=float, default=0.25, help="share of corpus characters in the mixture")
    ic.add_argument("--mixture_chars", type=int, default=3_000_000, help="characters of training text")
    ic.add_argument("--block_size", type=int, default=384, help="tokens (characters) per training sequence and context")
    ic.add_argument("--batch_size", type=int, default=16, help="training sequences per step")
    ic.add_argument("--max_iters", type=int, default=400, help="training steps of every size")
    ic.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate")
    ic.add_argument("--limit", type=int, default=80, help="test items per task and K")
    ic.add_argument("--eval_batch_size", type=int, default=50, help="items per evaluation batch")
    ic.add_argument("--train", type=runtime.str2bool, default=True, help="train (false: evaluate the runs already "
                    "in --out_dir)")
    ic.add_argument("--seed", type=int, default=1337, help="seed of the mixture, training and demonstrations")
    ic.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ic.add_argument("--data_dir", default=str(data.DEFAULT_DATA_DIR), help="where the corpus and data/tasks/ live")
    ic.add_argument("--out_dir", default="out/icl", help="runs, the mixture and results.json")
    ic.add_argument("--plot", default="out/icl/icl.png", help="PNG plot path (empty: none)")
    runtime.add_device_flags(ic, dtype=False, attn=False)
    ic.set_defaults(run=bench_icl)

    ph = sub.add_parser("phi", help="the Phi recipe (Textbooks Are All You Need) in miniature: curated stdlib code and "
                        "templated exercises vs the unfiltered pool at equal tokens, 3 seeds (trains; cached by settings)")
    ph.add_argument("--arms", default=",".join(PHI_ARMS), help="comma-separated from A (unfiltered pool), B (filtered "
                    "pool), C (B + fine-tune on the synthetic exercises)")
    ph.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    ph.add_argument("--pretrain_iters", type=int, default=400, help="stage-1 steps (every arm)")
    ph.add_argument("--finetune_iters", type=int, default=60, help="stage-2 steps: A and B continue on their own "
                    "data, C fine-tunes on the exercises (so every arm sees the same tokens)")
    ph.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    ph.add_argument("--block_size", type=int, default=192, help="characters per sequence")
    ph.add_argument("--learning_rate", type=float, default=3e-3, help="stage-1 peak learning rate (cosine to a tenth)")
    ph.add_argument("--finetune_lr", type=float, default=1e-3, help="stage-2 peak learning rate (cosine to a tenth)")
    ph.add_argument("--keep_fraction", type=float, default=0.3, help="share of the deduplicated functions the "
                    "quality classifier keeps for arm B")
    ph.add_argument("--n_label", type=int, default=3000, help="rubric-labelled functions the classifier is fitted on")
    ph.add_argument("--ref_iters", type=int, default=250, help="steps of each curation reference model")
    ph.add_argument("--embed_tokens", type=int, default=64, help="characters of each function the reference models read")
    ph.add_argument("--exercises_per_family", type=int, default=40, help="training exercises drawn per family "
                    "(at most; distinct ones)")
    ph.add_argument("--gen_tokens", type=int, default=64, help="greedy tokens generated per held-out exercise")
    ph.add_argument("--stdlib", default="", help="the pool's folder (empty: this Python's standard library)")
    ph.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ph.add_argument("--out", default="out/phi", help="curated data, runs, summary-PRETRAIN+FINETUNE.json")
    ph.set_defaults(run=bench_phi)

    sr = sub.add_parser("self_reward", help="self-rewarding language models (Yuan et al. 2024) in miniature: sorting "
                        "short strings, M1 trained from scratch, N iterations per seed with the model's own judge and "
                        "the random-pair and checker-pair controls; held-out exact match, judge accuracy, reward gap")
    sr.add_argument("--seeds", type=int, default=3, help="seeds (task data, M1, iterations)")
    sr.add_argument("--iterations", type=int, default=3, help="self-rewarding iterations (M2 .. M(N+1))")
    sr.add_argument("--conditions", default="judge,random,checker", help="how pairs are chosen (train.py --sr_pairs)")
    sr.add_argument("--alphabet", default="abcdefgh", help="the letters of the strings")
    sr.add_argument("--lengths", default="3-6", help="string lengths, LO-HI")
    sr.add_argument("--sr_instructions", type=int, default=300, help="M1's instruction examples (correct sortings)")
    sr.add_argument("--sr_judge_examples", type=int, default=600, help="M1's judge examples (perturbed, rubric-scored)")
    sr.add_argument("--prompts", type=int, default=200, help="self-rewarding prompts per iteration")
    sr.add_argument("--heldout", type=int, default=300, help="held-out evaluation prompts")
    sr.add_argument("--n_layer", type=int, default=2, help="M1: layers")
    sr.add_argument("--n_head", type=int, default=4, help="M1: heads")
    sr.add_argument("--n_embd", type=int, default=64, help="M1: width")
    sr.add_argument("--block_size", type=int, default=64, help="M1: context (characters)")
    sr.add_argument("--m1_iters", type=int, default=1500, help="M1: training steps (batch 32)")
    sr.add_argument("--dpo_iters", type=int, default=40, help="DPO steps per iteration")
    sr.add_argument("--dpo_batch", type=int, default=16, help="DPO pairs per step")
    sr.add_argument("--dpo_lr", type=float, default=1e-5, help="DPO learning rate (constant)")
    sr.add_argument("--dpo_beta", type=float, default=0.1, help="DPO beta")
    sr.add_argument("--lr_sweep", default="", help="comma-separated DPO learning rates to compare on seed 0's first "
                    "iteration (how --dpo_lr was chosen: 1e-5,3e-5,1e-4); empty: none")
    sr.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sr.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    sr.add_argument("--out_dir", default="out/self_reward", help="runs (cached) and results.json")
    sr.add_argument("--plot", default="out/self_reward/self_reward.png", help="PNG plot path (empty: none)")
    sr.set_defaults(run=bench_self_reward)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser(argv).parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
