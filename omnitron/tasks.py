"""GPT-3's synthetic tasks (Brown et al. 2020, §3.9.1 and §3.9.2), generated offline from a seed,
and one multiple-choice task from the corpus: data/tasks/NAME.jsonl, the format that evaluation.py
reads (evaluation.read_task) and that a user's own task file follows.

A library module (evaluation.py, sample.py --eval and bench.py icl use it). Task names are
lm-evaluation-harness's where it has the task (its `arithmetic` and `unscramble` groups):

  arithmetic_2da, arithmetic_3da   2- and 3-digit addition        "Q: What is 48 plus 76? A: 124"
  arithmetic_2ds, arithmetic_3ds   2- and 3-digit subtraction     "Q: What is 34 minus 53? A: -19"
  arithmetic_2dm                   2-digit multiplication         "Q: What is 24 times 99? A: 2376"
  arithmetic_1dc                   one-digit composite            "Q: What is 6+(4*8)? A: 38"
  cycle_letters                    cycled letters                 "lyinevitab = inevitably"
  anagrams1                        all but the first and last letter scrambled      "criroptocal = reciprocal"
  anagrams2                        all but the first and last 2 letters scrambled   "opoepnnt = opponent"
  random_insertion                 a punctuation or space character between letters "s.u!c/c!e.s s i/o/n = succession"
  reversed_words                   the word spelled backwards     "elbativeni = inevitable"
  corpus_cloze                     multiple choice: the last word of a line of the corpus, against 3
                                   distractors of the same length and nearly the same frequency

The word tasks use the corpus's words of 4 to 15 letters (GPT-3: the 10,000 most frequent words of
4 to 15 letters, from the English vocabulary), the most frequent first; the words of the test split
are never in the train split (items are held out by word, arithmetic problems by problem). The
corpus_cloze test lines come from the corpus's val part (its last 10%, data.VAL_FRACTION), the
train lines from the rest.

File format (one JSON object per line): an optional header {"description": ..., "sep": ...,
"answer_context": ..., "normalize": ...} (evaluation.read_task), then records {"input", "output", "split"} (free-form)
or {"input", "choices", "answer", "split"} (multiple choice; answer is an index into choices).
"""
import json
import random
import re
from collections import Counter
from pathlib import Path

from omnitron.runtime import atomic_write

UNSCRAMBLE = "Please unscramble the letters into a word, and write that word:"  # GPT-3's (§3.9.2, Figure G.*)
ARITHMETIC = {  # name: (digits, operator word, description)
    "arithmetic_2da": (2, "plus"), "arithmetic_3da": (3, "plus"),
    "arithmetic_2ds": (2, "minus"), "arithmetic_3ds": (3, "minus"),
    "arithmetic_2dm": (2, "times"),
}
WORD_TASKS = {  # name: description; the transformation is scramble()'s
    "cycle_letters": UNSCRAMBLE,
    "anagrams1": UNSCRAMBLE,
    "anagrams2": UNSCRAMBLE,
    "random_insertion": "Please remove the random symbols from the word, and write that word:",
    "reversed_words": "Please reverse the letters of the word, and write that word:",
}
INSERTED = ".,;!?/-' "  # random insertion: punctuation or a space (GPT-3's example: "s.u!c/c!e.s s i/o/n")
NAMES = [*ARITHMETIC, "arithmetic_1dc", *WORD_TASKS, "corpus_cloze"]


# ----------------------------------------------------------------------------- the transformations

def scramble(task, word, rng):
    """The input of a word task for `word` (lowercase letters), drawn with rng (random.Random):
    cycle_letters rotates it by 1..len-1; anagrams1 / anagrams2 shuffle all but the first and
    last 1 / 2 letters (differently from the word when the letters allow); random_insertion puts
    one of INSERTED between every two letters; reversed_words reverses it. GPT-3 §3.9.2."""
    if task == "cycle_letters":
        k = rng.randrange(1, len(word))
        return word[k:] + word[:k]
    if task in ("anagrams1", "anagrams2"):
        keep = 1 if task == "anagrams1" else 2
        middle = list(word[keep:-keep])
        for _ in range(10):  # a shuffle that changes the word, when one exists
            rng.shuffle(middle)
            if "".join(middle) != word[keep:-keep]:
                break
        return word[:keep] + "".join(middle) + word[-keep:]
    if task == "random_insertion":
        return "".join(c + rng.choice(INSERTED) for c in word[:-1]) + word[-1]
    if task == "reversed_words":
        return word[::-1]
    raise ValueError(f"unknown word task {task!r}")


