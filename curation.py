"""Data curation in the Phi recipe: a pool of code, deduplicated, scored, filtered and mixed, each
step recorded in a manifest.

Gunasekar et al. 2023 (*Textbooks Are All You Need*, phi-1, section 2.1) filtered The Stack and
StackOverflow for "educational value": GPT-4 rated ~100k samples, and a random forest on a code
model's (CodeGen's) output embeddings learnt to predict the rating for the rest. Ours, offline and
small:

- the pool: the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`, without
  site-packages), split *by top-level module* into train and held-out modules (split_modules);
- units: every function (top-level, or a method of a top-level class), dedented (functions);
- dedup: exact (sha1 of the text with trailing spaces removed) and near-duplicate (MinHash over
  5-token shingles, locality-sensitive hashing in bands, then the estimated Jaccard similarity
  against a threshold; Broder 1997, Leskovec et al. *Mining of Massive Datasets* ch. 3) (dedup);
- a transparent rubric in place of GPT-4's rating, from `ast` (rubric: docstring present and
  meaningful, comments, names resolvable in the unit, not test boilerplate, not a generated table,
  sensible length);
- the quality classifier: logistic regression (ours; phi-1 used a random forest) on the mean-pooled
  final hidden states of a reference model trained on the pool, fitted to the rubric's labels on a
  few thousand units and applied to all (embed, fit_logistic);
- the cheaper alternative: Moore & Lewis 2010's cross-entropy difference, H_in(x) - H_pool(x) per
  token, with an in-domain reference trained on hand-picked well-documented modules (REFERENCE_MODULES);
- mixing with weights, epochs repeated to reach a size (mix);
- Manifest: every step's counts, characters (= tokens: the comparison is character-level) and what
  was dropped and why.

Text is normalized to printable ASCII plus newline (normalize), so that every corpus and every
model shares one 96-character vocabulary (VOCAB).
"""
import ast
import builtins
import hashlib
import json
import re
import sysconfig
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime import UserError, atomic_write

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # the comparison's characters
# Well-documented, self-contained modules: the in-domain side of Moore-Lewis (kept in the train split).
REFERENCE_MODULES = ("textwrap", "fractions", "statistics", "heapq", "bisect", "colorsys", "graphlib", "shlex",
                     "difflib", "calendar", "string", "random", "functools", "dataclasses", "fnmatch", "glob",
                     "base64", "quopri", "ipaddress", "pprint", "reprlib", "contextlib")
_PRINTABLE = re.compile(r"[ -~\n]*")
SKIP_DIRS = ("site-packages", "__pycache__", "config-", "lib2to3/tests/data", "test/bad", "test/badsyntax")


# ----------------------------------------------------------------------------- the pool

