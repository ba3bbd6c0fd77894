"""Few-shot evaluation, GPT-3's way (Brown et al. 2020, §2 and §3), with lm-evaluation-harness's
request semantics: k-shot scoring of any model that checkpoints.load loads (a run folder, a Hugging Face
model directory, a LoRA adapter). A library module: sample.py --eval and bench.py icl use it.

Prompts. A task (read_task) has a train and a test split. For a test item, K demonstrations are
drawn from the train split with a seed, never the item itself (sample_demos; sampler="lm_eval":
lm-eval's ContextSampler); the context is the optional task description, the demonstrations
`input{sep} output` and the item's `input{sep}`, joined by "\\n\\n" (fewshot_prompt: lm-eval's
fewshot_delimiter; GPT-3's format). K is lowered to what fits the model's block with the longest
answer (fit_demos; overflow="truncate": K kept and the context left-truncated, lm-eval's); the
table reports the mean K used.

Multiple choice (records with "choices"): the log-likelihood of each candidate continuation
TARGET_DELIMITER + choice given the context (loglikelihoods), as lm-eval's `loglikelihood`
requests (encode_pair): all trailing whitespace of the context moved onto the continuation,
context and continuation tokenized together (the continuation's tokens are those of the whole
after the context's), an empty context conditioned on the tokenizer's BOS (else EOS), the whole
left-truncated to block_size + 1 tokens, only the continuation's tokens scored. Metrics (lm-eval's
names): `acc` (the largest summed log-likelihood is the answer), `acc_norm` (divided by the
choice's length in characters), `acc_mutual_info` (lm-eval's: log P(choice | context) -
log P(choice | "")), and, for a task with an `answer_context` (GPT-3: "Answer:" for ARC,
OpenBookQA, RACE), `acc_calibrated`: GPT-3's calibrated score
log P(choice | context) - log P(choice | answer_context).

Free-form (records with "output"): greedy decoding (generation.complete, a left-padded batch) up
to the end of the line; `exact_match` after the task's normalisation (normalize_answer, GPT-3's
for question answering, or surrounding whitespace only for its arithmetic and word tasks), or,
with free_form="loglikelihood", `acc` = is_greedy of the answer (lm-eval's arithmetic tasks); and
`perplexity` of the reference answer (lm-eval's lambada metric).

Speed: requests are batched; each distinct context runs once (one prefill into a KV cache, for
a batch of contexts at once) and its cache is repeated for all its candidates, which then run
together in one forward (reuse_context=True; False runs every request whole, for comparison).
"""
import dataclasses
import json
import math
import random
import re
import string
import sys
import time
from pathlib import Path

import torch

from omnitron import data
from omnitron import tasks as task_generator
from omnitron.generation import complete, left_pad, prefill
from omnitron.runtime import UserError, atomic_write, format_eta, print_table, read_jsonl

TARGET_DELIMITER = " "  # between the context and a continuation (lm-eval's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # between the description, the demonstrations and the query
DEFAULT_SEP = " =>"  # between a record's input and its output, unless the task file says otherwise
# The separators tried, in order, when nobody chose the separator and the model's vocabulary cannot spell
# it (a character model of Shakespeare has no '=' or '>'): GPT-3's first, the last always spelled.
SEPARATORS = (" =>", " =", " ->", ":", " -", "")


# ----------------------------------------------------------------------------- tasks and prompts

@dataclasses.dataclass
class Task:
    """A task file's contents. Records: {"input", "output"} (free-form) or {"input", "choices",
    "answer"} (multiple choice; "output" is then filled in as choices[answer])."""
    name: str
    train: list
    test: list
    description: str = None
    sep: str = DEFAULT_SEP
    answer_context: str = None  # the context of GPT-3's calibration (acc_mutual_info); None: not used
    normalize: str = "squad"  # free-form answers: NORMALIZERS' name
    sep_given: bool = False  # whether the file's header names the separator (else DEFAULT_SEP)

    @property
    def multiple_choice(self):
        return "choices" in (self.test or self.train)[0]


