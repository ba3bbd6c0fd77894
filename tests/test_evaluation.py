"""omnitron/evaluation.py and omnitron/tasks.py: few-shot prompts, log-likelihood scoring, exact match, tasks."""
import json

import pytest

import sample
from omnitron import evaluation, models, runtime, tasks, tokenization
from tests.helpers import (
    BLOCK,
    CORPUS,
    V,
    hf_class,
    hf_gpt2,
    hf_model,
    reference_loglikelihood,
    requests,
    run_entry_point,
    saved,
    tiny_model,
)

# ----------------------------------------------------------------------------- few-shot evaluation (evaluation.py, tasks.py)
# log-likelihoods against transformers' forward, lm-eval's request rules, a planted answer, GPT-3's task definitions


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loglikelihoods_equal_transformers_forward(tmp_path, family):
    """Every parameter random, written by transformers' save_pretrained and loaded by our code: the
    summed log-likelihood of each continuation equals transformers' forward on the same (truncated)
    tokens, one request at a time and batched, with the shared context's KV cache reused or not."""
    hf = hf_gpt2(n_positions=BLOCK) if family == "gpt2" else hf_model("llama")
    ours = saved(hf, tmp_path / family)
    assert ours.config.block_size == BLOCK
    reqs = requests(hf.config.vocab_size)
    want = [reference_loglikelihood(hf, c, x) for c, x in reqs]
    assert max(abs(w) for w in want) > 5.0  # not a comparison of near-zero numbers
    for batch_size in (1, 3, 64):
        for reuse in (True, False):
            got = evaluation.loglikelihoods(ours, reqs, batch_size=batch_size, reuse_context=reuse)
            assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-4, (batch_size, reuse)
    one_at_a_time = [evaluation.loglikelihoods(ours, [r])[0] for r in reqs]
    assert max(abs(g - w) for g, w in zip(one_at_a_time, want)) <= 1e-4


def test_switch_scores_do_not_depend_on_the_batch(tmp_path):
    """A Switch model as train.py saves it (capacity factors 1.25 / 2.0 in its config.json), loaded
    back: each request's score is the same scored alone (batch_size 1, no context reuse), in a batch
    of 16, and through the cached path, and equals transformers' (AutoModelForCausalLM with its
    defaults, dropless) on the same export. With the evaluation capacity computed over all the
    tokens of a forward, a request alone lost experts that it kept in a batch."""
    tiny_model("switch", block_size=BLOCK, n_experts=8, moe_intermediate_size=24).save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path).eval()
    assert (ours.config.capacity_factor, ours.config.eval_capacity_factor) == (1.25, 2.0)
    hf = hf_class("AutoModelForCausalLM").from_pretrained(tmp_path).eval()
    reqs = requests(V)[:16]
    want = [reference_loglikelihood(hf, c, x) for c, x in reqs]
    assert max(abs(w) for w in want) > 5.0  # not a comparison of near-zero numbers
    alone = [evaluation.loglikelihoods(ours, [r], batch_size=1, reuse_context=False)[0] for r in reqs]
    batched = evaluation.loglikelihoods(ours, reqs, batch_size=16, reuse_context=False)
    cached = evaluation.loglikelihoods(ours, reqs, batch_size=16, reuse_context=True)
    for got in (alone, batched, cached):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-4


def test_truncation_and_request_encoding():
    """lm-eval's semantics: left truncation to block + 1 tokens (a continuation longer than the block
    is refused); trailing spaces of the context go to the continuation; context and continuation
    are tokenized together; the tokens a tokenizer puts before a text start the context, none after."""
    assert evaluation.truncate(list(range(10)), [10, 11], 5) == ([6, 7, 8, 9], [10, 11])
    assert evaluation.truncate([1, 2], [3], 5) == ([1, 2], [3])
    with pytest.raises(ValueError, match="does not fit"):
        evaluation.truncate([1], list(range(6)), 5)
    tok = tokenization.CharTokenizer(" :=Qabxy")
    ctx, cont = evaluation.encode_pair(tok, "Q: ab =  ", "xy")
    assert tok.decode(ctx) == "Q: ab =" and tok.decode(cont) == "  xy"
    tok.template = ((7,), (6,))  # as a tokenizer.json whose post-processor adds BOS ... EOS
    ctx, cont = evaluation.encode_pair(tok, "ab", " x")
    assert ctx == [7, *tok.encode("ab")] and cont == tok.encode(" x")
    with pytest.raises(ValueError, match="empty"):  # a character vocabulary has no BOS or EOS to condition on
        evaluation.encode_pair(tokenization.CharTokenizer("ab"), "", "a")


