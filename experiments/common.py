"""What the experiments share: work reused when its settings match (cached, cached_result, cached_run: a
training run), comma-separated flag values, the training-run flags, matplotlib when it is installed and
save_figure, and the standalone entry point (python -m experiments.NAME)."""
import json
import sys
from pathlib import Path

import train
from omnitron import data, runtime
from omnitron.runtime import UserError


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


def save_figure(fig, path):
    """Lay out a matplotlib figure, save it to path as a PNG at 120 dpi (its folder made) and say where."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def comma_list(csv):
    """"a, b,,c" -> ["a", "b", "c"]: a comma-separated flag value, blanks dropped."""
    return [s.strip() for s in csv.split(",") if s.strip()]


def layer_width_pairs(spec):
    """"2x64,4x128" -> [(2, 64), (4, 128)] (n_layer x n_embd)."""
    try:
        return [tuple(int(v) for v in s.split("x")) for s in comma_list(spec)]
    except ValueError:
        raise UserError(f"--sizes: expected n_layer x n_embd pairs such as 2x64,4x128, not {spec!r}") from None


def comma_floats(csv, flag, count=None):
    """"1e11,2e11" -> [1e11, 2e11]: positive numbers, `count` of them if given; else UserError."""
    try:
        values = [float(v) for v in comma_list(csv)]
    except ValueError:
        values = []
    if not values or any(not v >= 0 for v in values) or (count and len(values) != count):
        raise UserError(f"{flag}: expected {count or 'one or more'} comma-separated numbers, not {csv!r}")
    return values


def is_cached(marker, settings, *needed):
    """Whether the JSON file `marker` holds `settings` and every path in `needed` exists (see cached)."""
    marker = Path(marker)
    return marker.is_file() and json.loads(marker.read_text()) == settings and all(Path(p).exists() for p in needed)


def cached(marker, settings, make, *needed):
    """Call make() unless the JSON file `marker` already holds `settings` and every path in `needed` exists;
    after make(), write `settings` to `marker`, last, so that an interrupted make() is done again.
    Returns whether make() ran."""
    if is_cached(marker, settings, *needed):
        return False
    make()
    runtime.write_json(marker, settings)
    return True


def cached_result(path, settings, compute):
    """compute()'s result (JSON-serialisable), stored in `path` as {"settings", "result"} and read back
    while the stored settings equal `settings`."""
    path = Path(path)
    if path.is_file() and (stored := json.loads(path.read_text())).get("settings") == settings:
        return stored["result"]
    result = compute()
    runtime.write_json(path, {"settings": settings, "result": result}, indent=1)
    return result


def cached_run(out, settings, label="", **flags):
    """train.run(out_dir=out, **flags), or nothing when `out` holds a finished run of the same
    settings (its settings.json, written last). A run of other settings (or an unfinished one) in
    `out` is replaced (train.py's --overwrite). Returns the run's log.jsonl records."""
    out = Path(out)

    def train_it():
        length = f"{flags['max_time']:g} s" if flags.get("max_time") else f"{flags.get('max_iters')} steps"
        print(f"--- {label or out.name}: training {length} into {out}", flush=True)
        train.run(out_dir=str(out), overwrite=True, **flags)
    cached(out / "settings.json", settings, train_it)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


RESULTS_BEGIN, RESULTS_END = "<!-- results: begin (written by the run) -->", "<!-- results: end -->"


def readme_results_block(readme):
    """The text between RESULTS_BEGIN and RESULTS_END in a README (stripped), or None without them."""
    text = Path(readme).read_text()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        return None
    return text.split(RESULTS_BEGIN, 1)[1].split(RESULTS_END, 1)[0].strip()


def write_results(path, results, render):
    """Write a run's numbers to `path` (JSON) and, when a README.md beside it holds the RESULTS_BEGIN and
    RESULTS_END markers, replace the text between them with render(results) (markdown), so that the
    README's table is the results file's. Empty path: nothing. Returns whether a README was updated."""
    if not path:
        return False
    path = Path(path)
    runtime.write_json(path, results, indent=1)
    print(f"results: {path}")
    readme = path.parent / "README.md"
    if not readme.is_file() or readme_results_block(readme) is None:
        return False
    head, rest = readme.read_text().split(RESULTS_BEGIN, 1)
    text = f"{head}{RESULTS_BEGIN}\n{render(results).strip()}\n{RESULTS_END}{rest.split(RESULTS_END, 1)[1]}"
    runtime.atomic_write(readme, lambda tmp: Path(tmp).write_text(text))
    print(f"results table: {readme}")
    return True


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


def main(experiment, argv=None):
    """python -m experiments.NAME [flags]: parse the flags that experiment.add_parser registers (the same as
    bench.py NAME's) and run it; a user error is one `error:` line and exit 1 (runtime.run_cli)."""
    def _main():
        sub = runtime.ArgumentParser().add_subparsers()
        command = experiment.add_parser(sub)
        command.prog = f"python -m {experiment.__package__}"
        args = command.parse_args(sys.argv[1:] if argv is None else argv)
        args.run(args)
        return 0
    runtime.run_cli(_main)
