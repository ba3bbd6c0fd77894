"""One training loop for every model in models/.

  python train.py --model gpt                          # the default: Shakespeare, char tokens, CPU-sized
  python train.py --config config/tinyshakespeare_cpu.toml
  python train.py --model gpt --resume                 # continue out/gpt where it stopped
  python train.py --init_from HF_DIR --data my.txt --out_dir out/ft   # fine-tune a Hugging Face checkpoint
  python train.py --init_from out/gpt --lora_rank 8 --data my.txt --out_dir out/lora --merge   # LoRA
  python train.py --init_from out/sft --dpo pairs.jsonl --out_dir out/dpo          # DPO (dpo.py)
  python train.py --init_from out/M1 --self_reward 3 --prompts p.jsonl --out_dir out/sr   # self-rewarding (self_reward.py)
  python train.py --init_from out/text --mm_images digits --mm_queries 8 --out_dir out/mm   # images (multimodal.py)

From Python, train.run(model="gpt", max_iters=100, ...) takes the same flags as keyword arguments
and returns the final metrics and the run folder; train.run(..., loss_fn=f) trains with another
loss (f(model, batch) -> (loss, metrics); the default is lm_loss).

Every option is a flag (`--help` lists them with their defaults); the model's own options come
from its Config dataclass. `--config FILE` is a TOML file of flag values; the command line
overrides it. A run folder (`--out_dir`) holds the model in Hugging Face format (config.json +
model.safetensors, so sample.py and transformers load it directly), its tokenizer,
train_state.pt (optimizer, step, RNG states, data position, flags; loaded weights-only) and
log.jsonl (one JSON object per log line). A LoRA run's folder holds the adapter instead of the model
(lora.py: adapter_config.json, which names the base model's directory, and adapter_model.safetensors),
train_state.pt and log.jsonl; --merge adds merged/, the base with the adapter folded in. A multimodal
run's folder (--mm_images) holds the bridge (multimodal.py: multimodal.json, which names the frozen
model's directory, and multimodal.safetensors), and the language model too when --mm_freeze false.

A new run never replaces a trained one by accident: into a folder that holds a trained checkpoint it
stops and says what is there (continue it with --resume, pick another --out_dir, or --overwrite).
Ctrl-C stops after the step in progress, checkpoints it and prints the --resume command; a resumed run
continues log.jsonl from its checkpoint's step.

The stages, in the order train() calls them: start (processes, device, precision), build (model,
tokenizer, data), prepare (optimizer, saved state), fit (the loop), finish (merge, sample).
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import tomllib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from omnitron import checkpoints, data, dpo, kernels, lora, models, multimodal, muon, runtime, self_reward
from omnitron.generation import stream
from omnitron.kernels import performer
from omnitron.runtime import UserError, autocast, format_eta, resolve_device, resolve_dtype, unwrap

INIT_BLOCK_SIZE = 1024  # --init_from DIR without --block_size: the model's length, up to this

TRAIN_FLAGS = [
    # (name, default, help)
    ("model", "gpt", "the model file models/NAME.py"),
    ("config", "", "a TOML file of flag values (see config/); command-line flags override it"),
    ("out_dir", "", "the run folder; empty: out/MODEL"),
    ("data", "", "a UTF-8 .txt file or a folder of them, or tinyshakespeare (shipped: nanoGPT's 1.1 MB text); "
                 "empty: Shakespeare's complete works"),
    ("data_dir", str(data.DEFAULT_DATA_DIR), "where corpora and their tokenized caches live"),
    ("tokenizer", "char", "char, bpe:N (trained on the corpus), gpt2, cl100k_base or o200k_base"),
    ("init_from", "scratch", "scratch, resume (the run in --out_dir), or a model directory to fine-tune"),
    ("convert_kv_heads", 0, "with --init_from DIR: mean-pool the key/value heads into this many groups (GQA "
                            "uptraining, Ainslie et al. 2023) before training (0: keep)"),
    ("resume", False, "same as --init_from resume"),
    ("overwrite", False, "replace the trained run in --out_dir; without it, a new run into a folder that holds a "
                         "trained checkpoint stops and says what is there (continue it with --resume, or pick "
                         "another --out_dir)"),
    ("lora_rank", 0, "with --init_from DIR: freeze the model and train rank-r LoRA adapters (Hu et al. 2021) "
                     "on the --lora_targets layers; 0: off (full fine-tuning)"),
    ("lora_alpha", 16.0, "LoRA: the update B A is scaled by lora_alpha / lora_rank"),
    ("lora_dropout", 0.0, "LoRA: dropout on the adapters' input"),
    ("lora_targets", "q,v", "LoRA: layers to adapt, comma-separated from q, k, v, o, mlp, or all (every linear "
                            "layer but the output head); gpt's fused c_attn is q, k and v at once"),
    ("lora_rslora", False, "LoRA: scale by lora_alpha / sqrt(lora_rank) (rank-stabilised LoRA)"),
    ("merge", False, "LoRA: at the end, write the base model with the adapter folded in to OUT_DIR/merged "
                     "(Hugging Face format); with --resume --max_iters 0, only that"),
    ("dpo", "", "a .jsonl file of {prompt, chosen, rejected} preference pairs: train with DPO (Rafailov et al. "
                "2023; dpo.py) from --init_from DIR, the response tokens scored, the prompt's masked; empty: off"),
    ("dpo_beta", 0.1, "DPO: beta, the strength of the KL constraint to the reference"),
    ("dpo_truncation", "drop_prompt_start", "DPO: a pair longer than the block: drop_prompt_start (the prompt loses "
                                            "its start; a response longer than the block is refused) or keep_start "
                                            "(TRL's default: the first block_size + 1 tokens, the response's end cut)"),
    ("dpo_reference", "", "DPO without --lora_rank: the frozen reference model's directory; empty: --init_from "
                          "(with --lora_rank the reference is the model with its adapters switched off)"),
    ("dpo_replay", "", "DPO: a text corpus replayed beside the pairs: each step adds --dpo_replay_weight times the "
                       "language-model loss of --dpo_replay_batch random windows of it (dpo.ReplayLoss; keeps a "
                       "skill the pairs do not train, such as a self-rewarding model's judging); empty: off"),
    ("dpo_replay_weight", 1.0, "DPO replay: the weight of the replay loss (nats per token) beside the DPO loss"),
    ("dpo_replay_batch", 0, "DPO replay: windows of --block_size tokens per step; 0: --batch_size"),
    ("self_reward", 0, "with --init_from DIR and --prompts: N self-rewarding iterations (Yuan et al. 2024; "
                       "self_reward.py): the model samples, judges its own candidates, and is DPO-trained on "
                       "(best, worst) pairs; OUT_DIR/M2 .. M(N+1) are the new models; 0: off"),
    ("prompts", "", "self-rewarding: a .jsonl file of {prompt} records (optional header: judge_template, stop, "
                    "judge_stop, checker; see self_reward.py)"),
    ("sr_candidates", 4, "self-rewarding: candidate responses sampled per prompt"),
    ("sr_temperature", 0.7, "self-rewarding: sampling temperature of candidates and judgements"),
    ("sr_top_p", 0.9, "self-rewarding: top-p (nucleus) of candidates and judgements"),
    ("sr_judge_samples", 3, "self-rewarding: judgements sampled per candidate, their scores averaged"),
    ("sr_max_new_tokens", 128, "self-rewarding: longest candidate response, tokens"),
    ("sr_judge_tokens", 128, "self-rewarding: longest judgement, tokens"),
    ("sr_pairs", "judge", "self-rewarding: how pairs are chosen: judge (the model's own scores), or the "
                          "controls random (two candidates at random) and checker (the prompts' checker: an "
                          "upper bound)"),
    ("mm_images", "", "digits: train a bridge that feeds images to the language model (multimodal.py: a patch "
                       "encoder, a Perceiver resampler, a projection; Flamingo, BLIP-2) on scenes of scikit-learn's "
                       "handwritten digits, from --init_from DIR (or scratch with --mm_freeze false); empty: off"),
    ("mm_scene_digits", 3, "multimodal: digits side by side in a scene"),
    ("mm_texts", "captions", "multimodal: the texts the bridge trains on: captions (`digits: 3 8 1`) or all "
                             "(captions and the questions `how many 8s? 1`, `largest? 8`, `sum? 12`)"),
    ("mm_queries", 8, "multimodal: N, the resampler's learned queries (the media's length); 0: no resampler, "
                      "every patch token goes to the language model"),
    ("mm_depth", 2, "multimodal: resampler layers"),
    ("mm_width", 64, "multimodal: the patch encoder's and the resampler's width"),
    ("mm_heads", 4, "multimodal: attention heads of the resampler and the gated layers"),
    ("mm_patch", 4, "multimodal: patches of p x p pixels"),
    ("mm_inject", "prefix", "multimodal: how the media reach the language model: prefix (a soft prompt before "
                            "the text, BLIP-2) or xattn (tanh-gated cross-attention before each block, Flamingo)"),
    ("mm_xattn_hidden", 0, "multimodal xattn: the gated layers' feed-forward width (0: no feed-forward)"),
    ("mm_freeze", True, "multimodal: freeze the language model and train the bridge alone; false: train both"),
    ("max_iters", 750, "optimizer steps"),
    ("max_time", 0.0, "seconds of training (wall time: evaluations and compilation included, startup not) after "
                      "which the run evaluates, saves and ends, like Lightning's max_time; the decay or cooldown "
                      "then also follows the share of max_time elapsed, ending at whichever of max_iters and "
                      "max_time comes first, so it ends on time at any speed (the step count, and so the "
                      "result, then depend on the machine's speed). 0: off"),
    ("batch_size", 32, "sequences per micro-batch"),
    ("block_size", 128, "tokens per sequence; with --init_from DIR and no --block_size: the model's own length "
                        f"(its config's block_size), at most {INIT_BLOCK_SIZE}"),
    ("gradient_accumulation_steps", 1, "micro-batches per optimizer step"),
    ("learning_rate", 3e-3, "peak learning rate"),
    ("min_lr", -1.0, "final learning rate of the cosine decay (-1: learning_rate / 10)"),
    ("warmup_iters", 100, "steps of linear warmup"),
    ("lr_decay_iters", -1, "steps of cosine decay (-1: max_iters)"),
    ("lr_schedule", "cosine", "after warmup: cosine (decay to min_lr at lr_decay_iters) or trapezoidal (constant, "
                              "then a linear cooldown to min_lr over the last cooldown_frac of lr_decay_iters: the "
                              "warmup-stable-decay schedule of the modded-nanogpt speedrun)"),
    ("cooldown_frac", 0.4, "trapezoidal: the share of max_iters spent in the linear cooldown"),
    ("optimizer", "adamw", "adamw, or muon: Muon (orthogonalised Nesterov momentum, Jordan et al. 2024; "
                           "omnitron/muon.py) on the hidden matrices, AdamW on embeddings, head, norms and biases"),
    ("muon_lr", 0.02, "muon: peak learning rate of the hidden matrices (the schedule scales it with learning_rate)"),
    ("muon_momentum", 0.95, "muon: momentum (Nesterov)"),
    ("muon_weight_decay", 0.0, "muon: decoupled weight decay of the hidden matrices"),
    ("weight_decay", 0.1, "AdamW weight decay, on matrices and embeddings only"),
    ("beta1", 0.9, "AdamW beta1"),
    ("beta2", 0.99, "AdamW beta2"),
    ("grad_clip", 1.0, "clip the gradient norm to this (0: off)"),
    ("eval_interval", 250, "evaluate and checkpoint every N steps"),
    ("eval_iters", 20, "batches per split in an evaluation"),
    ("eval_full_val", False, "the val loss over every token of the val split once (consecutive windows of "
                             "block_size; deterministic) instead of eval_iters random batches, whose mean weighs "
                             "each token a random number of times (20 batches of tinyshakespeare: +-0.007 nats "
                             "between draws); the train loss stays an estimate"),
    ("log_interval", 50, "print a log line every N steps"),
    ("device", "auto", "cpu, cuda, cuda:N, or auto"),
    ("dtype", "auto", "float32, bfloat16 or float16 (autocast; fp16 with a gradient scaler), or auto"),
    ("compile", False, "torch.compile the model"),
    ("fsdp", False, "under torchrun: shard parameters, gradients and optimizer state with FSDP (fully_shard) "
                    "instead of replicating them with DistributedDataParallel"),
    *runtime.ATTENTION_FLAGS,  # attn, attn_window, performer_features, performer_redraw
    ("seed", 1337, "random seed"),
    ("sample_tokens", 300, "tokens of sample text printed at the end (0: none)"),
]
LOG = "log.jsonl"  # a run's losses, one JSON record a line
MODEL_FLAGS_EXCLUDED = {"vocab_size", "block_size"}  # set from the tokenizer and --block_size
MODEL_BLOCK_SIZE = 0  # --block_size's value while a loaded model's own length is still to be read (build)


# ----------------------------------------------------------------------------- flags

def flag_default(name):
    """The default value of train.py's flag --name (not a model flag)."""
    return next(default for flag, default, _ in TRAIN_FLAGS if flag == name)


