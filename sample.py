"""Generate text from a trained run folder or a Hugging Face directory, decoding with the KV cache.

  python sample.py --out_dir out/gpt --prompt "ROMEO:"
  python sample.py --out_dir out/gpt --prompt @prompt.txt --num_samples 3 --temperature 0.9 --top_p 0.95
  python sample.py --out_dir out/gpt --prompt "ROMEO:" --temperature 1.0 --top_k 0 --min_p 0.05
  python sample.py --out_dir out/gpt --fewshot tasks.jsonl --shots 3 --prompt "query text"
  python sample.py --out_dir out/gpt --eval arithmetic_2da --shots 8   # k-shot accuracy (evaluation.py)
  python sample.py --out_dir out/lora --prompt "ROMEO:"   # a LoRA adapter on its base model
  python sample.py --out_dir out/gpt --prompt "ROMEO:" --prompt "JULIET: O" --compile   # one batch, compiled steps
  python sample.py --out_dir out/llama --prompt "ROMEO:" --quantize int8 --compile       # int8 weights (quantize.py)
  python sample.py --out_dir out/llama --prompt "ROMEO:" --draft out/llama_small        # speculative decoding
  python sample.py --out_dir out/mm --image 7 --prompt "how many 8s?" --temperature 0  # a question about an image

Several prompts (and --num_samples > 1) are decoded together as one batch, left-padded to the
longest (kernels.KVCache masks the padding): greedy decoding gives each row the tokens it would
get alone, up to block_size tokens of prompt and completion. A prompt (a few-shot one too) is
encoded as transformers' tokenizer(prompt) encodes it: with the special tokens that the tokenizer
puts around a text (a Hugging Face tokenizer.json's post-processor: Llama 3's BOS first).

Few-shot prompts are built GPT-3's way (Brown et al. 2020): an optional task description line,
K demonstrations `input => output` separated by blank lines, then `query =>`; the completion is
generated up to the end of its line. The .jsonl file holds one {"input": ..., "output": ...}
object per line, and optionally one header line {"description": ..., "sep": ...} (evaluation.read_task:
the format of the tasks in data/tasks/ too); "sep" is what goes between input and output (default
" =>"), and --sep overrides it. A model whose vocabulary cannot spell the default separator (a
character model of Shakespeare has no '=' or '>') gets one that it can (evaluation.SEPARATORS; a note
says which); a separator chosen in the header or with --sep, a demonstration or a prompt with a
character the vocabulary lacks is one error naming where the character came from.

--eval TASK scores the model on a task at --shots K (evaluation.py: GPT-3's k-shot evaluation with
lm-evaluation-harness's request semantics) and prints a table (task, K, metric, value, stderr, n);
TASK is a task of tasks.py (generated into data/tasks/ the first time) or a .jsonl file.

Sampling filters the logits as transformers' warpers do, in their order: temperature, top-k,
top-p, min-p (generation.filter_logits); ids the tokenizer does not have (a model's vocabulary can
be larger than its tokenizer's: Qwen2.5's 151,936 rows for 151,665 ids) are never drawn.

Faster decoding (figures from `bench.py decode`): --quantize int8 stores every linear
layer's weights in int8 with per-output-channel scales (gpt-fast's scheme, quantized at load;
quantize.py), --quantize bf16 in bf16; --draft DIR decodes speculatively (Leviathan et al. 2023):
a small model with the same tokenizer proposes --speculate_k tokens that the model verifies in one
forward; greedy output is the model's own, and sampling keeps the model's distribution.

--image asks about an image: --out_dir is then a multimodal bridge's folder (train.py --mm_images;
multimodal.py), --image N the N-th held-out test scene (made of test images only; its digits are
printed) or a file of grey levels, and each --prompt the text after the image (`digits:`,
`how many 8s?`, `largest?`, `sum?`), answered to the end of its line.
"""
import dataclasses
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from omnitron import evaluation, multimodal, quantize, runtime
from omnitron.checkpoints import load, load_draft  # noqa: F401 (sample.load: the API before omnitron/checkpoints.py)
from omnitron.evaluation import fewshot_prompt, read_fewshot, read_task  # noqa: F401 (read_fewshot: sample's API)
from omnitron.generation import check_sampling, complete, stream
from omnitron.runtime import UserError, autocast, resolve_device, resolve_dtype
from omnitron.tokenization import DEFAULT_DATA_DIR

