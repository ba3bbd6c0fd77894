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

from omnitron.runtime import UserError, atomic_write

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


def fit_logistic(x, y, l2=1e-3, steps=200):
    """Logistic regression p(good | x) = sigmoid(w . z + b) on standardized features z, fitted by
    L-BFGS in float64 (torch) with an L2 penalty l2 |w|^2. x (N, D), y (N,) 0/1. Returns a function
    x -> probabilities (numpy)."""
    X = torch.tensor(x, dtype=torch.float64)
    mu, sd = X.mean(0), X.std(0) + 1e-8
    Z, Y = (X - mu) / sd, torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

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


# ----------------------------------------------------------------------------- the whole pipeline

@dataclass
class Curated:
    """What build() writes into its folder: the arms' corpora, the evaluation sets, the manifest."""
    folder: Path

    def path(self, name):
        return self.folder / name

    @property
    def manifest(self):
        return json.loads((self.folder / "manifest.json").read_text())


def _split_body(unit):
    """(signature + docstring, body) of a function whose docstring is followed by a body, else None."""
    try:
        fn = ast.parse(unit.text).body[0]
    except (SyntaxError, ValueError, IndexError):
        return None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(fn) is None or len(fn.body) < 2:
        return None
    lines = unit.text.splitlines(keepends=True)
    cut = fn.body[0].end_lineno
    return "".join(lines[:cut]), "".join(lines[cut:])


def build(folder, train_reference, embed_tokens=64, keep_fraction=0.3, n_label=3000, n_label_test=1000,
          held_out_fraction=0.1, eval_functions=200, eval_windows=200, window=192, body_chars=128,
          exercises_per_family=40, held_out_per_family=8, stdlib=None, seed=0, log=print):
    """The Phi recipe's data, offline, into `folder` (Curated): pool_A.txt (the train modules'
    files, unfiltered), filtered_B.txt (the kept functions), exercises_train.txt, and the
    evaluation sets heldout_functions.jsonl (signature + docstring -> body), heldout_code.jsonl
    (random windows of held-out files), heldout_exercises.jsonl (families never trained on),
    heldout_instances.jsonl (new drawings of the training families);
    manifest.json records every step.

    train_reference(corpus_path, name) -> (model, tokenizer) trains a reference model on a corpus
    (the caller's: bench.py trains a small phi.py). Two are trained: on the deduplicated pool
    (the classifier's embeddings, and Moore-Lewis' general side) and on REFERENCE_MODULES' functions
    (Moore-Lewis' in-domain side)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    man = Manifest()
    rng = np.random.default_rng(seed)
    sources, train_names, held_names = _pool(folder, man, stdlib, held_out_fraction, seed, log)
    units = _rubric_labelled_units(man, sources, train_names, log)
    _quality_filter(folder, man, units, train_reference, embed_tokens, keep_fraction, n_label, n_label_test, rng,
                    seed, log)
    held_ex, inst_ex = _exercises(folder, man, exercises_per_family, held_out_per_family, seed, log)
    _evaluation_sets(folder, man, sources, held_names, rng, eval_functions, eval_windows, window, body_chars)
    man.figures["eval_sets"].update(heldout_exercises=len(held_ex), heldout_instances=len(inst_ex))
    man.figures["units_sample"] = [{"key": u.key, **u.meta} for u in units[:: max(1, len(units) // 50)]]
    man.save(folder / "manifest.json")
    return Curated(folder)




def _pool(folder, man, stdlib, held_out_fraction, seed, log):
    """build's first step: the standard library's modules split into train and held-out packages; the train
    modules' files as they are are arm A's pool_A.txt. Returns (sources by module, train names, held-out names)."""
    files = stdlib_files(stdlib)
    train_names, held_names = split_modules(files, held_out_fraction, seed)
    sources = {n: normalize(files[n].read_text(encoding="utf-8", errors="replace")) for n in files}
    log(f"pool: {len(files)} modules of {stdlib or sysconfig.get_paths()['stdlib']}, {sum(map(len, sources.values())):,} "
        f"characters; {len(train_names)} train / {len(held_names)} held-out modules", flush=True)
    man.figures["split"] = {"train_modules": len(train_names), "held_out_modules": len(held_names),
                            "held_out_packages": sorted({n.split(".")[0] for n in held_names}),
                            "train_chars": sum(len(sources[n]) for n in train_names),
                            "held_out_chars": sum(len(sources[n]) for n in held_names)}
    pool_a = "\n\n".join(sources[n].strip("\n") for n in train_names)
    atomic_write(folder / "pool_A.txt", lambda tmp: Path(tmp).write_text(pool_a))
    man.step("pool (arm A: the train modules' files, as they are)", [sources[n] for n in train_names],
             [sources[n] for n in train_names])

    return sources, train_names, held_names


def _rubric_labelled_units(man, sources, train_names, log):
    """The train modules' functions, deduplicated (exact and MinHash), each scored by the rubric."""
    units, unparsed = [], []
    for n in train_names:
        got = functions(sources[n], n)
        units += got
        if not got:
            unparsed.append(n)
    man.step("functions of the train modules (top-level and methods, dedented)", [sources[n] for n in train_names],
             units, {"modules without functions or not parsed": len(unparsed)}, unparsed)
    kept, dropped = dedup([u.text for u in units])
    reasons = {"exact duplicate": sum(d[0] == "exact" for d in dropped.values()),
               "near duplicate (MinHash Jaccard >= 0.8)": sum(d[0] == "near" for d in dropped.values())}
    examples = [f"{units[i].key} ~ {units[d[1]].key}" for i, d in list(dropped.items())[:5]]
    man.step("dedup", units, [units[i] for i in kept], reasons, examples)
    units = [units[i] for i in kept]
    log(f"{len(units):,} functions after dedup ({len(dropped):,} dropped)", flush=True)
    for u in units:
        score, label, points = rubric(u.text, u.module)
        u.meta.update(score=score, label=label)
    labels = np.array([u.meta["label"] for u in units])
    man.figures["rubric"] = {"good": int(labels.sum()), "units": len(units),
                             "points_rate": {p: round(float(np.mean([rubric(u.text, u.module)[2][p] for u in
                                                                     units[:5000]])), 3) for p in RUBRIC_POINTS}}

    return units


