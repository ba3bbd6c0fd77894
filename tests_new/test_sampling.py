"""Issue 12, cases 4, 7 and 8: sampling filters agree with transformers' warpers on ties and
boundaries (min-p added); no id the tokenizer cannot decode reaches the output; every error
reachable from a command line's input is one `error:` line and exit code 1.
References: transformers' logits processors and tokenizers' Tokenizer.decode (test-only packages).
Run from the repository root: python -m pytest tests_new/test_sampling.py
"""
import io
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import generation  # noqa: E402
import models  # noqa: E402
import sample  # noqa: E402
import tokenization  # noqa: E402
import train  # noqa: E402
from models import gpt, qwen  # noqa: E402

from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

INF = float("inf")


def randomize(model, seed=0, std=0.3):
    """Every parameter random (norms and biases included: unit norms and zero biases hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ----------------------------------------------------------------------------- case 4: the filters

def test_top_p_keeps_only_the_nucleus_at_an_exact_boundary():
    """Issue 12, case 4: probabilities exactly (0.5, 0.25, 0.25) at top_p 0.5: the nucleus is {0};
    (0.3, 0.1, 0.1, 0.5) at top_p 0.8: {0, 3}, as transformers keeps."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[math.log(2), 0., 0.]])
    assert {generation.sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(300)} == {0}
    logits = torch.tensor([[0.3, 0.1, 0.1, 0.5]]).log()
    assert {generation.sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {0, 3}
    assert torch.equal(TopPLogitsWarper(0.8)(None, logits).isfinite(), torch.tensor([[True, False, False, True]]))


def logit_sets(V=37):
    """(name, logits (B, V)): random at several scales, and adversarial: many ties (small integers,
    all equal, one hot), probabilities that are exact binary fractions (cumulative sums that land
    on a top_p exactly), and rows that earlier masking left with -inf entries."""
    g = torch.Generator().manual_seed(0)
    out = [(f"normal*{s}", torch.randn(16, V, generator=g) * s) for s in (0.1, 1.0, 8.0)]
    out.append(("ties", torch.randint(0, 4, (32, V), generator=g).float()))
    out.append(("all equal", torch.zeros(4, V)))
    out.append(("one hot", torch.zeros(4, V).index_fill_(1, torch.tensor([5]), 3.0)))
    dyadic = torch.tensor([[8, 4, 2, 1, 1] + [0] * (V - 5), [4, 4, 4, 2, 1, 1] + [0] * (V - 6),
                           [2] * 8 + [0] * (V - 8), [3, 1, 2, 1, 1] + [0] * (V - 5)], dtype=torch.float)
    out.append(("dyadic", (dyadic / dyadic.sum(-1, keepdim=True)).log()))  # -inf where 0
    out.append(("issue", torch.tensor([[math.log(2), 0., 0.] + [-INF] * (V - 3),
                                       [0.3, 0.1, 0.1, 0.5] + [0.0] * (V - 4)]).log().nan_to_num(nan=-INF)))
    masked = torch.randn(16, V, generator=g)
    masked[torch.rand(16, V, generator=g) < 0.5] = -INF
    masked[:, 0] = 1.0  # each row keeps something
    out.append(("masked", masked))
    return out


LOGITS = logit_sets()
TOP_PS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.875, 0.9, 0.95, 0.9375, 0.99, 1.0]
MIN_PS = [0.0, 0.01, 0.1, 0.125, 0.25, 0.5, 0.9, 1.0]
TOP_KS = [1, 2, 3, 5, 10, 36, 37, 50]
TEMPERATURES = [0.25, 0.5, 0.7, 1.0, 1.5, 2.0]


