"""One training loop for every model in models/.

  python train.py --model gpt                          # the default: Shakespeare, char tokens, CPU-sized
  python train.py --config config/tinyshakespeare_cpu.toml
  python train.py --model gpt --resume                 # continue out/gpt where it stopped
  python train.py --init_from HF_DIR --data my.txt     # fine-tune a Hugging Face checkpoint
  python train.py --init_from out/gpt --lora_rank 8 --data my.txt --out_dir out/lora --merge   # LoRA

Every option is a flag (`--help` lists them with their defaults); the model's own options come
from its Config dataclass. `--config FILE` is a TOML file of flag values; the command line
overrides it. A run folder (`--out_dir`) holds the model in Hugging Face format (config.json +
model.safetensors, so sample.py and transformers load it directly), its tokenizer,
train_state.pt (optimizer, step, RNG states, data position, flags; loaded weights-only) and
log.jsonl (one JSON object per log line). A LoRA run's folder holds the adapter instead of the model
(lora.py: adapter_config.json, which names the base model's directory, and adapter_model.safetensors),
train_state.pt and log.jsonl; --merge adds merged/, the base with the adapter folded in.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
import tomllib
from contextlib import nullcontext
from pathlib import Path

import torch

import data
import kernels
import lora
import models
import runtime
from runtime import UserError, autocast, resolve_device, resolve_dtype
from sample import stream

TRAIN_FLAGS = [
    # (name, default, help)
    ("model", "gpt", "the model file models/NAME.py"),
    ("config", "", "a TOML file of flag values (see config/); command-line flags override it"),
    ("out_dir", "", "the run folder; empty: out/MODEL"),
    ("data", "", "a UTF-8 .txt file or a folder of them; empty: Shakespeare's complete works"),
    ("data_dir", str(data.DEFAULT_DATA_DIR), "where corpora and their tokenized caches live"),
    ("tokenizer", "char", "char, bpe:N (trained on the corpus), gpt2, cl100k_base or o200k_base"),
    ("init_from", "scratch", "scratch, resume (the run in --out_dir), or a model directory to fine-tune"),
    ("convert_kv_heads", 0, "with --init_from DIR: mean-pool the key/value heads into this many groups (GQA "
                            "uptraining, Ainslie et al. 2023) before training (0: keep)"),
    ("resume", False, "same as --init_from resume"),
    ("lora_rank", 0, "with --init_from DIR: freeze the model and train rank-r LoRA adapters (Hu et al. 2021) "
                     "on the --lora_targets layers; 0: off (full fine-tuning)"),
    ("lora_alpha", 16.0, "LoRA: the update B A is scaled by lora_alpha / lora_rank"),
    ("lora_dropout", 0.0, "LoRA: dropout on the adapters' input"),
    ("lora_targets", "q,v", "LoRA: layers to adapt, comma-separated from q, k, v, o, mlp, or all (every linear "
                            "layer but the output head); gpt's fused c_attn is q, k and v at once"),
    ("lora_rslora", False, "LoRA: scale by lora_alpha / sqrt(lora_rank) (rank-stabilised LoRA)"),
    ("merge", False, "LoRA: at the end, write the base model with the adapter folded in to OUT_DIR/merged "
                     "(Hugging Face format); with --resume --max_iters 0, only that"),
    ("max_iters", 750, "optimizer steps"),
    ("batch_size", 32, "sequences per micro-batch"),
    ("block_size", 128, "tokens per sequence"),
    ("gradient_accumulation_steps", 1, "micro-batches per optimizer step"),
    ("learning_rate", 3e-3, "peak learning rate"),
    ("min_lr", -1.0, "final learning rate of the cosine decay (-1: learning_rate / 10)"),
    ("warmup_iters", 100, "steps of linear warmup"),
    ("lr_decay_iters", -1, "steps of cosine decay (-1: max_iters)"),
    ("weight_decay", 0.1, "AdamW weight decay, on matrices and embeddings only"),
    ("beta1", 0.9, "AdamW beta1"),
    ("beta2", 0.99, "AdamW beta2"),
    ("grad_clip", 1.0, "clip the gradient norm to this (0: off)"),
    ("eval_interval", 250, "evaluate and checkpoint every N steps"),
    ("eval_iters", 20, "batches per split in an evaluation"),
    ("log_interval", 50, "print a log line every N steps"),
    ("device", "auto", "cpu, cuda, cuda:N, or auto"),
    ("dtype", "auto", "float32, bfloat16 or float16 (autocast; fp16 with a gradient scaler), or auto"),
    ("compile", False, "torch.compile the model"),
    ("fsdp", False, "under torchrun: shard parameters, gradients and optimizer state with FSDP (fully_shard) "
                    "instead of replicating them with DistributedDataParallel"),
    ("attn", "auto", "attention backend: " + ", ".join(kernels.names())),
    ("seed", 1337, "random seed"),
    ("sample_tokens", 300, "tokens of sample text printed at the end (0: none)"),
]
MODEL_FLAGS_EXCLUDED = {"vocab_size", "block_size"}  # set from the tokenizer and --block_size


def flag_default(name):
    return next(default for flag, default, _ in TRAIN_FLAGS if flag == name)


def model_flags(module):
    """The model file's Config fields as (name, default, help) flags."""
    return [(f.name, f.default, f"model: {f.name}") for f in dataclasses.fields(module.Config)
            if f.name not in MODEL_FLAGS_EXCLUDED]