def arithmetic_problem(task, rng):
    """(input, output) of an arithmetic task (GPT-3 §3.9.1): operands of `digits` digits drawn
    uniformly, e.g. ("Q: What is 48 plus 76?", "124"); arithmetic_1dc: three one-digit numbers
    and two of + - *, with parentheses, e.g. ("Q: What is 6+(4*8)?", "38")."""
    if task == "arithmetic_1dc":
        a, b, c = (rng.randrange(10) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expr = f"{a}{op1}({b}{op2}{c})" if rng.random() < 0.5 else f"({a}{op1}{b}){op2}{c}"
        return f"Q: What is {expr}?", str(eval(expr))  # noqa: S307 (digits and + - * ( ) only)
    digits, op = ARITHMETIC[task]
    a, b = (rng.randrange(10 ** (digits - 1), 10 ** digits) for _ in range(2))
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return f"Q: What is {a} {op} {b}?", str(value)


# ----------------------------------------------------------------------------- words and lines of the corpus

def corpus_words(text, min_len=4, max_len=15, n=2000):
    """The corpus's n most frequent lowercase words of min_len..max_len letters (a-z only), most
    frequent first (ties in alphabetical order), with their counts: [(word, count)]."""
    counts = Counter(w for w in re.findall(r"[a-z]+", text.lower()) if min_len <= len(w) <= max_len)
    return sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:n]


def cloze_items(text, counts, rng, n_distractors=3, min_words=5):
    """Multiple-choice cloze items from the corpus's lines: the line without its last word (input),
    that word among n_distractors others of the same length and the nearest frequency (counts:
    corpus_words' list; the last word must be in it), in a random order."""
    by_length = {}
    for rank, (w, _) in enumerate(counts):
        by_length.setdefault(len(w), []).append((rank, w))
    nearest = {}  # word -> its n_distractors peers: same length, nearest frequency rank
    for peers in by_length.values():
        for rank, w in peers:
            others = sorted((abs(r - rank), p) for r, p in peers if p != w)
            if len(others) >= n_distractors:
                nearest[w] = [p for _, p in others[:n_distractors]]
    items = []
    line_end = re.compile(r"^(\s*\S.*?\s)([A-Za-z]+)[^A-Za-z]*$")
    for line in text.splitlines():
        m = line_end.match(line)
        if not m or m.group(2).lower() not in nearest or len(line.split()) < min_words:
            continue
        word, prefix = m.group(2), m.group(1).strip()
        distractors = list(nearest[word.lower()])
        if word[0].isupper():
            distractors = [w.capitalize() for w in distractors]
        choices = [word, *distractors]
        rng.shuffle(choices)
        items.append({"input": prefix, "choices": choices, "answer": choices.index(word)})
    return items


# ----------------------------------------------------------------------------- the files

def generate(text, out_dir, seed=1234, n_train=1000, n_test=500, val_fraction=0.1, names=None):
    """Write data/tasks/NAME.jsonl for every task of NAMES (or `names`) from the corpus `text`,
    deterministically for `seed`: n_train train and n_test test records per task (fewer when the
    corpus has fewer words or lines). Returns the paths written (each written temp-then-rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = corpus_words(text)
    words = [w for w, _ in counts]
    paths = []
    for name in names or NAMES:
        rng = random.Random(f"{seed}:{name}")  # each task its own stream: one task's size changes no other
        header = {"sep": " =", "normalize": "strip"}  # GPT-3: the answer must be exact
        if name.startswith("arithmetic"):
            header = {"sep": " A:", "normalize": "strip"}
            seen, records = set(), []
            for _ in range(50 * (n_train + n_test)):
                if len(records) == n_train + n_test:
                    break
                q, a = arithmetic_problem(name, rng)
                if q not in seen:
                    seen.add(q)
                    records.append({"input": q, "output": a})
            train, test = records[n_test:], records[:n_test]
        elif name in WORD_TASKS:
            header["description"] = WORD_TASKS[name]
            pool = [w for w in words if name != "anagrams2" or len(w) >= 5]  # anagrams2 needs a middle
            rng.shuffle(pool)
            n_held = min(n_test, len(pool) // 5)
            test_words, train_words = pool[:n_held], pool[n_held:]
            train = [{"input": scramble(name, w, rng), "output": w} for w in train_words[:n_train]]
            test = [{"input": scramble(name, w, rng), "output": w} for w in test_words]
        elif name == "corpus_cloze":
            header = {"description": "Choose the word that ends the line:", "sep": "", "answer_context": "Answer:"}
            cut = int(len(text) * (1 - val_fraction))
            train = cloze_items(text[:cut], counts, rng)
            test = cloze_items(text[cut:], counts, rng)
            rng.shuffle(train)
            rng.shuffle(test)
            train, test = train[:n_train], test[:n_test]
        else:
            raise ValueError(f"unknown task {name!r}; the tasks: {', '.join(NAMES)}")
        lines = [header] + [{**r, "split": "train"} for r in train] + [{**r, "split": "test"} for r in test]
        body = "".join(json.dumps(obj) + "\n" for obj in lines)
        path = out_dir / f"{name}.jsonl"
        atomic_write(path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
        paths.append(path)
    return paths
