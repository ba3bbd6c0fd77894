"""Self-rewarding language models (Yuan et al. 2024, "Self-Rewarding Language Models"): the model
writes candidate answers, judges them itself with an LLM-as-a-judge prompt, and is trained by DPO
(dpo.py) on the resulting preference pairs; each iteration's model is the next one's generator and
judge (the paper's section 2.2-2.3: AI feedback training, M_t -> M_{t+1}).

  python train.py --init_from out/M1 --self_reward 3 --prompts prompts.jsonl --out_dir out/sr \\
      --max_iters 100 --learning_rate 1e-5 --warmup_iters 0

For t = 1 .. N, with M_1 = --init_from:
  1. candidates: --sr_candidates (4) responses per prompt, sampled from M_t at --sr_temperature
     (0.7) and --sr_top_p (0.9) (the paper's N = 4, T = 0.7, p = 0.9), all prompts' rows decoded
     together as left-padded batches with the KV cache (generation.complete), up to the prompts
     file's `stop` text (default "\\n\\n") or --sr_max_new_tokens;
  2. judgements: M_t scores each candidate with the judge prompt, --sr_judge_samples (3) samples,
     each parsed for "Score: k" (0 <= k <= 5; parse_score); the candidate's score is the mean of
     the samples that parse. A judgement without a valid score is counted (malformed) and left out;
  3. pairs: per prompt, the highest-scored candidate is chosen and the lowest rejected; a prompt
     whose scores tie (or whose best and worst texts are the same) gives no pair (counted);
  4. DPO from M_t with M_t as the reference (train.py --dpo, every training flag as given) into
     OUT_DIR/M{t+1}, a run folder of its own, which also holds pairs.jsonl, judgements.jsonl (every
     candidate, its judge outputs and scores) and iteration.json (the logged record). With
     --lora_rank each run also writes merged/ (the base with the adapter folded in): the next
     iteration's model.
A finished iteration (M{t+1} at --max_iters) is kept when the command runs again; an interrupted
one resumes its DPO run from its saved pairs.

Logged per iteration (printed, and OUT_DIR/self_reward.jsonl): the pairs kept, ties dropped,
malformed judgements, the mean judge score; with a checker (see below), also the mean true score,
the candidates' exact-match rate, the fraction of pairs whose chosen response is truly the better
one, the judge's pairwise accuracy against the checker (over the pairs
of candidates of a prompt whose true scores differ: 1 when the mean judge scores order them the same
way, 1/2 when the judge ties them, 0 otherwise), and the reward-hacking gap: the mean self-score
minus the mean true score, on the judge's 0-5 scale.

The prompts file: one {"prompt": text} object a line, optionally with "answer" (used only by a
checker, for measurement, never for training), and optionally one header line {"judge_template":
text with {prompt} and {response} (default JUDGE_PROMPT, the paper's Figure 2), "stop": text that
ends a response (default "\\n\\n"; appended to the responses of the pairs, so that DPO teaches where
to stop), "judge_stop": text that ends a judgement (default: none), "checker": a name of CHECKERS}.
The checker is only ever a measurement, except under --sr_pairs checker, the upper-bound control;
--sr_pairs random is the other control (two different candidates at random).
"""
import json
import os
import random
import re
from pathlib import Path

import torch

from omnitron import checkpoints
from omnitron.generation import complete
from omnitron.runtime import UserError, atomic_write, print_table, read_jsonl, resolve_device, write_jsonl

# The paper's Figure 2 (LLM-as-a-Judge prompt), adapted: the user's question is the prompt.
JUDGE_PROMPT = """Review the user's question and the corresponding response using the additive 5-point scoring system \
described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is \
incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely \
resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless \
of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search \
results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's \
question directly and comprehensively, and is well-organized and helpful, even if there is slight room for \
improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without \
extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the \
response in alignment with this additive scoring model, we'll systematically attribute points based on the outlined \
criteria.
"""
MAX_SCORE = 5
SCORE = re.compile(r"Score:\s*(\d+(?:\.\d+)?)")
HEADER_KEYS = ("judge_template", "stop", "judge_stop", "checker")
PAIRS_FROM = ("judge", "random", "checker")


