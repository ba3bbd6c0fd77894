"""Running untrusted generated Python: a contained process, its verdict never an exception.

Used by exercises.py (each templated solution is kept only if its unit tests pass here) and by
`bench.py phi` (pass@1 of model completions). A program is judged in two processes:

- **The program's process** runs the program alone (never the tests, never their expected values)
  and then serves calls: the runner (RUNNER, trusted code started before the program) reads a
  request per line on stdin, `{"name", "args", "kwargs"}` with the arguments as Python literals,
  calls the program's function and writes `repr` of the result, or the exception's type and message,
  as one JSON line to a pipe. Its stdout and stderr go to files in its folder (what Result shows).
- **The tests run in the evaluator** (this process), with every free name of the tests that is not
  a builtin bound to a stub whose call goes over the pipe; a reply is parsed with
  `ast.literal_eval`, so the tests compare plain ints, strings, lists... that the program computed.
  The verdict is whether the tests raised, decided here: nothing the program prints, writes or
  returns is read as a pass, and an object that equals everything never reaches a comparison.

The program's process is contained by the best layer this machine has (`layer()`; `describe()`
says what it contains and what it does not, in one line that `pass_at_1` prints first):

- **bubblewrap** (`bwrap`, Debian package `bubblewrap`, what Flatpak uses): new PID, network, IPC,
  UTS, cgroup and mount namespaces. The file system is a read-only tmpfs holding only /usr (with the
  /bin, /lib links), the Python installation and the program's folder (the only writable place),
  a minimal /dev and the namespace's own /proc; so the evaluator's files, /proc and processes are
  invisible and the network is an unconfigured loopback. The environment is empty. When the
  evaluator is root, bwrap keeps only CAP_SETUID and CAP_SETGID and the runner becomes uid/gid 65534
  (nobody) before anything else, so RLIMIT_NPROC binds it; otherwise it runs as the calling user
  in a user namespace. Its own session (`--new-session`); when the run ends the namespace's init is
  killed, and with it every process in the namespace.
- **audit-hook**, the fallback where bwrap is missing or cannot start: the program runs in this
  file system as this user (uid 65534 when the evaluator is root and the Python installation is
  reachable by others), in its own session whose process group is killed at the end, with a PEP 578
  audit hook that refuses sockets, new processes, signals, ctypes, subinterpreters, the garbage
  collector's object lists and writes outside the folder. PEP 578 says hooks are not a sandbox:
  this stops ordinary code, not a program that tries.

Both layers start the runner with `python -I` in a fresh folder (its working directory, removed
afterwards), under resource limits: RLIMIT_AS (address space: a memory bomb gets MemoryError),
RLIMIT_CPU, RLIMIT_FSIZE (stdout/stderr are files: endless output is cut), RLIMIT_CORE 0 and
RLIMIT_NPROC 0 (no new processes or threads; root is exempt), and a wall-clock timeout.
"""
import ast
import builtins
import functools
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 5.0          # wall clock per program
CPU_S = 5                # RLIMIT_CPU
MEMORY_BYTES = 512 << 20  # RLIMIT_AS: the interpreter itself needs ~30 MB of address space
OUTPUT_BYTES = 64 << 10  # RLIMIT_FSIZE: stdout/stderr files and anything the program writes
REPLY_BYTES = 1 << 20     # the longest reply line (one result's repr) read from the program
KEEP_OUTPUT = 4000        # characters of stdout/stderr kept in the result
NOBODY = 65534            # the uid and gid a root evaluator runs programs as
LAYERS = ("bubblewrap", "audit-hook")

