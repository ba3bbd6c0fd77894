"""Compile every Triton kernel in kernels/ ahead of time for real GPUs, on any machine (no GPU).

    python -m omnitron.kernels.compile_check                 # sm_80 and sm_90: every autotune config
    python -m omnitron.kernels.compile_check --targets 90    # one target

The Triton interpreter (TRITON_INTERPRET=1, how the tests run kernels on a CPU) is not a
compiler: it runs the Python body with numpy and type-checks nothing that the GPU compiler
checks (a loop-carried variable that changes type, a tensor shape that a tl.dot rejects, a tile
that does not fit in shared memory). `triton.compile(ASTSource(...), target=GPUTarget("cuda",
CC, 32))` runs the real pipeline (Triton IR, TritonGPU IR, LLVM IR, PTX, and ptxas, which the
triton wheel ships) for a GPU that need not be there, and reports the shared memory each
compiled kernel needs. This module compiles:

- every autotune config of every kernel, for each target, at the largest head dim of the
  config's class (the most shared memory), and checks it against the target's limit;
- across those jobs, every head dim of {16, 64, 80, 128, 256}, both fp16 and bf16 (fp32 has its
  own configs), and causal and not, at least once per kernel (a covering set, as the numerical
  tests use: the full product would take many minutes of compilation on a laptop);
- the sliding-window variant (WINDOW > 0: other loop bounds and one more mask) of the forward, dK/dV
  and dQ kernels, the forward for both targets and each backward kernel for one (WINDOW_JOBS).

Jobs run in parallel processes. The tests call `check()` (tests/test_kernels.py); a new kernel module adds
its kernels to `jobs()`.
"""
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from omnitron import runtime

# Max shared memory per block, bytes (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability": 163 KiB on 8.0 (A100), 227 KiB on 9.0 (H100, H200)).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
HEAD_DIMS = (16, 64, 80, 128, 256)
DTYPE_NAMES = {2: ("fp16", "bf16"), 4: ("fp32",)}


def _signature(fn, dtype, constexprs):
    """Triton types of a flash_attention kernel's arguments: tensors are pointers of the input
    dtype (LSE and DELTA: fp32), scales fp32, everything else (sizes, strides) i32."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ("LSE", "DELTA"):
            sig[p.name] = "*fp32"
        elif p.name.isupper() and p.name not in ("H", "H_KV", "GROUP", "T", "S", "T_BUCKET", "S_BUCKET", "DEVICE_KEY"):
            sig[p.name] = "*" + dtype
        elif p.name.endswith("_scale"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


# the sliding-window jobs: (kernel, which target of the pass: 0 first, -1 last, dtype, head_dim, window)
WINDOW_JOBS = [("fwd", 0, "bf16", 128, 4096), ("fwd", -1, "fp16", 64, 256), ("dkdv", 0, "fp16", 64, 4096),
               ("dq", -1, "bf16", 128, 256)]


def jobs(targets=(80, 90)):
    """Every compile job: (kernel name, target, dtype, head_dim, causal, config or None, window)."""
    from omnitron.kernels import flash_attention as fa
    out = []
    passes = targets if len(targets) > 1 else targets * 2  # one target: it takes both passes
    for kernel, table in fa._CONFIGS.items():
        i = 0  # alternates dtypes and causal across this kernel's jobs
        for (block_d, size), configs in sorted(table.items()):
            dims = [d for d in HEAD_DIMS if fa.config_class(max(16, 1 << (d - 1).bit_length()), size)[0] == block_d]
            for r, config in enumerate(configs):
                for n, target in enumerate(passes):
                    # first pass: the class's largest head dim (the most shared memory); then the others in turn
                    head_dim = dims[-1] if n == 0 else dims[r % len(dims)]
                    dtype = DTYPE_NAMES[size][i % len(DTYPE_NAMES[size])]
                    out.append((kernel, target, dtype, head_dim, (i // 2) % 2 == 0, config, 0))
                    i += 1
    for kernel, which, dtype, head_dim, window in WINDOW_JOBS:  # the first config of the head dim's class
        config = fa._CONFIGS[kernel][fa.config_class(max(16, 1 << (head_dim - 1).bit_length()), 2)][0]
        out.append((kernel, targets[which], dtype, head_dim, True, config, window))
    # the preprocess kernel has no configs (a fixed block of rows)
    out += [("preprocess", targets[0], "bf16", 256, True, None, 0), ("preprocess", targets[-1], "fp32", 80, False, None, 0)]
    return list(dict.fromkeys(out))  # one target: a class with one head dim would repeat a job


def compile_one(job):
    """Compile one job for its target; returns (job, shared memory bytes or an error line, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from omnitron.kernels import flash_attention as fa
    kernel, target, dtype, head_dim, causal, config, window = job
    block_d = max(16, triton.next_power_of_2(head_dim))
    fn = {"fwd": fa._fwd_kernel, "dkdv": fa._bwd_dkdv_kernel, "dq": fa._bwd_dq_kernel,
          "preprocess": fa._bwd_preprocess_kernel}[kernel]
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn  # the JITFunction inside
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d}
    options = {"num_warps": 4, "num_stages": 1}
    if config is None:
        constexprs["BLOCK_M"] = 64
    else:
        m, n, options["num_warps"], options["num_stages"] = config
        constexprs.update(BLOCK_M=m, BLOCK_N=n, CAUSAL=causal, WINDOW=window, UPCAST=False,
                          PRECISION="tf32x3" if dtype == "fp32" else "tf32")
    t0 = time.time()
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs),
                                                            constexprs=constexprs),
                                  target=GPUTarget("cuda", target, 32), options=options)
        result = compiled.metadata.shared
    except Exception as e:  # the compiler's message, first and last lines
        lines = [line for line in str(e).splitlines() if line.strip()]
        result = f"{type(e).__name__}: {lines[-1] if lines else ''}"
    return job, result, time.time() - t0


