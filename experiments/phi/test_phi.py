"""experiments/phi: curation (rubric, dedup, pool, mixing, manifest), exercises, the sandbox, the run's pieces."""
import ast
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.phi import curation, exercises, sandbox
from experiments.phi import run as phi_experiment
from omnitron import evaluation, models, tokenization
from tests.helpers import ROOT

# ----------------------------------------------------------------------------- the Phi recipe (curation.py, exercises.py, sandbox.py)
# Tests of the Phi recipe: curation.py (split, functions, dedup, rubric, classifier,
# features, mix, manifest), exercises.py, sandbox.py and bench.py phi's pieces.


GOOD = textwrap.dedent('''\
    def mean_of(values):
        """Return the arithmetic mean of a non-empty sequence of numbers.

        Raises ValueError when the sequence is empty.
        """
        # sum first, then divide by the count
        total = 0
        for v in values:
            total += v
        if not values:
            raise ValueError("mean of an empty sequence")
        return total / len(values)
    ''')
TEST_BOILERPLATE = textwrap.dedent('''\
    def test_thing(self):
        self.assertEqual(helper(1), 2)
        self.assertTrue(other_helper())
    ''')
TABLE = "def table():\n    return [" + ", ".join(str(i) for i in range(60)) + "]\n"


# ----------------------------------------------------------------------------- rubric and filter


def test_rubric_scores_the_documented_function_above_boilerplate_and_tables():
    score, label, points = curation.rubric(GOOD)
    assert label and score == 7 and all(points.values())
    s_test, l_test, p_test = curation.rubric(TEST_BOILERPLATE)
    assert not l_test and not p_test["not_test"] and not p_test["docstring"]
    assert not p_test["self_contained"]  # helper and other_helper are not defined in it
    s_tab, l_tab, p_tab = curation.rubric(TABLE)
    assert not l_tab and not p_tab["not_table"] and not p_tab["sensible_length"]
    # a test module's function is test boilerplate whatever its name
    assert not curation.rubric(GOOD, module="test.test_statistics")[2]["not_test"]
    assert curation.rubric("def broken(:\n") == (0, False, {p: False for p in curation.RUBRIC_POINTS})


def test_rubric_and_classifier_are_deterministic():
    texts = [GOOD, TEST_BOILERPLATE, TABLE] * 3
    assert [curation.rubric(t) for t in texts] == [curation.rubric(t) for t in texts]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = (x[:, 0] - 2 * x[:, 3] + 0.3 * rng.normal(size=200) > 0).astype(float)
    p1 = curation.fit_logistic(x, y)(x)
    p2 = curation.fit_logistic(x, y)(x)
    np.testing.assert_array_equal(p1, p2)
    assert np.mean((p1 > 0.5) == y) > 0.9