# The program's process runs this first (`python -I -c RUNNER CONFIG`): it drops to the unprivileged
# user, sets the limits, empties the environment, installs the audit hook where that is the layer,
# runs program.py, then answers calls until stdin closes.
RUNNER = r'''
import ast, builtins, json, os, resource, sys
_cfg = json.loads(sys.argv[1])
if _cfg["uid"] is not None:
    os.setgroups([])
    os.setresgid(_cfg["uid"], _cfg["uid"], _cfg["uid"])
    os.setresuid(_cfg["uid"], _cfg["uid"], _cfg["uid"])
os.chdir(_cfg["folder"])
for _name, _soft, _hard in _cfg["limits"]:
    try:
        resource.setrlimit(getattr(resource, _name), (_soft, _hard))
    except (ValueError, OSError):
        pass
os.environ.clear()
_reply = _cfg["reply_fd"]
def _send(message):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(_reply, data):]
if _cfg["hook"]:
    exec(_cfg["hook"], {})
_namespace = {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins}
with open("program.py") as _f:
    _code = compile(_f.read(), "program.py", "exec")
exec(_code, _namespace)
_send({"ready": True})
for _line in sys.stdin.buffer:
    try:
        _request = json.loads(_line)
        _args, _kwargs = ast.literal_eval(_request["args"]), ast.literal_eval(_request["kwargs"])
        _send({"value": repr(_namespace[_request["name"]](*_args, **_kwargs))})
    except Exception as _e:
        try:
            _message = str(_e)[:1000]
        except Exception:
            _message = ""
        _send({"error": type(_e).__name__, "message": _message})
'''

# The audit-hook layer's hook (PEP 578), run by RUNNER before the program.
HOOK = r'''
import os, sys
def _guard():
    root = os.path.realpath(os.getcwd())
    blocked = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg",
        "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.cdata", "ctypes.dlsym", "os.chdir", "os.chroot",
        "os.setuid", "cpython.PyInterpreterState_New", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys._current_frames", "sys._getframe"})
    written = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.chmod",
                         "os.symlink", "os.link", "os.utime", "os.chown"})
    realpath, isdir, fsdecode, sep = os.path.realpath, os.path.isdir, os.fsdecode, os.sep
    def inside(path):
        try:
            p = realpath(fsdecode(path))
        except Exception:
            return False
        return p == root or p.startswith(root + sep)
    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes", "_xxsubinterpreters"):
            raise PermissionError(f"sandbox: {args[0]} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes)) and not inside(args[0]):
            mode, flags = args[1] or "r", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox folder")
            if isdir(args[0]):  # a directory's descriptor would let os.open(..., dir_fd=) write beside it
                raise PermissionError(f"sandbox: opening the directory {args[0]!r} outside the sandbox folder")
        if event == "sqlite3.connect" and args[0] not in (":memory:", b":memory:", "") and not inside(args[0]):
            raise PermissionError(f"sandbox: a database {args[0]!r} outside the sandbox folder")
        if event in written and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the sandbox folder")
    sys.addaudithook(hook)
_guard()
import posix
for _name in ("mkfifo", "mknod"):  # raise no audit event
    for _module in (os, posix):
        if hasattr(_module, _name):
            delattr(_module, _name)
del _guard, _name, _module, posix
'''


@dataclass
class Result:
    """A program's verdict: passed (its tests, run in the evaluator, raised nothing), status, its exit
    code (negative: killed by that signal; None: still running when the run ended, then killed), the
    first KEEP_OUTPUT characters of stdout (less its final newlines) and the last of stderr (whose
    last line says why the tests failed),
    the seconds the run took and the containment layer it ran under."""
    passed: bool
    status: str  # passed | failed (a test failed, a crash) | exited (before the tests) | timeout | killed
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    layer: str


class _Stop(BaseException):
    """Ends the tests: the program timed out, ended, or broke the reply protocol. A BaseException so
    that a test's own `except Exception` does not swallow it."""

    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