def _quality_filter(folder, man, units, train_reference, embed_tokens, keep_fraction, n_label, n_label_test, rng,
                    seed, log):
    """Arm B's filtered_B.txt: the two reference models trained (train_reference), the classifier fitted on
    rubric labels over the pool model's embeddings, the top keep_fraction kept; Moore-Lewis and the rubric
    score reported beside it as other selectors."""
    labels = np.array([u.meta["label"] for u in units])
    ref_pool = folder / "ref_pool.txt"
    atomic_write(ref_pool, lambda tmp: Path(tmp).write_text("\n\n".join(u.text for u in units)))
    domain = [u for u in units if u.module.split(".")[0] in REFERENCE_MODULES]
    ref_domain = folder / "ref_domain.txt"
    atomic_write(ref_domain, lambda tmp: Path(tmp).write_text("\n\n".join(u.text for u in domain)))
    log(f"reference models: pool ({ref_pool.stat().st_size:,} chars), in-domain ({len(domain)} functions of "
        f"{len(REFERENCE_MODULES)} hand-picked modules, {ref_domain.stat().st_size:,} chars)", flush=True)
    general, tok = train_reference(ref_pool, "ref_pool")
    indomain, _ = train_reference(ref_domain, "ref_domain")
    texts = [u.text for u in units]
    log(f"embedding {len(texts):,} functions (first {embed_tokens} tokens) with both reference models", flush=True)
    emb, ce_pool = features(general, tok, texts, embed_tokens)
    _, ce_domain = features(indomain, tok, texts, embed_tokens)

    # the classifier on a few thousand rubric labels, applied to all
    order = rng.permutation(len(units))
    fit_idx, test_idx = order[:n_label], order[n_label:n_label + n_label_test]
    predict = fit_logistic(emb[fit_idx], labels[fit_idx].astype(float))
    prob = predict(emb)
    acc = float(np.mean((prob[test_idx] > 0.5) == labels[test_idx]))
    base = float(max(labels[test_idx].mean(), 1 - labels[test_idx].mean()))
    n_keep = int(round(keep_fraction * len(units)))
    chosen = np.argsort(-prob, kind="stable")[:n_keep]
    ml = ce_domain - ce_pool
    ml_chosen = np.argsort(ml, kind="stable")[:n_keep]
    rubric_chosen = np.argsort(-np.array([u.meta["score"] for u in units]), kind="stable")[:n_keep]
    man.figures["classifier"] = {
        "model": "logistic regression on the pool reference model's mean-pooled final hidden states",
        "labelled_fit": len(fit_idx), "labelled_test": len(test_idx), "held_out_accuracy": round(acc, 4),
        "majority_baseline": round(base, 4), "good_rate": round(float(labels.mean()), 4)}
    man.figures["selection_precision"] = {  # fraction of rubric-good among the kept, per selector
        "classifier": round(float(labels[chosen].mean()), 4), "moore_lewis": round(float(labels[ml_chosen].mean()), 4),
        "random": round(float(labels.mean()), 4), "rubric_score": round(float(labels[rubric_chosen].mean()), 4),
        "classifier_moore_lewis_overlap": round(len(set(chosen) & set(ml_chosen)) / max(1, n_keep), 4)}
    for i, u in enumerate(units):
        u.meta.update(prob=round(float(prob[i]), 4), moore_lewis=round(float(ml[i]), 4))
    keep_set = set(chosen.tolist())
    filtered = [units[i] for i in sorted(keep_set)]
    drop_examples = [units[i].key for i in np.argsort(prob)[:5]]
    man.step(f"quality filter (arm B): the top {keep_fraction:.0%} by the classifier's probability", units, filtered,
             {"below the classifier's cut": len(units) - len(filtered)}, drop_examples,
             note=f"classifier held-out accuracy {acc:.3f} (majority baseline {base:.3f})")
    corpus_b, mixed = mix({"filtered": ([u.text for u in filtered], 1.0)}, sum(len(u.text) + 2 for u in filtered), seed)
    atomic_write(folder / "filtered_B.txt", lambda tmp: Path(tmp).write_text(corpus_b))
    man.figures["mix_B"] = mixed
    log(f"classifier held-out accuracy {acc:.3f} (majority {base:.3f}); kept {len(filtered):,} functions, "
        f"{len(corpus_b):,} chars", flush=True)