def build_parser(flags, suppress=False):
    """The argparse parser of these flags; with suppress, parsing returns only the flags given."""
    p = runtime.ArgumentParser(description="Train a model of models/ (one loop for every model and method).",
                               argument_default=argparse.SUPPRESS if suppress else None)
    for name, default, help_text in flags:
        kind = runtime.str2bool if isinstance(default, bool) else type(default)
        extra = {"nargs": "?", "const": True} if kind is runtime.str2bool else {}
        p.add_argument(f"--{name}", type=kind, help=help_text, **extra,
                       **({} if suppress else {"default": default}))
    return p


def parse_args(argv):
    """Flag values: defaults < the saved run (when resuming) < --config file < command line.
    Returns (flags as a dict, the model file's module)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--config", default="")
    known = pre.parse_known_args(argv)[0]
    overrides = {}
    if known.config:
        try:
            overrides = tomllib.loads(Path(known.config).read_text())
        except FileNotFoundError:
            raise UserError(f"config file not found: {known.config}") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{known.config}: {e}") from None
    module = models.get(known.model or overrides.get("model", "gpt"))  # the model decides the model flags
    flags = TRAIN_FLAGS + model_flags(module)
    args = vars(build_parser(flags).parse_args(argv))
    explicit = vars(build_parser(flags, suppress=True).parse_args(argv))
    if overrides:
        defaults = {name: default for name, default, _ in flags}
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise UserError(f"{args['config']}: unknown flag(s) {', '.join(unknown)}")
        explicit = {**{k: type(defaults[k])(v) for k, v in overrides.items()}, **explicit}
    if args["resume"] or explicit.get("init_from") == "resume":
        explicit["init_from"] = "resume"
    args.update(explicit)
    args["out_dir"] = args["out_dir"] or f"out/{args['model']}"
    if args["init_from"] == "resume":
        state_path = Path(args["out_dir"]) / "train_state.pt"
        if not state_path.is_file():
            raise UserError(f"nothing to resume: no {state_path}")
        saved = torch.load(state_path, map_location="cpu", weights_only=True)["args"]
        args = {**args, **saved, **explicit}
    return args, module


# ----------------------------------------------------------------------------- training

def lr_at(step, a):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = a["lr_decay_iters"] if a["lr_decay_iters"] > 0 else a["max_iters"]
    min_lr = a["min_lr"] if a["min_lr"] >= 0 else a["learning_rate"] / 10
    if step < a["warmup_iters"]:
        return a["learning_rate"] * (step + 1) / (a["warmup_iters"] + 1)
    if step >= decay_iters:
        return min_lr
    progress = (step - a["warmup_iters"]) / max(1, decay_iters - a["warmup_iters"])
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (a["learning_rate"] - min_lr)


def make_optimizer(model, a, device, sharded=False):
    """AdamW; weight decay on tensors of two or more dimensions (matrices, embeddings) only. The
    fused kernel, except on FSDP's sharded parameters (DTensors), which take the foreach one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": a["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a["learning_rate"], betas=(a["beta1"], a["beta2"]),
                             fused=not sharded, foreach=sharded or None)