def read_task(path, what="task file"):
    """A task file (.jsonl, one JSON object a line): an optional header {"description": text,
    "sep": text between input and output (default " =>"), "answer_context": text, "normalize":
    "squad" (default) or "strip" (NORMALIZERS)} and records
    {"input", "output"} or {"input", "choices": [...], "answer": index}, each optionally with
    "split": "train" or "test". Without splits, every record is both a test item and a possible
    demonstration (never for itself). Not found, not JSON, a bad record: UserError naming the line."""
    path = Path(path)
    header, splits, unsplit = {}, {"train": [], "test": []}, []
    for n, obj in read_jsonl(path, what):
        if "input" not in obj:
            if set(obj) - {"description", "sep", "answer_context", "normalize"}:
                raise UserError(f"{path}:{n}: expected a record {{\"input\", \"output\"}} or {{\"input\", \"choices\", "
                                f"\"answer\"}}, or a header with description, sep, answer_context, normalize")
            if obj.get("normalize", "squad") not in NORMALIZERS:
                raise UserError(f"{path}:{n}: normalize must be one of {', '.join(NORMALIZERS)}")
            header.update(obj)
            continue
        obj = dict(obj)
        if "choices" in obj:
            ok = (isinstance(obj["choices"], list) and len(obj["choices"]) >= 2 and isinstance(obj.get("answer"), int)
                  and 0 <= obj["answer"] < len(obj["choices"]))
            if not ok:
                raise UserError(f"{path}:{n}: a multiple-choice record needs \"choices\" (2 or more) and \"answer\" "
                                "(an index into them)")
            obj.setdefault("output", obj["choices"][obj["answer"]])
        elif "output" not in obj:
            raise UserError(f"{path}:{n}: a record needs \"output\" (free-form) or \"choices\" and \"answer\"")
        split = obj.pop("split", None)
        if split not in (None, "train", "test"):
            raise UserError(f"{path}:{n}: split must be train or test, not {split!r}")
        (splits[split] if split else unsplit).append(obj)
    train, test = splits["train"] + unsplit, splits["test"] + unsplit
    if not test:
        raise UserError(f"{path}: no test records (records with \"split\": \"test\", or without a split)")
    if len({"choices" in r for r in train + test}) > 1:
        raise UserError(f"{path}: mixes free-form and multiple-choice records")
    return Task(path.stem, train, test, header.get("description"), header.get("sep", DEFAULT_SEP),
                header.get("answer_context"), header.get("normalize", "squad"), "sep" in header)


def read_fewshot(path):
    """(description or None, every record of a task file: all_records): sample.py --fewshot's
    demonstrations. Errors: read_task's."""
    task = read_task(path, what="few-shot file")
    return task.description, all_records(task)


def all_records(task):
    """Every record of a task once, the train split first (a record without a split is in both)."""
    return list({id(r): r for r in task.train + task.test}.values())


def fewshot_prompt(demos, query, description=None, sep=DEFAULT_SEP):
    """GPT-3's format: the description, the demonstrations `input{sep} output`, then `query{sep}`,
    joined by FEWSHOT_DELIMITER (a blank line). The output follows TARGET_DELIMITER, as the
    continuation that is scored or generated does."""
    blocks = [description] if description else []
    blocks += [f"{d['input']}{sep}{TARGET_DELIMITER}{d['output']}" for d in demos]
    blocks.append(f"{query}{sep}")
    return FEWSHOT_DELIMITER.join(blocks)


def missing_characters(tokenizer, text):
    """The characters of text that the tokenizer cannot encode (a character vocabulary's gaps), in
    order, each once; [] for a byte-level tokenizer, which encodes everything."""
    def encodes(t):
        try:
            tokenizer.encode(t, add_special_tokens=False)
        except UserError:
            return False
        return True
    return [] if encodes(text) else [c for c in dict.fromkeys(text) if not encodes(c)]


def _quoted(chars):
    return ", ".join(repr(c) for c in chars)


