"""Issue 12, cases 5 and 6: a Hugging Face tokenizer.json is reproduced exactly or refused.
5: a byte-level BPE whose merges tiktoken's rank rule cannot reproduce is refused, naming the token;
   BPEs trained by tokenizers' BpeTrainer are still accepted and give the same ids.
6: the post-processor's special tokens around one sequence (Llama 3's BOS) are added as tokenizers
   and transformers add them: in encode (add_special_tokens=True by default), in sample.py prompts
   (few-shot ones too) and around each document of a fine-tuning corpus.
References: tokenizers (Tokenizer.encode) and transformers (AutoTokenizer, LlamaForCausalLM.generate),
every parameter random. Run from the repository root: python -m pytest tests_new/test_tokenizer_exact.py
"""
import contextlib
import functools
import io
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
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import models as tk_models  # noqa: E402

import data  # noqa: E402
import generation  # noqa: E402
import sample  # noqa: E402
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


def random_text(rng, n_words, alphabet, n_stems=40):
    """Words of random letters (Zipf-like repeats, so that long tokens form), spaces, newlines, digits."""
    stems = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(n_stems)]
    words = [stems[min(int(rng.paretovariate(1.0)) - 1, n_stems - 1)] + rng.choice(["", "", "s", "ing", "é"])
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


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_tiktoken_bpes_converted_by_transformers_are_accepted_and_exact(tmp_path, ignore_merges):
    """Llama 3's tokenizer.json was converted from tiktoken by transformers' TikTokenConverter: every
    split of a token into two tokens is a merge, so a token has several. Such a file (from a BPE
    trained here) is accepted and gives the ids of tokenizers."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    rng = random.Random(5)
    ranks = tokenization.train_bpe(random_text(rng, 20000, "abcdefgh", n_stems=400), 1500)
    tokenization.write_tiktoken_file(ranks, tmp_path / "t.tiktoken")
    converter = TikTokenConverter(vocab_file=str(tmp_path / "t.tiktoken"), pattern=LLAMA3_SPLIT)
    spec = json.loads(converter.converted().to_str())
    made = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert len(made) > 1.3 * (len(spec["model"]["vocab"]) - 256)  # several merges per token
    spec["model"]["ignore_merges"] = ignore_merges
    folder = write(tmp_path / "t", spec)
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = tokenization.hf_tokenizer(folder)
    for _ in range(20):
        text = random_text(rng, 200, "abcdefghq", n_stems=400)
        assert tok.encode(text) == ref.encode(text).ids


# ----------------------------------------------------------------------------- case 6: the post-processor

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<s>", "</s>"]
TEXT = "Hello world, it's a test: 12 345 <|end_of_text|> and more\n\nwords"


@pytest.fixture(scope="module")
def base_tokenizer():
    """A Llama-3 style byte-level BPE (Split + ByteLevel) trained here, without a post-processor."""
    rng = random.Random(1)
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return train_bpe_with_tokenizers([random_text(rng, 2000, "abcdefghij") + TEXT * 5], 400, pre, SPECIALS)


def with_post_processor(base, name):
    """A copy of base with one of the post-processors Hugging Face checkpoints ship."""
    ref = Tokenizer.from_str(base.to_str())
    ids = {t: ref.token_to_id(t) for t in SPECIALS}
    bos = ("<|begin_of_text|>", ids["<|begin_of_text|>"])
    eos = ("<|end_of_text|>", ids["<|end_of_text|>"])
    llama3 = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                           pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1", special_tokens=[bos])
    ref.post_processor = {
        "none": None,
        "byte_level": processors.ByteLevel(trim_offsets=False),
        "bos": llama3,
        # Llama 3's: ByteLevel (offsets only), then the BOS template
        "llama3": processors.Sequence([processors.ByteLevel(trim_offsets=False), llama3]),
        "bos_eos": processors.TemplateProcessing(single="<|begin_of_text|> $A <|end_of_text|>",
                                                 special_tokens=[bos, eos]),
        "eos": processors.TemplateProcessing(single="$A:0 <|end_of_text|>:0", special_tokens=[eos]),
        "plain": processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[]),
        "roberta": processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"])),
        "bert": processors.BertProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"])),
        "roberta_then_byte_level": processors.Sequence([processors.RobertaProcessing(("</s>", ids["</s>"]),
                                                                                     ("<s>", ids["<s>"])),
                                                        processors.ByteLevel()]),
    }[name]
    return ref


POST_PROCESSORS = ["none", "byte_level", "bos", "llama3", "bos_eos", "eos", "plain", "roberta", "bert",
                   "roberta_then_byte_level"]


@pytest.mark.parametrize("name", POST_PROCESSORS)
def test_encode_adds_the_post_processors_special_tokens_as_tokenizers_does(base_tokenizer, tmp_path, name):
    """encode(text) is tokenizers' Tokenizer.encode(text).ids (add_special_tokens=True by default);
    add_special_tokens=False leaves them out. Before: never added ("llama3": no BOS)."""
    ref = with_post_processor(base_tokenizer, name)
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = tokenization.hf_tokenizer(tmp_path)
    for text in [TEXT, "", " ", "a", "<|end_of_text|>"]:
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
    folder = write(tmp_path / "t", spec)
    with pytest.raises(ValueError, match=message) as err:
        tokenization.hf_tokenizer(folder)
    assert str(err.value).startswith(str(folder / "tokenizer.json") + ": ") and "\n" not in str(err.value)


def test_every_tokenizer_takes_add_special_tokens_and_has_a_template(tmp_path):
    """The shared signature: char and bpe:N tokenizers add nothing either way."""
    char = tokenization.CharTokenizer("abc ")
    tokenization.write_tiktoken_file(tokenization.train_bpe(TEXT * 4, 300), tmp_path / "t.tiktoken")
    bpe = tokenization.bpe_tokenizer(tmp_path / "t.tiktoken", "bpe:300")
    for tok, text in [(char, "a cab"), (bpe, TEXT)]:
        assert tok.template == ((), ())
        ids = tok.encode(text)
        assert ids == tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=False)


def test_a_corpus_gets_the_special_tokens_around_each_document(base_tokenizer, tmp_path):
    """Fine-tuning data: each file is one document in the template ([BOS] file [EOS] here), as
    tokenizers encodes each; without a template the joined text is tokenized as before. The cache
    made without the template is not reused."""
    docs = ["First document.\nTwo lines.", "Second, <|end_of_text|> inside.", "Third"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, d in enumerate(docs):
        (corpus / f"{i}.txt").write_text("\n" + d + "\n")
    keys = set()
    for name in ["bos_eos", "llama3", "none"]:
        ref = with_post_processor(base_tokenizer, name)
        (tmp_path / name).mkdir()
        ref.save(str(tmp_path / name / "tokenizer.json"))
        tok = tokenization.hf_tokenizer(tmp_path / name)
        ds = data.prepare(corpus, tok, tmp_path / "d", quiet=True)
        got = ds.tokens("train").tolist() + ds.tokens("val").tolist()
        if name == "none":
            assert got == ref.encode("\n\n".join(docs)).ids
        else:
            assert got == [i for d in docs for i in ref.encode(d).ids]
            assert got[0] == ref.token_to_id("<|begin_of_text|>")
        keys.add(tok.key())
    assert len(keys) == 3


# ----------------------------------------------------------------------------- sample.py against transformers

def tiny_llama(vocab_size, seed=1):
    """transformers' LlamaForCausalLM, 2 layers, width 32, every parameter random; no bos/eos ids
    in its config, so generation never stops early."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def run_sample(monkeypatch, *argv):
    """sample.py's output (its stream() writes to the sys.stdout it was imported with: given here)."""
    out = io.StringIO()
    monkeypatch.setattr(sample, "stream", functools.partial(generation.stream, out=out))
    with contextlib.redirect_stdout(out):
        assert sample.main([*argv, "--device", "cpu", "--dtype", "float32", "--attn", "naive"]) == 0
    return out.getvalue()


def test_sample_greedy_equals_transformers_generate_with_llama3_bos(base_tokenizer, tmp_path, monkeypatch):
    """A random tiny Llama saved with a Llama 3 tokenizer (BOS by its post-processor): sample.py's
    greedy text, plain and few-shot, is transformers' generate on tokenizer(prompt). Before: the
    prompt had no BOS and the text differed."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    hf_dir = tmp_path / "llama"
    ref = with_post_processor(base_tokenizer, "llama3")
    PreTrainedTokenizerFast(tokenizer_object=ref, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(hf_dir)
    model = tiny_llama(ref.get_vocab_size())  # every id a token, as real checkpoints have
    model.save_pretrained(hf_dir)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
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
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    ref = with_post_processor(base_tokenizer, name)
    PreTrainedTokenizerFast(tokenizer_object=ref, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(tmp_path)
    tok = tokenization.hf_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for cls in ["PreTrainedTokenizerFast", "GPT2Tokenizer"]:
        for flags in [{}, {"add_bos_token": True, "add_eos_token": True}, {"add_bos_token": False}]:
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | flags | {"tokenizer_class": cls}))
            assert AutoTokenizer.from_pretrained(tmp_path)(TEXT).input_ids == tok.encode(TEXT), (cls, flags)