def test_logistic_regression_is_at_the_penalized_optimum():
    """The fitted weights zero the gradient of the mean log-loss + l2 |w|^2 on standardized
    features, recomputed independently in float64 numpy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)) * [1, 5, 0.2, 3] + [0, 1, -2, 4]
    y = (rng.random(300) < 1 / (1 + np.exp(-(x[:, 0] - x[:, 2])))).astype(float)
    l2 = 1e-2
    predict = curation.fit_logistic(x, y, l2=l2)
    mu, sd = x.mean(0), x.std(0, ddof=1) + 1e-8
    z = (x - mu) / sd
    p = predict(x)
    # recover w, b from the logits: logit(p) = z w + b, least squares on an exact linear map
    logit = np.log(p / (1 - p))
    coef, *_ = np.linalg.lstsq(np.c_[z, np.ones(len(z))], logit, rcond=None)
    w = coef[:-1]  # (the bias b = coef[-1]: its gradient is mean(p - y), checked below)
    grad_w = z.T @ (p - y) / len(y) + 2 * l2 * w
    grad_b = np.mean(p - y)
    assert np.abs(grad_w).max() < 1e-6 and abs(grad_b) < 1e-6


# ----------------------------------------------------------------------------- dedup


def _function(i):
    return textwrap.dedent(f'''\
        def function_{i}(data, limit={i}):
            """Process data number {i} with its own logic."""
            result = []
            for index, item in enumerate(data):
                if index > limit * {i + 1}:
                    break
                result.append(item ** {i % 5 + 1} + {i * 7})
            return sorted(result, reverse={i % 2 == 0})
        ''')


def test_dedup_removes_planted_exact_and_near_duplicates():
    texts = [_function(i) for i in range(20)]
    exact = texts[3].replace("\n", "   \n")  # trailing spaces only: an exact duplicate
    near = texts[7].replace("break", "break  # done")  # a comment added: a near duplicate
    jaccard = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    assert 0.8 < jaccard(curation._shingles(near), curation._shingles(texts[7])) < 1
    assert max(jaccard(curation._shingles(texts[i]), curation._shingles(texts[j]))
               for i in range(20) for j in range(i)) < 0.8  # the others are distinct
    pool = texts + [exact, near]
    kept, dropped = curation.dedup(pool)
    assert kept == list(range(20))
    assert dropped[20] == ("exact", 3)
    assert dropped[21][:2] == ("near", 7) and dropped[21][2] >= 0.8
    # the same functions in another order: the first of each group is the one kept
    kept2, dropped2 = curation.dedup([near] + texts)
    assert 0 in kept2 and dropped2[8][:2] == ("near", 0)


def test_minhash_estimates_the_jaccard_similarity():
    a = " ".join(f"w{i}" for i in range(200))
    b = " ".join(f"w{i}" for i in range(100, 300))
    sa, sb = curation._shingles(a), curation._shingles(b)
    true = len(sa & sb) / len(sa | sb)
    sig = curation.minhash([a, b], num_perm=256)
    assert abs(np.mean(sig[0] == sig[1]) - true) < 0.08
    assert (curation.minhash([a, b]) == curation.minhash([a, b])).all()


# ----------------------------------------------------------------------------- pool, units, mixing, manifest


def test_split_keeps_packages_together_and_reference_modules_in_train():
    names = ["json", "json.decoder", "json.encoder", "csv", "textwrap", "fractions", "email", "email.utils"] + \
        [f"mod{i}" for i in range(200)]
    train, held = curation.split_modules(names, held_out_fraction=0.3, seed=0)
    assert set(train) | set(held) == set(names) and not set(train) & set(held)
    for pkg in ("json", "email"):
        members = [n for n in names if n.split(".")[0] == pkg]
        assert all(m in train for m in members) or all(m in held for m in members)
    assert "textwrap" in train and "fractions" in train
    assert 0.15 < len(held) / len(names) < 0.45
    assert (train, held) == curation.split_modules(names, held_out_fraction=0.3, seed=0)


def test_functions_are_dedented_and_parse_alone():
    src = textwrap.dedent('''\
        import os

        def top(a):
            return a

        class K:
            x = 1

            @staticmethod
            def method(b):
                """Doc."""
                return b

        if True:
            def hidden():
                pass
        ''')
    units = curation.functions(src, "m")
    assert [u.name for u in units] == ["top", "K.method"]
    assert units[1].text.startswith("@staticmethod\ndef method(b):")
    for u in units:
        ast.parse(u.text)
    assert curation.functions("def broken(:", "m") == []


def test_normalize_maps_to_the_shared_vocabulary():
    text = curation.normalize("a\tb\r\nc\u00e9\x0cd\x01")
    assert text == "a    b\nc?d?"
    assert set(text) <= set(curation.VOCAB) and len(curation.VOCAB) == 96


def test_mix_gives_each_source_its_weight_and_repeats_epochs():
    a = [f"a{i:03d}" * 5 for i in range(10)]     # 200 characters + separators
    b = [f"b{i:03d}" * 5 for i in range(100)]    # 2000 characters
    text, stats = curation.mix({"a": (a, 1.0), "b": (b, 3.0)}, 4000, seed=0)
    assert stats["a"]["chars"] >= 1000 and stats["a"]["chars"] < 1000 + 23
    assert stats["b"]["chars"] >= 3000 and stats["b"]["chars"] < 3000 + 23
    assert stats["a"]["epochs"] > 4  # the small source is repeated
    pieces = text.split("\n\n")  # whole texts, never cut
    assert set(pieces) <= set(a) | set(b)
    assert sum(x in a for x in pieces) == stats["a"]["texts"] and sum(x in b for x in pieces) == stats["b"]["texts"]
    assert curation.mix({"a": (a, 1.0), "b": (b, 3.0)}, 4000, seed=0)[0] == text
    with pytest.raises(ValueError):
        curation.mix({"a": ([], 1.0)}, 10)


def test_manifest_records_counts_and_reasons(tmp_path):
    man = curation.Manifest()
    units = [curation.Unit("m", f"f{i}", "x" * (i + 1)) for i in range(4)]
    entry = man.step("dedup", units, units[:3], {"exact duplicate": 1}, ["m:f3"])
    assert entry["in"] == 4 and entry["out"] == 3 and entry["chars_in"] == 10 and entry["chars_out"] == 6
    man.figures["classifier"] = {"held_out_accuracy": 0.9}
    man.save(tmp_path / "manifest.json")
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["steps"][0]["dropped"] == {"exact duplicate": 1} and saved["classifier"]["held_out_accuracy"] == 0.9


def test_features_are_padding_invariant_and_match_the_loglikelihoods():
    """The mean-pooled hidden state and the cross-entropy of a text do not depend on the batch it
    is in (right padding is masked), and the cross-entropy equals evaluation.loglikelihoods'."""
    torch.manual_seed(0)
    module = models.get("phi")
    model = module.Model(module.Config(vocab_size=96, block_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=2,
                                       intermediate_size=64)).eval()
    tok = tokenization.CharTokenizer(curation.VOCAB)
    texts = ["def f(x):\n    return x + 1\n", "x = 1", "class A:\n    pass\n" * 3]
    emb, ce = curation.features(model, tok, texts, max_tokens=48)
    for i, t in enumerate(texts):
        e1, c1 = curation.features(model, tok, [t], max_tokens=48)
        np.testing.assert_allclose(e1[0], emb[i], atol=1e-5)
        np.testing.assert_allclose(c1[0], ce[i], atol=1e-5)
        ids = tok.encode(t)[:48]
        ref = -evaluation.loglikelihoods(model, [(ids[:1], ids[1:])], reuse_context=False)[0] / (len(ids) - 1)
        assert abs(ref - ce[i]) < 1e-4
    with torch.no_grad():  # the pooled vector is the mean of lm_head's input over the text
        captured = {}
        h = model.lm_head.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0]))
        model(torch.tensor([tok.encode(texts[1])]))
        h.remove()
    np.testing.assert_allclose(captured["h"][0].mean(0).numpy(), emb[1], atol=1e-5)