def readable_sep(tokenizer, sep, chosen_by=None):
    """The separator between a demonstration's input and its output for this tokenizer: `sep` when the
    tokenizer can encode it. Otherwise, when someone chose it (chosen_by says where: "--sep", a task file's
    header), UserError naming where it came from and how to change it; when nobody did (DEFAULT_SEP, a
    built-in task's), the first of SEPARATORS that it can encode, with a note that says so. Returns
    (separator, note or None)."""
    missing = missing_characters(tokenizer, sep)
    if not missing:
        return sep, None
    if chosen_by:
        raise UserError(f"the separator {sep!r} ({chosen_by}) has {_quoted(missing)}, which this model's "
                        f"vocabulary lacks: choose a separator of its characters with --sep (e.g. --sep ':')")
    choice = next(s for s in SEPARATORS if not missing_characters(tokenizer, s))
    return choice, (f"note: this model's vocabulary lacks {_quoted(missing)} of the separator {sep!r}: the "
                    f"demonstrations read 'input{choice} output' (choose another with --sep)")


def check_readable(tokenizer, parts):
    """parts: (text, where it came from, how to change it) triples; the first text with a character the
    tokenizer cannot encode: UserError naming the characters, where they came from and the way out."""
    for text, where, fix in parts:
        if text and (missing := missing_characters(tokenizer, text)):
            raise UserError(f"{where} has {_quoted(missing)}, which this model's vocabulary lacks: {fix}")


TASK_CHARACTERS = ("use a model whose vocabulary has them (one trained on text with them, or with --tokenizer "
                   "bpe:N), or a task file without them")


def sample_demos(pool, item, k, seed, index):
    """k demonstrations for `item` drawn without replacement from pool (the train split), never
    the item itself (nor a record equal to it); seeded by (seed, index), so an item's demonstrations
    do not depend on which other items are evaluated. Fewer than k when the pool is short."""
    rng = random.Random(f"{seed}:{index}")
    others = [r for r in pool if r is not item and r != item]
    return rng.sample(others, min(k, len(others)))


class ContextSampler:
    """lm-evaluation-harness's demonstration sampling (lm_eval/api/samplers.py, ContextSampler.get_context
    and sample): one random.Random(seed) for the whole task, drawn from item after item in order;
    for each item rnd.sample(pool, k + 1) when the item is in the pool (lm-eval: the few-shot split
    is the test split), else rnd.sample(pool, k), then the records equal to the item removed and
    the first k kept. An item's demonstrations depend on the items before it (sample_demos' do not)."""

    def __init__(self, pool, seed):
        self.pool, self.rnd = pool, random.Random(seed)

    def get_context(self, item, k):
        n = k + 1 if any(r is item or r == item for r in self.pool) else k
        drawn = self.rnd.sample(self.pool, min(n, len(self.pool)))
        return [r for r in drawn if r != item][:k]


def find_task(name, data_dir):
    """The task file for `name`: a path to a .jsonl file, or a task of tasks.NAMES in
    DATA_DIR/tasks/ (all generated, from the default corpus, the first time one is asked for).
    Neither: UserError listing the tasks."""
    if name.endswith(".jsonl") or Path(name).is_file():
        return Path(name)
    if name not in task_generator.NAMES:
        raise UserError(f"unknown task {name!r}: give a .jsonl file or one of {', '.join(task_generator.NAMES)}")
    path = Path(data_dir) / "tasks" / f"{name}.jsonl"
    if not path.is_file():
        generate_default_tasks(data_dir)
    return path


