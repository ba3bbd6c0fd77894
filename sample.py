"""Generate text from a trained run folder or a Hugging Face directory, decoding with the KV cache.

  python sample.py --out_dir out/gpt --prompt "ROMEO:"
  python sample.py --out_dir out/gpt --prompt @prompt.txt --num_samples 3 --temperature 0.9 --top_p 0.95
  python sample.py --out_dir out/gpt --fewshot tasks.jsonl --shots 3 --prompt "query text"
  python sample.py --out_dir out/lora --prompt "ROMEO:"   # a LoRA adapter on its base model
  python sample.py --out_dir out/gpt --prompt "ROMEO:" --prompt "JULIET: O" --compile   # one batch, compiled steps

Several prompts (and --num_samples > 1) are decoded together as one batch, left-padded to the
longest (kernels.KVCache masks the padding): greedy decoding gives each row the tokens it would
get alone, up to block_size tokens of prompt and completion.

Few-shot prompts are built GPT-3's way (Brown et al. 2020): an optional task description line,
K demonstrations `input => output` separated by blank lines, then `query =>`; the completion is
generated up to the end of its line. The .jsonl file holds one {"input": ..., "output": ...}
object per line, and optionally one {"description": ...} line.
"""
import json
import sys
from pathlib import Path

import torch

import kernels
import lora
import models
import runtime
import tokenization
from runtime import UserError, autocast, resolve_device, resolve_dtype


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


