"""Tokenizers: text <-> token ids, and the files that save them beside a model.

Shared by data.py (tokenizing corpora), train.py, sample.py and bench.py. Every tokenizer has
`encode(text, add_special_tokens=True) -> list of ids` (transformers' argument: the special tokens
that the tokenizer puts around one sequence, `template`, e.g. Llama 3's BOS; only a Hugging Face
tokenizer.json has any), `decode(ids) -> text`, `vocab_size`, `spec` (what `--tokenizer` names it),
`template` ((ids before, ids after) the text), `prefix_token` (the id that an empty context is
conditioned on: BOS, else EOS, as lm-evaluation-harness's prefix_token_id; None when the tokenizer's
files name neither), `eos_token` (the end-of-sequence id that DPO appends to a response; None
when the files name none), `key()` (a name for its tokenized caches) and
`save(directory)` (tokenizer_omnitron.json, plus the file of merges it needs).

Tokenizers (`--tokenizer`):
  char                  one token per character of the corpus (default for small runs)
  bpe:N                 byte-level BPE of N tokens trained here on the corpus, GPT-4 split pattern,
                        saved as a .tiktoken file and run through tiktoken.Encoding
  gpt2 | cl100k_base | o200k_base
                        OpenAI's encodings through tiktoken (offline: put their files in
                        <data_dir>/tiktoken/)
A model directory's Hugging Face tokenizer.json (a byte-level BPE) is read by hf_tokenizer.
"""
import base64
import functools
import hashlib
import heapq
import json
import os
import re
import shutil
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from omnitron.runtime import UserError, atomic_write, read_json

# The data folder: corpora and their tokenized caches (data.py), and tiktoken's files (tiktoken/).
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# The split pattern of OpenAI's cl100k_base (GPT-4): contractions, words, 1-3 digit numbers,
# punctuation runs, newlines and spaces.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# GPT-2's split pattern: Hugging Face's ByteLevel pre-tokenizer with use_regex=true.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Files that tiktoken's named encodings need, with the address tiktoken fetches them from.
TIKTOKEN_FILES = {
    "gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
    "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
    "o200k_base": ["https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"],
}