# ----------------------------------------------------------------------------- the sorting task (the README's experiment)

def sort_rubric(letters, response):
    """The additive five-point rubric of the sorting task (the README's experiment): one point
    each when the response (1) is non-empty lowercase letters a-z only, (2) has as many letters as
    the input, (3) uses only letters of the input, (4) is in alphabetical order (non-decreasing),
    (5) has exactly the input's letters (a permutation). 5 points iff it is the sorted input."""
    r = response.strip()
    return (bool(r) and all("a" <= c <= "z" for c in r)) + (len(r) == len(letters)) + \
        (bool(r) and set(r) <= set(letters)) + (bool(r) and list(r) == sorted(r)) + (sorted(r) == sorted(letters))


def sort_checker(record, response):
    """True score of a response to a sorting prompt {"prompt", "answer": the sorted letters}."""
    return sort_rubric(record["answer"], response)


def exact_checker(record, response):
    """5 when the response (surrounding whitespace stripped) is the record's answer, else 0."""
    return MAX_SCORE * (response.strip() == record["answer"].strip())


CHECKERS = {"sort": sort_checker, "exact": exact_checker}  # true score of (record, response), 0..MAX_SCORE


# ----------------------------------------------------------------------------- files

def read_prompts(path):
    """(settings: the header's keys with their defaults, records [{"prompt", ...}]) of a prompts
    file (see the module's docstring). A missing file, a bad line, an unknown checker, a checker
    without the records' answers, or no prompts: UserError."""
    path = Path(path)
    settings = {"judge_template": JUDGE_PROMPT, "stop": "\n\n", "judge_stop": None, "checker": None}
    records = []
    for n, obj in read_jsonl(path, "prompts file"):
        if "prompt" not in obj:
            if set(obj) - set(HEADER_KEYS) or not all(isinstance(v, str) for v in obj.values()):
                raise UserError(f"{path}:{n}: expected {{\"prompt\": text}} or a header of {', '.join(HEADER_KEYS)} (texts)")
            settings.update(obj)
            continue
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise UserError(f"{path}:{n}: the prompt is empty or not a text")
        records.append(obj)
    if not records:
        raise UserError(f"{path}: no prompts")
    if settings["checker"] is not None:
        if settings["checker"] not in CHECKERS:
            raise UserError(f"{path}: unknown checker {settings['checker']!r}; choose from {', '.join(CHECKERS)}")
        if not all(isinstance(r.get("answer"), str) for r in records):
            raise UserError(f"{path}: the checker {settings['checker']} needs an \"answer\" in every record")
    if "{response}" not in settings["judge_template"]:
        raise UserError(f"{path}: the judge_template has no {{response}}")
    return settings, records


# ----------------------------------------------------------------------------- judging and pairs

def parse_score(text):
    """The score of a judgement: the number after the first "Score:", as a float, when it is
    between 0 and MAX_SCORE; None for a malformed judgement (no "Score:", or out of range)."""
    m = SCORE.search(text)
    if m is None:
        return None
    k = float(m.group(1))
    return k if 0 <= k <= MAX_SCORE else None


def judge_prompt(template, prompt, response):
    """The judge's prompt: the template with {prompt} and {response} filled in (by replacement,
    so other braces in the template stay as they are)."""
    return template.replace("{prompt}", prompt).replace("{response}", response)