def model_flags(module):
    """The model file's Config fields as (name, default, help) flags."""
    return [(f.name, f.default, f"model: {f.name}") for f in dataclasses.fields(module.Config)
            if f.name not in MODEL_FLAGS_EXCLUDED]


def build_parser(specs, suppress=False):
    """The argparse parser of these (name, default, help) flags; with suppress, parsing returns only
    the flags given."""
    p = runtime.ArgumentParser(description="Train a model of models/ (one loop for every model and method).",
                               argument_default=argparse.SUPPRESS if suppress else None)
    for name, default, help_text in specs:
        kind = runtime.str2bool if isinstance(default, bool) else type(default)
        extra = {"nargs": "?", "const": True} if kind is runtime.str2bool else {}
        if name == "attn":
            extra["choices"] = kernels.names()
        p.add_argument(f"--{name}", type=kind, help=help_text, **extra,
                       **({} if suppress else {"default": default}))
    return p


def read_config(path):
    """The flag values in a TOML file ({} without one). A missing or malformed file: UserError."""
    if not path:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {e}") from None


def coerce(name, value, default):
    """A flag value given in Python or in a TOML file, as the type of the flag's default (a Path
    becomes a str, "false" a bool). A value that is not of that type: UserError."""
    kind = type(default)
    try:
        if kind is bool:
            return value if isinstance(value, bool) else runtime.str2bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--{name}: expected {kind.__name__}, not {value!r}") from None