def left_pad(prompts, pad_id=0, device="cpu"):
    """Prompts of different lengths (lists of token ids) -> idx (B, T), each row padded on the
    left with pad_id to the longest, and pad (B,), how many padding tokens each row starts with."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    return idx, torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)


def compiled_decoder(model):
    """model's forward under torch.compile, made once per model, for one-token steps against a
    static KV cache: every step has the same shapes and inputs, so it compiles on the first step and
    never again. On CPU the compiled graph is driven from C++ (inductor's cpp_wrapper), which cuts
    the per-step overhead of small models."""
    if "_compiled_decoder" not in model.__dict__:  # outside nn.Module's registry: not a submodule
        options = {"cpp_wrapper": True} if model.lm_head.weight.device.type == "cpu" else {}
        model.__dict__["_compiled_decoder"] = torch.compile(model.forward, options=options)
    return model.__dict__["_compiled_decoder"]


def _window(seq, pad, n):
    """The last n tokens of seq (B, T), and the padding left in each row (pad (B,) or None)."""
    drop = max(seq.shape[1] - n, 0)
    if drop and pad is not None:
        pad = (pad - drop).clamp(min=0)
    return seq[:, drop:], pad


# gpt-fast's layout (generate.py): prefill runs the prompt into a fresh KV cache, decode_one_token
# draws a token and feeds it, decode_n_tokens loops (refilling a full cache), generate sets them up.

@torch.no_grad()
def prefill(model, seq, pad=None, max_len=None, static=False):
    """Run seq (B, T) into a fresh KV cache of max_len slots; return (logits (B, V) after the last
    token, the cache). pad (B,) and static: see kernels.KVCache. Under autocast the cache holds keys
    and values in the autocast dtype. max_len=None (recomputing): no cache is kept, the cache
    returned is None, except for a padded batch, where a throwaway one of T slots carries the mask."""
    if max_len is None and pad is None:
        return model(seq)[0][:, -1], None
    kind = seq.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    cache = model.init_cache(seq.shape[0], seq.shape[1] if max_len is None else max_len, dtype=dtype, pad=pad,
                             static=static)
    return model(seq, cache=cache)[0][:, -1], cache


def decode_one_token(model, logits, cache, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One step: draw the next tokens (B,) from logits (B, V) (sample_next), feed them to `model`
    (the model, or its compiled_decoder) against cache, which must have a free slot; return (the
    tokens (B,), the logits (B, V) after them). Call it under torch.no_grad(), as generate does."""
    token = sample_next(logits, temperature, top_k, top_p, generator)
    return token, model(token[:, None], cache=cache)[0][:, -1]


@torch.no_grad()
def decode_n_tokens(model, seq, logits, cache, n, pad=None, use_cache=True, compile=False, **sampling):
    """Yield n new tokens, a (B,) tensor at a time, continuing seq (B, T) from the logits (B, V) and
    cache that prefill(seq, pad) returned; sampling: sample_next's keywords.
    With the cache, each step is decode_one_token (through compiled_decoder with compile=True). A
    full cache (cache.max_len slots) is refilled: the new token joins the sequence, and prefill runs
    on its last block_size // 2 tokens, for all rows at once (on the longest row's schedule).
    use_cache=False recomputes instead: every step runs prefill on the last block_size tokens."""
    block = model.config.block_size
    step = compiled_decoder(model) if compile and use_cache else model
    max_len = cache.max_len if use_cache else None
    filled, recent = seq.shape[1], []  # recent: tokens not yet joined to seq (joined at a refill: one copy)
    for _ in range(n):
        if use_cache and filled < max_len:
            token, logits = decode_one_token(step, logits, cache, **sampling)
            filled += 1
            recent.append(token[:, None])
        else:  # recomputing, or the cache is full: prefill the window the rule keeps
            token = sample_next(logits, **sampling)
            seq, recent = torch.cat([seq, *recent, token[:, None]], dim=1), []
            seq, pad = _window(seq, pad, block // 2 if use_cache else block)
            logits, cache = prefill(model, seq, pad, max_len, static=compile)
            filled = seq.shape[1]
        yield token


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             use_cache=True, pad=None, compile=False):
    """Yield max_new_tokens new tokens, a (B,) tensor at a time, continuing idx (B, T).

    Rows may be prompts of different lengths, left-padded: pad (B,) says how many padding tokens
    each row starts with (left_pad makes idx and pad); each row then decodes as it would alone, as
    long as the padded batch fits block_size (a full cache is refilled for all rows at once, on the
    longest row's schedule; without the cache every row keeps its own last block_size tokens).
    The prompt's last block_size tokens are run once to fill a pre-allocated KV cache (prefill),
    then each step feeds one token (decode_n_tokens). When the cache reaches block_size, it is
    refilled from the last half block of the sequence.
    compile=True runs the one-token steps through compiled_decoder over a static cache.
    use_cache=False (for comparison) recomputes the last block_size tokens at every step."""
    block = model.config.block_size
    if pad is not None:  # no padding at all: the unmasked path
        pad = torch.as_tensor(pad, dtype=torch.long, device=idx.device)
        pad = pad if int(pad.max()) > 0 else None
    seq, pad = _window(idx, pad, block)
    max_len = None  # the cache's slots; None: recomputing
    if use_cache:
        max_len = seq.shape[1] + max_new_tokens
        if compile:  # a power of two: calls of other lengths reuse the compiled step (its shapes are the cache's)
            max_len = 1 << (max_len - 1).bit_length()
        max_len = min(block, max_len)  # real checkpoints have block_size up to 128k
    logits, cache = prefill(model, seq, pad, max_len, static=compile)
    yield from decode_n_tokens(model, seq, logits, cache, max_new_tokens, pad, use_cache, compile,
                               temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)


def stream(model, tokenizer, prompt_ids, max_new_tokens, out=sys.stdout, stop=None, **sampling):
    """Generate from one prompt, writing the text to `out` as it comes, and return it. With
    `stop`, generation ends where that string first appears (it is not included)."""
    device = model.lm_head.weight.device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    ids, shown, text = [], "", ""
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
    out.write(text[len(shown):])
    return text


def complete(model, tokenizer, prompts, max_new_tokens, stop=None, **sampling):
    """Completions (texts) of several prompts (lists of token ids), decoded together as one
    left-padded batch. With `stop`, each ends where that string first appears (not included), and
    decoding ends when every row has it."""
    idx, pad = left_pad(prompts, device=model.lm_head.weight.device)
    ids, open_rows = [[] for _ in prompts], set(range(len(prompts)))
    for tok in generate(model, idx, max_new_tokens, pad=pad, **sampling):
        for row, t in zip(ids, tok.tolist()):
            row.append(t)
        if stop is not None:
            open_rows = {i for i in open_rows if stop not in tokenizer.decode(ids[i])}
            if not open_rows:
                break
    texts = [tokenizer.decode(row) for row in ids]
    return [t[:t.index(stop)] if stop is not None and stop in t else t for t in texts]


# ----------------------------------------------------------------------------- few-shot prompts

def read_fewshot(path):
    """(description or None, list of {"input", "output"} records) from a .jsonl file."""
    description, records = None, []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"few-shot file not found: {path}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
        if "description" in obj:
            description = obj["description"]
        elif "input" in obj and "output" in obj:
            records.append(obj)
        else:
            raise UserError(f"{path}:{n}: expected {{\"input\": ..., \"output\": ...}} or {{\"description\": ...}}")
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
        raise UserError(f"model directory not found: {directory}")
    adapter = lora.is_adapter(directory)
    base = lora.base_path(directory) if adapter else directory
    model = models.from_pretrained(base, dtype=dtype, device=device).eval()
    if adapter:
        lora.merge(lora.load_adapter(model, directory))
    return model, tokenization.tokenizer_for_model(base, model.config.vocab_size)


def parser():
    p = runtime.ArgumentParser(description="Generate text from a trained model.")
    p.add_argument("--out_dir", default="out/gpt", help="a training run folder, a Hugging Face model directory, "
                   "or a LoRA adapter folder (its base model + the adapter)")
    p.add_argument("--prompt", action="append", help="the prompt text, or @FILE to read it from a file; "
                   "give it several times to decode several prompts as one batch; with --fewshot, the query. "
                   "None: a newline (with --fewshot: the input of the demonstration after the shots)")
    p.add_argument("--num_samples", type=int, default=1, help="how many samples to draw (of each prompt; "
                   "more than one row in all is decoded as one batch)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                   "whose probability reaches p (1.0: all)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    runtime.add_device_flags(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decoding step (a static "
                   "KV cache; the first call compiles, about 40 s on a laptop CPU)")
    p.add_argument("--fewshot", default=None, help="a .jsonl file of demonstrations for a few-shot prompt")
    p.add_argument("--shots", type=int, default=3, help="number of demonstrations in the few-shot prompt")
    return p


def read_prompt(text):
    if not text.startswith("@"):
        return text
    try:
        return Path(text[1:]).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {text[1:]}: {e}") from None


def main(argv=None):
    args = parser().parse_args(argv)
    kernels.set_backend(args.attn)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load(args.out_dir, device=device)
    prompts = [read_prompt(p) for p in args.prompt or ["\n"]]
    stop = None
    if args.fewshot:
        description, records = read_fewshot(args.fewshot)
        need = args.shots + (0 if args.prompt else 1)  # without --prompt, the next record is the query
        if args.shots < 0 or len(records) < need:
            raise UserError(f"{args.fewshot} has {len(records)} demonstrations; --shots {args.shots} needs "
                                 f"{need} (the query included)")
        queries = prompts if args.prompt else [records[args.shots]["input"]]
        prompts, stop = [fewshot_prompt(records[:args.shots], q, description) for q in queries], "\n"
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    if not all(prompt_ids):
        raise UserError("the prompt is empty")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, generator=generator,
                    compile=args.compile)
    with autocast(device, dtype):
        if len(prompts) == 1 and args.num_samples == 1:  # one row: show it as it comes
            print(prompts[0], end="", flush=True)
            stream(model, tokenizer, prompt_ids[0], args.max_new_tokens, stop=stop, **sampling)
            print()
            return 0
        rows = [i for i in range(len(prompts)) for _ in range(args.num_samples)]
        texts = complete(model, tokenizer, [prompt_ids[i] for i in rows], args.max_new_tokens, stop=stop, **sampling)
        for n, (i, text) in enumerate(zip(rows, texts)):
            print(prompts[i] + text + ("\n" + "-" * 40 if n + 1 < len(rows) else ""))
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