def _exercises(folder, man, exercises_per_family, held_out_per_family, seed, log):
    """The templated exercises verified in the sandbox: exercises_train.txt, heldout_exercises.jsonl
    (families never trained on) and heldout_instances.jsonl (new drawings of the training families).
    Returns (held-out exercises, new instances)."""
    from experiments.phi import exercises as ex_mod
    train_ex = ex_mod.generate(exercises_per_family, seed, held_out=False)
    kept_ex, rejected = ex_mod.verify(train_ex)
    man.step("synthetic exercises (templated), verified in the sandbox", [e.text for e in train_ex],
             [e.text for e in kept_ex], {"failed its tests": len(rejected)}, [e.name for e, _, _ in rejected])
    atomic_write(folder / "exercises_train.txt", lambda tmp: Path(tmp).write_text("\n\n".join(e.text for e in kept_ex)))
    held_ex, rejected_h = ex_mod.verify(ex_mod.generate(held_out_per_family, seed + 1, held_out=True))
    man.step("held-out exercises (families never trained on), verified", [e.text for e in held_ex] +
             [e.text for e, _, _ in rejected_h], [e.text for e in held_ex], {"failed its tests": len(rejected_h)})
    ex_mod.save_jsonl(held_ex, folder / "heldout_exercises.jsonl")
    # new drawings of the training families (texts not in the training set): does the fine-tune generalize
    # within a family, even where it cannot across families?
    seen_texts, per = {e.text for e in train_ex}, {}
    for e in ex_mod.generate(held_out_per_family * 4, seed + 2, held_out=False):
        if e.text not in seen_texts and len(per.setdefault(e.family, [])) < held_out_per_family // 2:
            per[e.family].append(e)
    inst_ex, rejected_i = ex_mod.verify([e for group in per.values() for e in group])
    man.step("new instances of the training families (texts not trained on), verified", [e.text for e in inst_ex] +
             [e.text for e, _, _ in rejected_i], [e.text for e in inst_ex], {"failed its tests": len(rejected_i)})
    ex_mod.save_jsonl(inst_ex, folder / "heldout_instances.jsonl")
    log(f"exercises: {len(kept_ex)} train ({len(ex_mod.FAMILIES) - len({e.family for e in held_ex})} families), "
        f"{len(held_ex)} held-out ({len({e.family for e in held_ex})} families)", flush=True)

    return held_ex, inst_ex