class CharTokenizer:
    """One id per distinct character of the corpus, in sorted order."""

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.spec = "char"
        self.template = ((), ())
        self.prefix_token = self.eos_token = None  # no BOS or EOS in a character vocabulary

    def encode(self, text, add_special_tokens=True):
        """Ids of text's characters (no special tokens: the argument is the shared signature's)."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in this model's character vocabulary")

    def decode(self, ids):
        """The text of ids; an id it does not have decodes to '' (as tokenizers' decode skips it)."""
        return "".join(self.chars[i] for i in ids if i in self.known_ids)

    @property
    def known_ids(self):
        """The ids it has: 0 to vocab_size - 1."""
        return range(self.vocab_size)

    def key(self):
        return "char-" + hashlib.sha1(self.chars.encode()).hexdigest()[:8]

    def save(self, directory):
        _write_json(Path(directory) / "tokenizer_omnitron.json", {"type": "char", "chars": self.chars})


class TiktokenTokenizer:
    """A tiktoken.Encoding: a BPE trained here (`bpe:N`), one of OpenAI's named encodings, or a
    Hugging Face byte-level BPE (`hf:tokenizer.json`, see hf_tokenizer). Special tokens are found
    first, the longest one at the leftmost place, as Hugging Face finds added tokens (tiktoken's
    own pick among overlapping ones, e.g. runs of spaces, is arbitrary); the text between them is
    Unicode-normalized (`normalizer`: None or a form such as "NFC") and BPE-encoded. `template`:
    (ids before, ids after) the text that encode adds by default, a tokenizer.json post-processor's.
    `prefix_token`: BOS, else EOS, and `eos_token`: EOS, as the tokenizer's files name them (None: not named)."""

    def __init__(self, encoding, spec, ranks_file=None, normalizer=None, template=((), ()), prefix_token=None,
                 eos_token=None):
        self.enc, self.spec, self.ranks_file, self.normalizer = encoding, spec, ranks_file, normalizer
        self.template = tuple(tuple(ids) for ids in template)
        self.prefix_token, self.eos_token = prefix_token, eos_token
        self.vocab_size = encoding.n_vocab
        specials = sorted(encoding.special_tokens_set, key=len, reverse=True)
        self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def encode(self, text, add_special_tokens=True):
        """Token ids of text; with add_special_tokens (the default, as transformers' tokenizer(text)
        and tokenizers' Tokenizer.encode), the template's ids around them (Llama 3: BOS first)."""
        ids = list(self.template[0]) if add_special_tokens else []
        for i, part in enumerate(self._specials.split(text) if self._specials else [text]):
            if i % 2:  # split() puts the special tokens at odd places
                ids.append(self.enc._special_tokens[part])
            elif part:
                ids += self.enc.encode_ordinary(unicodedata.normalize(self.normalizer, part) if self.normalizer
                                                else part)
        return ids + list(self.template[1]) if add_special_tokens else ids

    def decode(self, ids):
        """The text of ids (bytes that are not UTF-8 become U+FFFD); an id it does not have (at or
        past vocab_size, or in a gap between ids) decodes to '', as tokenizers' decode skips it."""
        return self.enc.decode([i for i in ids if i in self.known_ids])

    @functools.cached_property
    def known_ids(self):
        """The ids it has: its BPE tokens' and its special tokens' (a set)."""
        return frozenset(self.enc._mergeable_ranks.values()) | frozenset(self.enc._special_tokens.values())

    def key(self):
        if not self.ranks_file:
            return self.spec
        key = self.spec.replace(":", "-") + "-" + hashlib.sha1(Path(self.ranks_file).read_bytes()).hexdigest()[:8]
        if any(self.template):  # documents are tokenized with it (data.py): not the caches made without
            key += "-template" + hashlib.sha1(repr(self.template).encode()).hexdigest()[:6]
        return key

    def save(self, directory):
        meta = {"type": "tiktoken", "spec": self.spec, "pat_str": self.enc._pat_str}
        if self.ranks_file:  # our BPE's tokenizer.tiktoken or Hugging Face's tokenizer.json goes with the model
            meta["ranks_file"] = Path(self.ranks_file).name
            dst = Path(directory) / meta["ranks_file"]
            if not (dst.exists() and dst.samefile(self.ranks_file)):  # resuming saves where it loaded from
                atomic_write(dst, lambda tmp: shutil.copyfile(self.ranks_file, tmp))
            config = Path(self.ranks_file).parent / "tokenizer_config.json"  # its BOS / EOS (prefix_token)
            dst = Path(directory) / config.name
            if self.spec.startswith("hf:") and config.is_file() and not (dst.exists() and dst.samefile(config)):
                atomic_write(dst, lambda tmp: shutil.copyfile(config, tmp))
        _write_json(Path(directory) / "tokenizer_omnitron.json", meta)


def train_bpe(text, vocab_size, pat_str=GPT4_SPLIT_PATTERN):
    """Byte-level BPE: split text into chunks with the pattern, start from the 256 bytes and merge
    the most frequent adjacent pair until there are vocab_size tokens. Returns tiktoken's
    mergeable ranks {token bytes: id}. Pair counts are updated incrementally (only the chunks
    that contain the merged pair are touched) and the best pair comes from a lazy max-heap."""
    import regex  # a dependency of tiktoken

    if vocab_size < 257:
        raise UserError("bpe:N needs N >= 257 (256 byte tokens plus at least one merge)")
    chunk_counts = Counter(regex.findall(pat_str, text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    pair_count, where = defaultdict(int), defaultdict(set)
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[wi]
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg == 0:
            continue  # stale heap entry
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ranks.get(merged)
        if new_id is None:
            new_id = ranks[merged] = len(vocab)
            vocab.append(merged)
        changed = set()
        for wi in where.pop(pair):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                changed.add(p)
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_count[p] += f
                where[p].add(wi)
                changed.add(p)
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]
    return ranks


def write_tiktoken_file(ranks, path):
    """tiktoken's own file format: one `base64(token) rank` line per token."""
    lines = (f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(("\n".join(lines) + "\n").encode()))


def read_tiktoken_file(path):
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def bpe_tokenizer(ranks_file, spec, pat_str=GPT4_SPLIT_PATTERN):
    import tiktoken
    enc = tiktoken.Encoding(name=spec.replace(":", "_"), pat_str=pat_str,
                            mergeable_ranks=read_tiktoken_file(ranks_file), special_tokens={})
    return TiktokenTokenizer(enc, spec, ranks_file)


def _byte_decoder():
    """GPT-2's bytes_to_unicode, inverted: byte-level BPE vocabularies write each printable Latin-1
    byte as its own character and the n-th other byte (controls, space, ...) as chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _hf_ranks(model, added):
    """tiktoken's mergeable ranks {token bytes: id} from a byte-level BPE's vocab and merges, when
    tiktoken gives exactly the ids that Hugging Face's BPE gives; else ValueError naming the first
    token (or merge) at fault.

    Hugging Face merges the adjacent pair of lowest rank among the listed merges (leftmost first);
    tiktoken merges the adjacent pair whose concatenation is a token of lowest id (leftmost first),
    listed or not, and returns a whole piece that is a token as that one token (what Hugging Face
    does with `ignore_merges`). The two agree on every text when
      1. every token longer than a byte comes from a merge, and the ids of merged tokens never
         decrease along the merge list (several merges may make one token, as in Llama 3's), and
      2. tiktoken's rule, applied to each token's own bytes (`_tiktoken_last_pair`), makes that
         token by joining last a pair that is one of its listed merges, or never makes it; the
         latter only with `ignore_merges` (such a token comes only from a whole piece: tiktoken
         always returns it, Hugging Face only then).
    (Inside any text, the bytes of a token that tiktoken forms go through the same merges as the
    token alone, so by 2 every pair tiktoken joins is a listed merge and the only one tiktoken can
    form for its token; by 1 the lowest id is then the lowest merge rank: both rules join the same
    pairs.) A vocabulary that breaks either is refused, not approximated: e.g. merges `a b`, `b c`,
    `a bc` with tokens ab < bc < abc, where Hugging Face encodes "abcx" as ab + c + x and tiktoken
    as abc + x."""
    if model.get("type") != "BPE":
        raise ValueError(f"model type {model.get('type')} is not supported, only byte-level BPE")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("BPE dropout, continuing_subword_prefix and end_of_word_suffix are not supported")
    vocab, byte_of = {tok: i for tok, i in model["vocab"].items() if tok not in added}, _byte_decoder()
    if bad := next((tok for tok in vocab if not set(tok) <= byte_of.keys()), None):
        raise ValueError(f"token {bad!r} is not written in the GPT-2 byte alphabet: not a byte-level BPE")
    as_bytes = {tok: bytes(byte_of[c] for c in tok) for tok in vocab}
    ranks = {as_bytes[tok]: i for tok, i in vocab.items()}
    if sum(len(tok) == 1 for tok in vocab) != 256:
        raise ValueError("the vocabulary lacks some of the 256 byte tokens: not a byte-level BPE")
    listed, last = set(), -1  # listed: the merges as pairs of token bytes
    for n, merge in enumerate(model["merges"]):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or not {pair[0], pair[1], pair[0] + pair[1]} <= vocab.keys():
            raise ValueError(f"merge {n} {merge!r} is not a pair of vocabulary tokens making another")
        tok = pair[0] + pair[1]
        if vocab[tok] < last:
            raise ValueError(f"merge {n} {merge!r} makes token id {vocab[tok]} after a merge made id {last}: "
                             "the ids do not follow the merge order, which tiktoken's ranks need")
        listed.add((as_bytes[pair[0]], as_bytes[pair[1]]))
        last = vocab[tok]
    made = {a + b for a, b in listed}
    if unmade := [tok for tok in vocab if len(tok) > 1 and as_bytes[tok] not in made]:
        raise ValueError(f"{len(unmade)} tokens (e.g. {unmade[0]!r}) come from no merge, tiktoken would make them")
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if len(tok) > 2:  # a two-byte token has one way to be made
            pair = _tiktoken_last_pair(as_bytes[tok], ranks)
            if pair is None and not model.get("ignore_merges"):
                raise ValueError(f"token {tok!r} (id {i}): tiktoken's rule cannot make it from its bytes "
                                 f"{as_bytes[tok]!r}, tiktoken returns it only for a whole piece, which "
                                 "Hugging Face does only with ignore_merges=true")
            if pair is not None and pair not in listed:
                raise ValueError(f"token {tok!r} (id {i}): tiktoken's rule on its bytes {as_bytes[tok]!r} joins "
                                 f"{pair[0]!r} + {pair[1]!r} last, which is not one of its merges: Hugging Face's "
                                 "merges give other ids than tiktoken would")
    return ranks


def _tiktoken_last_pair(piece, ranks):
    """The two parts tiktoken joins last when it byte-pair-encodes `piece` (bytes) on its own,
    without its whole-piece shortcut: the adjacent pair whose concatenation has the lowest rank is
    joined first, the leftmost among equals (tiktoken's _byte_pair_merge); None if it gets stuck
    with more than two parts. `piece` is at least 2 bytes."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    never = float("inf")
    pair_ranks = [ranks.get(piece[i:i + 2], never) for i in range(len(piece) - 1)]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best == never:
            return None
        i = pair_ranks.index(best)  # the leftmost
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], never)
        if i < len(parts) - 1:
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], never)
    return parts[0], parts[1]