class _Channel:
    """The evaluator's end of the program's pipes: requests to its stdin, replies from the reply pipe,
    each read or write bounded by the run's deadline."""

    def __init__(self, proc, reply_fd, deadline):
        self.proc, self.fd, self.deadline, self.buffer = proc, reply_fd, deadline, b""
        os.set_blocking(proc.stdin.fileno(), False)

    def receive(self):
        """The next JSON message from the program. Raises _Stop on the deadline, at the end of the pipe,
        on a line over REPLY_BYTES or on anything that is not a JSON object."""
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Stop("timeout", "no reply within the time limit")
            if not select.select([self.fd], [], [], left)[0]:
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise _Stop("ended", "the program ended")
            self.buffer += chunk
            if len(self.buffer) > REPLY_BYTES:
                raise _Stop("failed", f"a reply longer than {REPLY_BYTES} bytes")
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            raise _Stop("failed", f"not a reply: {line[:200]!r}")
        return message

    def send(self, message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Stop("timeout", "the program did not read its request within the time limit")
            if select.select([], [self.proc.stdin], [], left)[1]:
                try:
                    data = data[os.write(self.proc.stdin.fileno(), data):]
                except BrokenPipeError:
                    raise _Stop("ended", "the program ended") from None

    def call(self, name, args, kwargs):
        """Calls the program's function `name`. Returns the result as a Python literal; raises the
        program's exception as the builtin exception of that name (RuntimeError for others)."""
        self.send({"name": name, "args": repr(args), "kwargs": repr(kwargs)})
        reply = self.receive()
        if "value" in reply:
            try:
                return ast.literal_eval(reply["value"])
            except Exception:
                raise _Stop("failed", f"{name} returned something that is not a literal: {reply['value'][:200]!r}")
        error = getattr(builtins, str(reply.get("error")), None)
        if not (isinstance(error, type) and issubclass(error, Exception)):
            error = RuntimeError
        raise error(f"{reply.get('error')}: {reply.get('message')}" if error is RuntimeError else reply.get("message"))


class _Remote:
    """Stands in the tests for the program's function `name`: calling it calls the program's."""

    def __init__(self, channel, name):
        self._channel, self._name = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self._name, args, kwargs)

    def __repr__(self):
        return f"<the program's {self._name}>"


def free_names(tests):
    """The names the tests read but neither bind nor find among the builtins: what the program must
    define. Returns a sorted list. Raises SyntaxError when the tests do not parse."""
    loaded, bound = set(), set()
    for node in ast.walk(ast.parse(tests)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return sorted(loaded - bound - set(dir(builtins)))


def _reachable_by_others(path):
    """True when every directory from / down to `path` lets other users through (o+x)."""
    path = Path(path).resolve()
    try:
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in [path, *path.parents])
    except OSError:
        return False


def _python_dirs():
    """The folders the interpreter needs: its prefixes and the folder of its executable (and of the
    executable a virtual environment's links to), outermost only, those under /usr left out."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths |= {os.path.dirname(os.path.abspath(sys.executable)), os.path.dirname(os.path.realpath(sys.executable))}
    paths = sorted(p for p in paths if p != "/" and not (p + "/").startswith("/usr/"))
    return [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]


def _bwrap_command(bwrap, folder, info_fd):
    """bwrap's arguments: the namespaces, a read-only root with /usr, the Python folders and the
    program's folder (writable), /dev, /proc, an empty environment."""
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--clearenv", "--info-fd", str(info_fd)]
    if os.geteuid() == 0:  # keep only what the runner needs to become nobody
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user"]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    made = set()
    for path, how in [(p, "--ro-bind") for p in _python_dirs()] + [(str(folder), "--bind")]:
        for parent in reversed(Path(path).parents):  # bwrap would make them 0700: make them 0755 first
            if str(parent) != "/" and str(parent) not in made:
                made.add(str(parent))
                cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += [how, path, path]
    return cmd + ["--dev", "/dev", "--proc", "/proc", "--remount-ro", "/", "--chdir", "/"]  # the runner enters the folder


