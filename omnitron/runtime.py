"""What every entry point shares (train.py, sample.py, bench.py): the device, dtype and autocast
choice, their command-line flags, user errors that end in one line, and atomic file writes.

A library module: it imports nothing from the project but kernels (for the --attn choices).
"""
import argparse
import difflib
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from omnitron import kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A problem with the user's input: the command line prints it as one line and exits 1."""


# ----------------------------------------------------------------------------- device and dtype

def resolve_device(name):
    """`auto` -> cuda if a GPU is visible, else cpu; any other name is checked and returned as given.
    A name torch does not know, or a CUDA device this machine does not have: UserError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not a device to run on (cpu, cuda, cuda:N, mps or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU here (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def resolve_dtype(name, device):
    """`auto` -> bf16 on a CUDA device that supports it, fp32 elsewhere (on CPUs bf16 matrix
    products are usually slower: measure with `bench.py speed`). Raises UserError on other names."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; not {name!r}")
    return DTYPES[name]


def autocast(device, dtype):
    """torch.autocast to dtype on device's type; a no-op context for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------- command lines

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (`--max_iters ten`, an unknown flag) are user errors: one `error:`
    line and exit 1 through run_cli, as every other bad input, instead of usage text and exit 2.
    --help shows every flag's default. A flag is given whole: argparse's prefix matching is off
    (`--max_iter 10` is refused, not taken as --max_iters), in subcommands too (their parsers are
    of this class)."""

    def __init__(self, *args, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):  # a flag misspelt or cut short: name the nearest
            flags = self.flag_names()
            given = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            near = [([f for f in flags if f.startswith(a)] or difflib.get_close_matches(a, flags, n=1, cutoff=0.7)
                     or [None])[0] for a in given]
            if near := [n for n in near if n]:
                message += f" (did you mean {', '.join(near)}?)"
        raise UserError(message)

    def flag_names(self):
        """The --flags of this parser and of its subcommands' parsers."""
        names = {f for f in self._option_string_actions if f.startswith("--")}
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    names |= {f for f in sub._option_string_actions if f.startswith("--")}
        return sorted(names)


def str2bool(s):
    """true/false, yes/no, on/off, 1/0 (any case) -> bool; ValueError otherwise (argparse's type)."""
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {s!r}")


def add_device_flags(p, dtype=True, attn=True):
    """--device (and --dtype, --attn: the attention backends of kernels' registry) on parser p."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is a GPU)")
    if dtype:
        p.add_argument("--dtype", default="auto", help=f"{', '.join(DTYPES)}, or auto (bf16 on CUDA, fp32 on CPU)")
    if attn:
        add_attention_flags(p)


ATTENTION_FLAGS = [  # (name, default, help): train.py's table, and every other command's through add_attention_flags
    ("attn", "auto", "attention backend: " + ", ".join(kernels.names())),
    ("attn_window", 0, "sliding-window attention: each query sees the last W positions, itself included "
                       "(0: off; a model's own sliding_window wins on its layers)"),
    ("performer_features", 0, "--attn performer: random features m (0: the paper's rule, head_dim * ln head_dim)"),
    ("performer_redraw", 0, "--attn performer: draw new random features every N training steps (0: never)"),
]


def add_attention_flags(p):
    """--attn, --attn_window, --performer_features, --performer_redraw on parser p."""
    for name, default, help_text in ATTENTION_FLAGS:
        p.add_argument(f"--{name}", type=type(default), default=default, help=help_text,
                       **({"choices": kernels.names()} if name == "attn" else {}))


def configure_attention(flags):
    """Apply those flags (a dict or an argparse namespace) to kernels (kernels.configure). The
    Performer flags without --attn performer: UserError (they would change nothing)."""
    flags = flags if isinstance(flags, dict) else vars(flags)
    if flags["attn"] != "performer":
        for name in ("performer_features", "performer_redraw"):
            if flags[name]:
                raise UserError(f"--{name} {flags[name]} needs --attn performer (attention is {flags['attn']})")
    kernels.configure(*(flags[name] for name, _, _ in ATTENTION_FLAGS))


ATTENTION_FILE = "attention.json"  # beside a model trained with Performer or a sliding window


def save_attention(directory, flags):
    """Write attention.json into a model directory trained with an attention that softmax does not
    compute (--attn performer, --attn_window W): sample.py and --init_from read it back
    (trained_attention). Other runs: nothing, and a stale file is removed."""
    chosen = {name: flags[name] for name in ("attn", "attn_window", "performer_features")}
    path = Path(directory) / ATTENTION_FILE
    if chosen["attn"] == "performer" or chosen["attn_window"]:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(chosen) + "\n"))
    elif path.is_file():
        path.unlink()


def trained_attention(flags, directory, say=print):
    """The attention flags (a dict) completed from `directory`'s attention.json, the attention the model
    was trained with: a flag left at its default takes the saved value; a flag given explicitly
    with another value wins, and a note says so (swapping FAVOR+ into a softmax model is a choice,
    never a silent one). Returns a new dict; the flags unchanged when there is no file."""
    path = Path(directory) / ATTENTION_FILE
    if not path.is_file():
        return dict(flags)
    defaults, out = {name: default for name, default, _ in ATTENTION_FLAGS}, dict(flags)
    for name, value in read_json(path).items():
        if name not in defaults:
            raise ValueError(f"{path}: unknown key {name!r}")
        if out[name] == defaults[name]:
            out[name] = value
        elif out[name] != value:
            say(f"note: the model was trained with {name} {value} ({path}); --{name} {out[name]} is used")
    return out


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that says what was kept and how to go on (train.py: the checkpoint's
    step and the --resume command); run_cli prints it and exits 130."""