def check_judge_prompt(tokenizer, template, model_dir):
    """UserError, before any sampling, when the judge template holds text the model's tokenizer cannot
    encode (the default prompt's <, >, braces in a character model of Shakespeare, say)."""
    try:
        tokenizer.encode(judge_prompt(template, "", ""))
    except (UserError, ValueError) as e:
        which = "the default, self_reward.JUDGE_PROMPT" if template == JUDGE_PROMPT else "the prompts file's"
        raise UserError(f"the judge prompt ({which}) cannot be tokenized by {model_dir}'s tokenizer: {e}; give a "
                        "judge_template the model can read in the prompts file's header") from None


def mean_score(judgements):
    """The mean of the judgements' scores that parse, None when none does."""
    scores = [s for s in map(parse_score, judgements) if s is not None]
    return sum(scores) / len(scores) if scores else None


def best_and_worst(candidates, scores):
    """(chosen, rejected) candidate indices: the highest and the lowest score (the first of equals),
    or None when fewer than two are scored, their scores tie, or the two texts are the same."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    hi = max(scored, key=lambda i: scores[i])
    lo = min(scored, key=lambda i: scores[i])
    if scores[hi] == scores[lo] or candidates[hi] == candidates[lo]:
        return None
    return hi, lo


def random_pair(candidates, rng):
    """Two candidates with different texts, drawn at random in a random order; None if all are the same."""
    distinct = [i for i, c in enumerate(candidates) if c not in candidates[:i]]
    return tuple(rng.sample(distinct, 2)) if len(distinct) >= 2 else None


def pairwise_accuracy(judge, true):
    """Over the pairs (i, j) of one prompt's candidates whose true scores differ and which the judge
    scored: the count where the judge's scores order them as the true ones do (a judge tie counts
    1/2), and the number of such pairs. Returns (agreements, pairs)."""
    agree, n = 0.0, 0
    for i in range(len(true)):
        for j in range(i + 1, len(true)):
            if true[i] == true[j] or judge[i] is None or judge[j] is None:
                continue
            n += 1
            agree += 0.5 if judge[i] == judge[j] else float((judge[i] > judge[j]) == (true[i] > true[j]))
    return agree, n


# ----------------------------------------------------------------------------- one iteration

def sample_texts(model, tokenizer, prompts, n, max_new_tokens, stop, generator, flags, batch_rows=64):
    """n samples of each prompt (texts), decoded batch_rows rows at a time (left-padded, KV cache).
    Returns a list per prompt."""
    rows = [tokenizer.encode(p) for p in prompts for _ in range(n)]
    texts = []
    for start in range(0, len(rows), batch_rows):
        texts += complete(model, tokenizer, rows[start:start + batch_rows], max_new_tokens, stop=stop,
                          temperature=flags["sr_temperature"], top_p=flags["sr_top_p"], generator=generator)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def judge_candidates(model, tokenizer, records, settings, flags, generator):
    """Sample candidates for every prompt and judge each. Returns one dict per prompt: prompt,
    candidates, judgements (per candidate, the judge's texts), scores (their means, None when no
    judgement parsed) and, with a checker, true (the checker's scores)."""
    prompts = [r["prompt"] for r in records]
    candidates = sample_texts(model, tokenizer, prompts, flags["sr_candidates"], flags["sr_max_new_tokens"],
                              settings["stop"], generator, flags)
    judge_prompts = [judge_prompt(settings["judge_template"], p, c) for p, cs in zip(prompts, candidates) for c in cs]
    judged = sample_texts(model, tokenizer, judge_prompts, flags["sr_judge_samples"], flags["sr_judge_tokens"],
                          settings["judge_stop"], generator, flags)
    checker = CHECKERS.get(settings["checker"])
    out, k = [], flags["sr_candidates"]
    for n, (record, cands) in enumerate(zip(records, candidates)):
        judgements = judged[n * k:(n + 1) * k]
        item = {"prompt": record["prompt"], "candidates": cands, "judgements": judgements,
                "scores": [mean_score(j) for j in judgements]}
        if checker is not None:
            item["true"] = [checker(record, c) for c in cands]
        out.append(item)
    return out


def make_pairs(items, pairs_from, stop, seed):
    """The DPO pairs {"prompt", "chosen", "rejected"} (responses with `stop` appended) of judged
    items, chosen by pairs_from (judge, random, checker), and how many prompts gave none."""
    rng = random.Random(seed)
    pairs, dropped = [], 0
    for item in items:
        cands = item["candidates"]
        if pairs_from == "judge":
            pick = best_and_worst(cands, item["scores"])
        elif pairs_from == "checker":
            pick = best_and_worst(cands, item["true"])
        else:
            pick = random_pair(cands, rng)
        if pick is None:
            dropped += 1
            continue
        pairs.append({"prompt": item["prompt"], "chosen": cands[pick[0]] + stop, "rejected": cands[pick[1]] + stop})
    return pairs, dropped


def pair_precision(items, pairs, stop):
    """Of the pairs (make_pairs's, responses ending in `stop`), the fraction whose chosen response
    has the higher true score and the fraction whose two responses tie on it (items with "true": a
    checker's). (better, tied); (None, None) without pairs."""
    true = {(i["prompt"], c + stop): t for i in items for c, t in zip(i["candidates"], i["true"])}
    diffs = [true[p["prompt"], p["chosen"]] - true[p["prompt"], p["rejected"]] for p in pairs]
    if not diffs:
        return None, None
    return sum(d > 0 for d in diffs) / len(diffs), sum(d == 0 for d in diffs) / len(diffs)


def summarize(items, pairs, dropped, stop="\n"):
    """The logged numbers of an iteration's judged items (see the module's docstring)."""
    judgements = [j for item in items for js in item["judgements"] for j in js]
    scores = [s for item in items for s in item["scores"] if s is not None]
    record = {"prompts": len(items), "candidates": sum(len(i["candidates"]) for i in items), "pairs": len(pairs),
              "ties_dropped": dropped, "judgements": len(judgements),
              "malformed_judgements": sum(parse_score(j) is None for j in judgements),
              "mean_score": sum(scores) / len(scores) if scores else None}
    if items and "true" in items[0]:
        true = [t for item in items for t in item["true"]]
        agree = [pairwise_accuracy(item["scores"], item["true"]) for item in items]
        n_pairs = sum(n for _, n in agree)
        both = [(s, t) for item in items for s, t in zip(item["scores"], item["true"]) if s is not None]
        record.update({"true_mean_score": sum(true) / len(true),
                       "exact_match": sum(t == MAX_SCORE for t in true) / len(true),
                       "judge_pairwise_accuracy": sum(a for a, _ in agree) / n_pairs if n_pairs else None,
                       "judge_pairs": n_pairs,
                       "pairs_true_better": pair_precision(items, pairs, stop)[0],
                       "reward_gap": sum(s - t for s, t in both) / len(both) if both else None})
    return record


def finished(folder, max_iters):
    """Whether a run folder holds a DPO run finished at max_iters (train_state.pt's step)."""
    path = Path(folder) / checkpoints.TRAIN_STATE
    return path.is_file() and checkpoints.read_train_state(folder)["step"] >= max_iters


def run(flags, module, train_fn):
    """--self_reward N: the iterations M_1 -> M_{N+1} (see the module's docstring). flags: train.py's;
    train_fn: train.train, which trains each DPO run. Returns the last iteration's record plus
    out_dir and "iterations" (every record)."""
    f = dict(flags)
    if f["init_from"] in ("scratch", "resume"):
        raise UserError("--self_reward iterates from a trained model: give it --init_from DIR (rerun the same "
                        "command to continue: finished iterations are kept)")
    if f["dpo"]:
        raise UserError("--self_reward makes its own pairs: it cannot take --dpo")
    if f["sr_pairs"] not in PAIRS_FROM:
        raise UserError(f"--sr_pairs must be one of {', '.join(PAIRS_FROM)}, not {f['sr_pairs']!r}")
    for name, least in (("self_reward", 1), ("sr_candidates", 2), ("sr_judge_samples", 1), ("sr_max_new_tokens", 1),
                        ("sr_judge_tokens", 1)):
        if f[name] < least:
            raise UserError(f"--{name} must be at least {least}, not {f[name]}")
    if f["sr_temperature"] < 0 or not 0 < f["sr_top_p"] <= 1:
        raise UserError(f"--sr_temperature must be >= 0 and --sr_top_p in (0, 1], not {f['sr_temperature']} and "
                        f"{f['sr_top_p']}")
    if not f["prompts"]:
        raise UserError("--self_reward needs --prompts FILE")
    if "RANK" in os.environ:
        raise UserError("--self_reward runs in one process (not under torchrun)")
    settings, records = read_prompts(f["prompts"])
    if f["sr_pairs"] == "checker" and settings["checker"] is None:
        raise UserError("--sr_pairs checker needs a checker in the prompts file's header")
    out_dir, device = Path(f["out_dir"]), resolve_device(f["device"])
    current, history = Path(f["init_from"]), []
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in range(1, f["self_reward"] + 1):
        folder = out_dir / f"M{t + 1}"
        if not (folder / "pairs.jsonl").is_file():
            model, tokenizer = checkpoints.load(current, device=device, dtype=torch.float32)
            check_judge_prompt(tokenizer, settings["judge_template"], current)
            generator = torch.Generator(device=device).manual_seed(f["seed"] + t)
            print(f"self-rewarding iteration {t}/{f['self_reward']}: {current} samples {f['sr_candidates']} "
                  f"candidates for {len(records)} prompts and judges each {f['sr_judge_samples']} times", flush=True)
            items = judge_candidates(model, tokenizer, records, settings, f, generator)
            pairs, dropped = make_pairs(items, f["sr_pairs"], settings["stop"], f["seed"] + t)
            if not pairs:
                raise UserError(f"iteration {t}: no preference pairs (every prompt's candidates tied)")
            record = {"iteration": t, "model": str(current), "out_dir": str(folder), "pairs_from": f["sr_pairs"],
                      **summarize(items, pairs, dropped, settings["stop"])}
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(folder / "judgements.jsonl", items)
            atomic_write(folder / "iteration.json", lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
            write_jsonl(folder / "pairs.jsonl", pairs)  # last: its presence says the iteration's data is complete
            del model
        record = json.loads((folder / "iteration.json").read_text())
        if not finished(folder, f["max_iters"]):
            resume = (folder / "train_state.pt").is_file()
            run_flags = {**flags, "self_reward": 0, "prompts": "", "dpo": str(folder / "pairs.jsonl"),
                         "init_from": "resume" if resume else str(current), "resume": resume, "out_dir": str(folder),
                         "dpo_reference": "", "merge": bool(f["lora_rank"]), "sample_tokens": 0}
            if resume:
                run_flags = {**checkpoints.read_train_state(folder)["args"],
                             "init_from": "resume", "resume": True, "max_iters": f["max_iters"]}
            train_fn(run_flags, module)
        current = folder / "merged" if f["lora_rank"] else folder
        history.append(record)
        print_table([record], [("iteration", "iter", "{}"), ("pairs", "pairs", "{}"), ("ties_dropped", "ties", "{}"),
                               ("malformed_judgements", "malformed", "{}"), ("mean_score", "mean score", "{:.2f}"),
                               ("true_mean_score", "true score", "{:.2f}"), ("reward_gap", "gap", "{:+.2f}"),
                               ("judge_pairwise_accuracy", "judge acc", "{:.3f}"), ("exact_match", "exact", "{:.3f}")])
        write_jsonl(out_dir / "self_reward.jsonl", history)
    return {**(history[-1] if history else {}), "out_dir": str(out_dir), "iterations": history}