def generate_default_tasks(data_dir, seed=1234):
    """tasks.generate on the default corpus (Shakespeare's complete works) into DATA_DIR/tasks/."""
    text = data.read_corpus(data.corpus_files(data.shakespeare_dir(data_dir)))[0]
    paths = task_generator.generate(text, Path(data_dir) / "tasks", seed=seed, val_fraction=data.VAL_FRACTION)
    print(f"generated {len(paths)} tasks in {Path(data_dir) / 'tasks'} (seed {seed})", file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------- log-likelihoods

def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness makes them (lm_eval/api/model.py,
    TemplateLM._encode_pair and TemplateLM.loglikelihood; lm_eval/models/huggingface.py,
    HFLM.tok_encode): all trailing whitespace of the context (context.rstrip()) moved to the start
    of the continuation; the continuation's ids are those of tokenize(context + continuation) after
    the first len(tokenize(context)). The special tokens that the tokenizer puts before a text
    (Llama 3's BOS) start the context, unless the context's text already starts with them (no second
    BOS); none go after. An empty context (nothing left after moving its whitespace, and no BOS
    template) is the tokenizer's prefix_token (BOS, else EOS), the continuation tokenized alone.
    ValueError: an empty context and a tokenizer without BOS or EOS; a continuation without tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    before = _before(tokenizer, context)
    ctx = before + tokenizer.encode(context, add_special_tokens=False)
    if not ctx:
        if tokenizer.prefix_token is None:
            raise ValueError("the context is empty and the tokenizer names no BOS or EOS token to condition on")
        ctx, cont = [tokenizer.prefix_token], tokenizer.encode(continuation, add_special_tokens=False)
        if not cont:
            raise ValueError(f"the continuation {continuation!r} has no tokens")
        return ctx, cont
    whole = before + tokenizer.encode(context + continuation, add_special_tokens=False)
    if len(whole) <= len(ctx):
        raise ValueError(f"the continuation {continuation!r} has no tokens")
    return ctx, whole[len(ctx):]


def _before(tokenizer, text):
    """The ids the tokenizer puts before text (its template's, Llama 3's BOS), or none when the
    text's own tokens already start with them (lm-eval's HFLM.tok_encode adds no second BOS)."""
    before = list(tokenizer.template[0])
    if before and tokenizer.encode(text, add_special_tokens=False)[:len(before)] == before:
        return []
    return before


def context_ids(tokenizer, text):
    """The ids of a context as a prompt: the tokenizer's ids before a text (unless the text starts
    with them already, _before) and the text's."""
    return _before(tokenizer, text) + tokenizer.encode(text, add_special_tokens=False)


def truncate(ctx, cont, block_size):
    """lm-eval's left truncation: the last block_size + 1 tokens of ctx + cont (the model reads
    all but the last); returns (the context left, cont). A continuation longer than block_size:
    ValueError."""
    if len(cont) > block_size:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit block_size {block_size}")
    keep = block_size + 1 - len(cont)
    return ctx[-keep:], cont


def _device(model):
    return model.lm_head.weight.device


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=16, reuse_context=True, with_greedy=False):
    """Summed log-probabilities (nats, floats, in fp32) of each request's continuation given its
    context. requests: (context ids, continuation ids) pairs (encode_pair's), left-truncated here
    to the model's block_size (truncate). Only the continuation's tokens are scored.
    with_greedy=True: (log-likelihood, is_greedy) pairs instead, as lm-evaluation-harness's
    `loglikelihood` returns them (lm_eval/models/huggingface.py, HFLM._loglikelihood_tokens:
    is_greedy when the argmax of the logits is the continuation's token at every scored position).

    reuse_context=True: each distinct (truncated) context runs once: up to batch_size contexts
    are prefilled together (left-padded, into a kernels.KVCache), the log-probability of each
    continuation's first token is read from the logits after its context, and the cache's rows are
    repeated for the candidates of every context, whose other tokens then run together in one
    forward. False: every request runs whole, batch_size at a time (right-padded), as lm-eval's
    HFLM does; the same numbers up to rounding."""
    block = model.config.block_size
    reqs = [truncate(list(c), list(x), block) for c, x in requests]
    scores, greedy = [0.0] * len(reqs), [True] * len(reqs)
    if reuse_context:
        by_context = {}
        for i, (ctx, _) in enumerate(reqs):
            by_context.setdefault(tuple(ctx), []).append(i)
        for chunk in _context_chunks(by_context, reqs, batch_size, block):
            _score_shared(model, chunk, by_context, reqs, scores, greedy)
    else:
        order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]) - len(reqs[i][1]))
        for start in range(0, len(order), batch_size):
            _score_whole(model, order[start:start + batch_size], reqs, scores, greedy)
    return list(zip(scores, greedy)) if with_greedy else scores