@torch.no_grad()
def evaluate(model, dataset, a, ctx, device, rank=0, world_size=1):
    """Mean loss over eval_iters global batches of each split; the same batches at every evaluation
    (each process takes its slice, and the means are averaged)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(a["seed"] + 1)
        losses = []
        for _ in range(a["eval_iters"]):
            x, y = dataset.get_batch(split, a["batch_size"], a["block_size"], gen, device, rank, world_size)
            with ctx:
                losses.append(model(x, y)[1])
        mean = torch.stack(losses).mean()
        if world_size > 1:
            torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.AVG)
        out[split] = mean.item()
    model.train()
    return out


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


def distribute(model, a, world_size, device):
    """The module that trains: the model itself in one process; wrapped in DistributedDataParallel
    (replicas, gradients all-reduced) or sharded in place by FSDP's fully_shard (every block, then
    the rest) under torchrun."""
    if world_size == 1:
        return model
    if a["fsdp"]:
        from torch.distributed.fsdp import fully_shard
        for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
            for block in blocks:
                fully_shard(block)
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(model, tokenizer, optimizer, scaler, a, step, data_gen, elapsed, out_dir, rank=0):
    """Model (Hugging Face format; in a LoRA run, the adapter only) first, then train_state.pt;
    each file is written under a temporary name and renamed, and both carry the step so a torn pair
    is detected on resume. Every process takes part in gathering the state; rank 0 writes it."""
    model_state, optimizer_state = full_state(model, optimizer)
    if rank != 0:
        return
    if a["lora_rank"]:  # the base model and its tokenizer stay where adapter_config.json points
        lora.save_adapter(model, out_dir, state=model_state, metadata={"step": str(step)})
    else:
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):  # sharded: write a gathered copy
            with torch.device("meta"):
                gathered = type(model)(model.config)
            gathered.load_state_dict(model_state, assign=True)
            model = gathered
        model.save_pretrained(out_dir, metadata={"step": str(step)})
        tokenizer.save(out_dir)
    state = {"step": step, "optimizer": optimizer_state, "scaler": scaler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                     **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})},
             "elapsed_s": elapsed, "args": a}
    runtime.atomic_write(Path(out_dir) / "train_state.pt", lambda tmp: torch.save(state, tmp))


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(a, module):
    out_dir = Path(a["out_dir"])
    rank, world_size, device = setup_distributed(resolve_device(a["device"]))
    dtype = resolve_dtype(a["dtype"], device)
    kernels.set_backend(a["attn"])
    torch.manual_seed(a["seed"])
    ctx = autocast(device, dtype)
    say = print if rank == 0 else (lambda *args, **kwargs: None)  # only rank 0 prints and writes
    if a["lora_rank"] and a["init_from"] == "scratch":
        raise UserError("--lora_rank adapts a trained model: give it --init_from DIR")
    if a["lora_rank"] and a["convert_kv_heads"]:
        raise UserError("--convert_kv_heads changes the base model: convert in a run of its own, then LoRA-tune it")
    if a["merge"] and (not a["lora_rank"] or world_size > 1):
        raise UserError("--merge folds a LoRA adapter into its base: it needs --lora_rank, in one process")
    if world_size > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 prepares the data first; the others then reuse it

    # --- model and tokenizer
    state = None
    if a["init_from"] == "scratch":
        dataset = data.prepare(a["data"] or None, a["tokenizer"], a["data_dir"])
        cfg_fields = {f.name for f in dataclasses.fields(module.Config)}
        config = module.Config(**{k: v for k, v in a.items() if k in cfg_fields and k not in MODEL_FLAGS_EXCLUDED},
                               vocab_size=dataset.tokenizer.vocab_size, block_size=a["block_size"])
        model = module.Model(config)
    else:
        src = out_dir if a["init_from"] == "resume" else Path(a["init_from"])
        if not src.is_dir():
            raise UserError(f"--init_from: no model directory {src}")
        lora_resume = a["lora_rank"] and a["init_from"] == "resume"
        base = lora.base_path(out_dir) if lora_resume else src  # a LoRA run's folder holds only the adapter
        model = models.from_pretrained(base, dtype=torch.float32)
        tokenizer = data.tokenizer_for_model(base, model.config.vocab_size)
        if a["convert_kv_heads"] and a["init_from"] != "resume":
            if not hasattr(model, "convert_kv_heads"):
                raise UserError(f"--convert_kv_heads: {type(model).__module__} has no key/value heads to convert")
            model.convert_kv_heads(a["convert_kv_heads"])
        base_dtype = None if dtype == torch.float32 else dtype  # LoRA: the frozen base needs no fp32 copy
        if lora_resume:
            lora.load_adapter(model, out_dir, base_dtype)
        elif a["lora_rank"]:
            config = lora.LoRAConfig(a["lora_rank"], a["lora_alpha"], lora.resolve_targets(model, a["lora_targets"]),
                                     a["lora_dropout"], a["lora_rslora"], base_model_name_or_path=str(src))
            lora.apply(model, config, base_dtype)
        dataset = data.prepare(a["data"] or None, tokenizer, a["data_dir"])
        if a["init_from"] == "resume":
            state = torch.load(out_dir / "train_state.pt", map_location="cpu", weights_only=True)
            from safetensors import safe_open
            weights = lora.ADAPTER_WEIGHTS if a["lora_rank"] else "model.safetensors"
            with safe_open(out_dir / weights, "pt") as f:
                model_step = int((f.metadata() or {}).get("step", -1))
            if model_step != state["step"]:
                raise UserError(f"{out_dir}: {weights} (step {model_step}) and train_state.pt "
                                     f"(step {state['step']}) do not match; the last checkpoint was interrupted")
    if world_size > 1 and rank == 0:
        torch.distributed.barrier()
    dataset.check_block_size(a["block_size"])
    if getattr(model.config, "pos", None) == "learned" and a["block_size"] > model.config.block_size:
        raise UserError(f"--block_size {a['block_size']} exceeds the model's {model.config.block_size} positions")
    model.to(device)
    train_model = distribute(model, a, world_size, device)
    optimizer = make_optimizer(model, a, device, sharded=a["fsdp"] and world_size > 1)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    data_gen = torch.Generator().manual_seed(a["seed"])
    step, elapsed_before = 0, 0.0
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        data_gen.set_state(state["rng"]["data"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, elapsed_before = state["step"], state["elapsed_s"]
    train_model = torch.compile(train_model) if a["compile"] else train_model

    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "log.jsonl", "a" if state is not None else "w") if rank == 0 else None

    def log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    n_params = model.num_params()
    tokens_per_step = a["batch_size"] * a["block_size"] * a["gradient_accumulation_steps"] * world_size
    say(f"model {a['model']}: {n_params / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
          f"{dataset.manifest['n_train']:,} train / {dataset.manifest['n_val']:,} val tokens; "
          f"{device}, {str(dtype).removeprefix('torch.')}, attention {kernels.get_backend(device)}; "
          f"{tokens_per_step:,} tokens per step{f' over {world_size} processes' if world_size > 1 else ''}, "
          f"steps {step}..{a['max_iters']}", flush=True)
    if a["lora_rank"]:
        trainable, total = lora.count_params(model)
        say(f"LoRA rank {model.lora_config.r} on {', '.join(model.lora_config.target_modules)}: {trainable:,} trainable "
            f"parameters, {100 * trainable / (total - trainable):.2f}% of the frozen base model "
            f"{model.lora_config.base_model_name_or_path} ({total - trainable:,})", flush=True)

    t0, first_step, losses = time.time(), step, {}
    t_interval, steps_interval = t0, 0  # a resumed run may start between evaluations
    model.train()
    while True:
        if step % a["eval_interval"] == 0 or step >= a["max_iters"]:
            losses = evaluate(train_model, dataset, a, ctx, device, rank, world_size)
            elapsed = elapsed_before + time.time() - t0
            say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            log({"step": step, "elapsed_s": round(elapsed, 3), "val_loss": losses["val"], "train_loss": losses["train"]})
            if step > first_step or step == a["max_iters"]:
                save_checkpoint(model, dataset.tokenizer, optimizer, scaler, a, step, data_gen, elapsed, out_dir, rank)
            t_interval, steps_interval = time.time(), 0  # throughput excludes evaluation time
        if step >= a["max_iters"]:
            break
        lr = lr_at(step, a)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(a["gradient_accumulation_steps"]):
            x, y = dataset.get_batch("train", a["batch_size"], a["block_size"], data_gen, device, rank, world_size)
            with ctx, gradient_sync(train_model, micro == a["gradient_accumulation_steps"] - 1):
                _, loss = train_model(x, y)
                scaler.scale(loss / a["gradient_accumulation_steps"]).backward()
        if a["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), a["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_interval += 1
        if step % a["log_interval"] == 0 or step == a["max_iters"]:
            if world_size > 1:  # the mean over the global batch, as one process would see it
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
            loss_value = loss.item()  # syncs the device, so the timing below is real
            now = time.time()
            step_time = (now - t_interval) / steps_interval
            eta = (now - t0) / (step - first_step) * (a["max_iters"] - step)  # evaluations included
            say(f"iter {step}/{a['max_iters']} | loss {loss_value:.4f} | lr {lr:.2e} | "
                  f"{tokens_per_step / step_time:,.0f} tok/s | {step_time * 1000:.0f} ms/iter | "
                  f"ETA {format_eta(eta)}", flush=True)
            log({"step": step, "elapsed_s": round(elapsed_before + now - t0, 3), "train_loss": loss_value,
                 "lr": lr, "tokens_per_s": round(tokens_per_step / step_time, 1)})
            t_interval, steps_interval = now, 0
    if log_file:
        log_file.close()
    total = elapsed_before + time.time() - t0
    say(f"done: val loss {losses['val']:.4f} after {step} steps, {format_eta(total)} ({total:.0f} s); "
          f"model saved in {out_dir}", flush=True)
    if a["merge"]:
        merged = out_dir / "merged"
        lora.merge(model).save_pretrained(merged)
        dataset.tokenizer.save(merged)
        say(f"merged model (base + adapter) saved in {merged}", flush=True)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    elif a["sample_tokens"] > 0:
        model.eval()
        print("sample:", flush=True)
        prompt = dataset.tokenizer.encode("\n")
        gen = torch.Generator(device=device).manual_seed(a["seed"])
        with ctx:
            stream(model, dataset.tokenizer, prompt, a["sample_tokens"], temperature=0.8, top_k=200, generator=gen)
        print(flush=True)
    return {"val_loss": losses["val"], "train_loss": losses["train"], "step": step, "elapsed_s": total}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, module = parse_args(argv)
    train(args, module)
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
