"""Issue 12, cases 5 and 6: a Hugging Face tokenizer.json is reproduced exactly or refused.
5: a byte-level BPE whose merges tiktoken's rank rule cannot reproduce is refused, naming the token;
   BPEs trained by tokenizers' BpeTrainer are still accepted and give the same ids.
6: the post-processor's special tokens around one sequence (Llama 3's BOS) are added as tokenizers
   and transformers add them: in encode (add_special_tokens=True by default), in sample.py prompts
   (few-shot ones too) and around each document of a fine-tuning corpus.
References: tokenizers (Tokenizer.encode) and transformers (AutoTokenizer, LlamaForCausalLM.generate),
every parameter random. Run from the repository root: python -m pytest tests_new/test_tokenizer_exact.py
"""
import itertools
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import tiktoken  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers  # noqa: E402
from tokenizers import models as tk_models  # noqa: E402

import tokenization  # noqa: E402

BYTE_OF = tokenization._byte_decoder()  # byte-level character -> byte
CHAR_OF = {b: c for c, b in BYTE_OF.items()}
GPT2_BYTE_IDS = {c: i for i, c in enumerate(BYTE_OF)}  # GPT-2's encoder.json order: "!" is 0, "a" is 64
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_spec(vocab, merges, ignore_merges=False, use_regex=True, post_processor=None, added=()):
    """A byte-level BPE tokenizer.json as a dict: vocab {byte-level string: id}, merges ["a b", ...]."""
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
            "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for c, i in added],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": use_regex},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}}


def write(folder, spec):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


def raw_tiktoken(spec):
    """tiktoken run on the vocabulary as it is (no checks): ranks are the ids, one piece per text."""
    ranks = {bytes(BYTE_OF[c] for c in tok): i for tok, i in spec["model"]["vocab"].items()}
    return tiktoken.Encoding(name="raw", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})


# ----------------------------------------------------------------------------- case 5: merges tiktoken cannot follow

@pytest.mark.parametrize("ignore_merges", [False, True])
def test_merges_that_tiktoken_cannot_reproduce_are_refused(tmp_path, ignore_merges):
    """Tokens ab (256), bc (257), abc (258) from merges `a b`, `b c`, `a bc`: Hugging Face never joins
    ab + c, tiktoken does (abc is a token of the next rank). Before: accepted, "abc" -> [258]."""
    vocab = GPT2_BYTE_IDS | {"ab": 256, "bc": 257, "abc": 258}
    spec = bpe_spec(vocab, ["a b", "b c", "a bc"], ignore_merges)
    folder = write(tmp_path / "t", spec)
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ref.encode("abcx").ids == [256, 66, 87]  # what the tokenizer gives ...
    assert raw_tiktoken(spec).encode_ordinary("abcx") == [258, 87]  # ... and what tiktoken would
    assert ref.encode("abc").ids == ([258] if ignore_merges else [256, 66])
    with pytest.raises(ValueError, match=r"token 'abc' \(id 258\).*joins b'ab' \+ b'c' last") as err:
        tokenization.hf_tokenizer(folder)
    assert str(err.value).startswith(str(folder / "tokenizer.json") + ": ") and "\n" not in str(err.value)


def random_bpe(rng, n_merges, alphabet="abc", max_len=5):
    """A hand-made byte-level BPE over a few letters: each merge joins two random tokens (old or
    new) into a token of at most max_len bytes; a concatenation already made gets a second merge
    when it is the newest token (ids still follow the merge order), else is skipped."""
    tokens, merges, vocab = list(alphabet), [], dict(GPT2_BYTE_IDS)
    for _ in range(20 * n_merges):
        if len(merges) == n_merges:
            break
        a, b = rng.choice(tokens), rng.choice(tokens)
        t = a + b
        if len(t) > max_len or f"{a} {b}" in merges:
            continue
        if t not in vocab:
            vocab[t] = len(vocab)
            tokens.append(t)
        elif vocab[t] != len(vocab) - 1:
            continue
        merges.append(f"{a} {b}")
    return vocab, merges


def all_strings(alphabet="abc", max_len=6):
    return ["".join(p) for n in range(1, max_len + 1) for p in itertools.product(alphabet, repeat=n)]


def test_hand_made_bpes_are_refused_exactly_when_tiktoken_would_differ(tmp_path):
    """Random BPEs over a, b, c (ignore_merges either way), every string up to 6 letters one piece:
    one that is accepted gives the ids of tokenizers on all of them; one that is refused has a
    string on which tiktoken's rule, run on its vocabulary, gives other ids than tokenizers."""
    rng, texts = random.Random(0), all_strings()
    seen = {"accepted": 0, "refused": 0}
    for n in range(60):
        vocab, merges = random_bpe(rng, rng.randint(3, 12))
        spec = bpe_spec(vocab, merges, ignore_merges=rng.random() < 0.5, use_regex=False)
        folder = write(tmp_path / str(n), spec)
        ref = [e.ids for e in Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(texts)]
        raw = list(map(raw_tiktoken(spec).encode_ordinary, texts))
        witness = next((t for t, r, w in zip(texts, ref, raw) if w != r), None)
        try:
            tok = tokenization.hf_tokenizer(folder)
        except ValueError as e:
            assert "\n" not in str(e) and ("token '" in str(e) or "merge order" in str(e)), e
            assert witness is not None, (merges, spec["model"]["ignore_merges"], str(e))
            seen["refused"] += 1
            continue
        assert witness is None, (merges, spec["model"]["ignore_merges"], witness)
        assert [tok.encode(t) for t in texts] == ref, merges
        seen["accepted"] += 1
    assert seen["accepted"] >= 15 and seen["refused"] >= 15, seen


def train_bpe_with_tokenizers(texts, vocab_size, pre, seed_specials=()):
    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer, tok.decoder = pre, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(seed_specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def random_text(rng, n_words, alphabet):
    """Words of random letters (Zipf-like repeats, so that long tokens form), spaces, newlines, digits."""
    stems = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(40)]
    words = [stems[min(int(rng.paretovariate(1.0)) - 1, 39)] + rng.choice(["", "", "s", "ing", "é"])
             for _ in range(n_words)]
    seps = [" ", " ", " ", "  ", "\n", ", ", ". ", " 12 ", "\t"]
    return "".join(w + rng.choice(seps) for w in words)


@pytest.mark.parametrize("seed", range(4))
def test_bpes_trained_by_tokenizers_are_accepted_and_exact(tmp_path, seed):
    """BpeTrainer's merges are what tiktoken's rule does: accepted, the same ids on fresh random text
    (GPT-2's pre-tokenizer and Llama 3's Split + ByteLevel, ignore_merges either way)."""
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "abcdefgh", "aeiou rst", "xyz日本"])
    pre = rng.choice([pre_tokenizers.ByteLevel(add_prefix_space=False),
                      pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])])
    ref = train_bpe_with_tokenizers([random_text(rng, 3000, alphabet)], rng.choice([300, 600, 1200]), pre)
    spec = json.loads(ref.to_str())
    spec["model"]["ignore_merges"] = bool(seed % 2)
    folder = write(tmp_path / "t", spec)
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = tokenization.hf_tokenizer(folder)
    assert max(len(t) for t in spec["model"]["vocab"]) >= 6  # long tokens were learned
    for _ in range(20):
        text = random_text(rng, 200, alphabet + "q")
        assert tok.encode(text) == ref.encode(text).ids