def _context_chunks(by_context, reqs, batch_size, block):
    """Groups of up to batch_size distinct contexts, longest first, such that the longest context
    plus the longest remaining continuation of the group fits the block (the cache's slots)."""
    contexts = sorted(by_context, key=len, reverse=True)
    chunk, longest_ctx, longest_rest = [], 0, 0
    for ctx in contexts:
        rest = max(len(reqs[i][1]) - 1 for i in by_context[ctx])
        lc, lr = max(longest_ctx, len(ctx)), max(longest_rest, rest)
        if chunk and (len(chunk) == batch_size or lc + lr > block):
            yield chunk
            chunk, lc, lr = [], len(ctx), rest
        chunk.append(ctx)
        longest_ctx, longest_rest = lc, lr
    if chunk:
        yield chunk


def _score_shared(model, contexts, by_context, reqs, scores, greedy):
    """One prefill of `contexts` (left-padded), then one forward of all their candidates' tokens
    after the first, against the cache's rows repeated per candidate (right-padded). Adds to
    scores[i] and clears greedy[i] where a scored token is not the argmax."""
    device = _device(model)
    idx, pad = left_pad(contexts, device=device)
    pad = pad if int(pad.max()) > 0 else None
    members = [(row, i) for row, ctx in enumerate(contexts) for i in by_context[ctx]]
    rest = max(len(reqs[i][1]) - 1 for _, i in members)
    logits, cache = prefill(model, idx, pad, max_len=idx.shape[1] + rest if rest else None)
    first = torch.log_softmax(logits.float(), dim=-1)
    first_argmax = first.argmax(-1).tolist()
    for row, i in members:
        scores[i] += first[row, reqs[i][1][0]].item()
        greedy[i] = greedy[i] and first_argmax[row] == reqs[i][1][0]
    if not rest:
        return
    rows = torch.tensor([row for row, _ in members], device=device)
    cand = cache.take(rows)
    tokens = torch.tensor([reqs[i][1][:-1] + [0] * (rest + 1 - len(reqs[i][1])) for _, i in members], device=device)
    out = torch.log_softmax(model(tokens, cache=cand)[0].float(), dim=-1)  # (R, rest, V)
    argmax = out.argmax(-1).tolist()
    for r, (_, i) in enumerate(members):
        cont = reqs[i][1][1:]
        if cont:
            pos = torch.arange(len(cont), device=device)
            scores[i] += out[r, pos, torch.tensor(cont, device=device)].sum().item()
            greedy[i] = greedy[i] and argmax[r][:len(cont)] == cont


def _score_whole(model, batch, reqs, scores, greedy):
    """Requests run whole: input ctx + cont[:-1], right-padded; the continuation's log-probs, and
    whether each of its tokens is the argmax."""
    device = _device(model)
    rows = [scored_sequence(*reqs[i]) for i in batch]
    idx, targets = right_pad([x for x, _ in rows], 0, device), right_pad([y for _, y in rows], -1, device)
    logits = model(idx)[0]
    hits = ((logits.argmax(-1) == targets) | (targets == -1)).all(-1).tolist()
    for i, value, hit in zip(batch, target_logprobs(logits, targets).sum(dim=-1).tolist(), hits):
        scores[i] += value
        greedy[i] = hit


def scored_sequence(ctx, cont):
    """What a forward reads to score cont after ctx (lists of ids), and its targets: the input
    ctx + cont[:-1] and, position by position, the next token where it belongs to cont, -1 under
    the context (not scored). Both lists have len(ctx) + len(cont) - 1 ids."""
    return ctx + cont[:-1], [-1] * (len(ctx) - 1) + cont


def right_pad(rows, value, device="cpu"):
    """Lists of ids as one (B, T) long tensor, each row padded on the right with `value` to the
    longest."""
    T = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=torch.long, device=device)


def target_logprobs(logits, targets):
    """log p(target) at each position, (B, T) in fp32, from logits (B, T, V) and targets (B, T)
    (ids; -1: not scored, 0 there). Summed over a row: the log-likelihood of its scored tokens
    (nats), what loglikelihoods and DPO (dpo.py) compute. Differentiable."""
    return -torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1,
                                              reduction="none")