# ----------------------------------------------------------------------------- exercises


def test_every_kept_exercise_passes_its_tests_and_a_broken_one_is_rejected():
    one_each = exercises.generate(per_family=1, seed=3)
    assert len({e.family for e in one_each}) == len(exercises.FAMILIES) >= 36
    assert sum(e.held_out for e in one_each) == 8
    broken = exercises.build("add_const", random.Random(0))
    broken.solution = broken.solution.replace("+", "-")
    kept, rejected = exercises.verify(one_each + [broken])
    assert kept == one_each
    assert [(ex.name, status) for ex, status, _ in rejected] == [(broken.name, "failed")]
    assert "AssertionError" in rejected[0][2]


def test_exercise_tests_reject_a_wrong_body():
    """The tests discriminate: a body returning None fails every family's tests (one process for
    all, each exercise in its own namespace)."""
    wrong = exercises.generate(per_family=1, seed=5)
    program = "results = []\n"
    for e in wrong:
        src = e.prompt + "    return None\n" + e.tests
        program += f"try:\n    exec({src!r}, {{}})\n    results.append(True)\nexcept AssertionError:\n" \
                   f"    results.append(False)\n"
    program += "print(sum(results))\n"
    r = sandbox.run(program)
    assert r.passed and r.stdout.strip() == "0"