def run_cli(main):
    """Run a command's main(); a user error (bad flag value, missing or corrupt file, bad corpus)
    ends in one line on stderr and exit code 1. OMNITRON_DEBUG=1 shows the traceback instead.
    Ctrl-C exits 130, printing the line of an Interrupted."""
    try:
        sys.exit(main())
    except (UserError, ValueError, OSError) as e:
        if os.environ.get("OMNITRON_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted) and str(e):
            print(e, file=sys.stderr, flush=True)
        sys.exit(130)


def format_eta(seconds):
    """Seconds as 1h05m or 4m09s."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def print_table(rows, columns):
    """Print rows (dicts) as a table of columns ((key, header, format) triples), right-aligned; a
    missing or None value is '-'."""
    cells = [[h for _, h, _ in columns]] + [[fmt.format(r[k]) if r.get(k) is not None else "-"
                                             for k, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- models

def unwrap(model):
    """The model itself, inside torch.compile's and DistributedDataParallel's wrappers (FSDP's
    fully_shard shards the model in place: it is its own model)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------- files

DAMAGED = "the file is damaged or incomplete: copy it again, or train the run that wrote it again"


def read_json(path):
    """A JSON file as Python objects; ValueError naming the file, and what to do, when it is not
    valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {DAMAGED}") from None


def load_tensors(path):
    """The tensors of a .safetensors file, or of a weights-only torch file (pytorch_model.bin), as a
    dict of name -> tensor on the CPU. A file that cannot be read: ValueError naming it and what to
    do (FileNotFoundError when it is missing)."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors', zip's and pickle's errors, and EOFError for an empty file
        raise ValueError(f"cannot load {path}: {type(e).__name__}: {first_line(e)}; {DAMAGED}") from None


def first_line(error):
    """The first line of an exception's message ('' when it has none)."""
    return str(error).splitlines()[0] if str(error) else ""


def write_json(path, obj, **dumps_kwargs):
    """Write obj as JSON to path atomically (atomic_write): a reader sees the old file or the new one,
    never half of one. dumps_kwargs (indent, default, ...) go to json.dumps."""
    body = json.dumps(obj, **dumps_kwargs)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) on a temporary file beside `path`, then rename it onto `path`:
    readers never see half a file (used for every checkpoint and cache file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_fn(str(tmp))
    os.replace(tmp, path)


def read_jsonl(path, what="file"):
    """The JSON objects of a .jsonl file with their line numbers, [(n, object)], blank lines
    skipped. Not found, not UTF-8, a line that is not JSON or not an object: UserError naming
    the file (as `what`) and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: expected a JSON object")
        records.append((n, obj))
    return records


def write_jsonl(path, rows):
    """Objects as a .jsonl file, one a line, written under a temporary name and renamed."""
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