def resolve_flags(module, explicit, config, config_path=""):
    """Every flag's value: defaults < the saved run (when resuming) < the config file's values
    (`config`, from `config_path`) < the flags given explicitly (command line, or run()'s keyword
    arguments). An unknown flag in the config file, or nothing to resume: UserError."""
    defaults = {name: default for name, default, _ in TRAIN_FLAGS + model_flags(module)}
    if unknown := sorted(set(config) - set(defaults)):
        raise UserError(f"{config_path}: unknown flag(s) {', '.join(unknown)}")
    explicit = {**{k: coerce(k, v, defaults[k]) for k, v in config.items()}, **explicit}
    flags = {**defaults, **explicit}
    if flags["resume"] or flags["init_from"] == "resume":
        explicit["init_from"] = "resume"
    flags.update(explicit)
    flags["out_dir"] = flags["out_dir"] or f"out/{flags['model']}"
    if flags["init_from"] == "resume":
        state_path = Path(flags["out_dir"]) / checkpoints.TRAIN_STATE
        if not state_path.is_file():
            raise UserError(f"nothing to resume: no {state_path}")
        saved = checkpoints.read_train_state(flags["out_dir"])["args"]
        flags = {**flags, **saved, **explicit}
    elif flags["init_from"] != "scratch" and "block_size" not in explicit:
        flags["block_size"] = MODEL_BLOCK_SIZE  # the loaded model's own length (build)
    return flags


def parse_args(argv):
    """The command line's flags (see resolve_flags for the precedence). Returns (flags as a dict,
    the model file's module). A bad or unknown flag: UserError."""
    pre = runtime.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--config", default="")
    known = pre.parse_known_args(argv)[0]
    config = read_config(known.config)
    module = models.get(known.model or config.get("model", "gpt"))  # the model decides the model flags
    specs = TRAIN_FLAGS + model_flags(module)
    build_parser(specs).parse_args(argv)  # --help, and the errors of bad values
    explicit = vars(build_parser(specs, suppress=True).parse_args(argv))
    return resolve_flags(module, explicit, config, known.config), module


def run(model=None, *, loss_fn=None, **given):
    """Train from Python with train.py's flags as keyword arguments: run(model="llama", max_iters=200,
    data="my.txt") is `python train.py --model llama --max_iters 200 --data my.txt`, with the same
    defaults and precedence (`model` None: the config file's, else gpt). `loss_fn`: see train().
    Returns train()'s dict (final losses, step, elapsed_s, out_dir). An unknown flag or a value of
    the wrong type: UserError."""
    config = read_config(given.get("config", ""))
    module = models.get(model or config.get("model", "gpt"))
    defaults = {name: default for name, default, _ in TRAIN_FLAGS + model_flags(module)}
    if unknown := sorted(set(given) - set(defaults)):
        raise UserError(f"unknown flag(s) {', '.join(unknown)}")
    explicit = {k: coerce(k, v, defaults[k]) for k, v in given.items()}
    if model:
        explicit["model"] = model
    return train(resolve_flags(module, explicit, config, given.get("config", "")), module, loss_fn)


# ----------------------------------------------------------------------------- the loss

def lm_loss(model, batch):
    """The default training loss: the language-model loss (mean cross-entropy of next tokens, nats)
    of batch = (x, y), both (B, T) token ids, plus the model's auxiliary losses of that forward
    (model.aux_losses(): name -> scalar tensor, e.g. a mixture of experts' load balancing).
    Returns (loss, metrics): metrics is {} for a dense model, else lm_loss, each auxiliary loss and
    the model's aux_metrics() (a router's dropped fraction and largest expert load).

    Any function of this form can train instead (train.run(..., loss_fn=f)): it gets the module that
    trains (wrapped by DDP or torch.compile: unwrap() reaches the model) and a batch of
    dataset.get_batch, and returns a scalar loss to minimise and a dict of scalar metrics to log."""
    x, y = batch
    _, loss = model(x, y)
    inner = unwrap(model)
    aux, stats = inner.aux_losses(), inner.aux_metrics()
    if not aux and not stats:
        return loss, {}
    metrics = {"lm_loss": loss.detach(), **{name: value.detach() for name, value in {**aux, **stats}.items()}}
    return loss + sum(aux.values()), metrics


# ----------------------------------------------------------------------------- schedule, optimizer, evaluation

def lr_at(step, flags, elapsed=0.0):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, or (lr_schedule trapezoidal) the
    peak until the last cooldown_frac of lr_decay_iters and a linear cooldown to min_lr there
    (lr_decay_iters -1: max_iters). With max_time > 0 the clock is a second scale: the decay is as far
    as the further of the step's share of lr_decay_iters and the share of max_time that `elapsed`
    (seconds of training so far) is, so it ends at whichever limit comes first (the warmup stays in
    steps)."""
    min_lr = flags["min_lr"] if flags["min_lr"] >= 0 else flags["learning_rate"] / 10
    if step < flags["warmup_iters"]:
        return flags["learning_rate"] * (step + 1) / (flags["warmup_iters"] + 1)
    decay_iters = flags["lr_decay_iters"] if flags["lr_decay_iters"] > 0 else flags["max_iters"]
    max_time, frac = flags.get("max_time", 0), flags.get("cooldown_frac", 0)
    if flags.get("lr_schedule", "cosine") == "trapezoidal":
        left = (decay_iters - step) / (frac * decay_iters) if frac * decay_iters > 0 else 1.0
        if max_time > 0 and frac > 0:
            left = min(left, (max_time - elapsed) / (frac * max_time))
        return min_lr + min(1.0, max(0.0, left)) * (flags["learning_rate"] - min_lr)
    if step >= decay_iters or 0 < max_time <= elapsed:
        return min_lr
    progress = (step - flags["warmup_iters"]) / max(1, decay_iters - flags["warmup_iters"])
    if max_time > 0:
        progress = max(progress, elapsed / max_time)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (flags["learning_rate"] - min_lr)


def make_optimizer(model, flags, device, sharded=False):
    """AdamW; weight decay on tensors of two or more dimensions (matrices, embeddings) only. The
    fused kernel, except on FSDP's sharded parameters (DTensors), which take the foreach one.
    --optimizer muon: Muon on the hidden matrices and this AdamW on the rest (muon.py)."""
    if flags.get("optimizer", "adamw") == "muon":
        return muon.muon_with_adamw(model, flags["learning_rate"], flags["muon_lr"], flags["weight_decay"],
                                    (flags["beta1"], flags["beta2"]), flags["muon_momentum"],
                                    flags["muon_weight_decay"])
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": flags["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=flags["learning_rate"], betas=(flags["beta1"], flags["beta2"]),
                             fused=not sharded, foreach=sharded or None)


@torch.no_grad()
def evaluate(model, dataset, flags, ctx, device, rank=0, world_size=1):
    """Mean language-model loss over eval_iters global batches of each split (the model's own loss,
    whatever the training loss_fn, so runs compare); the same batches at every evaluation (each
    process takes its slice, and the means are averaged); with eval_full_val, val's over every val
    token once (whole_split_loss). Returns {"train": nats, "val": nats}."""
    model.eval()
    out = {}
    loss_of = getattr(dataset, "model_loss", None) or (lambda m, batch: m(*batch)[1])  # scenes: with the image
    for split in ("train", "val"):
        if split == "val" and flags.get("eval_full_val"):
            out[split] = whole_split_loss(model, dataset, split, flags, ctx, device, rank, world_size)
            continue
        gen = torch.Generator().manual_seed(flags["seed"] + 1)
        losses = []
        for _ in range(flags["eval_iters"]):
            batch = dataset.get_batch(split, flags["batch_size"], flags["block_size"], gen, device, rank, world_size)
            with ctx:
                losses.append(loss_of(model, batch))
        mean = torch.stack(losses).mean()
        if world_size > 1:
            torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.AVG)
        out[split] = mean.item()
    model.train()
    return out


def whole_split_loss(model, dataset, split, flags, ctx, device, rank=0, world_size=1):
    """The mean loss over every token of a split, once: consecutive non-overlapping windows of block_size
    (the last full window's end is the split's; the tokens before the first are left out, fewer than
    block_size), batch_size windows per forward, the global batches dealt to the processes in turn.
    The last batch is filled with rows whose targets are -1 (ignored), so every forward has one
    shape (no recompilation) and every process runs the same number of them. Returns nats per token."""
    tokens, T, B = dataset.tokens(split), flags["block_size"], flags["batch_size"]
    n = (len(tokens) - 1) // T
    offset = len(tokens) - 1 - n * T  # windows end at the split's end
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
    for first in range(0, n, B * world_size):
        windows = range(first + rank * B, min(first + (rank + 1) * B, n))  # this process's share (maybe none)
        xy = np.zeros((B, T + 1), dtype=np.int64)
        for j, w in enumerate(windows):
            xy[j] = tokens[offset + w * T: offset + w * T + T + 1]
        x, y = torch.from_numpy(xy[:, :-1]), torch.from_numpy(xy[:, 1:].copy())
        y[len(windows):] = -1  # padding rows: every target ignored
        x, y = x.to(device), y.to(device)
        with ctx:  # also when this process has no window left: DDP's collectives pair up
            loss = model(x, y)[1]
        if windows:
            totals[0] += loss.double() * (len(windows) * T)
            totals[1] += len(windows) * T
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1]).item()


# ----------------------------------------------------------------------------- several processes

def setup_distributed(device):
    """Under torchrun (RANK and WORLD_SIZE set): join the process group (nccl on CUDA, gloo on
    CPU) and return (rank, world_size, this process's device); otherwise (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def distribute(model, flags, world_size, device):
    """The module that trains: the model itself in one process; wrapped in DistributedDataParallel
    (replicas, gradients all-reduced) or sharded in place by FSDP's fully_shard (each of
    model.fsdp_units(), children first, then the rest) under torchrun."""
    if world_size == 1:
        return model
    if flags["fsdp"]:
        from torch.distributed.fsdp import fully_shard
        for unit in model.fsdp_units():  # bottom-up: each unit before the modules that hold it
            fully_shard(unit)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)