def _hf_pattern(pre):
    """The pre-tokenizer as tiktoken's one split pattern: ByteLevel(use_regex=true) is GPT-2's pattern;
    Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)] (Llama 3, Qwen) is the Split regex."""
    *splits, last = (pre["pretokenizers"] if pre and pre.get("type") == "Sequence" else [pre]) or [None]
    if not last or last.get("type") != "ByteLevel":
        raise ValueError("the pre-tokenizer does not end in ByteLevel: not a byte-level BPE")
    if last.get("add_prefix_space", True):
        raise ValueError("ByteLevel add_prefix_space=true (a space put before the text) is not expressible in tiktoken")
    if any(s.get("type") != "Split" or s.get("behavior") != "Isolated" or s.get("invert")
           or "Regex" not in s["pattern"] for s in splits):
        raise ValueError(f"pre-tokenizer {splits} is not supported (only Split with a Regex, Isolated)")
    patterns = [s["pattern"]["Regex"] for s in splits]
    if last.get("use_regex", True):  # ByteLevel splits with GPT-2's pattern itself
        patterns.append(GPT2_SPLIT_PATTERN)
    if len(patterns) > 1:
        raise ValueError("the pre-tokenizer splits twice (Split, then ByteLevel use_regex=true); tiktoken splits once")
    if not patterns:
        return r"[\s\S]+"  # no split: the whole text is one piece
    # Hugging Face keeps the text between matches as pieces too; tiktoken would drop it
    return rf"(?:{patterns[0]})|(?:(?!{patterns[0]})[\s\S])+"