# ----------------------------------------------------------------------------- command line

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
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of most likely "
                   "tokens whose probability reaches p (1.0: all)")
    p.add_argument("--min_p", type=float, default=0.0, help="min-p sampling (Nguyen et al. 2024): drop the tokens "
                   "less likely than min_p times the most likely one (0: off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    runtime.add_device_flags(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decoding step (a static "
                   "KV cache; the first call compiles, about 40 s on a laptop CPU)")
    p.add_argument("--quantize", default="none", choices=quantize.SCHEMES, help="weight-only quantization at load: "
                   "int8 (per-output-channel scales, gpt-fast's scheme) or bf16 weights; applied to the draft too")
    p.add_argument("--draft", default="", help="a draft model directory (same tokenizer) for speculative decoding "
                   "(empty: none)")
    p.add_argument("--speculate_k", type=int, default=4, help="tokens the draft proposes per verification")
    p.add_argument("--fewshot", default=None, help="a .jsonl file of demonstrations for a few-shot prompt: "
                   "{\"input\", \"output\"} lines, optionally a header {\"description\", \"sep\"} (sep: between "
                   "input and output, default ' =>')")
    p.add_argument("--sep", default=None, help="--fewshot and --eval: the separator between a demonstration's "
                   "input and output, over the task's (None: the task's; when the model's vocabulary cannot spell "
                   "a default one, the first of ' =>', ' =', ' ->', ':', ' -' that it can)")
    p.add_argument("--shots", type=int, default=3, help="number of demonstrations in the few-shot prompt (and "
                   "per item with --eval)")
    p.add_argument("--eval", default=None, metavar="TASK", help="evaluate the model on a task at --shots K "
                   "instead of generating: a name of tasks.NAMES (data/tasks/NAME.jsonl, generated if missing) "
                   "or a .jsonl file")
    p.add_argument("--limit", type=int, default=0, help="--eval: the first N test items only (0: all)")
    p.add_argument("--batch_size", type=int, default=16, help="--eval: items per batch")
    p.add_argument("--description", type=runtime.str2bool, default=True, help="--eval: start the prompt with the "
                   "task's description line, when it has one")
    p.add_argument("--json", default="", help="--eval: also write the results to this JSON file")
    p.add_argument("--fewshot_sampler", choices=evaluation.SAMPLERS, default="per_item", help="--eval: "
                   "demonstrations drawn per item from (seed, item index) (per_item), or as lm-evaluation-harness's "
                   "ContextSampler draws them, one generator through the items in order (lm_eval)")
    p.add_argument("--fewshot_overflow", choices=evaluation.OVERFLOWS, default="drop", help="--eval: more shots "
                   "than the block holds: lower K (drop, GPT-3's rule) or keep K and left-truncate the context "
                   "(truncate, lm-evaluation-harness's)")
    p.add_argument("--free_form", choices=evaluation.FREE_FORM, default="generate", help="--eval, free-form "
                   "tasks: exact_match of the greedy completion (generate), or acc = is_greedy of the answer "
                   "(loglikelihood, lm-evaluation-harness's arithmetic tasks)")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="--eval: where data/tasks/ and the default "
                   "corpus live; --image N: where the digits are")
    p.add_argument("--image", default=None, help="with a multimodal bridge's --out_dir: the image the prompts ask "
                   "about: N (the N-th held-out test scene, 0-based) or a .npy / text file of grey levels 0-16 "
                   "(None: no image)")
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
    check_sampling(args.temperature, args.top_k, args.top_p, args.min_p)
    for flag, least in (("num_samples", 1), ("max_new_tokens", 0), ("speculate_k", 1)):
        if getattr(args, flag) < least:
            raise UserError(f"--{flag} must be >= {least}, not {getattr(args, flag)}")
    vars(args).update(runtime.trained_attention(vars(args), args.out_dir, say=lambda m: print(m, file=sys.stderr)))
    runtime.configure_attention(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.eval:
        return run_eval(args, device, dtype)
    if args.image is not None:
        return run_image(args, device, dtype)
    model, tokenizer = load(args.out_dir, device=device)
    draft = load_draft(args.draft, model, tokenizer, device) if args.draft else None
    for m in (model, draft):
        if m is not None:
            quantize.quantize(m, args.quantize)
    prompts = [read_prompt(p) for p in args.prompt or ["\n"]]
    stop = None
    if args.fewshot:
        prompts, stop = fewshot_prompts(args, tokenizer, prompts), "\n"
    else:
        evaluation.check_readable(tokenizer, [(p, "the prompt (--prompt)", "change the prompt") for p in prompts])
    prompt_ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]  # Llama 3: BOS first
    if not all(prompt_ids):
        raise UserError("the prompt is empty")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p or None,
                    generator=generator, compile=args.compile)
    if draft is not None:
        sampling.update(draft=draft, speculate_k=args.speculate_k)
    with autocast(device, dtype), compile_errors(args.compile):
        if len(prompts) == 1 and args.num_samples == 1:  # one row: show it as it comes
            # the prompt is shown with the first generated text: an error in the first step (--compile's
            # compilation) comes alone
            stream(model, tokenizer, prompt_ids[0], args.max_new_tokens, stop=stop, head=prompts[0], **sampling)
            print()
            return 0
        rows = [i for i in range(len(prompts)) for _ in range(args.num_samples)]
        texts = complete(model, tokenizer, [prompt_ids[i] for i in rows], args.max_new_tokens, stop=stop, **sampling)
        for n, (i, text) in enumerate(zip(rows, texts)):
            print(prompts[i] + text + ("\n" + "-" * 40 if n + 1 < len(rows) else ""))
    return 0


