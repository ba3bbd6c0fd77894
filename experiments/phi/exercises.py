"""Synthetic exercises: templated function-writing tasks (signature + docstring -> body).

The role of phi-1's CodeExercises (Gunasekar et al. 2023, Textbooks Are All You Need, section 2.3),
which GPT-3.5 wrote; ours are *templated, not written by a language model*: FAMILIES is a few
dozen hand-written templates (arithmetic, lists, strings, dicts, recursion), each drawn with random
constants, names and argument names. Every exercise carries unit tests whose expected values come
from an independent reference function (the family's `ref`, run here), and is kept only if its
templated solution passes them in the sandbox (sandbox.py) -- so a broken template never reaches
the training data.

Families marked held_out are never trained on: they are the pass@1 test set of `bench.py phi`.
Each is a sibling of a training family (min beside max, minus beside plus, lower beside upper), so
that a small model has a chance; they still need a word-to-code mapping it never saw in the exercises.

  exercise.prompt      def add_seven(x):  /  four spaces, the docstring "Return x plus 7." (a newline ends each)
  exercise.solution    four spaces, return x + 7, a newline
  exercise.tests       assert add_seven(3) == 10, one assert a line
  exercise.text        prompt + solution: what training reads
"""
import json
import random
import re
from dataclasses import asdict, dataclass

from experiments.phi import sandbox

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "north", "piano", "queen", "robot", "salt", "tree"]


@dataclass
class Exercise:
    family: str
    name: str
    prompt: str     # signature line + docstring line(s), ending in a newline
    solution: str   # the body, indented four spaces
    tests: str      # assert lines
    held_out: bool

    @property
    def text(self):
        return self.prompt + self.solution


def _number_name(k):
    """A constant's name in a function name: its word up to twelve (add_seven), else its digits (add_57)."""
    return NUMBER_WORDS[k] if 0 <= k < len(NUMBER_WORDS) else str(k)


def _ints(rng, n, lo=-9, hi=9):
    return [rng.randint(lo, hi) for _ in range(n)]


def _word(rng):
    return rng.choice(WORDS)


# Each family: make(rng) -> (name, params, docstring, body lines, reference function, list of argument tuples).
def _add_const(rng, hi=12):
    k = rng.randint(2, hi)
    v = rng.choice(["x", "n", "value"])
    return (f"add_{_number_name(k)}", v, f"Return {v} plus {k}.", [f"return {v} + {k}"], lambda a: a + k,
            [(a,) for a in _ints(rng, 4, -20, 20)])


def _sub_const(rng, hi=12):
    k = rng.randint(2, hi)
    v = rng.choice(["x", "n", "value"])
    return (f"subtract_{_number_name(k)}", v, f"Return {v} minus {k}.", [f"return {v} - {k}"], lambda a: a - k,
            [(a,) for a in _ints(rng, 4, -20, 20)])


def _mul_const(rng, hi=12):
    k = rng.randint(2, hi)
    v = rng.choice(["x", "n", "value"])
    return (f"times_{_number_name(k)}", v, f"Return {v} times {k}.", [f"return {v} * {k}"], lambda a: a * k,
            [(a,) for a in _ints(rng, 4, -20, 20)])


def _square(rng):
    v = rng.choice(["x", "n", "value"])
    return (rng.choice(["square", "squared"]), v, f"Return the square of {v}.", [f"return {v} * {v}"],
            lambda a: a * a, [(a,) for a in _ints(rng, 4, -20, 20)])


def _is_even(rng):
    v = rng.choice(["n", "x", "number"])
    return (rng.choice(["is_even", "even"]), v, f"Return True if {v} is even, else False.", [f"return {v} % 2 == 0"],
            lambda a: a % 2 == 0, [(a,) for a in _ints(rng, 5, -20, 20)])