def gradient_sync(train_model, enabled):
    """Gradients are all-reduced on the last micro-step of an accumulation only."""
    if hasattr(train_model, "set_requires_gradient_sync"):  # FSDP
        train_model.set_requires_gradient_sync(enabled)
        return nullcontext()
    if hasattr(train_model, "no_sync") and not enabled:  # DDP
        return train_model.no_sync()
    return nullcontext()


def full_state(model, optimizer):
    """The trained model and optimizer state, gathered from the shards when sharded, keyed by
    parameter name: the same checkpoint whatever the number of processes that wrote or reads it.
    Frozen parameters (a LoRA run's base model) are left out: they never change."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=True))


def load_optimizer_state(model, optimizer, state):
    """Load full_state()'s optimizer state, sharding it as the model is sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- one run, in stages

@dataclasses.dataclass
class Session:
    """One process's run: its flags, where it runs, and what the stages fill in (build: model and
    dataset; prepare: the module that trains, optimizer, scaler, data generator and position)."""
    flags: dict
    rank: int
    world_size: int
    device: str
    dtype: torch.dtype
    ctx: object  # autocast to dtype, or nothing for fp32
    model: torch.nn.Module = None  # the model itself
    dataset: data.Dataset = None
    train_model: torch.nn.Module = None  # the model as it trains: wrapped by DDP / sharded by FSDP / compiled
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None
    data_gen: torch.Generator = None  # draws the training batches: its state is the data position
    step: int = 0
    start_step: int = 0  # the step this process started from (a resumed run's checkpoint)
    saved_step: int = None  # the step of the last checkpoint in out_dir (None: none yet)
    elapsed_before: float = 0.0  # seconds of training before this process (a resumed run)

    @property
    def out_dir(self):
        return Path(self.flags["out_dir"])

    @property
    def tokens_per_step(self):
        f = self.flags
        return f["batch_size"] * f["block_size"] * f["gradient_accumulation_steps"] * self.world_size

    def say(self, *args, **kwargs):
        if self.rank == 0:  # only rank 0 prints and writes
            print(*args, **kwargs)


def start(flags):
    """The process: join the process group under torchrun, pick the device, dtype and attention
    backend, seed the RNG. Flag combinations that cannot work: UserError."""
    for name in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        if flags[name] < 1 and not (name == "block_size" and flags[name] == MODEL_BLOCK_SIZE
                                    and flags["init_from"] not in ("scratch", "resume")):
            raise UserError(f"--{name} must be at least 1, not {flags[name]}")
    if flags["max_iters"] < 0:
        raise UserError(f"--max_iters must be 0 or more, not {flags['max_iters']}")
    if flags["eval_full_val"] and (flags["dpo"] or flags["mm_images"]):
        raise UserError("--eval_full_val evaluates a text corpus's val split: not with --dpo or --mm_images")
    if flags["max_time"] < 0:
        raise UserError(f"--max_time must be 0 (off) or more, not {flags['max_time']}")
    for name, choices in (("optimizer", ("adamw", "muon")), ("lr_schedule", ("cosine", "trapezoidal"))):
        if flags[name] not in choices:
            raise UserError(f"--{name} {flags[name]!r}: choose from {', '.join(choices)}")
    if not 0 <= flags["cooldown_frac"] <= 1:
        raise UserError(f"--cooldown_frac must be in [0, 1], not {flags['cooldown_frac']}")
    if flags["optimizer"] == "muon" and flags["fsdp"]:
        raise UserError("--optimizer muon orthogonalises whole matrices: use it with DDP, not --fsdp's shards")
    rank, world_size, device = setup_distributed(resolve_device(flags["device"]))
    dtype = resolve_dtype(flags["dtype"], device)
    if flags["init_from"] not in ("scratch", "resume"):  # the attention the model was trained with
        flags.update(runtime.trained_attention(flags, flags["init_from"]))
    runtime.configure_attention(flags)
    torch.manual_seed(flags["seed"])
    if flags["lora_rank"] and flags["init_from"] == "scratch":
        raise UserError("--lora_rank adapts a trained model: give it --init_from DIR")
    if flags["lora_rank"] and flags["convert_kv_heads"]:
        raise UserError("--convert_kv_heads changes the base model: convert in a run of its own, then LoRA-tune it")
    if flags["merge"] and (not flags["lora_rank"] or world_size > 1):
        raise UserError("--merge folds a LoRA adapter into its base: it needs --lora_rank, in one process")
    if flags["dpo"]:
        if flags["init_from"] == "scratch":
            raise UserError("--dpo trains a trained model: give it --init_from DIR")
        if flags["dpo_truncation"] not in dpo.TRUNCATIONS:
            raise UserError(f"--dpo_truncation must be one of {', '.join(dpo.TRUNCATIONS)}, "
                            f"not {flags['dpo_truncation']!r}")
        if flags["dpo_beta"] <= 0:
            raise UserError(f"--dpo_beta must be positive, not {flags['dpo_beta']}")
        if flags["fsdp"] and world_size > 1 and not flags["lora_rank"]:
            raise UserError("--dpo --fsdp needs --lora_rank (the reference is then the model with its adapters off; "
                            "a full frozen reference copy would not be sharded)")
        if flags["dpo_replay_weight"] < 0 or flags["dpo_replay_batch"] < 0:
            raise UserError("--dpo_replay_weight and --dpo_replay_batch must be 0 or more, not "
                            f"{flags['dpo_replay_weight']} and {flags['dpo_replay_batch']}")
        if not flags["lora_rank"] and not flags["dpo_reference"]:
            flags["dpo_reference"] = flags["init_from"]  # saved in train_state.pt: a resumed run keeps it
    elif flags["dpo_replay"]:
        raise UserError("--dpo_replay adds a replay loss to DPO: it needs --dpo (or --self_reward)")
    if flags["mm_images"]:
        check_multimodal(flags, world_size)
    return Session(flags, rank, world_size, device, dtype, autocast(device, dtype))