def test_scoring_picks_the_planted_answer(planted):
    """A model trained on `words => yes`: multiple choice picks "yes" wherever it stands among the
    choices (acc, acc_norm, acc_calibrated: a character vocabulary has no BOS or EOS for lm-eval's
    acc_mutual_info), and greedy generation answers it (exact match), with
    0 and 2 demonstrations."""
    run, task_file = planted
    model, tokenizer = sample.load(run)
    task = evaluation.read_task(task_file)
    assert task.multiple_choice and task.answer_context == "Answer:"
    for shots in (0, 2):
        rows = {r["metric"]: r for r in evaluation.evaluate(model, tokenizer, task, shots, progress=False)}
        assert set(rows) == {"acc", "acc_norm", "acc_calibrated"}
        assert all(r["value"] == 1.0 and r["n"] == 4 and r["shots"] == shots for r in rows.values())
        free = evaluation.Task("free", task.train, [{"input": r["input"], "output": "yes"} for r in task.test],
                               sep=" =>")
        em, ppl = evaluation.evaluate(model, tokenizer, free, shots, batch_size=3, progress=False)
        assert (em["metric"], em["value"], em["n"]) == ("exact_match", 1.0, 4)
        assert ppl["metric"] == "perplexity" and ppl["n"] == 4 and 1.0 < ppl["value"] < 5.0  # " yes" is likely
        free.test = [{**r, "output": "no"} for r in free.test]
        em_no, ppl_no = evaluation.evaluate(model, tokenizer, free, shots, progress=False)
        assert em_no["value"] == 0.0 and ppl_no["value"] > 10 * ppl["value"]


