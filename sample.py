"""Generate text from a trained run folder or a Hugging Face directory, decoding with the KV cache.

  python sample.py --out_dir out/gpt --prompt "ROMEO:"
  python sample.py --out_dir out/gpt --prompt @prompt.txt --num_samples 3 --temperature 0.9 --top_p 0.95
  python sample.py --out_dir out/gpt --fewshot tasks.jsonl --shots 3 --prompt "query text"
  python sample.py --out_dir out/lora --prompt "ROMEO:"   # a LoRA adapter on its base model

Few-shot prompts are built GPT-3's way (Brown et al. 2020): an optional task description line,
K demonstrations `input => output` separated by blank lines, then `query =>`; the completion is
generated up to the end of its line. The .jsonl file holds one {"input": ..., "output": ...}
object per line, and optionally one {"description": ...} line.
"""
import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

import data
import kernels
import lora
import models


# ----------------------------------------------------------------------------- decoding

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, otherwise a draw from the
    softmax at that temperature, restricted to the top_k tokens and/or the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # tokens after the nucleus is full
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True):
    """Yield max_new_tokens new tokens, a (B,) tensor at a time, continuing idx (B, T).
    The prompt is run once to fill the KV cache, then each step feeds one token. When the cache
    reaches block_size, it is refilled from the last half block of the sequence. Without the
    cache (use_cache=False, for comparison) every step recomputes the last block_size tokens."""
    block = model.config.block_size
    seq = idx[:, -block:]
    cache_len = min(block, seq.shape[1] + max_new_tokens)  # real checkpoints have block_size up to 128k
    cache = model.init_cache(idx.shape[0], cache_len) if use_cache else None
    logits, _ = model(seq, cache=cache)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        yield nxt
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        if not use_cache:
            seq = seq[:, -block:]
            logits, _ = model(seq)
        elif cache.pos == cache_len:  # only when cache_len == block
            seq = seq[:, -(block // 2):]
            cache = model.init_cache(idx.shape[0], block)
            logits, _ = model(seq, cache=cache)
        else:
            logits, _ = model(seq[:, -1:], cache=cache)


def stream(model, tokenizer, prompt_ids, max_new_tokens, out=sys.stdout, stop=None, **sampling):
    """Generate from one prompt, writing the text to `out` as it comes, and return it. With
    `stop`, generation ends where that string first appears (it is not included)."""
    device = model.lm_head.weight.device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    ids, shown = [], ""
    for tok in generate(model, idx, max_new_tokens, **sampling):
        ids.append(tok.item())
        text = tokenizer.decode(ids)
        done = stop is not None and stop in text
        if done:
            text = text[:text.index(stop)]
        if done or not text.endswith("\ufffd"):  # hold back half of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
        if done:
            return text
    out.write(text[len(shown):] if ids else "")
    return text if ids else ""


# ----------------------------------------------------------------------------- few-shot prompts

def read_fewshot(path):
    """(description or None, list of {"input", "output"} records) from a .jsonl file."""
    description, records = None, []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise data.UserError(f"few-shot file not found: {path}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise data.UserError(f"{path}:{n}: not JSON ({e.msg})") from None
        if "description" in obj:
            description = obj["description"]
        elif "input" in obj and "output" in obj:
            records.append(obj)
        else:
            raise data.UserError(f"{path}:{n}: expected {{\"input\": ..., \"output\": ...}} or {{\"description\": ...}}")
    return description, records


def fewshot_prompt(demos, query, description=None, sep=" =>"):
    """GPT-3's format: description, then `input => output` demonstrations, then `query =>`,
    blocks separated by blank lines."""
    blocks = [description] if description else []
    blocks += [f"{d['input']}{sep} {d['output']}" for d in demos]
    blocks.append(f"{query}{sep}")
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- command line

def load(directory, device="cpu", dtype=None):
    """A model directory (a training run or a Hugging Face checkpoint) and its tokenizer. A LoRA
    adapter folder (adapter_config.json) loads its base model and the adapter, merged into it
    (decoding then costs what the base model costs); the tokenizer is the base model's."""
    if not Path(directory).is_dir():
        raise data.UserError(f"model directory not found: {directory}")
    adapter = lora.is_adapter(directory)
    base = lora.base_path(directory) if adapter else directory
    model = models.from_pretrained(base, dtype=dtype, device=device).eval()
    if adapter:
        lora.merge(lora.load_adapter(model, directory))
    return model, data.tokenizer_for_model(base, model.config.vocab_size)


def autocast(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def resolve_device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def resolve_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise data.UserError(f"--dtype must be auto, {', '.join(dtypes)}; not {name!r}")
    return dtypes[name]


def parser():
    p = argparse.ArgumentParser(description="Generate text from a trained model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out/gpt", help="a training run folder, a Hugging Face model directory, "
                   "or a LoRA adapter folder (its base model + the adapter)")
    p.add_argument("--prompt", default="\n", help="the prompt text, or @FILE to read it from a file; "
                   "with --fewshot, the query")
    p.add_argument("--num_samples", type=int, default=1, help="how many samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                   "whose probability reaches p (1.0: all)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, or auto")
    p.add_argument("--attn", default="auto", choices=kernels.BACKENDS + ("auto",), help="attention backend")
    p.add_argument("--fewshot", default=None, help="a .jsonl file of demonstrations for a few-shot prompt")
    p.add_argument("--shots", type=int, default=3, help="number of demonstrations in the few-shot prompt")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    kernels.set_backend(args.attn)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load(args.out_dir, device=device)
    prompt = args.prompt
    if prompt.startswith("@"):
        try:
            prompt = Path(prompt[1:]).read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError) as e:
            raise data.UserError(f"cannot read prompt file {prompt[1:]}: {e}") from None
    stop = None
    if args.fewshot:
        description, records = read_fewshot(args.fewshot)
        query_given = args.prompt != parser().get_default("prompt")
        if args.shots < 0 or len(records) < args.shots + (0 if query_given else 1):
            raise data.UserError(f"{args.fewshot} has {len(records)} demonstrations; --shots {args.shots} needs "
                                 f"{args.shots + (0 if query_given else 1)} (the query included)")
        query = prompt if query_given else records[args.shots]["input"]
        prompt, stop = fewshot_prompt(records[:args.shots], query, description), "\n"
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise data.UserError("the prompt is empty")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, generator=generator)
    with autocast(device, dtype):
        for i in range(args.num_samples):
            print(prompt, end="", flush=True)
            stream(model, tokenizer, prompt_ids, args.max_new_tokens, stop=stop, **sampling)
            print("\n" + "-" * 40 if i + 1 < args.num_samples else "")
    return 0


if __name__ == "__main__":
    data.run_cli(main)