def normalize(text):
    """Text as the comparison's vocabulary has it: tabs to 4 spaces, \\r and form feeds removed,
    any other character outside printable ASCII + newline replaced by '?'."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ").replace("\f", "")
    if _PRINTABLE.fullmatch(text):
        return text
    return "".join(c if (" " <= c <= "~" or c == "\n") else "?" for c in text)


def stdlib_files(root=None):
    """{module name: path} of the standard library's .py files (site-packages and bytecode
    caches left out), in sorted order. root: the stdlib folder (default sysconfig's)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"no standard library source folder at {root}")
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(s in rel for s in SKIP_DIRS):
            continue
        name = rel[:-3].replace("/", ".").removesuffix(".__init__")
        out[name] = path
    if not out:
        raise UserError(f"no .py files under {root}")
    return out


def split_modules(names, held_out_fraction=0.1, seed=0):
    """Split module names by their top-level package: a package and all its submodules go to one
    side, chosen by a hash of (seed, package), so the split is stable as modules come and go.
    REFERENCE_MODULES always train. Returns (train names, held-out names), sorted."""
    def held_out(name):
        top = name.split(".")[0]
        if top in REFERENCE_MODULES:
            return False
        return zlib.crc32(f"{seed}:{top}".encode()) / 2 ** 32 < held_out_fraction
    train = sorted(n for n in names if not held_out(n))
    return train, sorted(n for n in names if held_out(n))


@dataclass
class Unit:
    """One function of the pool: its module, qualified name and dedented source."""
    module: str
    name: str
    text: str
    meta: dict = field(default_factory=dict)  # rubric score, reasons, classifier probability, ...

    @property
    def key(self):
        return f"{self.module}:{self.name}"


def functions(source, module):
    """The functions of a module's source: top-level ones and the methods of top-level classes, each
    dedented, decorators included. A source that does not parse: []."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []

    def take(node, prefix=""):
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        text = textwrap.dedent("".join(lines[start:node.end_lineno])).rstrip() + "\n"
        out.append(Unit(module, prefix + node.name, text))

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            take(node)
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    take(sub, node.name + ".")
    return out


# ----------------------------------------------------------------------------- dedup

def _shingles(text, k=5):
    tokens = re.findall(r"\w+|[^\w\s]", text)
    if len(tokens) < k:
        tokens = tokens + [""] * (k - len(tokens))
    return {" ".join(tokens[i:i + k]) for i in range(len(tokens) - k + 1)}


def minhash(texts, num_perm=128, k=5, seed=0):
    """MinHash signatures (len(texts), num_perm) uint32 of each text's set of k-token shingles
    (tokens: words and single punctuation marks). Shingles are hashed with crc32, then by
    num_perm multiply-shift hashes ((a h + b) mod 2^64) >> 32 with odd random a (Dietzfelbinger et
    al. 1997). The fraction of equal columns of two rows estimates the sets' Jaccard similarity."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 2 ** 63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
    b = rng.integers(0, 2 ** 63, num_perm, dtype=np.uint64)
    sig = np.empty((len(texts), num_perm), dtype=np.uint32)
    with np.errstate(over="ignore"):
        for i, text in enumerate(texts):
            h = np.fromiter((zlib.crc32(s.encode()) for s in _shingles(text, k)), dtype=np.uint64)
            sig[i] = ((a[:, None] * h[None, :] + b[:, None]) >> np.uint64(32)).min(axis=1).astype(np.uint32)
    return sig


def dedup(texts, threshold=0.8, num_perm=128, bands=32, k=5):
    """Indices to keep and the reason each other text is dropped: {index: ("exact", i) or
    ("near", i, jaccard)} with i the kept text it repeats. Exact: the same text once trailing
    spaces are stripped. Near: MinHash LSH (bands x num_perm/bands rows) proposes pairs, and a pair
    whose estimated Jaccard similarity of k-token shingles is >= threshold is a duplicate; the
    first text of a group is kept."""
    keep, dropped, seen = [], {}, {}
    for i, t in enumerate(texts):
        digest = hashlib.sha1("\n".join(line.rstrip() for line in t.strip().splitlines()).encode()).hexdigest()
        if digest in seen:
            dropped[i] = ("exact", seen[digest])
        else:
            seen[digest] = i
            keep.append(i)
    if not keep:
        return keep, dropped
    sig = minhash([texts[i] for i in keep], num_perm, k)
    rows = num_perm // bands
    buckets, kept = {}, []
    for j, i in enumerate(keep):
        candidates = set()
        for band in range(bands):
            key = (band, sig[j, band * rows:(band + 1) * rows].tobytes())
            candidates.update(buckets.get(key, ()))
        best = max(((float(np.mean(sig[j] == sig[c])), c) for c in candidates), default=(0.0, None))
        if best[0] >= threshold:
            dropped[i] = ("near", keep[best[1]], round(best[0], 3))
            continue
        kept.append(i)
        for band in range(bands):
            buckets.setdefault((band, sig[j, band * rows:(band + 1) * rows].tobytes()), []).append(j)
    return kept, dropped


# ----------------------------------------------------------------------------- the rubric

BUILTIN_NAMES = frozenset(dir(builtins)) | {"__name__", "__file__", "__class__", "self", "cls"}
RUBRIC_POINTS = ("docstring", "meaningful_docstring", "comments", "self_contained", "not_test", "not_table",
                 "sensible_length")


def rubric(text, module=""):
    """The transparent quality rubric of one function's source (phi-1's "educational value",
    judged by rules instead of GPT-4). One point each, 7 in all:
      docstring             it has one
      meaningful_docstring  at least 5 words, and not only its own name
      comments              a # comment, or a docstring of 2+ lines
      self_contained        >= 80% of the names it reads are its parameters, its own assignments,
                            imports inside it, builtins or self/cls (resolved with ast)
      not_test              not a test: name not test*/setUp*/tearDown*, module not a test
                            module, no self.assert* calls
      not_table             literals are < 40% of its expression nodes and no line exceeds 100 chars
      sensible_length       5 to 60 lines
    Returns (score 0..7, label: good when score >= 5 with a docstring, {point: bool})."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return 0, False, {p: False for p in RUBRIC_POINTS}
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None:
        return 0, False, {p: False for p in RUBRIC_POINTS}
    doc = ast.get_docstring(fn) or ""
    lines = text.splitlines()
    words = re.findall(r"[A-Za-z]+", doc)
    bare = fn.name.strip("_").replace("_", " ").lower()
    assigned = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    loaded = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            loaded.append(node.id)
        elif isinstance(node, ast.Name):
            assigned.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            assigned.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not fn:
            assigned.add(node.name)
        elif isinstance(node, ast.arg):
            assigned.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            assigned.add(node.name)
    resolvable = [n in assigned or n in BUILTIN_NAMES for n in loaded]
    exprs = [n for n in ast.walk(fn) if isinstance(n, ast.expr)]
    literals = [n for n in exprs if isinstance(n, ast.Constant)]
    is_test = (fn.name.startswith(("test", "setUp", "tearDown")) or ".test" in "." + module
               or any(isinstance(n, ast.Attribute) and n.attr.startswith("assert") and
                      isinstance(n.value, ast.Name) and n.value.id == "self" for n in ast.walk(fn)))
    points = {
        "docstring": bool(doc.strip()),
        "meaningful_docstring": len(words) >= 5 and " ".join(words).lower() != bare,
        "comments": any(line.lstrip().startswith("#") for line in lines) or len(doc.strip().splitlines()) >= 2,
        "self_contained": not resolvable or sum(resolvable) / len(resolvable) >= 0.8,
        "not_test": not is_test,
        "not_table": (len(literals) / max(1, len(exprs)) < 0.4) and max(map(len, lines), default=0) <= 100,
        "sensible_length": 5 <= len(lines) <= 60,
    }
    score = sum(points.values())
    return score, points["docstring"] and score >= 5, points


# ----------------------------------------------------------------------------- model-based scores

def _batches(ids, batch_size):
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


@torch.no_grad()
def embed(model, tokenizer, texts, max_tokens=256, batch_size=32):
    """Mean-pooled final hidden states (len(texts), n_embd) float32 numpy: the input of the model's
    output head (after the final norm), averaged over each text's first max_tokens tokens. As phi-1
    used a code model's output embeddings (section 2.1); the model is any of models/ (the hook is
    on lm_head)."""
    model.eval()
    ids = [tokenizer.encode(t)[:max_tokens] or [0] for t in texts]
    captured = {}
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    out = np.zeros((len(texts), model.config.n_embd), dtype=np.float32)
    try:
        for batch in _batches(ids, batch_size):
            T = max(len(ids[i]) for i in batch)
            idx = torch.tensor([ids[i] + [0] * (T - len(ids[i])) for i in batch])
            mask = torch.tensor([[1.0] * len(ids[i]) + [0.0] * (T - len(ids[i])) for i in batch])
            model(idx)
            h = captured["h"].float()
            out[batch] = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    finally:
        handle.remove()
    return out


def cross_entropy_per_token(model, tokenizer, texts, max_tokens=256, batch_size=32):
    """Mean cross-entropy (nats per token) of each text's first max_tokens tokens after its first
    (numpy float64), through evaluation.loglikelihoods."""
    import evaluation
    model.eval()
    pairs = []
    for t in texts:
        ids = tokenizer.encode(t)[:max_tokens]
        ids = ids if len(ids) >= 2 else ids + tokenizer.encode("\n") * (2 - len(ids))
        pairs.append((ids[:1], ids[1:]))
    scores = evaluation.loglikelihoods(model, pairs, batch_size=batch_size, reuse_context=False)
    return np.array([-s / len(c) for s, (_, c) in zip(scores, pairs)])


def fit_logistic(x, y, l2=1e-3, steps=200):
    """Logistic regression p(good | x) = sigmoid(w . z + b) on standardized features z, fitted by
    L-BFGS in float64 (torch) with an L2 penalty l2 |w|^2. x (N, D), y (N,) 0/1. Returns a function
    x -> probabilities (numpy)."""
    X = torch.tensor(x, dtype=torch.float64)
    mu, sd = X.mean(0), X.std(0) + 1e-8
    Z, Y = (X - mu) / sd, torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, Y) + l2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda q: torch.sigmoid(((torch.tensor(q, dtype=torch.float64) - mu) / sd) @ w + b).numpy()


# ----------------------------------------------------------------------------- mixing and the manifest

def mix(sources, total_chars, seed=0, sep="\n\n"):
    """A corpus of about total_chars characters from weighted sources: {name: (texts, weight)};
    each source gives weight / sum(weights) of the characters, its texts shuffled and repeated
    (epochs) as needed, and the chosen texts of all sources are shuffled together. Returns (the
    text, {name: {"texts", "chars", "epochs"}})."""
    rng = np.random.default_rng(seed)
    total_w = sum(w for _, w in sources.values())
    if total_w <= 0:
        raise ValueError("mix: the weights sum to zero")
    chosen, stats = [], {}
    for name, (texts, weight) in sources.items():
        if weight <= 0:
            continue
        if not texts:
            raise ValueError(f"mix: source {name!r} is empty")
        want, got, n = total_chars * weight / total_w, 0, 0
        while got < want:
            for i in rng.permutation(len(texts)):
                if got >= want:
                    break
                chosen.append(texts[i])
                got += len(texts[i]) + len(sep)
                n += 1
        size = sum(len(t) + len(sep) for t in texts)
        stats[name] = {"texts": n, "chars": got, "epochs": round(got / size, 3)}
    order = rng.permutation(len(chosen))
    return sep.join(chosen[i] for i in order), stats


class Manifest:
    """The dataset's record: one entry per step (what came in, what went out, characters, what
    was dropped and why, a few examples of the dropped), plus named figures. Saved as JSON."""

    def __init__(self):
        self.steps, self.figures = [], {}

    def step(self, name, units_in, units_out, dropped=None, examples=None, note=""):
        chars = lambda us: sum(len(u.text) if isinstance(u, Unit) else len(u) for u in us)  # noqa: E731
        entry = {"step": name, "in": len(units_in), "out": len(units_out), "chars_in": chars(units_in),
                 "chars_out": chars(units_out), "dropped": dict(sorted((dropped or {}).items())),
                 "examples_dropped": list(examples or [])[:5]}
        if note:
            entry["note"] = note
        self.steps.append(entry)
        return entry

    def save(self, path):
        obj = {"steps": self.steps, **self.figures}
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))