def check_multimodal(flags, world_size):
    """The --mm_* flags that cannot work: UserError."""
    if flags["mm_images"] != "digits":
        raise UserError(f"--mm_images: the images are digits (scikit-learn's handwritten digits), not {flags['mm_images']!r}")
    if flags["mm_inject"] not in multimodal.INJECTIONS:
        raise UserError(f"--mm_inject must be {' or '.join(multimodal.INJECTIONS)}, not {flags['mm_inject']!r}")
    if flags["mm_texts"] not in multimodal.TEXTS:
        raise UserError(f"--mm_texts must be {' or '.join(multimodal.TEXTS)}, not {flags['mm_texts']!r}")
    for name in ("mm_scene_digits", "mm_width", "mm_heads", "mm_patch"):
        if flags[name] < 1:
            raise UserError(f"--{name} must be at least 1, not {flags[name]}")
    if flags["mm_queries"] < 0 or flags["mm_depth"] < 1 or flags["mm_xattn_hidden"] < 0:
        raise UserError("--mm_queries and --mm_xattn_hidden must be 0 or more, --mm_depth at least 1")
    if flags["init_from"] == "resume":
        raise UserError("--mm_images cannot resume a run yet: start it again")
    if flags["mm_freeze"] and flags["init_from"] == "scratch":
        raise UserError("--mm_freeze freezes a trained language model: give it --init_from DIR (or --mm_freeze false)")
    if flags["lora_rank"] or flags["dpo"] or flags["self_reward"] or flags["convert_kv_heads"]:
        raise UserError("--mm_images trains a bridge of its own: not with --lora_rank, --dpo, --self_reward or "
                        "--convert_kv_heads")
    if world_size > 1:
        raise UserError("--mm_images trains in one process")


def attach_bridge(s):
    """--mm_images: the model gets its bridge (multimodal.attach), sized by the --mm_* flags; from
    scratch, the scenes replace the corpus (whose tokenizer they use)."""
    f, model = s.flags, s.model
    if not isinstance(s.dataset, multimodal.SceneDataset):
        s.dataset = multimodal.SceneDataset(s.dataset.tokenizer, f["data_dir"], f["mm_scene_digits"], f["mm_texts"])
    try:
        config = multimodal.BridgeConfig(
            n_embd=model.config.n_embd, image_width=multimodal.DIGIT_SIZE * f["mm_scene_digits"],
            patch=f["mm_patch"], width=f["mm_width"], heads=f["mm_heads"], queries=f["mm_queries"],
            depth=f["mm_depth"], inject=f["mm_inject"], xattn_hidden=f["mm_xattn_hidden"], freeze_lm=f["mm_freeze"],
            base_model=str(Path(f["init_from"]).resolve()) if f["mm_freeze"] else "")
    except ValueError as e:
        raise UserError(f"--mm_*: {e}") from None
    multimodal.attach(model, config)
    limit, need = model.max_positions, config.media_tokens + s.dataset.manifest["longest_text"]
    if f["mm_inject"] == "prefix" and limit is not None and need > limit:
        raise UserError(f"a prefix of {config.media_tokens} media tokens and the texts need {need} positions; "
                        f"the model has {limit}")


def build(s, module):
    """The model and the dataset (tokenized with the model's tokenizer; with --dpo, the preference
    pairs): a new model of `module` (--init_from scratch), or one loaded from a model directory
    (fine-tuning, LoRA, DPO) or from the run folder (--resume). Rank 0 tokenizes the corpus first; the other processes then reuse its cache.
    Returns the saved training state when resuming, else None."""
    f = s.flags
    if s.world_size > 1 and s.rank != 0:
        torch.distributed.barrier()
    state = None
    if f["init_from"] == "scratch":
        s.dataset = data.prepare(f["data"] or None, f["tokenizer"], f["data_dir"])
        fields = {field.name for field in dataclasses.fields(module.Config)} - MODEL_FLAGS_EXCLUDED
        config = module.Config(**{k: v for k, v in f.items() if k in fields},
                               vocab_size=s.dataset.tokenizer.vocab_size, block_size=f["block_size"])
        s.model = module.Model(config)
    else:
        s.model, tokenizer = load_model(f, s.out_dir, s.dtype)
        keep_loaded_config(s, module)
        if f["block_size"] == MODEL_BLOCK_SIZE:  # --init_from DIR without --block_size: the model's own length
            f["block_size"] = min(s.model.config.block_size, INIT_BLOCK_SIZE)
        if f["dpo"]:  # preference pairs (start() refuses --dpo from scratch)
            s.dataset = dpo.PairDataset(f["dpo"], tokenizer, f["dpo_truncation"])
        elif f["mm_images"]:  # scenes of digits (attach_bridge)
            s.dataset = multimodal.SceneDataset(tokenizer, f["data_dir"], f["mm_scene_digits"], f["mm_texts"])
        else:
            s.dataset = data.prepare(f["data"] or None, tokenizer, f["data_dir"])
        if f["init_from"] == "resume":
            state = load_train_state(s.out_dir, f["lora_rank"])
    if s.world_size > 1 and s.rank == 0:
        torch.distributed.barrier()
    if f["mm_images"]:
        attach_bridge(s)
    s.dataset.check_block_size(f["block_size"])
    limit = s.model.max_positions
    if limit is not None and f["block_size"] > limit:
        raise UserError(f"--block_size {f['block_size']} exceeds the model's {limit} positions: give --block_size "
                        f"{limit} or less" + (" (or leave it out: --init_from takes the model's own length)"
                                              if f["init_from"] != "scratch" else ""))
    return state


def keep_loaded_config(s, module):
    """A loaded model keeps its own file and configuration (config.json). The flags are set to what
    it is, so the banner and the saved state say the truth; a model flag given with another value
    is reported in one line (it cannot change a trained model)."""
    f, config = s.flags, s.model.config
    ignored = [f"--{k} {f[k]}" for k, default, _ in model_flags(module)
               if f[k] != default and hasattr(config, k) and getattr(config, k) != f[k]]
    if ignored:
        s.say(f"note: {', '.join(ignored)} not applied: the loaded model keeps its config.json", flush=True)
    for k, _, _ in model_flags(module):
        del f[k]
    f["model"] = type(s.model).__module__.rsplit(".", 1)[-1]
    f.update({k: getattr(config, k) for k, _, _ in model_flags(models.get(f["model"]))})


def load_model(flags, out_dir, dtype):
    """A trained model and its tokenizer: from --init_from DIR (converted to --convert_kv_heads groups,
    LoRA adapters added with --lora_rank) or, resuming, from the run folder (a LoRA run's folder
    holds the adapter: the base model comes from the directory it names)."""
    src = out_dir if flags["init_from"] == "resume" else Path(flags["init_from"])
    if not src.is_dir():
        raise UserError(f"--init_from: no model directory {src}")
    lora_resume = flags["lora_rank"] and flags["init_from"] == "resume"
    base = lora.base_path(out_dir) if lora_resume else src
    model, tokenizer = checkpoints.load(base, dtype=torch.float32)  # back in train mode when fit starts
    if flags["convert_kv_heads"] and flags["init_from"] != "resume":
        if not hasattr(model, "convert_kv_heads"):
            raise UserError(f"--convert_kv_heads: {type(model).__module__} has no key/value heads to convert")
        model.convert_kv_heads(flags["convert_kv_heads"])
    base_dtype = None if dtype == torch.float32 else dtype  # LoRA: the frozen base needs no fp32 copy
    if lora_resume:
        lora.load_adapter(model, out_dir, base_dtype)
    elif flags["lora_rank"]:
        config = lora.LoRAConfig(flags["lora_rank"], flags["lora_alpha"],
                                 lora.resolve_targets(model, flags["lora_targets"]), flags["lora_dropout"],
                                 flags["lora_rslora"], base_model_name_or_path=str(src))
        lora.apply(model, config, base_dtype)
    return model, tokenizer


