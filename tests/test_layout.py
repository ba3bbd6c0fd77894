"""The layout's invariants: the library never imports an experiment or a command, every experiment folder
has what DEVELOPERS.md's experiment contract lists, and the two location-dependent paths resolve to the
checkout."""
import ast
import subprocess
import sys

import bench
from omnitron import data, tokenization
from tests.helpers import ROOT

COMMANDS = {"train", "sample", "bench", "experiments"}


def imported_roots(path):
    """The top-level names a Python file imports (absolute imports only)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_library_imports_no_experiment_and_no_command():
    files = sorted((ROOT / "omnitron").rglob("*.py"))
    assert len(files) > 20
    offending = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & COMMANDS) for f in files}
    assert {f: names for f, names in offending.items() if names} == {}


def test_every_experiment_folder_keeps_the_contract():
    """README.md, run.py (add_parser, run), __main__.py and test_NAME.py in each folder; bench.py registers
    exactly the folders."""
    folders = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/run.py"))
    assert folders == sorted(bench.EXPERIMENTS)
    for name in folders:
        folder = ROOT / "experiments" / name
        for file in ("README.md", "__init__.py", "__main__.py", f"test_{name}.py"):
            assert (folder / file).is_file(), folder / file
        source = ast.parse((folder / "run.py").read_text())
        defined = {n.name for n in source.body if isinstance(n, ast.FunctionDef)}
        assert {"add_parser", "run"} <= defined, name


def test_an_experiment_runs_alone_with_bench_pys_flags():
    """python -m experiments.NAME parses the flags of bench.py NAME and ends a user error in one line."""
    r = subprocess.run([sys.executable, "-m", "experiments.switch", "--arms", "nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: unknown arm(s) nope; arms: dense, switch, dense_wide, dense_init0.1, switch_init0.1, switch_alpha0, "
        "switch_top2"]
    usage = subprocess.run([sys.executable, "-m", "experiments.switch", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120).stdout
    assert usage.startswith("usage: python -m experiments.switch ") and "--init_scale" in usage


def test_the_location_dependent_paths_resolve_to_the_checkout():
    """The tests' ROOT is the repository root (the commands beside it), and the corpus cache folder is its
    data/ although the library now lives one folder down (omnitron/)."""
    assert (ROOT / "train.py").is_file() and (ROOT / "omnitron" / "__init__.py").is_file()
    assert tokenization.DEFAULT_DATA_DIR == data.DEFAULT_DATA_DIR == ROOT / "data"