def _evaluation_sets(folder, man, sources, held_names, rng, eval_functions, eval_windows, window, body_chars):
    """heldout_functions.jsonl (signature + docstring -> body) and heldout_code.jsonl (random windows) from the
    held-out modules."""
    held_units = [u for n in held_names for u in functions(sources[n], n)]
    pairs = [p for p in map(_split_body, held_units) if p and len(p[1].strip()) >= 20]
    pick = rng.permutation(len(pairs))[:eval_functions]
    rows = [{"prompt": pairs[i][0], "body": pairs[i][1][:body_chars]} for i in sorted(pick)]
    atomic_write(folder / "heldout_functions.jsonl",
                 lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    held_text = "\n\n".join(sources[n] for n in held_names)
    starts = rng.integers(0, len(held_text) - window - 1, eval_windows)
    windows = [{"text": held_text[s:s + window]} for s in sorted(starts)]
    atomic_write(folder / "heldout_code.jsonl",
                 lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in windows)))
    man.figures["eval_sets"] = {"heldout_functions": len(rows), "heldout_functions_available": len(pairs),
                                "heldout_code_windows": len(windows), "window_chars": window}


@torch.no_grad()
def features(model, tokenizer, texts, max_tokens=64, batch_size=64):
    """For each text's first max_tokens tokens, in one forward: the mean-pooled final hidden state
    (the input of lm_head, after the final norm; phi-1 used a code model's output embeddings,
    section 2.1), (N, n_embd) float32, and the mean cross-entropy of its tokens after the first
    (nats per token), (N,) float64. Any model of models/ (the hook is on lm_head)."""
    model.eval()
    ids = [tokenizer.encode(t)[:max_tokens] for t in texts]
    ids = [i if len(i) >= 2 else i + tokenizer.encode("\n") * (2 - len(i)) for i in ids]
    captured = {}
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    emb = np.zeros((len(texts), model.config.n_embd), dtype=np.float32)
    ce = np.zeros(len(texts), dtype=np.float64)
    try:
        for batch in _batches(ids, batch_size):
            T = max(len(ids[i]) for i in batch)
            idx = torch.tensor([ids[i] + [0] * (T - len(ids[i])) for i in batch])
            mask = torch.tensor([[1.0] * len(ids[i]) + [0.0] * (T - len(ids[i])) for i in batch])
            logits = model(idx)[0].float()
            h = captured["h"].float()
            emb[batch] = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")
            m = mask[:, 1:]
            ce[batch] = ((nll * m).sum(1) / m.sum(1)).double().numpy()
    finally:
        handle.remove()
    return emb, ce