def prepare(s, state=None):
    """Place and distribute the model; make the optimizer, the gradient scaler (fp16 only) and the
    data generator; restore them, the RNG states and the step from `state` when resuming;
    torch.compile last."""
    f = s.flags
    s.model.to(s.device)
    s.train_model = distribute(s.model, f, s.world_size, s.device)
    s.optimizer = make_optimizer(s.model, f, s.device, sharded=f["fsdp"] and s.world_size > 1)
    s.scaler = torch.amp.GradScaler(enabled=s.dtype == torch.float16)
    s.data_gen = torch.Generator().manual_seed(f["seed"])
    if state is not None:
        load_optimizer_state(s.model, s.optimizer, state["optimizer"])
        s.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        s.data_gen.set_state(state["rng"]["data"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        s.step, s.elapsed_before = state["step"], state["elapsed_s"]
        s.saved_step = state["step"]
    s.start_step = s.step
    s.train_model = torch.compile(s.train_model) if f["compile"] else s.train_model


def describe_attention(device, model):
    """The attention backend in use, with its window or Performer's feature count."""
    name, window = kernels.get_backend(device), kernels.get_window()
    if kernels.BACKENDS[name].stateful:
        return f"{name} (m = {performer.num_features(model.config.head_dim)} random features)"
    return f"{name}, window {window}" if window else name


def describe(s):
    """The run's first lines: model, data, device, precision, batch, steps; LoRA's parameter count."""
    f, model, manifest = s.flags, s.model, s.dataset.manifest
    s.say(f"model {f['model']}: {model.num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
          f"{manifest['n_train']:,} train / {manifest['n_val']:,} val tokens; "
          f"{s.device}, {str(s.dtype).removeprefix('torch.')}, attention {describe_attention(s.device, model)}; "
          f"{s.tokens_per_step:,} tokens per step{f' over {s.world_size} processes' if s.world_size > 1 else ''}, "
          f"steps {s.step}..{f['max_iters']}" + (f" or {f['max_time']:g} s of training" if f["max_time"] > 0 else "")
          + (f"; DPO on {manifest['pairs']:,} preference pairs, beta {f['dpo_beta']}" if f["dpo"] else ""), flush=True)
    if f["mm_images"]:
        bridge, lm = multimodal.count_params(model)
        cfg = model.bridge.config
        s.say(f"multimodal bridge ({cfg.queries or 'no'} queries, {cfg.media_tokens} media tokens, {cfg.inject}): "
              f"{bridge:,} parameters; language model {lm:,} parameters, "
              f"{'frozen' if cfg.freeze_lm else 'trained too'}; scenes of {f['mm_scene_digits']} digits from "
              f"{manifest['n_train']} train / {manifest['n_val']} val images, texts: {f['mm_texts']}", flush=True)
    if f["lora_rank"]:
        trainable, total = lora.count_params(model)
        cfg = model.lora_config
        s.say(f"LoRA rank {cfg.r} on {', '.join(cfg.target_modules)}: {trainable:,} trainable "
              f"parameters, {100 * trainable / (total - trainable):.2f}% of the frozen base model "
              f"{cfg.base_model_name_or_path} ({total - trainable:,})", flush=True)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Clock:
    """The loop's wall time: since it started (t0, at first_step) and since the last log line or
    evaluation (the interval that throughput is measured over: evaluations are left out)."""
    first_step: int
    t0: float = dataclasses.field(default_factory=time.time)
    interval_start: float = None
    interval_steps: int = 0

    def __post_init__(self):
        self.interval_start = self.t0

    def restart_interval(self, now=None):
        self.interval_start, self.interval_steps = time.time() if now is None else now, 0


class StopRequest:
    """Ctrl-C (SIGINT) while the loop runs in one process: the first asks it to stop after the step in
    progress (fit checkpoints there, so nothing is cut half-way); a second interrupts at once
    (KeyboardInterrupt). Installed in the main thread only, and only over Python's own SIGINT handler
    (a process that ignores SIGINT keeps ignoring it)."""

    def __init__(self, enabled=True):
        self.enabled, self.requested, self.previous = enabled, False, None

    def __enter__(self):
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C interrupts at once

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def fit(s, loss_fn=None):
    """Train from s.step to max_iters (or until --max_time seconds of training are spent) with loss_fn
    (default lm_loss; see train()): evaluate and checkpoint every eval_interval steps and at the last;
    print and log (out_dir/log.jsonl) every log_interval steps and at max_iters. A resumed run's log continues from the checkpoint's step
    (resume_log; an evaluation logged at that step is not repeated). Ctrl-C in one process: the loop
    stops after the step in progress, checkpoints it and raises runtime.Interrupted (stop_here).
    Returns (the last evaluation {"train", "val"}, the last logged loss_fn metrics, seconds of training
    in all)."""
    f, loss_fn = s.flags, loss_fn or lm_loss
    s.out_dir.mkdir(parents=True, exist_ok=True)
    log_path, resumed = s.out_dir / LOG, f["init_from"] == "resume"
    logged = resume_log(log_path, s.step, rewrite=s.rank == 0) if resumed else None
    if not resumed and s.rank == 0:  # a replaced run's state (--overwrite) never pairs with this run's files
        (s.out_dir / checkpoints.TRAIN_STATE).unlink(missing_ok=True)
    clock, losses, metrics = Clock(s.step), {}, {}
    with (open(log_path, "a" if resumed else "w") if s.rank == 0 else nullcontext()) as log_file, \
            StopRequest(enabled=s.world_size == 1) as stop:
        s.model.train()
        while True:
            performer.set_step(s.step)  # --performer_redraw: this step's draw of random features
            elapsed = training_seconds(s, clock)
            last = s.step >= f["max_iters"] or 0 < f["max_time"] <= elapsed
            if s.step % f["eval_interval"] == 0 or last:
                if logged is not None and s.step == clock.first_step:  # logged before the run stopped
                    losses = {"train": logged.get("train_lm_loss", logged.get("train_loss")), "val": logged["val_loss"]}
                else:
                    losses = evaluate_and_checkpoint(s, clock, log_file, last)
            if last:
                break
            if stop.requested:
                stop_here(s, clock)
            lr = lr_at(s.step, f, elapsed)
            loss, step_metrics = train_step(s, loss_fn, lr)
            clock.interval_steps += 1
            if s.step % f["log_interval"] == 0 or s.step == f["max_iters"]:
                metrics = log_progress(s, clock, log_file, lr, loss, step_metrics)
    return losses, metrics, s.elapsed_before + time.time() - clock.t0


def training_seconds(s, clock):
    """Seconds of training so far, a resumed run's earlier ones included. Under --max_time with several
    processes, rank 0's count (broadcast), so that every process takes the same learning rate and
    stops at the same step."""
    elapsed = s.elapsed_before + time.time() - clock.t0
    if s.flags["max_time"] > 0 and s.world_size > 1:
        value = torch.tensor([elapsed], dtype=torch.float64, device=s.device)  # NCCL takes device tensors
        torch.distributed.broadcast(value, 0)
        elapsed = value.item()
    return elapsed


def stop_here(s, clock):
    """Ctrl-C during fit: checkpoint this step (unless that is done) and raise runtime.Interrupted
    with the line that says which step the checkpoint holds and how to continue."""
    if s.saved_step != s.step:
        save_checkpoint(s, s.elapsed_before + time.time() - clock.t0)
    raise runtime.Interrupted(f"interrupted at step {s.step} of {s.flags['max_iters']}: checkpoint saved in "
                              f"{s.out_dir} (step {s.step}); continue with: python train.py --out_dir {s.out_dir} "
                              f"--resume")


def interrupted_line(s):
    """What a Ctrl-C that stopped the run at once says: the step of the last checkpoint in out_dir and the
    --resume command, or that there is none."""
    if s.saved_step is None:
        return f"interrupted at step {s.step} before the first checkpoint: nothing to resume in {s.out_dir}"
    return (f"interrupted at step {s.step}: the last checkpoint in {s.out_dir} holds step {s.saved_step}; "
            f"continue with: python train.py --out_dir {s.out_dir} --resume")


def evaluate_and_checkpoint(s, clock, log_file, last=False):
    """Evaluate, print and log the losses, and checkpoint (not at the step a run starts or resumes
    from, unless it is the last: max_iters, or --max_time spent). With --dpo the evaluation is the
    language-model loss beside a training loss that is DPO's: its lines say `lm loss` and log.jsonl's
    key is train_lm_loss (val_loss is always the language-model loss). Returns the losses {"train", "val"}."""
    f = s.flags
    losses = evaluate(s.train_model, s.dataset, f, s.ctx, s.device, s.rank, s.world_size)
    elapsed = s.elapsed_before + time.time() - clock.t0
    lm = " lm" if f["dpo"] else ""
    s.say(f"step {s.step}: train{lm} loss {losses['train']:.4f}, val{lm} loss {losses['val']:.4f}", flush=True)
    write_log(log_file, {"step": s.step, "elapsed_s": round(elapsed, 3), "val_loss": losses["val"],
                         "train_lm_loss" if f["dpo"] else "train_loss": losses["train"]})
    if s.step > clock.first_step or last:
        save_checkpoint(s, elapsed)
    clock.restart_interval()  # throughput excludes evaluation time
    return losses


def train_step(s, loss_fn, lr):
    """One optimizer step at learning rate lr over gradient_accumulation_steps micro-batches
    (gradient clipping, fp16 loss scaling). Returns the loss and metrics of the last micro-batch."""
    f, n_micro = s.flags, s.flags["gradient_accumulation_steps"]
    for group in s.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)  # muon: its peak over AdamW's
    for micro in range(n_micro):
        batch = s.dataset.get_batch("train", f["batch_size"], f["block_size"], s.data_gen, s.device, s.rank,
                                    s.world_size)
        with s.ctx, gradient_sync(s.train_model, micro == n_micro - 1):
            loss, metrics = loss_fn(s.train_model, batch)
            s.scaler.scale(loss / n_micro).backward()
    if f["grad_clip"] > 0:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), f["grad_clip"])
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    return loss, metrics