# ----------------------------------------------------------------------------- free-form answers

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    """The exact-match normalisation of GPT-3's free-form scoring (SQuAD's and TriviaQA's, which
    GPT-3 used: lowercase, punctuation removed, the articles a / an / the removed, whitespace
    collapsed), except that a sign or a decimal point belonging to a number is kept, so that an
    arithmetic answer "-19" is not "19". Returns the normalised string."""
    text = text.lower()
    text = "".join(c for i, c in enumerate(text) if c not in PUNCTUATION or _in_number(text, i))
    return " ".join(ARTICLES.sub(" ", text).split())


def _in_number(text, i):
    """Whether text[i] ('-', '+' or '.') is a sign or decimal point: a digit follows, and a '.' has one before."""
    follows = i + 1 < len(text) and text[i + 1].isdigit()
    if text[i] in "+-":
        return follows and (i == 0 or not text[i - 1].isalnum())
    return text[i] == "." and follows and i > 0 and text[i - 1].isdigit()


NORMALIZERS = {"squad": normalize_answer, "strip": str.strip}  # strip: surrounding whitespace only


def exact_match(prediction, reference, normalize="squad"):
    """1.0 when the strings are equal after normalisation, else 0.0. normalize: "squad"
    (normalize_answer: GPT-3's for question answering) or "strip" (surrounding whitespace only:
    GPT-3's arithmetic and word tasks, where the answer must be exact; lm-eval's exact_match
    without ignore_case / ignore_punctuation)."""
    return float(NORMALIZERS[normalize](prediction) == NORMALIZERS[normalize](reference))


# ----------------------------------------------------------------------------- one task at K shots

def fit_demos(tokenizer, task, demos, query, block_size, answer_tokens, use_description=True, overflow="drop"):
    """(context text, the demonstrations kept): with overflow="drop", the first demonstrations are
    dropped until the context and answer_tokens more fit block_size (GPT-3: K is at most what the
    context window holds); with none left and still too long, the context is left-truncated later
    (truncate). overflow="truncate": all K kept, the context left-truncated later (lm-evaluation-harness)."""
    description = task.description if use_description else None
    while True:
        context = fewshot_prompt(demos, query, description, task.sep)
        n = len(context_ids(tokenizer, context))
        if not demos or overflow == "truncate" or n + answer_tokens <= block_size:
            return context, demos
        demos = demos[1:]


class Progress:
    """Items done out of a total, with the rate and an ETA, on one line of stderr (rewritten)."""

    def __init__(self, label, total, enabled=True):
        self.label, self.total, self.enabled, self.t0, self.done = label, total, enabled, time.time(), 0

    def update(self, n):
        self.done += n
        if self.enabled:
            elapsed = time.time() - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0
            end = "\n" if self.done >= self.total else ""
            print(f"\r{self.label}: {self.done}/{self.total} items, {self.done / max(elapsed, 1e-9):.1f}/s, "
                  f"ETA {format_eta(eta)}", end=end, file=sys.stderr, flush=True)


