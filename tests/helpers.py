"""What the tests share: the repository root, tiny models and checkpoints, lazy transformers / peft imports,
and independent references (float64 math, transformers, tokenizers). Fixtures are in the root conftest.py.

References are independent of our code: Hugging Face transformers for checkpoints and logits, explicit
float64 math, and exact invariants (KV-cache decoding equals recomputation, a resumed run equals the run
that never stopped)."""
import ast
import contextlib
import copy
import functools
import io
import itertools
import json
import math
import os
import random
import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import models as tk_models

import sample
from omnitron import data, generation, hub, kernels, lora, models, tokenization
from omnitron.kernels.flash_attention import flash_attention
from omnitron.models import gpt, llama, phi, qwen

# transformers and peft are imported on first use, by hf_class and peft_api below: imported here,
# they would add 2 s and 8 s to every collection (pytest --collect-only: 5 s without them)

ROOT = Path(__file__).resolve().parent.parent  # the repository root (tests/..)
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
# the registered backends that compute softmax attention (performer approximates it: its own tests in tests/test_kernels.py)
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


# sampling filters and vocabularies larger than their tokenizer (ties, padded rows, tokenizer ids)


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
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tk_models
    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["ROMEO: the night is sweet, my love, and thou art fair. JULIET: O light!\n"] * 20,
                            trainer)
    assert tok.get_vocab_size() == vocab_size
    return tok


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


def load_moe(family, directory):
    """transformers' model of a directory loaded as a user loads it: AutoModelForCausalLM with its
    default arguments (experts_implementation: grouped_mm where it can, else eager); of the family's
    class."""
    hf = hf_class("AutoModelForCausalLM").from_pretrained(directory).eval()
    assert type(hf).__name__ == MOE_FAMILIES[family][1]
    return hf


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


TOKENIZER_IDS, MODEL_VOCAB = 281, 320  # Qwen2.5: 151,665 ids, 151,936 rows
# Hoffmann et al.'s approach-3 law: the truth of the synthetic runs
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


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
