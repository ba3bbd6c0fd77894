"""Running untrusted generated Python: a separate process with limits, its verdict never an exception.

Used by exercises.py (each templated solution is kept only if its unit tests pass here) and by
`bench.py phi` (pass@1 of model completions). Each program runs as

    python -I <prelude + program + tests + end marker>

in a fresh temporary folder (its working directory and HOME, removed afterwards), with a minimal
environment (PATH, LANG, HOME), in its own session (so the whole process group is killed), under
`resource` limits set in the child before exec: RLIMIT_AS (address space: a memory bomb gets
MemoryError), RLIMIT_CPU (CPU seconds), RLIMIT_FSIZE (the largest file it may write: stdout and
stderr go to files in its folder, so an endless print is stopped by SIGXFSZ), RLIMIT_NPROC (no new
processes; not enforced for root) and RLIMIT_CORE 0; plus a wall-clock timeout (a sleeping hang).

The prelude installs a PEP 578 audit hook that refuses, with PermissionError: socket creation and
connection (no network), new processes (os.system, os.exec*, os.fork, os.posix_spawn,
subprocess.Popen, os.kill), imports of ctypes (which could call C directly), and opening a file for
writing, or removing/renaming one, outside the program's folder. A sample passes only if the process exits
0 *and* prints the end marker (a random nonce that follows the tests), so `sys.exit(0)` or
`os._exit(0)` before the tests run is a failure, never a pass.

What this is not: PEP 578 says audit hooks are not a sandbox; a determined program can get past
them (through an unaudited C extension already imported, or a bug in the interpreter), reading
files is allowed (the standard library must load), and the process runs as this user. The resource
limits are the kernel's and hold; the network block and the write block are the hook's and stop
ordinary code (what a small language model writes), not an adversary. Real isolation needs a
container, a separate user, seccomp or a VM (nsjail, gVisor), as production code evaluators use.
"""
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 5.0          # wall clock per program
CPU_S = 5                # RLIMIT_CPU
MEMORY_BYTES = 512 << 20  # RLIMIT_AS: the interpreter itself needs ~30 MB of address space
OUTPUT_BYTES = 64 << 10  # RLIMIT_FSIZE: stdout/stderr files and anything the program writes
KEEP_OUTPUT = 4000        # characters of stdout/stderr kept in the result

PRELUDE = r'''
import sys as _sys, os as _os
def _guard():
    import os, sys
    root = os.path.realpath(os.getcwd())
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
               "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill",
               "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.cdata", "ctypes.dlsym",
               "os.chdir", "os.chroot", "os.setuid"}
    def inside(path):
        try:
            p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/")
        except Exception:
            return False
        return p == root or p.startswith(root + os.sep)
    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes"):
            raise PermissionError("sandbox: ctypes is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes)):
            mode, flags = args[1] or "r", args[2] or 0
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox folder")
        if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate",
                     "os.chmod", "os.symlink", "os.link", "os.utime", "os.chown"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the sandbox folder")
    sys.addaudithook(hook)
_guard()
del _guard
'''


@dataclass
class Result:
    """A program's verdict: passed (exit 0 and the end marker printed), why not, its exit code
    (negative: killed by that signal), and the first KEEP_OUTPUT characters of stdout and stderr."""
    passed: bool
    status: str  # passed | failed | timeout | killed | no_marker
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _limits(cpu_s, memory_bytes, output_bytes):
    def apply():  # runs in the child between fork and exec
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # ignored for root (CAP_SYS_RESOURCE)
        except (ValueError, OSError):
            pass
    return apply


def run(program, tests="", timeout_s=TIMEOUT_S, cpu_s=CPU_S, memory_bytes=MEMORY_BYTES, output_bytes=OUTPUT_BYTES):
    """Run `program` followed by `tests` (Python source: asserts, say) in a sandboxed process.
    Returns a Result; never raises for anything the program does (a crash, a hang, a memory bomb,
    sys.exit, a blocked write or connection, endless output: passed=False with a status)."""
    import time
    nonce = secrets.token_hex(16)
    source = PRELUDE + "\n" + program + "\n\n" + tests + f"\n\nprint({('SANDBOX-OK-' + nonce)!r})\n"
    folder = Path(tempfile.mkdtemp(prefix="omnitron-sandbox-"))
    t0 = time.time()
    try:
        (folder / "program.py").write_text(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(folder)}
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "program.py"], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, preexec_fn=_limits(cpu_s, memory_bytes, output_bytes),
                                    close_fds=True)
            try:
                rc = proc.wait(timeout=timeout_s)
                status = None
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
                except (ProcessLookupError, PermissionError):
                    pass
                rc = proc.wait()
        stdout = _head(folder / "stdout")
        stderr = _head(folder / "stderr")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if status is None:
        if rc < 0:
            status = "killed"
        elif rc != 0:
            status = "failed"
        elif f"SANDBOX-OK-{nonce}" not in stdout:
            status = "no_marker"
        else:
            status = "passed"
    stdout = stdout.replace(f"SANDBOX-OK-{nonce}", "").rstrip("\n")
    return Result(status == "passed", status, rc, stdout[:KEEP_OUTPUT], stderr[:KEEP_OUTPUT], time.time() - t0)


def _head(path, n=KEEP_OUTPUT + 100):
    try:
        with open(path, "rb") as f:
            data = f.read(OUTPUT_BYTES)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    # the end marker is the last line: keep the tail too when the output is long
    return text if len(text) <= n else text[:n // 2] + "\n...\n" + text[-n // 2:]


def pass_at_1(programs, tests, **limits):
    """The fraction of programs (one sample per problem) whose tests pass: pass@1 of Chen et al.
    2021 (Codex), with n = 1 sample per problem, i.e. the mean of the verdicts. Returns (pass@1,
    [Result])."""
    if len(programs) != len(tests):
        raise ValueError(f"{len(programs)} programs but {len(tests)} test sets")
    results = [run(p, t, **limits) for p, t in zip(programs, tests)]
    return (sum(r.passed for r in results) / len(results) if results else 0.0), results