def reference(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """transformers' warpers as its generate() builds them for sampling (min_tokens_to_keep=1),
    on fp32 logits as generate() gives them."""
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        procs.append(MinPLogitsWarper(min_p))
    return procs(None, logits.float())


def assert_same_survivors(logits, **setting):
    ours, want = generation.filter_logits(logits, **setting), reference(logits, **setting)
    assert torch.equal(ours.isfinite(), want.isfinite()), (setting, (ours.isfinite() != want.isfinite()).nonzero())
    assert torch.equal(ours[want.isfinite()], want[want.isfinite()]), setting


@pytest.mark.parametrize("name,values", [("temperature", TEMPERATURES), ("top_k", TOP_KS), ("top_p", TOP_PS),
                                         ("min_p", MIN_PS)])
def test_each_filter_keeps_the_tokens_transformers_keeps(name, values):
    for _, logits in LOGITS:
        for value in values:
            assert_same_survivors(logits, **{name: value})


def test_filters_combined_keep_the_tokens_transformers_keeps():
    """temperature, then top-k, then top-p, then min-p, each on what the one before left."""
    g = torch.Generator().manual_seed(1)
    pick = lambda xs: xs[torch.randint(len(xs), (), generator=g)]  # noqa: E731
    for _ in range(50):
        setting = dict(temperature=pick(TEMPERATURES), top_k=pick(TOP_KS + [None]), top_p=pick(TOP_PS + [None]),
                       min_p=pick(MIN_PS + [None]))
        for _, logits in LOGITS:
            assert_same_survivors(logits, **setting)


def test_sampling_draws_only_the_survivors():
    """sample_next draws from filter_logits: every survivor appears, nothing else does."""
    g = torch.Generator().manual_seed(2)
    logits = torch.tensor([[2.0, 1.9, 0.5, -1.0, 1.0, 1.0]])
    for setting in (dict(min_p=0.4), dict(top_k=4), dict(top_p=0.7), dict(top_k=5, top_p=0.9, min_p=0.2),
                    dict(temperature=0.5, min_p=0.1)):
        survivors = set(generation.filter_logits(logits, **setting).isfinite().nonzero()[:, 1].tolist())
        temperature = setting.pop("temperature", 1.0)
        drawn = {generation.sample_next(logits, temperature, generator=g, **setting).item() for _ in range(400)}
        assert drawn == survivors, setting


@pytest.mark.parametrize("setting,message", [
    (dict(temperature=-1.0), "temperature must be >= 0"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k must be an integer >= 0"), (dict(top_p=1.5), "top_p must be between 0 and 1"),
    (dict(top_p=-0.1), "top_p"), (dict(min_p=2.0), "min_p must be between 0 and 1"),
])
def test_sampling_settings_out_of_range_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        generation.check_sampling(**setting)
    model = randomize(gpt.Model(gpt.Config(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))).eval()
    with pytest.raises(ValueError, match=message):
        next(generation.generate(model, torch.tensor([[1, 2]]), 2, **setting))


# ----------------------------------------------------------------------------- case 7: ids the tokenizer lacks

TOKENIZER_IDS, MODEL_VOCAB = 281, 320  # Qwen2.5: 151,665 ids, 151,936 rows


def bpe_tokenizer_json(vocab_size):
    """A byte-level BPE trained with tokenizers (as Hugging Face ships them), vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["ROMEO: the night is sweet, my love, and thou art fair. JULIET: O light!\n"] * 20,
                            trainer)
    assert tok.get_vocab_size() == vocab_size
    return tok


@pytest.fixture(scope="module")
def padded_vocab_dir(tmp_path_factory):
    """A random Qwen model of 320 vocabulary rows with a tokenizer.json of 281 ids, as a Hugging
    Face directory; the rows past 281 are made to dominate (3x rows 0..38), so that an unmasked
    draw would propose them often."""
    folder = tmp_path_factory.mktemp("padded")
    cfg = qwen.Config(vocab_size=MODEL_VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=64, variant="qwen2", tie_embeddings=False)
    model = randomize(qwen.Model(cfg)).eval()
    with torch.no_grad():
        model.lm_head.weight[TOKENIZER_IDS:] = 3 * model.lm_head.weight[:MODEL_VOCAB - TOKENIZER_IDS]
    model.save_pretrained(folder)
    bpe_tokenizer_json(TOKENIZER_IDS).save(str(folder / "tokenizer.json"))
    return folder


def test_sample_py_with_a_vocabulary_larger_than_its_tokenizer_runs_to_the_end(padded_vocab_dir, capsys,
                                                                                monkeypatch):
    """Issue 12, case 7: 320 rows, 281 ids, temperature 1: the run finishes (it was KeyError
    'Invalid token for decoding: 281' from tiktoken)."""
    code, err = run_entry_point(["sample.py", "--out_dir", str(padded_vocab_dir), "--prompt", "ROMEO:",
                                 "--temperature", "1", "--top_k", "0", "--max_new_tokens", "200", "--device", "cpu",
                                 "--dtype", "float32"], capsys, monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and err == [], err
    assert out.startswith("ROMEO:") and len(out) > 100


def test_sampling_never_proposes_ids_the_tokenizer_lacks(padded_vocab_dir):
    """Greedy and sampled, one row and a batch: every id is one the tokenizer has; greedy is the
    argmax over those ids (recomputed here from the full forward at every step)."""
    model, tok = sample.load(padded_vocab_dir)
    allowed = generation.decodable(tok, MODEL_VOCAB)
    assert allowed.sum() == TOKENIZER_IDS and not allowed[TOKENIZER_IDS:].any()
    prompt = torch.tensor([tok.encode("ROMEO: the")])
    assert model(prompt)[0][0, -1].argmax() >= TOKENIZER_IDS  # unmasked, greedy would take a padded row
    greedy = [t.item() for t in generation.generate(model, prompt, 20, temperature=0, allowed=allowed)]
    seq = prompt
    with torch.no_grad():
        for want in greedy:
            nxt = model(seq)[0][:, -1, :TOKENIZER_IDS].argmax(-1)
            assert nxt.item() == want
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack(list(generation.generate(model, prompt.repeat(4, 1), 50, temperature=1.5, generator=g,
                                                 allowed=allowed)))
    assert drawn.max() < TOKENIZER_IDS
    # stream and complete take the ids from their tokenizer
    out = io.StringIO()
    text = generation.stream(model, tok, prompt[0].tolist(), 60, out=out, temperature=1.5, generator=g)
    assert out.getvalue() == text and len(text) > 30
    assert generation.complete(model, tok, [prompt[0].tolist()], 20, temperature=0) == [tok.decode(greedy)]


def test_decode_skips_ids_it_lacks_as_tokenizers_does(tmp_path):
    """Our decode against tokenizers' Tokenizer.decode on id lists with ids past the tokenizer's
    last one (tokenizers skips them), and the char tokenizer and gaps between ids likewise."""
    ref = bpe_tokenizer_json(TOKENIZER_IDS)
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = tokenization.hf_tokenizer(tmp_path)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, 400, (int(torch.randint(1, 30, (), generator=g)),), generator=g).tolist()
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), ids
    assert ours.decode([281, 5000]) == ref.decode([281, 5000]) == ""
    char = tokenization.CharTokenizer("abc")
    assert char.decode([0, 3, 2, 99]) == "ac" and list(char.known_ids) == [0, 1, 2]
    import tiktoken  # a gap: ids 256..259 are nobody's
    enc = tiktoken.Encoding(name="gap", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<s>": 260})
    gap = tokenization.TiktokenTokenizer(enc, "test")
    assert gap.decode([104, 257, 260, 105, 300]) == "h<s>i"
    allowed = generation.decodable(gap, 264)
    assert allowed[:256].all() and not allowed[256:260].any() and allowed[260] and not allowed[261:].any()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("ROMEO: the night is sweet, my love.\nJULIET: O light, thou art fair!\n" * 40)
    return path


def test_train_closing_sample_with_a_vocabulary_larger_than_its_tokenizer(padded_vocab_dir, corpus, tmp_path,
                                                                         capsys):
    """train.py's closing sample (stream) of a fine-tuned model of 320 rows and 281 ids."""
    train.main([f"--data={corpus}", f"--data_dir={tmp_path / 'd'}", f"--out_dir={tmp_path / 'ft'}",
                f"--init_from={padded_vocab_dir}", "--max_iters=1", "--eval_interval=1", "--eval_iters=1",
                "--batch_size=2", "--block_size=16", "--device=cpu", "--dtype=float32", "--sample_tokens=100",
                "--learning_rate=0"])
    out = capsys.readouterr().out
    assert "sample:" in out and len(out.split("sample:", 1)[1]) > 40


def test_sample_py_min_p_and_a_batch_run(padded_vocab_dir, capsys):
    """--min_p reaches the sampler; the batched path (complete) too."""
    assert sample.main(["--out_dir", str(padded_vocab_dir), "--prompt", "ROMEO:", "--prompt", "JULIET: O",
                        "--num_samples", "2", "--temperature", "1", "--top_k", "0", "--min_p", "0.05",
                        "--max_new_tokens", "30", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("-" * 40) == 3


# ----------------------------------------------------------------------------- case 8: one error line

def bad_files(root):
    """Model directories with corrupt or mismatched files, made once."""
    root = Path(root)
    good = root / "good"
    if not good.exists():
        cfg = gpt.Config(vocab_size=TOKENIZER_IDS, block_size=32, n_layer=1, n_head=2, n_embd=16)
        randomize(gpt.Model(cfg)).save_pretrained(good)
        bpe_tokenizer_json(TOKENIZER_IDS).save(str(good / "tokenizer.json"))
    dirs = {}
    for name, edit in {
        "truncated_safetensors": lambda d: (d / "model.safetensors").write_bytes(
            (good / "model.safetensors").read_bytes()[:1000]),
        "garbage_safetensors": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
        "config_not_json": lambda d: (d / "config.json").write_text("{not json"),
        "config_no_model_type": lambda d: (d / "config.json").write_text("{}"),
        "config_wrong_shape": lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((good / "config.json").read_text()), "n_embd": 32})),
        "tokenizer_not_json": lambda d: (d / "tokenizer.json").write_text("not json at all"),
        "tokenizer_truncated": lambda d: (d / "tokenizer.json").write_text((good / "tokenizer.json").read_text()[:500]),
        "omnitron_tokenizer_not_json": lambda d: (d / "tokenizer_omnitron.json").write_text("{"),
        "adapter_not_json": lambda d: (d / "adapter_config.json").write_text("[1, 2"),
        "tokenizer_too_big": lambda d: bpe_tokenizer_json(300).save(str(d / "tokenizer.json")),
        "no_weights": lambda d: (d / "model.safetensors").unlink(),
    }.items():
        d = dirs[name] = root / name
        if not d.exists():
            d.mkdir()
            for f in good.iterdir():
                (d / f.name).write_bytes(f.read_bytes())
            edit(d)
    return dirs


BAD_INVOCATIONS = [
    # argparse's own errors, every entry point and bench subcommand
    (["train.py", "--bogus"], "unrecognized arguments"),
    (["train.py", "--max_iters", "ten"], "invalid int value"),
    (["sample.py", "--bogus"], "unrecognized arguments"),
    (["sample.py", "--top_k", "1.5"], "invalid int value"),
    (["sample.py", "--temperature"], "expected one argument"),
    (["bench.py"], "required: command"),
    (["bench.py", "nope"], "invalid choice"),
    (["bench.py", "speed", "--model"], "expected one argument"),
    (["bench.py", "speed", "--n_layer", "x"], "invalid int value"),
    (["bench.py", "attention", "--batch", "x"], "invalid int value"),
    (["bench.py", "kvcache", "--bogus"], "unrecognized arguments"),
    (["bench.py", "lora", "--lora_rank", "x"], "invalid int value"),
    (["bench.py", "curves"], "required: runs"),
    (["bench.py", "curves", "/nonexistent/run"], "no log.jsonl"),
    (["-m", "kernels.compile_check", "--bogus"], "unrecognized arguments"),
    (["-m", "kernels.compile_check", "--targets", "x"], "--targets"),
    (["-m", "kernels.compile_check", "--targets", "70"], "sm_70"),
    # sampling settings out of range (sample.py refuses them before loading anything)
    (["sample.py", "--temperature", "-1"], "temperature must be >= 0"),
    (["sample.py", "--top_p", "1.5"], "top_p must be between 0 and 1"),
    (["sample.py", "--min_p", "-0.5"], "min_p must be between 0 and 1"),
    (["sample.py", "--top_k", "-3"], "top_k must be an integer >= 0"),
    (["sample.py", "--num_samples", "0"], "--num_samples must be >= 1"),
    (["sample.py", "--out_dir", "/nonexistent/dir"], "model directory not found"),
    # corrupt and mismatched files
    (["sample.py", "--out_dir", "{truncated_safetensors}"], "cannot load"),
    (["sample.py", "--out_dir", "{garbage_safetensors}"], "cannot load"),
    (["sample.py", "--out_dir", "{config_not_json}"], ""),  # one line, though it does not name the file
    (["sample.py", "--out_dir", "{config_no_model_type}"], "model_type"),
    (["sample.py", "--out_dir", "{config_wrong_shape}"], "shape"),
    (["sample.py", "--out_dir", "{tokenizer_not_json}"], "tokenizer.json"),
    (["sample.py", "--out_dir", "{tokenizer_truncated}"], "tokenizer.json"),
    (["sample.py", "--out_dir", "{omnitron_tokenizer_not_json}"], ""),
    (["sample.py", "--out_dir", "{adapter_not_json}"], ""),
    (["sample.py", "--out_dir", "{tokenizer_too_big}"], "300 tokens"),
    (["sample.py", "--out_dir", "{no_weights}"], ""),
    (["sample.py", "--out_dir", "{good}", "--fewshot", "/nonexistent.jsonl"], "few-shot file not found"),
    (["sample.py", "--out_dir", "{good}", "--prompt", "@/nonexistent.txt"], "cannot read prompt file"),
    (["train.py", "--init_from", "{config_not_json}", "--max_iters", "1"], ""),
    (["train.py", "--init_from", "{truncated_safetensors}", "--max_iters", "1"], "cannot load"),
    (["train.py", "--init_from", "{tokenizer_not_json}", "--max_iters", "1"], "tokenizer.json"),
]


def run_entry_point(argv, capsys, monkeypatch):
    """argv as `python ARGV` runs it (the script's or module's __main__ block), in this process:
    (exit code, stderr lines); stdout is left in capsys."""
    monkeypatch.delenv("OMNITRON_DEBUG", raising=False)
    monkeypatch.chdir(ROOT)
    if argv[0] == "-m":
        monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:]])
        run = lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        monkeypatch.setattr(sys, "argv", argv)
        run = lambda: runpy.run_path(str(ROOT / argv[0]), run_name="__main__")  # noqa: E731
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr()
    print(err.out, end="")  # back to capsys
    return e.value.code, err.err.splitlines()


@pytest.mark.parametrize("argv,message", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_user_errors_are_one_error_line_and_exit_1(argv, message, tmp_path_factory, capsys, monkeypatch):
    dirs = bad_files(tmp_path_factory.getbasetemp() / "bad_files") | {}
    dirs["good"] = tmp_path_factory.getbasetemp() / "bad_files" / "good"
    argv = [a.format(**dirs) for a in argv]
    if argv[0] == "train.py":  # a corpus, and nothing written beside the repository
        corpus = tmp_path_factory.getbasetemp() / "corpus.txt"
        corpus.write_text("ROMEO: the night is sweet, my love.\n" * 40)
        argv += [f"--data={corpus}", f"--data_dir={tmp_path_factory.mktemp('d')}",
                 f"--out_dir={tmp_path_factory.mktemp('o')}", "--device=cpu"]
    code, lines = run_entry_point(argv, capsys, monkeypatch)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("argv", [["sample.py", "--top_p", "2"], ["bench.py", "speed", "--model"],
                                  ["-m", "kernels.compile_check", "--targets", "x"]])
def test_user_errors_through_the_interpreter(argv):
    """The same, as a separate process: nothing else (a warning, a traceback) reaches stderr."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "OMNITRON_DEBUG"})
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