def _is_odd(rng):
    v = rng.choice(["n", "x", "number"])
    return (rng.choice(["is_odd", "odd"]), v, f"Return True if {v} is odd, else False.", [f"return {v} % 2 == 1"],
            lambda a: a % 2 == 1, [(a,) for a in _ints(rng, 5, -20, 20)])


def _abs_diff(rng):
    a, b = rng.choice([("a", "b"), ("x", "y"), ("m", "n")])
    return ("distance", f"{a}, {b}", f"Return the absolute difference of {a} and {b}.", [f"return abs({a} - {b})"],
            lambda p, q: abs(p - q), [tuple(_ints(rng, 2, -20, 20)) for _ in range(4)])


def _max_two(rng):
    a, b = rng.choice([("a", "b"), ("x", "y"), ("m", "n")])
    return (rng.choice(["larger", "bigger"]), f"{a}, {b}", f"Return the larger of {a} and {b}.", [f"return max({a}, {b})"],
            max, [tuple(_ints(rng, 2, -20, 20)) for _ in range(4)])


def _min_two(rng):
    a, b = rng.choice([("a", "b"), ("x", "y"), ("m", "n")])
    return (rng.choice(["smaller", "lesser"]), f"{a}, {b}", f"Return the smaller of {a} and {b}.",
            [f"return min({a}, {b})"], min, [tuple(_ints(rng, 2, -20, 20)) for _ in range(4)])


def _clamp(rng, span=10):
    lo, hi = sorted(rng.sample(range(-span, span + 1), 2))
    v = rng.choice(["x", "n", "value"])
    return ("clamp", v, f"Return {v} limited to the range {lo} to {hi}.", [f"return max({lo}, min({v}, {hi}))"],
            lambda a: max(lo, min(a, hi)), [(a,) for a in _ints(rng, 4, -20, 20)])


def _lists(rng, n=4, lo=1, hi=6):
    return [(_ints(rng, rng.randint(lo, hi)),) for _ in range(n)]