def _hf_template(post):
    """(ids before, ids after) the text: the special tokens that a tokenizer.json post-processor
    puts around one sequence when tokenizers encodes with add_special_tokens=True (the default, as
    transformers' tokenizer(text)). TemplateProcessing: its `single` template, which holds the
    sequence `$A` once (Llama 3: BOS, $A); RobertaProcessing, BertProcessing: cls, $A, sep;
    ByteLevel: no tokens (it only moves offsets); Sequence: each in turn (tokenizers runs at most
    one that adds tokens). Pair templates do not concern one sequence. Anything else: ValueError."""
    kind = post and post.get("type")
    if kind is None or kind == "ByteLevel":
        return (), ()
    if kind == "Sequence":
        parts = [_hf_template(p) for p in post["processors"]]
        adding = [p for p in parts if any(p)]
        if len(adding) > 1:
            raise ValueError("a Sequence post-processor in which several add special tokens is not supported "
                             "(tokenizers itself fails on it)")
        return adding[0] if adding else ((), ())
    if kind in ("RobertaProcessing", "BertProcessing"):
        return (post["cls"][1],), (post["sep"][1],)
    if kind != "TemplateProcessing":
        raise ValueError(f"post-processor {kind} is not supported (only TemplateProcessing, RobertaProcessing, "
                         "BertProcessing, ByteLevel and a Sequence of them)")
    single = post["single"]
    if [p.get("Sequence", {}).get("id") for p in single if "Sequence" in p] != ["A"]:
        raise ValueError(f"the post-processor's single template {single} does not hold the sequence $A once")
    at = next(i for i, p in enumerate(single) if "Sequence" in p)
    ids = [post["special_tokens"][p["SpecialToken"]["id"]]["ids"] for p in single if "SpecialToken" in p]
    return tuple(i for part in ids[:at] for i in part), tuple(i for part in ids[at:] for i in part)