def test_exercises_are_templated_and_reproducible():
    a = exercises.generate(per_family=5, seed=0)
    assert [e.text for e in a] == [e.text for e in exercises.generate(per_family=5, seed=0)]
    assert len({e.text for e in a}) == len(a)
    e = a[0]
    assert e.text.startswith("def ") and '"""' in e.prompt and e.solution.startswith("    ")


# ----------------------------------------------------------------------------- the sandbox


@pytest.mark.parametrize("isolation", [None, "audit-hook"])
def test_sandbox_contains_hang_memory_bomb_exit_escape_network_and_output(tmp_path, isolation):
    outside = tmp_path / "escaped.txt"
    cases = {
        "hang": ("import time\ntime.sleep(60)", "timeout"),
        "busy loop": ("while True:\n    pass", "timeout"),
        "memory bomb": ("x = bytearray(4 * 1024 ** 3)", "failed"),
        "sys.exit(0)": ("import sys\nsys.exit(0)", "exited"),
        "os._exit(0)": ("import os\nos._exit(0)", "exited"),
        "write outside": (f"open({str(outside)!r}, 'w').write('x')", "failed"),
        "os.open outside": (f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)", "failed"),
        "network": ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "failed"),
        "subprocess": (f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}])", "failed"),
        "os.system": (f"import os\nassert os.system('touch {outside}') == 0", "failed"),  # -1 when fork fails
        "infinite output": ("while True:\n    print('x' * 1000)", "failed"),
        "crash": ("raise RuntimeError('boom')", "failed"),
    }
    for name, (program, status) in cases.items():
        r = sandbox.run(program, "assert True", timeout_s=1.5, cpu_s=3, isolation=isolation)
        assert not r.passed and r.status == status, (name, r)
        assert len(r.stdout) <= sandbox.KEEP_OUTPUT
    assert not outside.exists()
    ok = sandbox.run("open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())", "assert True",
                     isolation=isolation)
    assert ok.passed and ok.stdout == "fine"


def test_sandbox_child_has_an_empty_environment_and_its_own_folder():
    r = sandbox.run("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(sys.flags.isolated)")
    env, cwd, isolated = r.stdout.splitlines()
    assert eval(env) == [] and isolated == "1"
    assert Path(cwd).name.startswith("omnitron-sandbox-") and not Path(cwd).exists()  # removed afterwards


# An attacker's first step against an in-process audit hook: find the hook's set of blocked events
# through the garbage collector and empty it. Where there is no such hook, or gc is refused, it does nothing.
DISARM = """
import gc
try:
    for _o in gc.get_objects():
        if isinstance(_o, set) and "os.kill" in _o:
            _o.clear()
except Exception:
    pass
"""
ADD_FIVE_TESTS = "assert add_five(3) == 8\nassert add_five(-1) == 4\n"


@pytest.mark.parametrize("isolation", [None, "audit-hook"])
def test_sandbox_verdict_cannot_be_forged(isolation):
    """A wrong solution cannot be scored as passed: not by printing what it finds in its own files
    (a pass marker) or writing to any descriptor and exiting before the tests, and not by returning
    an object that equals everything."""
    forge = textwrap.dedent("""
        import os, re
        def add_five(x):
            return 0
        text = open('/proc/self/cmdline', errors='replace').read()
        for name in os.listdir('.'):
            try:
                text += open(name, errors='replace').read()
            except OSError:
                pass
        for marker in set(re.findall(r'SANDBOX-OK-[0-9a-f]+', text)):
            print(marker, flush=True)
        for fd in range(1, 64):
            try:
                os.write(fd, b'{"ready": true}\\n{"passed": true}\\nPASSED\\n')
            except OSError:
                pass
        os._exit(0)
    """)
    always_equal = "class Anything:\n    def __eq__(self, other):\n        return True\n\n" \
                   "def add_five(x):\n    return Anything()\n"
    for name, program in {"forged marker": forge, "always equal": always_equal}.items():
        r = sandbox.run(program, ADD_FIVE_TESTS, isolation=isolation)
        assert not r.passed and r.status != "passed", (name, r)
    right = sandbox.run("def add_five(x):\n    return x + 5\n", ADD_FIVE_TESTS, isolation=isolation)
    assert right.passed and right.status == "passed", right