def _run(program, tests, timeout_s, cpu_s, memory_bytes, output_bytes, layer):
    names = free_names(tests)
    folder = Path(tempfile.mkdtemp(prefix="omnitron-sandbox-"))
    t0 = time.monotonic()
    root = os.geteuid() == 0
    if layer == "bubblewrap":
        uid = NOBODY if root else None
    else:
        uid = NOBODY if root and all(map(_reachable_by_others, _python_dirs() + [folder.parent])) else None
    limits = [("RLIMIT_AS", memory_bytes, memory_bytes), ("RLIMIT_CPU", cpu_s, cpu_s + 1),
              ("RLIMIT_FSIZE", output_bytes, output_bytes), ("RLIMIT_CORE", 0, 0), ("RLIMIT_NPROC", 0, 0)]
    reply_r, reply_w = os.pipe()
    info_r, info_w = os.pipe() if layer == "bubblewrap" else (None, None)
    config = {"uid": uid, "folder": str(folder), "limits": limits, "reply_fd": reply_w, "hook": HOOK if layer == "audit-hook" else None}
    status, why, rc = None, "", None
    try:
        (folder / "program.py").write_text(program)
        if uid is not None:
            os.chown(folder, uid, uid)
            os.chown(folder / "program.py", uid, uid)
        cmd = [sys.executable, "-I", "-c", RUNNER, json.dumps(config)]
        if layer == "bubblewrap":
            cmd = _bwrap_command(shutil.which("bwrap"), folder, info_w) + cmd
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=folder, env={}, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    pass_fds=[fd for fd in (reply_w, info_w) if fd is not None],
                                    start_new_session=True)
            os.close(reply_w)
            reply_w = None
            if info_w is not None:
                os.close(info_w)
                info_w = None
            channel = _Channel(proc, reply_r, t0 + timeout_s)
            try:
                if "ready" not in channel.receive():
                    raise _Stop("failed", "the program's first message was not 'ready'")
                try:
                    exec(compile(tests, "<tests>", "exec"), {"__builtins__": builtins,
                                                             **{n: _Remote(channel, n) for n in names}})
                    status = "passed"
                except Exception as e:
                    status = "failed"
                    lineno = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                                   if f.filename == "<tests>"), 0)
                    line = tests.splitlines()[lineno - 1].strip() if lineno else ""
                    why = f"tests: {line}: " + "".join(traceback.format_exception_only(e)).strip()
                proc.stdin.close()
                proc.wait(min(1.0, max(0.0, t0 + timeout_s - time.monotonic())))  # let it flush and exit
            except _Stop as stop:
                status, why = stop.status, f"sandbox: {stop}"
                if status == "ended":  # the pipe closed: the program is exiting
                    proc.wait(min(1.0, max(0.0, t0 + timeout_s - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            finally:
                rc = proc.poll()
                _kill(proc, info_r)
        if status == "ended":  # the program ended before or during the tests: its exit code says how
            status = "killed" if rc is not None and rc < 0 else "failed" if rc else "exited"
        stdout, stderr = _head(folder / "stdout"), _head(folder / "stderr")
    finally:
        for fd in (reply_r, reply_w, info_r, info_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
    if why:
        stderr = (stderr.rstrip("\n") + "\n" + why).lstrip("\n")
    return Result(status == "passed", status, rc, stdout.rstrip("\n")[:KEEP_OUTPUT], stderr[-KEEP_OUTPUT:],
                  time.monotonic() - t0, layer)


def _kill(proc, info_fd):
    """Ends the program and everything it started: its process group (SIGKILL); under bwrap, killing
    bwrap makes the namespace's init die (--die-with-parent), which takes every process in the
    namespace with it; we wait until that init is gone or a zombie (its pid from --info-fd), two
    seconds at most."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if info_fd is None:
        return
    try:
        os.set_blocking(info_fd, False)
        child = json.loads(os.read(info_fd, 1 << 16) or b"{}").get("child-pid")
    except (OSError, ValueError):
        child = None
    deadline = time.monotonic() + 2.0
    while child and _alive(child) and time.monotonic() < deadline:
        time.sleep(0.002)


def _alive(pid):
    """True while process `pid` exists and is not a zombie (a namespace's init becomes one only after
    every other process in its namespace is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _head(path, n=KEEP_OUTPUT + 100):
    try:
        with open(path, "rb") as f:
            data = f.read(OUTPUT_BYTES)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    # keep the head and the tail when the output is long
    return text if len(text) <= n else text[:n // 2] + "\n...\n" + text[-n // 2:]


@functools.cache
def layer():
    """The containment layer this machine gives: "bubblewrap" when `bwrap` is on PATH and a trivial
    program passes under it (user or mount namespaces may be refused in a container), otherwise
    "audit-hook". Probed once per process."""
    if not shutil.which("bwrap"):
        return "audit-hook"
    try:
        probe = _run("def double(x):\n    return 2 * x\n", "assert double(1) == 2", 10.0, CPU_S, MEMORY_BYTES,
                     OUTPUT_BYTES, "bubblewrap")
    except OSError:
        return "audit-hook"
    return "bubblewrap" if probe.passed else "audit-hook"


def describe(which=None):
    """One line: the layer (`which`, default `layer()`), what it contains and what it does not.
    Returns the line."""
    which = which or layer()
    root = os.geteuid() == 0
    if which == "bubblewrap":
        user = f"uid {NOBODY}" if root else f"uid {os.geteuid()} in a user namespace"
        return (f"sandbox: bubblewrap (pid/net/ipc/uts/mount namespaces, {user}, read-only root with only /usr and "
                f"Python, empty environment, tests run in the evaluator) + rlimits; not contained: the shared kernel "
                f"(no seccomp filter), CPU and memory beyond per-process rlimits (no cgroup), reading /usr and the "
                f"Python installation")
    return (f"sandbox: audit-hook (bwrap {'cannot start here' if shutil.which('bwrap') else 'is not installed'}; "
            f"tests run in the evaluator) + rlimits; not contained: a program that disarms the hook (PEP 578 hooks "
            f"are not a boundary), reading files, and processes, signals and the network as "
            f"{'uid ' + str(NOBODY) + ' where Python is reachable by others, else root' if root else 'this user'}")


def run(program, tests="", timeout_s=TIMEOUT_S, cpu_s=CPU_S, memory_bytes=MEMORY_BYTES, output_bytes=OUTPUT_BYTES,
        isolation=None):
    """Run `program` contained, then `tests` (Python source: asserts, say) here against it: each
    free name of the tests calls the program's function of that name with literal arguments and
    gets its result as a literal. `isolation` is "bubblewrap", "audit-hook" or None (the best
    available: `layer()`). Returns a Result; never raises for anything the program does (a crash, a
    hang, a memory bomb, sys.exit, a blocked write or connection, endless output: passed=False with
    a status). Raises SyntaxError when the tests do not parse and ValueError for an unknown layer."""
    which = isolation or layer()
    if which not in LAYERS:
        raise ValueError(f"isolation {which!r}: choose from {', '.join(LAYERS)}")
    return _run(program, tests, timeout_s, cpu_s, memory_bytes, output_bytes, which)


def pass_at_1(programs, tests, report=print, **limits):
    """The fraction of programs (one sample per problem) whose tests pass: pass@1 of Chen et al.
    2021 (Codex), with n = 1 sample per problem, i.e. the mean of the verdicts. Calls `report` first
    with describe()'s line (what the sandbox does not contain). Returns (pass@1, [Result]). Raises
    ValueError when the lists differ in length."""
    if len(programs) != len(tests):
        raise ValueError(f"{len(programs)} programs but {len(tests)} test sets")
    if report:
        report(describe(limits.get("isolation")))
    results = [run(p, t, **limits) for p, t in zip(programs, tests)]
    return (sum(r.passed for r in results) / len(results) if results else 0.0), results