def fewshot_prompts(args, tokenizer, prompts):
    """--fewshot: the few-shot prompt of each query (the --prompts; without them, the record after the
    demonstrations), with a separator the model can spell (evaluation.readable_sep: the task's, --sep's, or
    one of its characters when nobody chose it). A character the vocabulary lacks: UserError naming
    where it came from (the separator, the description, a demonstration, the prompt) and what to change."""
    task = read_task(args.fewshot, what="few-shot file")
    records = evaluation.all_records(task)
    need = args.shots + (0 if args.prompt else 1)  # without --prompt, the next record is the query
    if args.shots < 0 or len(records) < need:
        raise UserError(f"{args.fewshot} has {len(records)} demonstrations; --shots {args.shots} needs "
                        f"{need} (the query included)")
    sep, note = evaluation.readable_sep(tokenizer, *separator(args, task))
    demos = records[:args.shots]
    queries = prompts if args.prompt else [records[args.shots]["input"]]
    edit = f"edit or remove it in {args.fewshot}"
    evaluation.check_readable(tokenizer, [
        (task.description, f"the description in {args.fewshot}", edit),
        *[(d[key], f"the demonstration {d['input']!r} (its {key}) in {args.fewshot}", f"{edit}, or give fewer --shots")
          for d in demos for key in ("input", "output")],
        *[(q, "the prompt (--prompt)" if args.prompt else f"the query {q!r} (the record after the shots in "
           f"{args.fewshot})", "change the prompt" if args.prompt else "give --prompt") for q in queries]])
    if note:  # after the checks: an error is the one line
        print(note, file=sys.stderr, flush=True)
    return [fewshot_prompt(demos, q, task.description, sep) for q in queries]


def separator(args, task, built_in=False):
    """(the separator, who chose it: "--sep", the task file's header, or None for a default) of a task."""
    if args.sep is not None:
        return args.sep, "--sep"
    if task.sep_given and not built_in:
        return task.sep, f"the \"sep\" of {args.fewshot or args.eval}'s header"
    return task.sep, None


@contextmanager
def compile_errors(compiling):
    """With --compile: torch.compile's failures (no C++ compiler found, an inductor error) are one error
    line that says to sample without --compile."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        from_torch = isinstance(e, OSError) or type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
        if not compiling or not from_torch:
            raise
        raise UserError(f"--compile: torch.compile failed ({type(e).__name__}: {runtime.first_line(e)}); "
                        "sample without --compile (on a CPU it needs a C++ compiler)") from None


def run_image(args, device, dtype):
    """--image: each prompt's completion after the image (multimodal.generate), to the end of its line."""
    model, tokenizer = load(args.out_dir, device=device)
    if not hasattr(model, "bridge"):
        raise UserError(f"--image needs a multimodal bridge: {args.out_dir} has no {multimodal.BRIDGE_CONFIG}")
    cfg = model.bridge.config
    if args.image.isdigit():
        images, digits = multimodal.test_scenes(args.data_dir, cfg.image_width // multimodal.DIGIT_SIZE)
        if int(args.image) >= len(images):
            raise UserError(f"--image {args.image}: there are {len(images)} test scenes (0..{len(images) - 1})")
        image = images[int(args.image)]
        print(f"test scene {args.image}: the digits {' '.join(map(str, digits[int(args.image)]))}")
    else:
        image = multimodal.read_image(args.image, cfg.image_height, cfg.image_width)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast(device, dtype):
        for prompt in [read_prompt(p) for p in args.prompt or ["digits:"]]:
            answer = multimodal.generate(model, tokenizer, image, multimodal.after_image(prompt), args.max_new_tokens,
                                         args.temperature, generator)
            print(prompt + answer)
    return 0


def run_eval(args, device, dtype):
    """--eval TASK: the model's k-shot scores on the task's test items (evaluation.evaluate)."""
    for flag, least in (("shots", 0), ("limit", 0), ("batch_size", 1)):
        if getattr(args, flag) < least:
            raise UserError(f"--{flag} must be >= {least}, not {getattr(args, flag)}")
    path = evaluation.find_task(args.eval, args.data_dir)
    task = read_task(path)
    model, tokenizer = load(args.out_dir, device=device)
    built_in = args.eval in evaluation.task_generator.NAMES and path.parent == Path(args.data_dir) / "tasks"
    sep, note = evaluation.readable_sep(tokenizer, *separator(args, task, built_in))
    task = dataclasses.replace(task, sep=sep)
    with autocast(device, dtype):
        rows = evaluation.evaluate(model, tokenizer, task, args.shots, seed=args.seed, limit=args.limit or None,
                                   batch_size=args.batch_size, use_description=args.description,
                                   sampler=args.fewshot_sampler, overflow=args.fewshot_overflow,
                                   free_form=args.free_form)
    if note:  # after the evaluation: an error is the one line
        print(note, file=sys.stderr, flush=True)
    evaluation.report(rows, args.json or None, meta={"model": args.out_dir, "task": str(args.eval),
                                                      "seed": args.seed, "dtype": str(dtype)})
    return 0


if __name__ == "__main__":
    runtime.run_cli(main)