def test_sample_eval_command_line(planted, tmp_path, capsys, monkeypatch):
    """sample.py --eval prints the table and writes the JSON; a bad task file is one `error:` line."""
    run, task_file = planted
    out = tmp_path / "r.json"
    code, err = run_entry_point(["sample.py", "--out_dir", str(run), "--eval", str(task_file), "--shots", "1",
                                 "--json", str(out), "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    table = capsys.readouterr().out
    assert "acc_norm" in table and "stderr" in table
    results = json.loads(out.read_text())["results"]
    assert {r["metric"]: r["value"] for r in results} == {"acc": 1.0, "acc_norm": 1.0, "acc_calibrated": 1.0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    for argv, words in ((["--eval", str(bad)], f"{bad}:2"), (["--eval", "no_such_task"], "unknown task"),
                        (["--eval", str(tmp_path / "missing.jsonl")], "task file not found"),
                        (["--eval", str(task_file), "--shots", "-1"], "--shots")):
        code, err = run_entry_point(["sample.py", "--out_dir", str(run), *argv], capsys, monkeypatch)
        assert code == 1 and len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_exact_match_normalisation():
    """GPT-3's (SQuAD's) normalisation: case, punctuation, articles and whitespace do not count; a
    number's sign and decimal point do. "strip": only the surrounding whitespace does not."""
    same = [("The Rose.", "rose"), (" 124\n", "124"), ("Hello,  World!", "hello world"), ("an apple", "Apple"),
            ("-19", " -19."), ("3.5", "3.5"), ("it's", "its")]
    differ = [("-19", "19"), ("3.5", "35"), ("rose", "roses"), ("1 2", "12")]
    assert all(evaluation.exact_match(a, b) == 1.0 for a, b in same)
    assert all(evaluation.exact_match(a, b) == 0.0 for a, b in differ)
    assert evaluation.normalize_answer("Q: What is 6+(4*8)? A: -38") == "q what is 648 -38"
    # GPT-3's arithmetic and word tasks: the answer exactly, surrounding whitespace aside
    assert evaluation.exact_match(" succession\n", "succession", "strip") == 1.0
    assert evaluation.exact_match("s.uccession", "succession", "strip") == 0.0 == evaluation.exact_match("Rose", "rose",
                                                                                                         "strip")


def test_demonstrations_never_include_the_item():
    """Demonstrations come from the train split with a seed, never the item itself (nor a record equal
    to it), the same for an item whatever else is evaluated; K is lowered to what fits the block."""
    records = [{"input": f"w{i}", "output": f"o{i}"} for i in range(12)] + [{"input": "w3", "output": "o3"}]
    for index, item in enumerate(records):
        for k in (0, 1, 5, 11, 50):
            demos = evaluation.sample_demos(records, item, k, seed=7, index=index)
            assert item not in demos and len(demos) == min(k, 11 if item["input"] == "w3" else 12)
            assert demos == evaluation.sample_demos(records, item, k, seed=7, index=index)
    other_seed = evaluation.sample_demos(records, records[0], 5, seed=8, index=0)
    assert other_seed != evaluation.sample_demos(records, records[0], 5, seed=7, index=0)
    tok = tokenization.CharTokenizer("".join(sorted(set("Describe:\n =>wo0123456789"))))
    task = evaluation.Task("t", records, records, description="Describe:")
    context, kept = evaluation.fit_demos(tok, task, records[:10], "w11", 40, answer_tokens=4)
    assert context == evaluation.fewshot_prompt(kept, "w11", "Describe:") and len(context) + 4 <= 40
    assert kept == records[10 - len(kept):10] and 0 < len(kept) < 10  # the demonstrations nearest the query stay


def test_task_files_and_fewshot_prompts(tmp_path):
    """A user's .jsonl: header, splits, multiple choice; records without a split are test items and
    demonstrations; sample.py's few-shot prompt is the same builder."""
    f = tmp_path / "mine.jsonl"
    f.write_text('{"description": "Pick:", "sep": " ->"}\n{"input": "a", "choices": ["x", "y"], "answer": 1, '
                 '"split": "train"}\n\n{"input": "b", "choices": ["x", "y"], "answer": 0}\n')
    task = evaluation.read_task(f)
    assert (task.name, task.description, task.sep, task.multiple_choice) == ("mine", "Pick:", " ->", True)
    assert [r["input"] for r in task.train] == ["a", "b"] and [r["input"] for r in task.test] == ["b"]
    assert evaluation.fewshot_prompt(task.train[:1], "b", task.description, task.sep) == "Pick:\n\na -> y\n\nb ->"
    assert sample.fewshot_prompt is evaluation.fewshot_prompt
    for body, words in (('{"input": "a", "choices": ["x"], "answer": 0}', "2 or more"),
                        ('{"input": "a", "output": "b", "split": "dev"}', "split"), ("[1]", "JSON object"),
                        ('{"split": "train"}', "header"), ("{", "not JSON"), ('{"normalize": "x"}', "normalize"),
                        ('{"input": "a", "output": "b", "split": "train"}', "no test records")):
        f.write_text(body + "\n")
        with pytest.raises(runtime.UserError, match=words):
            evaluation.read_task(f)


def test_generator_is_deterministic_and_follows_gpt3(tmp_path):
    """The same files for a seed (other files for another); each task's input is its definition's
    transformation of the output (GPT-3 §3.9), arithmetic answers are right, test words are never
    train words, cloze distractors have the answer's length."""
    a = tasks.generate(CORPUS, tmp_path / "a", seed=3, n_train=40, n_test=10)
    b = tasks.generate(CORPUS, tmp_path / "b", seed=3, n_train=40, n_test=10)
    c = tasks.generate(CORPUS, tmp_path / "c", seed=4, n_train=40, n_test=10)
    assert [p.name for p in a] == [f"{n}.jsonl" for n in tasks.NAMES]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))
    assert any(p.read_bytes() != q.read_bytes() for p, q in zip(a, c))
    for path in a:
        task = evaluation.read_task(path)
        assert task.train and task.test and task.normalize == ("squad" if task.multiple_choice else "strip")
        if task.name in tasks.WORD_TASKS:
            assert not {r["output"] for r in task.train} & {r["output"] for r in task.test}
        for r in task.train + task.test:
            x, y = r["input"], r["output"]
            if task.name.startswith("arithmetic"):
                expr = x.removeprefix("Q: What is ").removesuffix("?")
                expr = expr.replace(" plus ", "+").replace(" minus ", "-").replace(" times ", "*")
                assert str(eval(expr)) == y
            elif task.name == "cycle_letters":
                assert x != y and x in y + y and len(x) == len(y)
            elif task.name in ("anagrams1", "anagrams2"):
                keep = 1 if task.name == "anagrams1" else 2
                assert x[:keep] == y[:keep] and x[-keep:] == y[-keep:] and sorted(x) == sorted(y)
            elif task.name == "random_insertion":
                assert x[::2] == y and all(ch in tasks.INSERTED for ch in x[1::2])
            elif task.name == "reversed_words":
                assert x == y[::-1]
            else:
                assert len({len(ch) for ch in r["choices"]}) == 1 and len(set(r["choices"])) == 4
    assert "2da" in tasks.NAMES[0] and len(evaluation.read_task(a[0]).test) == 10


# ----------------------------------------------------------------------------- agreement with lm-evaluation-harness
# lm-eval (0.4.13) is not a test dependency (it pulls in datasets, pyarrow, pandas, scikit-learn, nltk,
# sacrebleu): its definitions are written out below, on the `tokenizers` library's encoding.

def lm_eval_encode_pair(ref, context, continuation, bos=None):
    """lm_eval/api/model.py, TemplateLM.loglikelihood and TemplateLM._encode_pair, with
    lm_eval/models/huggingface.py, HFLM.tok_encode (the tokenizer's special tokens added, not when
    the string already starts with the BOS text) and HFLM.prefix_token_id (`bos`): ref a tokenizers.Tokenizer."""
    def tok_encode(text):
        return ref.encode(text, add_special_tokens=not (bos and text.startswith(bos))).ids
    if context == "":
        return [ref.token_to_id(bos)], ref.encode(continuation, add_special_tokens=False).ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole, ctx = tok_encode(context + continuation), tok_encode(context)
    return ctx, whole[len(ctx):]


def hf_folder(tmp_path, ref, name, config=None):
    """ref's tokenizer.json (and tokenizer_config.json `config`) in a folder; returns our tokenizer of it."""
    folder = tmp_path / name
    folder.mkdir()
    ref.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenization.hf_tokenizer(folder)


CONTEXTS = ["a\n", "Q: What is 4 plus 5?\nA:\n\n", "a \t\n ", "First Citizen:\n", "hear me  ", "x =>"]


def test_encode_pair_moves_all_trailing_whitespace_as_lm_eval(tmp_path, gpt2_like):
    """Every trailing whitespace character of the context (newlines, tabs, spaces) goes to the
    continuation, as lm-eval's _encode_pair's context.rstrip(): the same ids as lm-eval's rule on
    the tokenizers library's encoding."""
    ref = gpt2_like[1]
    ours = hf_folder(tmp_path, ref, "gpt2")
    for context in CONTEXTS:
        for continuation in (" b", " Citizen", "5"):
            assert evaluation.encode_pair(ours, context, continuation) == lm_eval_encode_pair(ref, context,
                                                                                              continuation)
    assert evaluation.encode_pair(ours, "a\n", " b")[1][0] == ref.encode("\n").ids[0]  # the newline is scored


def test_no_second_bos_and_the_empty_context_conditions_on_the_prefix_token(tmp_path, base_tokenizer):
    """A BOS template (Llama 3): a context whose text starts with the BOS text gets no second BOS;
    an empty context is [BOS] and the continuation alone, as lm-eval's loglikelihood. Without a
    template the prefix token comes from tokenizer_config.json (bos_token, else eos_token); naming
    neither, an empty context is refused; a named token missing from the vocabulary is refused."""
    from tests.helpers import with_post_processor
    bos = "<|begin_of_text|>"
    ref = with_post_processor(base_tokenizer, "llama3")
    ours = hf_folder(tmp_path, ref, "llama3")
    assert ours.prefix_token == ref.token_to_id(bos)
    for context in [bos + "Hello world", bos + "a\n", "Hello world\n", ""]:
        for continuation in (" more", " words\n"):
            assert evaluation.encode_pair(ours, context, continuation) == lm_eval_encode_pair(
                ref, context, continuation, bos), (context, continuation)
    ctx, _ = evaluation.encode_pair(ours, bos + "Hello", " world")
    assert ctx.count(ref.token_to_id(bos)) == 1
    plain = with_post_processor(base_tokenizer, "none")
    for config, want in (({"bos_token": "<s>", "eos_token": "<|end_of_text|>"}, "<s>"),
                         ({"bos_token": None, "eos_token": {"content": "<|end_of_text|>"}}, "<|end_of_text|>")):
        tok = hf_folder(tmp_path, plain, f"plain{len(list(tmp_path.iterdir()))}", config)
        assert tok.prefix_token == plain.token_to_id(want)
        assert evaluation.encode_pair(tok, "", " Hello") == lm_eval_encode_pair(plain, "", " Hello", want)
    bare = hf_folder(tmp_path, plain, "bare")
    assert bare.prefix_token is None
    with pytest.raises(ValueError, match="no BOS or EOS"):
        evaluation.encode_pair(bare, "", " Hello")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        hf_folder(tmp_path, plain, "wrong", {"bos_token": "<bos>"})


def hf_gpt2_for(ref, seed=0):
    """A tiny random transformers GPT-2 with ref's vocabulary (block BLOCK)."""
    return hf_gpt2(n_positions=BLOCK, vocab=ref.get_vocab_size(), seed=seed)


def test_empty_context_loglikelihood_and_acc_mutual_info_as_lm_eval(tmp_path, gpt2_like):
    """lm-eval's acc_mutual_info (lm_eval/api/task.py, ConfigurableTask.construct_requests and
    process_results): argmax of log P(" c" | context) - log P(" c" | ""), the empty context its
    prefix token; GPT-3's calibration (log P(" c" | context) - log P(" c" | "Answer:")) is
    acc_calibrated. Per item, against transformers' forward in float64 on lm-eval's encoding."""
    import random
    ref = gpt2_like[1]
    hf = hf_gpt2_for(ref)
    folder = tmp_path / "m"
    ours = saved(hf, folder)
    ref.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    tok = tokenization.hf_tokenizer(folder)
    rng = random.Random(0)
    words = "the you hear speak famish die resolved rather proceed further true sure".split()
    items = [{"input": " ".join(rng.sample(words, 3)), "choices": rng.sample(words, 4), "answer": rng.randrange(4)}
             for _ in range(12)]
    task = evaluation.Task("t", items, items, sep=" =>", answer_context="Answer:")
    contexts = [evaluation.fewshot_prompt([], r["input"], None, task.sep) for r in items]

    def ll(context, continuation):
        return reference_loglikelihood(hf, *lm_eval_encode_pair(ref, context, continuation, "<|endoftext|>"))
    want = {"acc_mutual_info": [], "acc_calibrated": []}
    for r, c in zip(items, contexts):
        cond = [ll(c, " " + x) for x in r["choices"]]
        for name, other in (("acc_mutual_info", ""), ("acc_calibrated", "Answer:")):
            pmi = [a - ll(other, " " + x) for a, x in zip(cond, r["choices"])]
            want[name].append(float(max(range(4), key=pmi.__getitem__) == r["answer"]))
    assert want["acc_mutual_info"] != want["acc_calibrated"]  # the two definitions differ on these items
    bar = evaluation.Progress("t", len(items), enabled=False)
    got = evaluation._score_choices(ours, tok, task, items, contexts, 5, True, bar)
    assert got["acc_mutual_info"] == want["acc_mutual_info"] and got["acc_calibrated"] == want["acc_calibrated"]
    lm = evaluation.loglikelihoods(ours, [evaluation.encode_pair(tok, "", " hear me")], with_greedy=True)[0]
    assert abs(lm[0] - ll("", " hear me")) < 1e-4


def test_loglikelihoods_return_is_greedy_as_lm_eval(tmp_path):
    """with_greedy=True: (log-likelihood, is_greedy) pairs, is_greedy as lm-eval's
    HFLM._loglikelihood_tokens (the argmax at every scored position is the continuation's token),
    against transformers' forward; continuations built greedily are True, with and without the
    reused context cache."""
    import torch
    hf = hf_gpt2(n_positions=BLOCK)
    ours = saved(hf, tmp_path / "g")
    reqs = requests(hf.config.vocab_size)
    for ctx in ([3, 4, 5], list(range(2, 30)), list(range(BLOCK + 10))):
        seq = list(ctx)
        for _ in range(4):
            with torch.no_grad():
                seq.append(int(hf(torch.tensor([seq[-BLOCK:]])).logits[0, -1].double().argmax()))
        reqs += [(ctx, seq[len(ctx):]), (ctx, seq[len(ctx):len(ctx) + 1]), (ctx, seq[len(ctx):-1] + [seq[-1] + 1])]

    def greedy(ctx, cont):
        whole = (ctx + cont)[-(BLOCK + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor([whole[:-1]])).logits[0].double()[-len(cont):]
        return logits.argmax(-1).tolist() == cont
    want = [(reference_loglikelihood(hf, c, x), greedy(c, x)) for c, x in reqs]
    assert sum(g for _, g in want) >= 6 and not all(g for _, g in want)
    for reuse in (True, False):
        got = evaluation.loglikelihoods(ours, reqs, batch_size=4, reuse_context=reuse, with_greedy=True)
        assert [g for _, g in got] == [g for _, g in want]
        assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) <= 1e-4


def lm_eval_context_sampler(pool, items, k, seed):
    """lm_eval/api/samplers.py, ContextSampler.get_context / sample, with the task's one
    random.Random(fewshot_seed): k + 1 drawn when the item is in the pool, the item removed, the first k."""
    import random
    rnd = random.Random(seed)
    out = []
    for doc in items:
        fewshotex = rnd.sample(pool, k + 1 if doc in pool else k)
        out.append([x for x in fewshotex if x != doc][:k])
    return out


def test_lm_eval_flags_reproduce_its_choices(planted):
    """sampler="lm_eval" draws lm-eval's demonstrations; overflow="truncate" keeps K (lm-eval) where
    "drop" lowers it (GPT-3); free_form="loglikelihood" scores acc = is_greedy of the answer (lm-eval's
    arithmetic tasks); bad values are user errors."""
    records = [{"input": f"w{i}", "output": f"o{i}"} for i in range(12)]
    sampler = evaluation.ContextSampler(records, 1234)
    assert [sampler.get_context(r, 3) for r in records] == lm_eval_context_sampler(records, records, 3, 1234)
    run, task_file = planted
    model, tokenizer = sample.load(run)
    task = evaluation.read_task(task_file)
    many = evaluation.Task("many", task.train * 20, task.test, sep=" =>")
    kept = {o: evaluation.evaluate(model, tokenizer, many, 40, overflow=o, progress=False)[0]["shots_used"]
            for o in evaluation.OVERFLOWS}
    assert kept["truncate"] == 40 and kept["drop"] < 40
    free = evaluation.Task("free", task.train, [{"input": r["input"], "output": "yes"} for r in task.test], sep=" =>")
    rows = {r["metric"]: r["value"] for r in evaluation.evaluate(model, tokenizer, free, 2, free_form="loglikelihood",
                                                                  progress=False)}
    assert rows["acc"] == 1.0 and 1.0 < rows["perplexity"] < 5.0
    free.test = [{**r, "output": "no"} for r in free.test]
    assert evaluation.evaluate(model, tokenizer, free, 2, free_form="loglikelihood", progress=False)[0]["value"] == 0.0
    with pytest.raises(runtime.UserError, match="sampler"):
        evaluation.evaluate(model, tokenizer, free, 2, sampler="random", progress=False)