def log_progress(s, clock, log_file, lr, loss, metrics):
    """Print and log the step's line: the loss and metrics of its last micro-batch (averaged over the
    processes: the global batch's, as one process would see it), lr, throughput, ETA. Returns the
    metrics as floats."""
    f = s.flags
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device).detach()
                          for v in (loss, *metrics.values())])
    if s.world_size > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.AVG)
    loss_value, *metric_values = values.tolist()  # syncs the device, so the timing below is real
    metrics = dict(zip(metrics, metric_values))
    now = time.time()
    step_time = (now - clock.interval_start) / clock.interval_steps
    eta = (now - clock.t0) / (s.step - clock.first_step) * (f["max_iters"] - s.step)  # evaluations included
    if f["max_time"] > 0:
        eta = max(0.0, min(eta, f["max_time"] - (s.elapsed_before + now - clock.t0)))
    shown = "".join(f" | {name} {value:.4f}" for name, value in metrics.items())
    name = "dpo loss" if f["dpo"] and not f["dpo_replay"] else "loss"  # DPO's, not the evaluations' lm loss
    s.say(f"iter {s.step}/{f['max_iters']} | {name} {loss_value:.4f}{shown} | lr {lr:.2e} | "
          f"{s.tokens_per_step / step_time:,.0f} tok/s | {step_time * 1000:.0f} ms/iter | "
          f"ETA {format_eta(eta)}", flush=True)
    write_log(log_file, {"step": s.step, "elapsed_s": round(s.elapsed_before + now - clock.t0, 3),
                         "train_loss": loss_value, **metrics, "lr": lr,
                         "tokens_per_s": round(s.tokens_per_step / step_time, 1)})
    clock.restart_interval(now)
    return metrics


def write_log(log_file, record):
    """One JSON line in log.jsonl (rank 0 only: the others have no file)."""
    if log_file:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()


def read_log(path):
    """The records of a run's log.jsonl ([] without one). A last line cut off while it was written (the
    run killed) is left out; another line that is not a JSON record with a step: UserError naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            if n == len(lines):
                break
            raise UserError(f"{path}:{n}: not a log record; the log is damaged: delete that line (the log only "
                            "records the losses) and run the command again")
        records.append(record)
    return records


def resume_log(path, step, rewrite=True):
    """A resumed run's log.jsonl: the records up to the checkpoint's `step` kept and those after it (the
    steps the stopped run did after its last checkpoint, which this run does again) dropped, written back
    (rewrite; rank 0 only), so that the log holds each step once and elapsed_s never runs back. Returns
    the evaluation record logged at `step` (None when there is none)."""
    kept = [r for r in read_log(path) if r["step"] <= step]
    if rewrite:
        runtime.write_jsonl(path, kept)
    evaluations = [r for r in kept if r["step"] == step and "val_loss" in r]
    return evaluations[-1] if evaluations else None


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(s, elapsed):
    """Model (Hugging Face format; in a LoRA run, the adapter only) first, then train_state.pt;
    each file is written under a temporary name and renamed, and both carry the step so a torn pair
    is detected on resume. Every process takes part in gathering the state; rank 0 writes it."""
    model_state, optimizer_state = full_state(s.model, s.optimizer)
    if s.rank != 0:
        return
    model, metadata = s.model, {"step": str(s.step)}
    if s.flags["lora_rank"]:  # the base model and its tokenizer stay where adapter_config.json points
        lora.save_adapter(model, s.out_dir, state=model_state, metadata=metadata)
    elif s.flags["mm_images"]:  # the bridge; a frozen language model stays where multimodal.json points
        multimodal.save(model, s.out_dir, state=model_state, metadata=metadata)
        if not s.flags["mm_freeze"]:
            with multimodal.language_model(model):
                model.save_pretrained(s.out_dir, metadata=metadata)
            s.dataset.tokenizer.save(s.out_dir)
    else:
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):  # sharded: write a gathered copy
            with torch.device("meta"):
                gathered = type(model)(model.config)
            gathered.load_state_dict(model_state, assign=True)
            model = gathered
        model.save_pretrained(s.out_dir, metadata=metadata)
        s.dataset.tokenizer.save(s.out_dir)
    runtime.save_attention(s.out_dir, s.flags)
    state = {"step": s.step, "optimizer": optimizer_state, "scaler": s.scaler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "data": s.data_gen.get_state(),
                     **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})},
             "elapsed_s": elapsed, "args": s.flags}
    runtime.atomic_write(s.out_dir / checkpoints.TRAIN_STATE, lambda tmp: torch.save(state, tmp))
    s.saved_step = s.step


def load_train_state(out_dir, lora_rank):
    """train_state.pt of a run folder (weights-only), after checking that the model (or adapter) file
    beside it was written at the same step; a torn checkpoint, or a damaged file: UserError."""
    state = checkpoints.read_train_state(out_dir)
    weights = lora.ADAPTER_WEIGHTS if lora_rank else "model.safetensors"
    model_step = weights_step(out_dir / weights)
    if model_step != state["step"]:
        raise UserError(f"{out_dir}: {weights} (step {model_step}) and train_state.pt "
                        f"(step {state['step']}) do not match; the last checkpoint was interrupted while it was "
                        f"written: start a new run from its model with --init_from {out_dir} --out_dir NEW_DIR, "
                        "or train again with --overwrite")
    return state


def weights_step(path):
    """The training step a checkpoint's weights file was written at (its safetensors metadata), -1 when it
    names none. A file that cannot be read: ValueError naming it."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return int((f.metadata() or {}).get("step", -1))
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot load {path}: {type(e).__name__}: {runtime.first_line(e)}; "
                         f"{runtime.DAMAGED}") from None