def mean_stderr(values):
    """(mean, standard error of the mean: sample standard deviation / sqrt(n), as lm-eval's
    mean_stderr); the error is None for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


SAMPLERS = ("per_item", "lm_eval")  # sample_demos (ours) or ContextSampler (lm-evaluation-harness's)
OVERFLOWS = ("drop", "truncate")  # too many shots for the block: lower K (GPT-3) or left-truncate (lm-eval)
FREE_FORM = ("generate", "loglikelihood")  # exact match of a greedy generation, or is_greedy (lm-eval's arithmetic)


def evaluate(model, tokenizer, task, shots, seed=1234, limit=None, batch_size=16, use_description=True,
             reuse_context=True, max_new_tokens=None, progress=True, sampler="per_item", overflow="drop",
             free_form="generate"):
    """Evaluate `task` (read_task's) at `shots` demonstrations per item on its first `limit` test
    items (None: all). Returns the result rows: {"task", "shots" (asked), "shots_used" (the mean K
    used), "description" (bool), "metric", "value" (a fraction; perplexity: >= 1), "stderr", "n"}.

    Multiple choice: acc, acc_norm; acc_mutual_info (lm-evaluation-harness's, lm_eval/api/task.py
    ConfigurableTask.process_results: log P(choice | context) - log P(choice | ""), the empty
    context being the tokenizer's BOS, else EOS; not reported for a tokenizer with neither); and,
    for a task with an answer_context, acc_calibrated (GPT-3's calibration, Brown et al. 2020 §2.4:
    log P(choice | context) - log P(choice | answer_context)).
    Free-form: exact_match of the greedy completion (free_form="generate"), or acc = is_greedy of
    the answer (free_form="loglikelihood", lm-eval's arithmetic tasks); and `perplexity` of the
    reference answers, as lm-eval's lambada: exp(-mean over items of the answer's summed
    log-likelihood given the context), a smooth measure where exact match is still 0 (no
    standard error).
    sampler: "per_item" (sample_demos) or "lm_eval" (ContextSampler); overflow: "drop" (fit_demos
    lowers K to what fits, GPT-3's rule) or "truncate" (K kept, the context left-truncated, lm-eval's).
    A value outside these: UserError. Run it under the autocast the caller wants; the model in eval mode."""
    if shots < 0:
        raise UserError(f"--shots must be >= 0, not {shots}")
    for name, value, allowed in (("sampler", sampler, SAMPLERS), ("overflow", overflow, OVERFLOWS),
                                 ("free_form", free_form, FREE_FORM)):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    items = task.test[:limit] if limit else task.test
    block = model.config.block_size
    if task.multiple_choice:
        answer_tokens = max(_n_tokens(tokenizer, TARGET_DELIMITER + c) for r in items for c in r["choices"])
    else:
        answer_tokens = max_new_tokens or max(_n_tokens(tokenizer, TARGET_DELIMITER + r["output"] + "\n")
                                              for r in task.train + items) + 2
    label = f"{task.name} {shots}-shot{' (no description)' if task.description and not use_description else ''}"
    bar = Progress(label, len(items), progress)
    contexts, used = [], []
    lm_eval_sampler = ContextSampler(task.train, seed) if sampler == "lm_eval" else None
    for index, item in enumerate(items):
        demos = (lm_eval_sampler.get_context(item, shots) if lm_eval_sampler
                 else sample_demos(task.train, item, shots, seed, index))
        try:
            context, kept = fit_demos(tokenizer, task, demos, item["input"], block, answer_tokens, use_description,
                                      overflow)
        except UserError:  # a character the vocabulary lacks: say where it came from
            check_readable(tokenizer, [(task.description if use_description else None,
                                        f"{task.name}'s description", TASK_CHARACTERS),
                                       (task.sep, f"{task.name}'s separator", "choose another with --sep"),
                                       *[(d[key], f"{task.name}: the demonstration {d['input']!r} (its {key})",
                                          TASK_CHARACTERS) for d in demos for key in ("input", "output")],
                                       (item["input"], f"{task.name}: test item {index} ({item['input']!r})",
                                        TASK_CHARACTERS)])
            raise
        contexts.append(context)
        used.append(len(kept))
    if task.multiple_choice:
        per_metric = _score_choices(model, tokenizer, task, items, contexts, batch_size, reuse_context, bar)
    else:
        try:
            answers = [encode_pair(tokenizer, c, TARGET_DELIMITER + r["output"]) for c, r in zip(contexts, items)]
        except UserError:  # a reference the tokenizer cannot encode (a char model's vocabulary): no perplexity
            answers = None
        if free_form == "loglikelihood":
            if answers is None:
                raise UserError(f"{task.name}: a reference answer has a character the tokenizer cannot encode")
            scored = loglikelihoods(model, answers, batch_size, reuse_context, with_greedy=True)
            per_metric = {"acc": [float(g) for _, g in scored], "perplexity": [ll for ll, _ in scored]}
            bar.update(len(items))
        else:
            per_metric = _score_generations(model, tokenizer, task, items, contexts, answer_tokens, batch_size, bar)
            if answers:
                per_metric["perplexity"] = loglikelihoods(model, answers, batch_size, reuse_context)
    described = bool(use_description and task.description)
    rows = []
    for metric, values in per_metric.items():
        if metric == "perplexity":  # lm-eval's (lambada): exp(-mean of the answers' log-likelihoods)
            value, err = math.exp(-mean_stderr(values)[0]), None
        else:
            value, err = mean_stderr(values)
        rows.append({"task": task.name, "shots": shots, "shots_used": sum(used) / len(used), "description": described,
                     "metric": metric, "value": value, "stderr": err, "n": len(values)})
    return rows


def _n_tokens(tokenizer, text):
    """Tokens of text; for a text the tokenizer cannot encode (a reference answer with a character
    that a char vocabulary lacks), its UTF-8 bytes, an upper bound for char and byte-level tokenizers."""
    try:
        return len(tokenizer.encode(text, add_special_tokens=False))
    except UserError:
        return len(text.encode("utf-8"))


def has_prefix(tokenizer):
    """Whether an empty context can be scored: a BOS template or a prefix_token (encode_pair)."""
    return bool(tokenizer.template[0]) or tokenizer.prefix_token is not None


def _score_choices(model, tokenizer, task, items, contexts, batch_size, reuse_context, bar):
    """acc, acc_norm, acc_mutual_info and acc_calibrated (see evaluate) of multiple-choice items,
    batch_size items at a time."""
    others = {"acc_mutual_info": "" if has_prefix(tokenizer) else None, "acc_calibrated": task.answer_context}
    others = {name: ctx for name, ctx in others.items() if ctx is not None}  # metric -> its other context
    metrics = {"acc": [], "acc_norm": [], **{name: [] for name in others}}
    step = 1 + len(others)
    for start in range(0, len(items), batch_size):
        chunk = range(start, min(start + batch_size, len(items)))
        requests = []
        for i in chunk:
            for c in items[i]["choices"]:
                requests += [encode_pair(tokenizer, ctx, TARGET_DELIMITER + c) for ctx in (contexts[i], *others.values())]
        lls = loglikelihoods(model, requests, batch_size, reuse_context)
        k = 0
        for i in chunk:
            choices, gold = items[i]["choices"], items[i]["answer"]
            cond = lls[k:k + step * len(choices):step]
            metrics["acc"].append(float(_argmax(cond) == gold))
            metrics["acc_norm"].append(float(_argmax([s / len(c) for s, c in zip(cond, choices)]) == gold))
            for j, name in enumerate(others, 1):
                other = lls[k + j:k + step * len(choices):step]
                metrics[name].append(float(_argmax([a - b for a, b in zip(cond, other)]) == gold))
            k += step * len(choices)
        bar.update(len(chunk))
    return metrics


def _argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def _score_generations(model, tokenizer, task, items, contexts, max_new_tokens, batch_size, bar):
    """exact_match (task.normalize) of greedy completions, stopped at the end of the line; items
    batched by the length of their prompt (left-padded batches)."""
    keep = max(1, model.config.block_size - max_new_tokens)  # lm-eval's generate_until: the context's last ids
    prompts = [context_ids(tokenizer, c)[-keep:] for c in contexts]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    scores = [0.0] * len(items)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        texts = complete(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, stop="\n", temperature=0.0)
        for i, text in zip(batch, texts):
            scores[i] = exact_match(text, items[i]["output"], task.normalize)
        bar.update(len(batch))
    return {"exact_match": scores}


# ----------------------------------------------------------------------------- results

COLUMNS = [("task", "task", "{}"), ("shots", "K", "{}"), ("shots_used", "K used", "{:.1f}"),
           ("description", "description", "{}"), ("metric", "metric", "{}"), ("value", "value", "{:.4f}"),
           ("stderr", "stderr", "{:.4f}"), ("n", "n", "{}")]


def report(rows, json_path=None, meta=None):
    """Print the result rows as a table (task, K, metric, value, standard error, n) and, with
    json_path, write {"meta": meta, "results": rows} there (temp-then-rename)."""
    print_table(rows, COLUMNS)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"meta": meta or {}, "results": rows}, indent=1) + "\n"
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(body))
        print(f"results: {json_path}")