@pytest.mark.parametrize("isolation", [None, "audit-hook"])
def test_sandbox_writes_nothing_outside_its_folder(isolation):
    """sqlite3.connect, os.open relative to a directory descriptor and os.mkfifo, each aimed at the
    folder above the program's, leave nothing there."""
    name = "omnitron-escape-" + secrets.token_hex(6)
    targets = {"sqlite3.connect": ((f"import sqlite3\nc = sqlite3.connect('../{name}.db')\n"
                                    "c.execute('create table t (x)')\nc.commit()\n"), f"{name}.db"),
               "os.open(dir_fd=)": ((f"import os\nd = os.open('..', os.O_RDONLY)\n"
                                     f"os.write(os.open('{name}.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d), b'x')\n"),
                                    f"{name}.txt"),
               "os.mkfifo": (f"import os\nos.mkfifo('../{name}.fifo')\n", f"{name}.fifo")}
    parent = Path(tempfile.gettempdir())
    try:
        for call, (program, target) in targets.items():
            r = sandbox.run(program, "assert True", isolation=isolation)
            assert not (parent / target).exists(), (call, r)
            assert not r.passed, (call, r)
    finally:
        for _, target in targets.values():
            (parent / target).unlink(missing_ok=True)


def test_sandbox_cannot_read_the_evaluators_environment():
    """The program's environment is empty, and the evaluator's (a process started with a secret in
    its environment, which /proc/PID/environ shows) cannot be read."""
    token = secrets.token_hex(8)
    program = textwrap.dedent("""
        import os
        print(dict(os.environ))
        for pid in (os.getppid(), EVALUATOR):
            try:
                print(open(f'/proc/{pid}/environ', errors='replace').read())
            except OSError as e:
                print(type(e).__name__)
    """)
    evaluator = ("import os, sys\nfrom experiments.phi import sandbox\n"
                 "r = sandbox.run(sys.argv[1].replace('EVALUATOR', str(os.getpid())))\n"
                 "print(r.passed, r.stdout, r.stderr)")
    out = subprocess.run([sys.executable, "-c", evaluator, program], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMNITRON_TEST_SECRET": token}, timeout=60)
    assert token not in out.stdout + out.stderr
    assert out.returncode == 0 and out.stdout.startswith("True {}\n"), out  # passed, an empty environment


def _processes_with(token):
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_sandbox_leaves_no_process_behind():
    """A child that starts its own session (out of the program's process group) does not outlive the run."""
    token = "omnitron-orphan-" + secrets.token_hex(6)
    program = DISARM + textwrap.dedent(f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(20)', '{token}'])
        time.sleep(0.5)
    """)
    sandbox.run(program, "assert True", timeout_s=5)
    deadline = time.time() + 2
    while _processes_with(token) and time.time() < deadline:  # a dying namespace may take a moment
        time.sleep(0.05)
    survivors = _processes_with(token)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def test_sandbox_cannot_signal_its_parent():
    received = []
    old = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    try:
        program = DISARM + textwrap.dedent(f"""
            import os, signal
            for pid in (os.getppid(), {os.getpid()}):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except OSError as e:
                    print(type(e).__name__)
        """)
        sandbox.run(program, "assert True")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not received


def test_sandbox_has_no_network_not_even_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(1.0)
        port = server.getsockname()[1]
        program = DISARM + f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
        r = sandbox.run(program, "assert True")
        try:
            server.accept()[0].close()
            reached = True
        except socket.timeout:
            reached = False
    assert not reached and not r.passed, r


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap is not installed")
def test_isolated_layer_is_active_where_bubblewrap_is_installed():
    """With bwrap installed (CI installs it) programs run under it: in their own PID namespace (the
    runner is pid 2 under bwrap's init), as nobody when the evaluator is root, seeing only /usr, the
    Python installation and their folder."""
    assert sandbox.layer() == "bubblewrap" and sandbox.describe().startswith("sandbox: bubblewrap")
    r = sandbox.run("import os\nprint(os.getpid(), os.getuid(), sorted(os.listdir('/')))")
    assert r.passed and r.layer == "bubblewrap", r
    pid, uid, top = r.stdout.split(" ", 2)
    assert pid == "2" and int(uid) == (sandbox.NOBODY if os.geteuid() == 0 else os.geteuid())
    assert not set(eval(top)) - {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "dev", "proc", "tmp",
                                 *Path(sys.prefix).resolve().parts[1:2], *Path(tempfile.gettempdir()).parts[1:2]}


def test_pass_at_1_of_correct_and_wrong_solution_sets():
    tasks = exercises.generate(per_family=1, seed=7, held_out=True)
    right = [t.prompt + t.solution for t in tasks]
    reported = []
    p, results = sandbox.pass_at_1(right, [t.tests for t in tasks], report=reported.append)
    assert p == 1.0 and all(r.passed for r in results)
    assert reported == [sandbox.describe()] and "not contained: " in reported[0]  # one line, first
    wrong = [t.prompt + tasks[(i + 1) % len(tasks)].solution for i, t in enumerate(tasks)]  # another family's body
    assert sandbox.pass_at_1(wrong, [t.tests for t in tasks])[0] == 0.0


def test_completion_is_cut_where_the_function_ends():
    text = "    return x + 1\n\n    # still inside\n    pass\ndef other():\n    return 2"
    assert phi_experiment.phi_completion(text) == "    return x + 1\n\n    # still inside\n    pass\n"
    assert phi_experiment.phi_completion("") == "\n"


def test_bench_phi_refuses_unknown_arms():
    out = subprocess.run([sys.executable, "bench.py", "phi", "--arms", "A,Z"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: --arms 'A,Z': choose from B+wide, A+wide, B+narrow"]


# ----------------------------------------------------------------------------- wide exercises and compositions


def test_wide_drawings_are_diverse_correct_and_leave_the_narrow_ones_unchanged():
    """Wide drawings: thousands of distinct exercises per family, each passing its own tests, names and
    constants renamed consistently in the docstring and the body (a recursive call included, an attribute
    such as '-'.join not), today's narrow drawings unchanged (the diversity control's 355, 35,131 characters)."""
    many = exercises.generate(2000, seed=1, families=["add_const", "sort_list"], wide=True)
    assert len(many) == 4000 and len({e.text for e in many}) == 4000
    one_each = exercises.generate(20, seed=2, wide=True)
    assert len({e.family for e in one_each}) == len(exercises.FAMILIES) and all(map(exercises.check, one_each))
    for e in one_each:
        params = ast.parse(e.prompt + e.solution).body[0].args.args
        assert all(a.arg in exercises.IDENTIFIERS for a in params)
        assert all(a.arg in e.prompt.split('"""')[1] for a in params if e.family not in ("factorial", "sum_to"))
    rec = next(e for e in one_each if e.family == "fibonacci")
    assert rec.solution.count(rec.name + "(") == 2
    join = next(e for e in one_each if e.family == "join_words")
    assert "'.join(" in join.solution
    narrow = exercises.generate(40, seed=0, held_out=False)
    assert len(narrow) == 355 and sum(len(e.text) for e in narrow) == 35131
    broken = exercises.build("add_const", random.Random(0), wide=True)
    broken.solution = broken.solution.replace("+", "-")
    assert not exercises.check(broken)


def test_compositions_chain_two_operations_and_pass_in_the_sandbox():
    tasks = exercises.compositions(12, seed=4)
    assert len({t.text for t in tasks}) == 12 and {t.family for t in tasks} <= {"compose_int", "compose_list",
                                                                                "compose_str"}
    assert all(t.held_out and ", then " in t.prompt or t.family != "compose_int" for t in tasks)
    kept, rejected = exercises.verify(tasks, report=None)
    assert kept == tasks and not rejected
    # the composition's test fails a body that applies only one of the two operations
    t = next(t for t in tasks if t.family == "compose_int")
    one_step = t.solution.split("*")[0].replace("(", "") + "\n" if "*" in t.solution else "    return 0\n"
    assert not exercises.check(exercises.Exercise(t.family, t.name, t.prompt, one_step, t.tests, True))


def test_phi_runs_end_to_end_at_a_tiny_budget(tmp_path):
    """The experiment at a tiny budget on a pool of 12 standard-library modules: every arm trains in two stages
    (stage 2 a mix of exercises and replay), is scored on the three held-out sets, and the results file and the
    README table rendered from it are written."""
    import sysconfig
    from experiments import common
    root = Path(sysconfig.get_paths()["stdlib"])
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    for name in ("textwrap", "heapq", "colorsys", "shlex", "fnmatch", "glob", "reprlib", "bisect",  # train
                 "csv", "sched", "code", "genericpath"):  # held out (split_modules' hash)
        shutil.copy(root / f"{name}.py", stdlib / f"{name}.py")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "README.md").write_text(f"{common.RESULTS_BEGIN}\npending\n{common.RESULTS_END}\n")
    argv = ["phi", "--stdlib", str(stdlib), "--out", str(tmp_path / "phi"), "--results", str(tmp_path / "res" / "results.json"),
            "--seeds", "1", "--pretrain_iters", "2", "--finetune_iters", "2", "--batch_size", "2", "--ref_iters", "2",
            "--n_label", "60", "--exercises_per_family", "1", "--wide_per_family", "2", "--eval_instances", "1",
            "--eval_compositions", "3", "--eval_unseen", "1", "--gen_tokens", "8", "--threads", "1"]
    import bench
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(results["arms"]) == set(phi_experiment.PHI_ARMS)
    assert results["exercises"]["new_instances"] == 33 and results["exercises"]["compositions"] == 3
    for row in results["rows"]:
        for name in phi_experiment.EVAL_SETS:
            assert 0 <= row[f"pass_at_1_{name}"] <= 1
        assert row["forgetting_body"] == pytest.approx(row["body_loss"] - row["stage1_body_loss"])
    mixes = sorted((tmp_path / "phi" / "stage2").glob("*.txt"))
    assert len(mixes) == 3  # filtered + wide, pool + wide, filtered + narrow
    assert common.readme_results_block(tmp_path / "res" / "README.md") == phi_experiment.results_table(results).strip()


def test_the_readme_table_is_the_results_file():
    """The README's results table is the one rendered from results.json beside it (or, before the first default
    run, a line saying the numbers are pending)."""
    from experiments import common
    folder = Path(phi_experiment.__file__).parent
    block = common.readme_results_block(folder / "README.md")
    assert block is not None
    if (folder / "results.json").is_file():
        assert block == phi_experiment.results_table(json.loads((folder / "results.json").read_text())).strip()
    else:
        assert "pending" in block


def test_phi_init_gives_every_arm_the_same_start_and_vocabulary(tmp_path):
    a = phi_experiment.phi_init(tmp_path / "a", 1, 32, **phi_experiment.PHI_MODEL)
    b = phi_experiment.phi_init(tmp_path / "b", 1, 32, **phi_experiment.PHI_MODEL)
    ma, mb = models.from_pretrained(a), models.from_pretrained(b)
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), n
    tok = tokenization.tokenizer_for_model(a, ma.config.vocab_size)
    assert tok.vocab_size == 96 and tok.decode(tok.encode("def f():\n    pass")) == "def f():\n    pass"


def test_code_shape_masks_names_numbers_and_strings_but_keeps_the_operation():
    shape = phi_experiment.code_shape
    assert shape("    return b + 7\n") == shape("    return records + 8\n") == ("return", "NAME", "+", "0")
    assert shape("    return b + 7\n") != shape("    return b * 7\n")
    assert shape("    return max(aa)\n") != shape("    return min(aa)\n")  # builtins are the operation
    assert shape("    return s.upper()\n") == shape("    return word.upper()\n")  # so are attribute names
    assert shape("    return s.upper()\n") != shape("    return s.lower()\n")
    assert shape("    return sep.join(xs) + 'a'\n") == shape('    return d.join(y) + "bc"\n')
    assert shape('    return "unterminated\n') is None