def _list_sum(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("total", v, f"Return the sum of the numbers in {v}.", [f"return sum({v})"], sum, _lists(rng, lo=0))


def _list_max(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("largest", v, f"Return the largest number in {v}.", [f"return max({v})"], max, _lists(rng))


def _list_min(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("smallest", v, f"Return the smallest number in {v}.", [f"return min({v})"], min, _lists(rng))


def _list_len(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("size", v, f"Return the number of items in {v}.", [f"return len({v})"], len, _lists(rng, lo=0))


def _first(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("first", v, f"Return the first item of {v}.", [f"return {v}[0]"], lambda xs: xs[0], _lists(rng))


def _last(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("last", v, f"Return the last item of {v}.", [f"return {v}[-1]"], lambda xs: xs[-1], _lists(rng))


def _count_value(rng, hi=3):
    k = rng.randint(0, hi)
    v = rng.choice(["xs", "numbers", "items"])
    return (f"count_{_number_name(k)}s", v, f"Return how many times {k} occurs in {v}.", [f"return {v}.count({k})"],
            lambda xs: xs.count(k), [([rng.randint(0, hi) for _ in range(rng.randint(0, 7))],) for _ in range(4)])


def _positives(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("positives", v, f"Return the positive numbers of {v}, in order.", [f"return [x for x in {v} if x > 0]"],
            lambda xs: [x for x in xs if x > 0], _lists(rng, lo=0))


def _negatives(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("negatives", v, f"Return the negative numbers of {v}, in order.", [f"return [x for x in {v} if x < 0]"],
            lambda xs: [x for x in xs if x < 0], _lists(rng, lo=0))


def _scale_all(rng, hi=9):
    k = rng.randint(2, hi)
    v = rng.choice(["xs", "numbers", "items"])
    return (f"scale_by_{_number_name(k)}", v, f"Return a list of each number of {v} times {k}.",
            [f"return [x * {k} for x in {v}]"], lambda xs: [x * k for x in xs], _lists(rng, lo=0))


def _reverse_list(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("reverse", v, f"Return the items of {v} in reverse order.", [f"return {v}[::-1]"], lambda xs: xs[::-1],
            _lists(rng, lo=0))


def _sort_list(rng):
    v = rng.choice(["xs", "numbers", "items"])
    return ("ascending", v, f"Return the items of {v} sorted in increasing order.", [f"return sorted({v})"], sorted,
            _lists(rng, lo=0))


def _strings(rng, n=4):
    return [(rng.choice(WORDS + ["Hello World", "a b c", "Mixed Case", ""]),) for _ in range(n)]


def _upper(rng):
    v = rng.choice(["s", "text", "word"])
    return ("shout", v, f"Return {v} in upper case.", [f"return {v}.upper()"], str.upper, _strings(rng))


def _lower(rng):
    v = rng.choice(["s", "text", "word"])
    return ("whisper", v, f"Return {v} in lower case.", [f"return {v}.lower()"], str.lower, _strings(rng))


def _reverse_string(rng):
    v = rng.choice(["s", "text", "word"])
    return ("backwards", v, f"Return the string {v} reversed.", [f"return {v}[::-1]"], lambda s: s[::-1], _strings(rng))


def _starts_with(rng, words=WORDS):
    p = rng.choice(words)[:rng.randint(1, 3)]
    v = rng.choice(["s", "text", "word"])
    return (f"starts_with_{p}", v, f"Return True if {v} starts with '{p}'.", [f"return {v}.startswith('{p}')"],
            lambda s: s.startswith(p), [(rng.choice([p + _word(rng), _word(rng)]),) for _ in range(4)])


def _ends_with(rng, words=WORDS):
    p = rng.choice(words)[-rng.randint(1, 3):]
    v = rng.choice(["s", "text", "word"])
    return (f"ends_with_{p}", v, f"Return True if {v} ends with '{p}'.", [f"return {v}.endswith('{p}')"],
            lambda s: s.endswith(p), [(rng.choice([_word(rng) + p, _word(rng)]),) for _ in range(4)])


def _count_char(rng, letters="aeiorst"):
    c = rng.choice(letters)
    v = rng.choice(["s", "text", "word"])
    return (f"count_{c}", v, f"Return how many times the letter '{c}' occurs in {v}.", [f"return {v}.count('{c}')"],
            lambda s: s.count(c), _strings(rng))


def _word_count(rng):
    v = rng.choice(["s", "text", "sentence"])
    return ("word_count", v, f"Return the number of words in {v}.", [f"return len({v}.split())"],
            lambda s: len(s.split()), _strings(rng))


def _join_words(rng, seps=("-", ", ", " ", "+", "/")):
    sep = rng.choice(seps)
    v = rng.choice(["words", "parts", "names"])
    return ("join", v, f"Return the strings of {v} joined by '{sep}'.", [f"return '{sep}'.join({v})"],
            lambda ws: sep.join(ws), [([_word(rng) for _ in range(rng.randint(0, 4))],) for _ in range(4)])


def _repeat_string(rng, hi=5):
    k = rng.randint(2, hi)
    v = rng.choice(["s", "text", "word"])
    return (f"repeat_{_number_name(k)}", v, f"Return {v} repeated {k} times.", [f"return {v} * {k}"],
            lambda s: s * k, _strings(rng))


def _is_palindrome(rng):
    v = rng.choice(["s", "text", "word"])
    return ("is_palindrome", v, f"Return True if {v} reads the same backwards.", [f"return {v} == {v}[::-1]"],
            lambda s: s == s[::-1], [(rng.choice(["level", "noon", "abcba", "stone", "ab", ""]),) for _ in range(4)])


def _dicts(rng, n=4):
    return [({_word(rng): rng.randint(0, 9) for _ in range(rng.randint(0, 4))},) for _ in range(n)]


def _dict_get(rng, words=WORDS, hi=9):
    key, default = rng.choice(words), rng.randint(0, hi)
    v = rng.choice(["d", "table", "counts"])
    return (f"get_{key}", v, f"Return the value of key '{key}' in {v}, or {default} if it is missing.",
            [f"return {v}.get('{key}', {default})"], lambda d: d.get(key, default),
            [({**d, key: 5},) if i % 2 else (d,) for i, (d,) in enumerate(_dicts(rng))])


def _sorted_keys(rng):
    v = rng.choice(["d", "table", "counts"])
    return ("sorted_keys", v, f"Return the keys of {v} in sorted order.", [f"return sorted({v})"], sorted, _dicts(rng))


def _invert(rng):
    v = rng.choice(["d", "table", "mapping"])
    return ("invert", v, f"Return a dict that maps each value of {v} to its key.",
            [f"return {{value: key for key, value in {v}.items()}}"], lambda d: {b: a for a, b in d.items()},
            [({_word(rng) + str(i): i for i in range(rng.randint(0, 4))},) for _ in range(4)])


def _dict_values_sum(rng):
    v = rng.choice(["d", "table", "counts"])
    return ("sum_values", v, f"Return the sum of the values of {v}.", [f"return sum({v}.values())"],
            lambda d: sum(d.values()), _dicts(rng))


def _factorial(rng):
    v = rng.choice(["n", "k"])
    f = rng.choice(["factorial", "fact"])
    return (f, v, f"Return {v} factorial, computed recursively.",
            [f"if {v} <= 1:", "    return 1", f"return {v} * {f}({v} - 1)"],
            lambda n: 1 if n <= 1 else __import__("math").factorial(n), [(rng.randint(0, 8),) for _ in range(4)])


def _sum_to(rng):
    v = rng.choice(["n", "k"])
    f = rng.choice(["sum_to", "triangle"])
    return (f, v, f"Return 1 + 2 + ... + {v}, computed recursively.",
            [f"if {v} <= 0:", "    return 0", f"return {v} + {f}({v} - 1)"], lambda n: n * (n + 1) // 2 if n > 0 else 0,
            [(rng.randint(0, 12),) for _ in range(4)])


def _fibonacci(rng):
    v = rng.choice(["n", "k"])
    f = rng.choice(["fib", "fibonacci"])
    fibs = [0, 1]
    for _ in range(20):
        fibs.append(fibs[-1] + fibs[-2])
    return (f, v, f"Return the {v}-th Fibonacci number, computed recursively.",
            [f"if {v} < 2:", f"    return {v}", f"return {f}({v} - 1) + {f}({v} - 2)"], lambda n: fibs[n],
            [(rng.randint(0, 12),) for _ in range(4)])


def _power(rng, hi=5):
    b = rng.randint(2, hi)
    v = rng.choice(["n", "k"])
    return (f"power_of_{_number_name(b)}", v, f"Return {b} to the power {v}, computed recursively.",
            [f"if {v} == 0:", "    return 1", f"return {b} * power_of_{_number_name(b)}({v} - 1)"],
            lambda n: b ** n, [(rng.randint(0, 8),) for _ in range(4)])


def _count_down(rng):
    v = rng.choice(["n", "k"])
    return ("count_down", v, f"Return the list {v}, {v} - 1, ..., 1, built recursively.",
            [f"if {v} <= 0:", "    return []", f"return [{v}] + count_down({v} - 1)"],
            lambda n: list(range(n, 0, -1)), [(rng.randint(0, 6),) for _ in range(4)])


# name -> (make, held_out)
FAMILIES = {
    "add_const": (_add_const, False), "mul_const": (_mul_const, False), "square": (_square, False),
    "is_even": (_is_even, False), "abs_diff": (_abs_diff, False), "max_two": (_max_two, False),
    "clamp": (_clamp, False), "list_sum": (_list_sum, False), "list_max": (_list_max, False),
    "list_len": (_list_len, False), "first": (_first, False), "count_value": (_count_value, False),
    "positives": (_positives, False), "scale_all": (_scale_all, False), "reverse_list": (_reverse_list, False),
    "sort_list": (_sort_list, False), "upper": (_upper, False), "reverse_string": (_reverse_string, False),
    "starts_with": (_starts_with, False), "count_char": (_count_char, False), "word_count": (_word_count, False),
    "join_words": (_join_words, False), "repeat_string": (_repeat_string, False),
    "is_palindrome": (_is_palindrome, False), "dict_get": (_dict_get, False), "sorted_keys": (_sorted_keys, False),
    "invert": (_invert, False), "dict_values_sum": (_dict_values_sum, False), "factorial": (_factorial, False),
    "sum_to": (_sum_to, False), "fibonacci": (_fibonacci, False), "power": (_power, False),
    "count_down": (_count_down, False),
    # held out: siblings of training families, never trained on
    "sub_const": (_sub_const, True), "is_odd": (_is_odd, True), "min_two": (_min_two, True),
    "list_min": (_list_min, True), "last": (_last, True), "negatives": (_negatives, True), "lower": (_lower, True),
    "ends_with": (_ends_with, True),
}


# ----------------------------------------------------------------------------- wide drawings
# The diversity of phi-1's CodeExercises (section 2.3: "diverse" exercises, so that the model cannot memorise
# them) and of TinyStories (Eldan & Li 2023): in a wide drawing the constants span a wide range (WIDE_RANGES),
# the function and argument names come from pools of about a hundred identifiers, and the docstring's frame
# has five wordings. Thousands of distinct exercises per family: copying names and constants from the prompt
# is the only way to solve them.

WIDE_WORDS = WORDS + ["amber", "bread", "candle", "delta", "eagle", "forest", "garden", "harbor", "island", "jacket",
                      "kettle", "ladder", "marble", "needle", "orange", "pepper", "quartz", "rocket", "silver",
                      "tunnel", "umbrella", "violet", "window", "yellow", "zebra"]
WIDE_RANGES = {  # family -> keyword arguments of its maker in a wide drawing
    "add_const": dict(hi=99), "sub_const": dict(hi=99), "mul_const": dict(hi=99), "clamp": dict(span=60),
    "count_value": dict(hi=9), "scale_all": dict(hi=99), "starts_with": dict(words=WIDE_WORDS),
    "ends_with": dict(words=WIDE_WORDS), "count_char": dict(letters="abcdefghijklmnopqrstuvwxyz"),
    "join_words": dict(seps=("-", ", ", " ", "+", "/", ":", ";", "|", "_", " and ", "->", ".")),
    "repeat_string": dict(hi=9), "dict_get": dict(words=WIDE_WORDS, hi=99), "power": dict(hi=9),
}
# argument names: 100 identifiers (none a builtin, a keyword, or a name the templates' bodies use themselves)
IDENTIFIERS = ("a b c d e f g h j k m n p q r s t u v w y z aa bb xx yy zz num val arg inp obj elem item_ "
               "data seq arr lst vals nums ints digits amounts scores counts sizes weights totals entries "
               "records rows cells text word line name label msg token phrase title note chars src dst "
               "left right first_ second_ lhs rhs alpha beta gamma delta omega start stop lo hi base top "
               "number count size total amount score weight width height depth level rank index offset "
               "table mapping lookup store cache config params registry").split()
_VERBS = ["get", "make", "compute", "find", "calc", "build", "do", "solve", "eval", "apply"]
_NOUNS = ["result", "answer", "output", "value", "thing", "item", "data", "stuff", "number", "it"]
FRAMES = ("Return {}", "Returns {}", "Compute and return {}", "Give back {}", "This function returns {}")
_QUOTED = re.compile(r"('[^']*')")


def _rename(text, mapping):
    """text with each whole word of `mapping` replaced, outside single-quoted literals and not after a dot
    (an attribute: '-'.join stays when a function named join is renamed)."""
    pattern = re.compile(r"(?<![.\w])(" + "|".join(map(re.escape, mapping)) + r")\b")
    return "".join(part if part.startswith("'") else pattern.sub(lambda m: mapping[m.group(1)], part)
                   for part in _QUOTED.split(text))


def _widen(name, params, doc, body, rng):
    """A drawing made wide: a new function name (verb_noun, 100 of them), new argument names from IDENTIFIERS
    (none that the docstring or body already uses), and one of FRAMES around the docstring's "Return ...".
    Returns (name, params, doc, body)."""
    old = [a.strip() for a in params.split(",")]
    used = set(re.findall(r"\w+", doc + " " + " ".join(body)))
    new = rng.sample([i for i in IDENTIFIERS if i not in used], len(old))
    fname = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
    mapping = {**dict(zip(old, new)), name: fname}
    doc = _rename(doc, dict(zip(old, new)))
    if doc.startswith("Return "):
        doc = rng.choice(FRAMES).format(doc[len("Return "):])
    return fname, ", ".join(new), doc, [_rename(line, mapping) for line in body]


def build(family, rng, wide=False):
    """One exercise of a family, drawn with rng (random.Random): today's narrow drawing, or (wide) with the
    family's WIDE_RANGES and new names and wording (_widen)."""
    make, held_out = FAMILIES[family]
    name, params, doc, body, ref, inputs = make(rng, **(WIDE_RANGES.get(family, {}) if wide else {}))
    if wide:
        name, params, doc, body = _widen(name, params, doc, body, rng)
    prompt = f'def {name}({params}):\n    """{doc}"""\n'
    solution = "".join(f"    {line}\n" for line in body)
    tests = "".join(f"assert {name}({', '.join(map(repr, args))}) == {ref(*args)!r}\n" for args in inputs)
    return Exercise(family, name, prompt, solution, tests, held_out)


def generate(per_family=20, seed=0, held_out=None, families=None, wide=False, exclude=()):
    """Distinct exercises (by text, none in `exclude`), up to per_family of each family (a family with few
    distinct drawings gives fewer), unverified. held_out: None (all), True or False (only those families);
    wide: wide drawings (build)."""
    rng = random.Random(seed)
    out, exclude = [], set(exclude)
    for family in families or FAMILIES:
        if held_out is not None and FAMILIES[family][1] != held_out:
            continue
        seen = set()
        for _ in range(per_family * 10):
            ex = build(family, rng, wide)
            if ex.text not in seen and ex.text not in exclude:
                seen.add(ex.text)
                out.append(ex)
            if len(seen) == per_family:
                break
    return out


# ----------------------------------------------------------------------------- two-step compositions
# Held-out set 2: two operations of the training families in one function ("Return x plus 3, then times
# 2." -> return (x + 3) * 2). Never trained on: they test whether the model composes what it learned.

def _int_step(rng):
    """(docstring phrase, expression maker E -> text, function) of one integer operation of a training family."""
    k = rng.randint(2, 99)
    wrap = lambda e: e if e.isidentifier() else f"({e})"  # a compound inner expression in parentheses
    return rng.choice([(f"plus {k}", lambda e: f"{e} + {k}", lambda a: a + k),
                       (f"times {k}", lambda e: f"{wrap(e)} * {k}", lambda a: a * k),
                       ("squared", lambda e: f"{wrap(e)} * {wrap(e)}", lambda a: a * a)])


_LIST_FIRST = [  # (phrase "the ... of V", expression over V, function)
    ("the positive numbers of {v}", "[x for x in {v} if x > 0]", lambda xs: [x for x in xs if x > 0]),
    ("the items of {v} in reverse order", "{v}[::-1]", lambda xs: xs[::-1]),
    ("the items of {v} sorted in increasing order", "sorted({v})", sorted),
]
_LIST_THEN = [  # (phrase, template over the inner expression E, function)
    ("the sum of", "sum({})", sum), ("the number of items in", "len({})", len),
    ("the first item of", "{}[0]", lambda xs: xs[0]), ("the largest number in", "max({})", max),
]
_STRING_STEPS = [("in upper case", "{}.upper()", str.upper), ("reversed", "{}[::-1]", lambda s: s[::-1])]


def composition(rng):
    """One two-step exercise (family "compose_int", "compose_list" or "compose_str"), wide names as in _widen."""
    kind = rng.choice(["compose_int", "compose_list", "compose_str"])
    v = rng.choice(IDENTIFIERS)
    fname = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
    if kind == "compose_int":
        (p1, e1, f1), (p2, e2, f2) = _int_step(rng), _int_step(rng)
        doc, expr, ref = f"{v} {p1}, then {p2}.", e2(e1(v)), lambda a: f2(f1(a))
        inputs = [(a,) for a in _ints(rng, 4, -20, 20)]
    elif kind == "compose_list":
        (p1, e1, f1), (p2, e2, f2) = rng.choice(_LIST_FIRST), rng.choice(_LIST_THEN)
        doc, expr, ref = f"{p2} {p1.format(v=v)}.", e2.format(e1.format(v=v)), lambda xs: f2(f1(xs))
        inputs = [([rng.randint(1, 9)] + _ints(rng, rng.randint(1, 5)),) for _ in range(4)]  # a positive first
    else:
        (p1, e1, f1), (p2, e2, f2) = rng.sample(_STRING_STEPS, 2)
        doc, expr, ref = f"{v} {p1}, {p2}.", e2.format(e1.format(v)), lambda s: f2(f1(s))
        inputs = _strings(rng)
    doc = rng.choice(FRAMES).format(doc)
    prompt = f'def {fname}({v}):\n    """{doc}"""\n'
    tests = "".join(f"assert {fname}({', '.join(map(repr, args))}) == {ref(*args)!r}\n" for args in inputs)
    return Exercise(kind, fname, prompt, f"    return {expr}\n", tests, True)


def compositions(n, seed=0):
    """n distinct two-step exercises (composition), unverified."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        ex = composition(rng)
        if ex.text not in seen:
            seen.add(ex.text)
            out.append(ex)
    return out


def check(exercise):
    """Whether an exercise's own templated solution passes its tests, run here (exec in a fresh namespace):
    for the thousands of wide training drawings, whose solutions are this file's templates (trusted code),
    where a sandboxed process each would cost about 0.1 s. Model outputs always go through the sandbox."""
    namespace = {}
    try:
        exec(exercise.prompt + exercise.solution, namespace)
        exec(exercise.tests, namespace)
    except Exception:
        return False
    return True


def verify(exercises, report=print, **limits):
    """Run each exercise's solution against its tests in the sandbox (one process each), after
    calling `report` with sandbox.describe()'s line (what the sandbox does not contain). Returns
    (kept, rejected): rejected is [(exercise, sandbox status, last line of stderr)]."""
    if report:
        report(sandbox.describe(limits.get("isolation")))
    kept, rejected = [], []
    for ex in exercises:
        r = sandbox.run(ex.prompt + ex.solution, ex.tests, **limits)
        if r.passed:
            kept.append(ex)
        else:
            rejected.append((ex, r.status, (r.stderr.strip().splitlines() or [""])[-1]))
    return kept, rejected


def save_jsonl(exercises, path):
    """One JSON object per exercise (family, name, prompt, solution, tests, held_out)."""
    from pathlib import Path

    from omnitron.runtime import atomic_write
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text("".join(json.dumps(asdict(e)) + "\n" for e in exercises)))


def load_jsonl(path):
    from pathlib import Path
    return [Exercise(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