WEIGHTS = ("model.safetensors", lora.ADAPTER_WEIGHTS, multimodal.BRIDGE_WEIGHTS)  # what a checkpoint's model is in


def check_out_dir(flags):
    """A new run (not --resume, no --overwrite) into a folder that holds a trained checkpoint (model weights
    and a train_state.pt past step 0) would replace it: UserError naming what is there (step, val loss)
    and the three ways on (--resume, another --out_dir, --overwrite). A missing or empty folder is fine."""
    out = Path(flags["out_dir"])
    if flags["init_from"] == "resume" or flags["overwrite"] or not (out / checkpoints.TRAIN_STATE).is_file():
        return
    if not any((out / name).is_file() for name in WEIGHTS):
        return
    ways = "continue it with --resume, train into another --out_dir, or pass --overwrite to replace it"
    try:
        step = checkpoints.read_train_state(out)["step"]
    except UserError:
        raise UserError(f"{out / checkpoints.TRAIN_STATE} is damaged: {out} holds a run that cannot be resumed; "
                        "train into another --out_dir, or pass --overwrite to replace it") from None
    if step <= 0:
        return
    try:
        evaluations = [r for r in read_log(out / LOG) if r["step"] == step and "val_loss" in r]
    except UserError:
        evaluations = []
    loss = f", val loss {evaluations[-1]['val_loss']:.4f}" if evaluations else ""
    raise UserError(f"{out} already holds a trained run (step {step}{loss}): {ways}")


# ----------------------------------------------------------------------------- the end, and the whole run

def finish(s, losses, elapsed):
    """The closing lines: the final loss and the time (a resumed run: its own steps and seconds, then the
    whole run's); with --merge, the base model with the adapter folded in (OUT_DIR/merged); leave the
    process group, or print a sample of sample_tokens tokens."""
    f = s.flags
    lm = " lm" if f["dpo"] else ""
    if s.start_step:
        mine = elapsed - s.elapsed_before
        timing = (f"this run: steps {s.start_step}..{s.step} in {format_eta(mine)} ({mine:.0f} s); "
                  f"{format_eta(elapsed)} ({elapsed:.0f} s) of training in all")
    else:
        timing = f"{format_eta(elapsed)} ({elapsed:.0f} s)"
    s.say(f"done: val{lm} loss {losses['val']:.4f} after {s.step} steps, {timing}; model saved in {s.out_dir}",
          flush=True)
    if f["merge"]:
        merged = s.out_dir / "merged"
        lora.merge(s.model).save_pretrained(merged)
        s.dataset.tokenizer.save(merged)
        s.say(f"merged model (base + adapter) saved in {merged}", flush=True)
    if s.world_size > 1:
        torch.distributed.destroy_process_group()
    elif f["sample_tokens"] > 0 and not f["mm_images"]:
        s.model.eval()
        print("sample:", flush=True)
        prompt = s.dataset.tokenizer.encode("\n")
        gen = torch.Generator(device=s.device).manual_seed(f["seed"])
        with s.ctx:
            stream(s.model, s.dataset.tokenizer, prompt, f["sample_tokens"], temperature=0.8, top_k=200,
                   generator=gen)
        print(flush=True)


def train(flags, module, loss_fn=None):
    """One training run with these flags (parse_args's or run()'s) of a model file of models/.
    loss_fn(model, batch) -> (scalar loss, {name: scalar metric}) is what the steps minimise (default
    lm_loss); its metrics, those of the last micro-batch of a logged step, go into log.jsonl beside
    train_loss. Returns {"val_loss", "train_loss" (the last evaluation, nats), the last logged metrics,
    "step", "elapsed_s", "out_dir"}. A folder that holds a trained run is not replaced without
    --overwrite (check_out_dir, once the flags and inputs are checked). Ctrl-C: runtime.Interrupted,
    whose line says which step the last checkpoint holds and how to continue."""
    if flags["self_reward"]:
        try:
            return self_reward.run(flags, module, train)
        except KeyboardInterrupt:
            raise runtime.Interrupted(f"interrupted: run the same command again to continue ({flags['out_dir']} "
                                      "keeps the finished iterations and the last checkpoint)") from None
    s = None
    try:
        s = start(flags)
        return stages(s, flags, module, loss_fn)
    except KeyboardInterrupt as e:
        if isinstance(e, runtime.Interrupted) or (s is not None and s.rank != 0):
            raise
        raise runtime.Interrupted(interrupted_line(s) if s is not None else
                                  "interrupted before training started") from None


def stages(s, flags, module, loss_fn):
    """train()'s stages after start: build, the objective, prepare, fit, finish."""
    state = build(s, module)
    if flags["dpo"]:
        if loss_fn is not None:
            raise UserError("--dpo is a training objective of its own: it cannot take another loss_fn")
        reference = None if flags["lora_rank"] else dpo.load_reference(flags["dpo_reference"], s.device)
        loss_fn = dpo.DPOLoss(reference, flags["dpo_beta"])
        if flags["dpo_replay"]:  # the replay corpus, tokenized with the model's tokenizer
            replay = data.prepare(flags["dpo_replay"], s.dataset.tokenizer, flags["data_dir"])
            replay.check_block_size(flags["block_size"])
            loss_fn = dpo.ReplayLoss(loss_fn, replay, flags["dpo_replay_weight"],
                                     flags["dpo_replay_batch"] or flags["batch_size"], flags["block_size"],
                                     torch.Generator().manual_seed(flags["seed"] + 2))
    if flags["mm_images"]:
        if loss_fn is not None:
            raise UserError("--mm_images trains with its own loss (multimodal.loss_fn): it cannot take another loss_fn")
        loss_fn = multimodal.loss_fn
    check_out_dir(flags)  # after every check of the flags and inputs, before anything is written
    prepare(s, state)
    describe(s)
    losses, metrics, elapsed = fit(s, loss_fn)
    finish(s, losses, elapsed)
    return {**metrics, "val_loss": losses["val"], "train_loss": losses["train"], "step": s.step,
            "elapsed_s": elapsed, "out_dir": str(s.out_dir)}


def main(argv=None):
    """The command line: train with the flags of argv (default sys.argv[1:])."""
    argv = sys.argv[1:] if argv is None else argv
    flags, module = parse_args(argv)
    train(flags, module)
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