def _worker_setup(cache_dir):
    """Each compiling process: the real compiler (not the interpreter the tests may have set), a
    cache of its own (every job really compiles), no line info and ptxas at -O0 (faster; neither
    changes the shared memory a kernel needs, which is allocated before ptxas runs)."""
    os.environ.update(TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache_dir, TRITON_DISABLE_LINE_INFO="1",
                      DISABLE_PTXAS_OPT="1", TRITON_DEFAULT_FP_FUSION="1")


def check(targets=(80, 90), processes=None):
    """Compile every job; returns (failures, results): failures are lines naming the job and what
    went wrong (a compile error, or more shared memory than the target has)."""
    todo = jobs(targets)
    with tempfile.TemporaryDirectory() as cache_dir, \
            ProcessPoolExecutor(processes or os.cpu_count(), mp_context=get_context("spawn"),
                                initializer=_worker_setup, initargs=(cache_dir,)) as pool:
        results = list(pool.map(compile_one, todo))
    failures = []
    for job, result, _ in results:
        if isinstance(result, str):
            failures.append(f"{job}: {result}")
        elif result > SHARED_MEMORY_LIMIT[job[1]]:
            failures.append(f"{job}: needs {result / 1024:.0f} KiB of shared memory, sm_{job[1]} has "
                            f"{SHARED_MEMORY_LIMIT[job[1]] // 1024} KiB")
    return failures, results


def main(argv=None):
    p = runtime.ArgumentParser(description=__doc__.splitlines()[0])  # its errors: one error: line, exit 1
    p.add_argument("--targets", default="80,90", help="comma-separated compute capabilities: 80 (A100), "
                   f"90 (H100, H200); known limits: {', '.join(map(str, SHARED_MEMORY_LIMIT))}")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        targets = tuple(int(t) for t in args.targets.split(","))
    except ValueError:
        p.error(f"--targets: expected comma-separated compute capabilities (80,90), not {args.targets!r}")
    if unknown := [t for t in targets if t not in SHARED_MEMORY_LIMIT]:
        p.error(f"no shared-memory limit known for sm_{unknown[0]}; known: {', '.join(map(str, SHARED_MEMORY_LIMIT))}")
    failures, results = check(targets)
    print("target  kernel      dtype  head_dim  mask    (BLOCK_M, BLOCK_N, warps, stages)  shared memory / limit")
    for (kernel, target, dtype, head_dim, causal, config, window), result, seconds in results:
        shared = (f"{result / 1024:6.1f} / {SHARED_MEMORY_LIMIT[target] // 1024} KiB" if isinstance(result, int)
                  else result)
        print(f"sm_{target}   {kernel:10s}  {dtype}   {head_dim:<8d}  "
              f"{f'W={window:<4d}' if window else 'causal' if causal else 'full  '}  "
              f"{str(config or '(64 rows, -, 4, 1)'):33s}  {shared}  ({seconds:.1f} s)")
    print(f"{len(results)} compiled in {time.time() - t0:.0f} s; {len(failures)} failed")
    for line in failures:
        print("FAILED", line)
    return 1 if failures else 0


if __name__ == "__main__":
    runtime.run_cli(main)