def hf_tokenizer(directory):
    """A Hugging Face byte-level BPE (directory/tokenizer.json, as GPT-2, Llama 3, Qwen2/3 and Phi-2
    ship it) as a tiktoken.Encoding giving the same ids: vocab and merges become mergeable ranks,
    the pre-tokenizer the split pattern, added_tokens the special tokens (with their ids); an NFC
    normalizer is applied between special tokens; the post-processor's special tokens (Llama 3's
    BOS) go around the text, unless encode(..., add_special_tokens=False). tokenizer_config.json is
    read only for the prefix token (prefix_token_id). What tiktoken cannot reproduce exactly, or a
    BOS / EOS that the vocabulary lacks: ValueError naming it."""
    import tiktoken
    path = Path(directory) / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        normalizer = spec.get("normalizer") and spec["normalizer"]["type"]
        if normalizer not in (None, "NFC"):
            raise ValueError(f"normalizer {normalizer} is not supported (only none or NFC)")
        added = {t["content"]: t for t in spec["added_tokens"]}
        if bad := [c for c, t in added.items() if t.get("lstrip") or t.get("rstrip") or t.get("single_word")
                   or (normalizer and t.get("normalized"))]:
            raise ValueError(f"added token {bad[0]!r} has lstrip, rstrip, single_word or normalized=true "
                             "(with a normalizer), which tiktoken cannot express")
        ranks, pat_str = _hf_ranks(spec["model"], added), _hf_pattern(spec["pre_tokenizer"])
        specials = {c: t["id"] for c, t in added.items()}
        known = {*ranks.values(), *specials.values()}
        if len(known) != len(ranks) + len(specials):
            raise ValueError("token ids are not unique")
        template = _hf_template(spec.get("post_processor"))
        if bad := [i for part in template for i in part if i not in known]:
            raise ValueError(f"the post-processor adds token id {bad[0]}, which is not in the vocabulary")
        enc = tiktoken.Encoding(name="hf", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    bos, eos = _hf_bos_eos(Path(directory), specials, {v: k for k, v in ranks.items()})
    prefix = template[0][0] if len(template[0]) == 1 else bos if bos is not None else eos
    return TiktokenTokenizer(enc, "hf:tokenizer.json", path, normalizer, template, prefix, eos)


def _hf_bos_eos(directory, specials, id_to_bytes):
    """(BOS id, EOS id) of a Hugging Face directory, as transformers' bos_token_id and eos_token_id
    read them: tokenizer_config.json's bos_token and eos_token (a string or {"content": ...}; null,
    absent or no file: None), looked up among the added tokens, then the byte-level vocabulary.
    hf_tokenizer's prefix_token (lm-evaluation-harness's HFLM.prefix_token_id) is the one token
    that tokenizer.json's post-processor puts before the text (Llama 3's BOS), else BOS, else EOS.
    A named token that the vocabulary lacks, or a file that is not JSON: ValueError."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None, None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not JSON ({e})") from None
    by_text = {t.decode("utf-8", "replace"): i for i, t in id_to_bytes.items()} | specials
    ids = []
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None and token not in by_text:
            raise ValueError(f"{config_path}: {key} {token!r} is not in the vocabulary")
        ids.append(None if token is None else by_text[token])
    return tuple(ids)


def named_tiktoken(name, data_dir=DEFAULT_DATA_DIR):
    """OpenAI's encodings through tiktoken. Offline, tiktoken finds its files in its cache; we
    point that cache at <data_dir>/tiktoken/ and add the files the user put there under the
    names tiktoken looks for (sha1 of the address; tiktoken checks each file's hash)."""
    import tiktoken
    if name not in TIKTOKEN_FILES:
        raise UserError(f"unknown tokenizer {name!r}; use char, bpe:N, or one of {', '.join(TIKTOKEN_FILES)}")
    folder = Path(data_dir) / "tiktoken"
    cache = folder / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for url in TIKTOKEN_FILES[name]:
        local, cached = folder / url.rsplit("/", 1)[-1], cache / hashlib.sha1(url.encode()).hexdigest()
        if local.is_file() and not cached.is_file():
            shutil.copyfile(local, cached)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        enc = tiktoken.get_encoding(name)
        return TiktokenTokenizer(enc, name, prefix_token=enc.eot_token, eos_token=enc.eot_token)  # <|endoftext|>
    except Exception as e:
        files = ", ".join(TIKTOKEN_FILES[name])
        raise UserError(f"tokenizer {name!r} is not available offline ({type(e).__name__}); "
                        f"download {files} and put the file(s) in {folder}/") from None


def load_tokenizer(directory, data_dir=DEFAULT_DATA_DIR):
    """The tokenizer saved beside a model (tokenizer_omnitron.json), or None if there is none."""
    meta_path = Path(directory) / "tokenizer_omnitron.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    if meta["type"] == "char":
        return CharTokenizer(meta["chars"])
    if meta.get("spec", "").startswith("hf:"):
        return hf_tokenizer(directory)
    if meta.get("ranks_file"):
        return bpe_tokenizer(Path(directory) / meta["ranks_file"], meta["spec"], meta["pat_str"])
    return named_tiktoken(meta["spec"], data_dir)


def tokenizer_for_model(directory, vocab_size, data_dir=DEFAULT_DATA_DIR):
    """The tokenizer a model directory was trained with (tokenizer_omnitron.json), else its Hugging
    Face tokenizer.json; Hugging Face GPT-2 checkpoints that carry neither get tiktoken's gpt2 encoding."""
    tok = load_tokenizer(directory, data_dir)
    if tok is None and (Path(directory) / "tokenizer.json").is_file():
        tok = hf_tokenizer(directory)
    if tok is None and vocab_size == 50257:
        tok = named_tiktoken("gpt2", data_dir)
    if tok is None:
        raise UserError(f"no tokenizer in {directory} (tokenizer_omnitron.json or tokenizer.json)")
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer in {directory} has {tok.vocab_size} tokens, the model only {vocab_size}")
    return tok


def _write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_bytes((json.dumps(obj, indent=2) + "\n").encode()))
