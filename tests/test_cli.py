"""The command lines end to end: train.py, sample.py, bench.py; every user error is one error: line and exit 1."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import sample
import train
from omnitron import generation, kernels, runtime, tasks
from omnitron.kernels import performer
from tests.helpers import ROOT, bad_files, hf_class, run_cli, run_entry_point, tiny_model, tiny_text, train_args

# ----------------------------------------------------------------------------- command lines end to end


def test_train_and_sample_command_lines(corpus, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train.py", *train_args(corpus, tmp_path, max_iters=30, eval_interval=15, log_interval=10,
                                        dropout=0.0, sample_tokens=40))
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and "ETA" in r.stdout and "tok/s" in r.stdout and "sample:" in r.stdout
    r = run_cli("sample.py", "--out_dir", str(out), "--prompt", "ROMEO:", "--max_new_tokens", "20",
                "--num_samples", "2", "--top_p", "0.9", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ROMEO:") >= 2
    (tmp_path / "p.txt").write_text("JULIET:")
    r = run_cli("sample.py", "--out_dir", str(out), "--prompt", f"@{tmp_path / 'p.txt'}", "--max_new_tokens", "5",
                "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("JULIET:")
    # the same greedy continuation as decoding in-process
    model, tok = sample.load(out)
    expected = "".join(tok.decode([t.item()]) for t in generation.generate(model, torch.tensor([tok.encode("JULIET:")]),
                                                                        5, temperature=0))
    assert r.stdout.rstrip("\n") == "JULIET:" + expected.rstrip("\n")
    # two prompts of different lengths, one batch: each row is what that prompt gives alone
    r = run_cli("sample.py", "--out_dir", str(out), "--prompt", "ROMEO: O", "--prompt", f"@{tmp_path / 'p.txt'}",
                "--max_new_tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(rows) == 2 and rows[1].rstrip("\n") == "JULIET:" + expected.rstrip("\n")
    assert rows[0].startswith("ROMEO: O")
    # the run folder is a Hugging Face directory
    assert hf_class("GPT2LMHeadModel").from_pretrained(out).config.n_layer == 2


def test_fewshot_prompt_is_built_gpt3_style(tmp_path):
    records = [{"input": "sea otter", "output": "loutre de mer"}, {"input": "cheese", "output": "fromage"}]
    prompt = sample.fewshot_prompt(records, "peppermint", "Translate English to French:")
    assert prompt == ("Translate English to French:\n\nsea otter => loutre de mer\n\n"
                      "cheese => fromage\n\npeppermint =>")
    assert sample.fewshot_prompt([], "x") == "x =>"
    f = tmp_path / "t.jsonl"
    f.write_text('{"description": "Echo:"}\n' + "\n".join(json.dumps(r) for r in records) + "\n")
    assert sample.read_fewshot(f) == ("Echo:", records)


def test_fewshot_command_line(corpus, tmp_path):
    corpus.write_text(tiny_text() + "\nlove => LOVE, NIGHT, DAY\n")  # the characters of the prompt
    train.main(train_args(corpus, tmp_path, max_iters=2, eval_interval=2))
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"input": w, "output": w.upper()}) for w in ["love", "night", "day"]))
    r = run_cli("sample.py", "--out_dir", str(tmp_path / "run"), "--fewshot", str(f), "--shots", "2",
                "--max_new_tokens", "10", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("love => LOVE\n\nnight => NIGHT\n\nday =>")
    assert "\n" not in r.stdout[len("love => LOVE\n\nnight => NIGHT\n\nday =>"):].rstrip("\n")
    r = run_cli("sample.py", "--out_dir", str(tmp_path / "run"), "--fewshot", str(f), "--shots", "3")
    assert r.returncode == 1 and "needs 4" in r.stderr


@pytest.fixture(scope="module")
def shakespeare_like_run(tmp_path_factory):
    """A tiny char model of a text whose characters, like Shakespeare's, have no '=' or '>' (tiny_text and
    the letters of the word tasks' description), with the word task reversed_words made from it in its
    data_dir/tasks (where sample.py --eval finds the built-in tasks). Returns (run folder, data_dir)."""
    root = tmp_path_factory.mktemp("shakespeare_like")
    text = tiny_text() + "\nPlease, reverse the letters of the word: write that word.\n"
    (root / "corpus.txt").write_text(text)
    train.run(data=str(root / "corpus.txt"), data_dir=str(root / "d"), out_dir=str(root / "run"), max_iters=2,
              eval_interval=2, eval_iters=1, batch_size=4, block_size=128, n_layer=1, n_head=2, n_embd=16,
              sample_tokens=0, device="cpu", dtype="float32")
    tasks.generate(text, root / "d" / "tasks", names=["reversed_words"], n_train=20, n_test=4)
    return root / "run", root / "d"


def test_fewshot_defaults_work_on_a_model_without_their_characters(shakespeare_like_run, tmp_path, capsys,
                                                                   monkeypatch):
    """The default separator ' =>' and the word tasks' ' =' have characters a Shakespeare char model lacks:
    --fewshot and --eval take one the model can spell, and say so; a character chosen by the user (--sep,
    the file's header) or in a demonstration or the prompt is one error line naming where it came from."""
    run, data_dir = shakespeare_like_run
    f = tmp_path / "t.jsonl"
    records = [{"input": w, "output": w.upper()} for w in ("rose", "name", "fair", "art")]
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ["sample.py", "--out_dir", str(run), "--max_new_tokens", "3", "--temperature", "0", "--device", "cpu"]
    code, err = run_entry_point([*base, "--fewshot", str(f), "--shots", "2", "--prompt", "art"], capsys, monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("rose: ROSE\n\nname: NAME\n\nart:"), (err, out)
    assert err == ["note: this model's vocabulary lacks '=', '>' of the separator ' =>': the demonstrations read "
                   "'input: output' (choose another with --sep)"]
    code, err = run_entry_point([*base, "--eval", "reversed_words", "--data_dir", str(data_dir), "--shots", "2",
                                 "--limit", "2"], capsys, monkeypatch)
    assert code == 0 and "exact_match" in capsys.readouterr().out, err
    assert err[-1].startswith("note: this model's vocabulary lacks '=' of the separator ' ='"), err
    header = tmp_path / "header.jsonl"
    header.write_text(json.dumps({"sep": " =>"}) + "\n" + f.read_text())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "rose=", "output": "ROSE"}) + "\n" + f.read_text())
    for args, message in [
        (["--fewshot", str(header)], f"the separator ' =>' (the \"sep\" of {header}'s header) has '=', '>'"),
        (["--fewshot", str(f), "--sep", " ="], "the separator ' =' (--sep) has '='"),
        (["--fewshot", str(bad)], f"the demonstration 'rose=' (its input) in {bad} has '='"),
        (["--fewshot", str(f), "--prompt", "x=y"], "the prompt (--prompt) has 'x', '='"),
        (["--prompt", "2 > 1"], "the prompt (--prompt) has '2', '>', '1'"),
    ]:
        code, err = run_entry_point([*base, *args, "--shots", "2"], capsys, monkeypatch)
        assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {message}, which this model's "
                                                                 "vocabulary lacks: "), err


def test_compile_failure_is_one_line_before_any_text(shakespeare_like_run, capsys, monkeypatch):
    """sample.py --compile where torch.compile cannot compile (no C++ compiler): one error line that says
    to drop --compile, and the prompt is not printed before it."""
    def no_compiler(model):
        def step(*args, **kwargs):
            raise FileNotFoundError(2, "No such file or directory", "g++")
        return step
    monkeypatch.setattr(generation, "compiled_decoder", no_compiler)
    code, err = run_entry_point(["sample.py", "--out_dir", str(shakespeare_like_run[0]), "--prompt", "ROMEO:",
                                 "--compile", "--max_new_tokens", "5", "--device", "cpu"], capsys, monkeypatch)
    assert code == 1 and capsys.readouterr().out == ""
    assert err == ["error: --compile: torch.compile failed (FileNotFoundError: [Errno 2] No such file or "
                   "directory: 'g++'); sample without --compile (on a CPU it needs a C++ compiler)"]


DAMAGES = {"truncated": lambda raw: raw[:len(raw) // 2], "empty": lambda raw: b""}
RUN_FILES = ["train_state.pt", "model.safetensors", "config.json", "tokenizer_omnitron.json"]


@pytest.mark.parametrize("name", RUN_FILES)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_run_file_is_one_line_naming_it_and_the_way_on(shakespeare_like_run, tmp_path, capsys,
                                                                monkeypatch, name, damage):
    """Every file of a run folder, cut short or empty: --resume, sample.py and a new run into the folder
    each end in one error line that names the file and says what to do."""
    run = tmp_path / "run"
    shutil.copytree(shakespeare_like_run[0], run)
    (run / name).write_bytes(DAMAGES[damage]((run / name).read_bytes()))
    data_dir = shakespeare_like_run[1]
    resume = ["train.py", "--out_dir", str(run), "--resume", "--max_iters", "3", "--data_dir", str(data_dir)]
    fresh = ["train.py", "--out_dir", str(run), "--max_iters", "1", "--data_dir", str(data_dir), "--data",
             str(data_dir.parent / "corpus.txt"), "--block_size", "8", "--n_layer", "1", "--n_embd", "16"]
    commands = [resume, fresh] if name == "train_state.pt" else [resume, ["sample.py", "--out_dir", str(run)]]
    for argv in commands:
        code, err = run_entry_point(argv, capsys, monkeypatch)
        assert code == 1 and len(err) == 1 and str(run / name) in err[0], (argv, err)
        assert any(way in err[0] for way in ("--overwrite", "copy it again")), err


def test_bench_help_says_how_long_each_subcommand_takes():
    """bench.py --help lists every subcommand with how long it takes (some take an hour)."""
    import bench
    text = bench.parser(["--help"]).format_help()
    lines = text.split("how long each subcommand takes", 1)[1].splitlines()
    choices = bench.parser([])._subparsers._group_actions[0].choices
    for name in choices:
        line = next((line for line in lines if line.split()[:1] == [name]), "")
        assert re.search(r"\d+ (s|min|h)\b|seconds", line), (name, line)


@pytest.mark.parametrize("problem", ["missing", "empty", "not_utf8", "too_short", "empty_folder", "bad_bpe"])
def test_bad_corpus_is_one_clear_line_and_exit_1(tmp_path, problem):
    path = tmp_path / "c.txt"
    tokenizer = "char"
    if problem == "empty":
        path.write_text("  \n\n")
    elif problem == "not_utf8":
        path.write_bytes(b"hello \xff\xfe world" * 10)
    elif problem == "too_short":
        path.write_text("short text " * 5)
    elif problem == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif problem == "bad_bpe":
        path.write_text(tiny_text())
        tokenizer = "bpe:x"
    r = run_cli("train.py", "--data", str(path), "--data_dir", str(tmp_path / "d"), "--tokenizer", tokenizer,
                "--out_dir", str(tmp_path / "o"), "--max_iters", "1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert {"missing": "not found", "empty": "empty", "not_utf8": "not UTF-8", "too_short": "too short",
            "empty_folder": "no .txt files", "bad_bpe": "bpe:N"}[problem] in lines[0]


@pytest.mark.parametrize("args,message", [
    (["--max_iters", "ten"], "invalid int value"),
    (["--model"], "expected one argument"),
    (["--model", "nope"], "unknown model"),
    (["--init_from", "/nonexistent/dir"], "no model directory"),
    (["--resume", "--out_dir", "/nonexistent/run"], "nothing to resume"),
    (["--config", "/nonexistent.toml"], "config file not found"),
])


def test_train_user_errors(args, message):
    r = run_cli("train.py", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_sample_corrupt_checkpoint_is_one_line(tmp_path):
    tiny_model("gpt").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    r = run_cli("sample.py", "--out_dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("error: cannot load") and "Traceback" not in r.stderr


def test_help_lists_every_flag_with_its_default():
    r = run_cli("train.py", "--help")
    for flag in ["--out_dir", "--max_iters", "--batch_size", "--block_size", "--learning_rate", "--n_layer",
                 "--n_head", "--n_embd", "--dropout", "--eval_interval", "--eval_iters", "--init_from", "--device",
                 "--dtype", "--compile", "--resume", "--config", "--pos", "--gradient_accumulation_steps"]:
        assert flag in r.stdout
    assert r.stdout.count("(default:") >= len(train.TRAIN_FLAGS)
    assert "--fewshot" in run_cli("sample.py", "--help").stdout


# --- every user error reachable from a command line is one error: line and exit 1 (argparse's too)

BAD_INVOCATIONS = [
    # argparse's own errors, every entry point and bench subcommand
    (["train.py", "--bogus"], "unrecognized arguments"),
    (["train.py", "--max_iters", "ten"], "invalid int value"),
    (["sample.py", "--bogus"], "unrecognized arguments"),
    (["sample.py", "--top_k", "1.5"], "invalid int value"),
    (["sample.py", "--temperature"], "expected one argument"),
    (["bench.py"], "required: command"),
    (["bench.py", "nope"], "invalid choice"),
    (["bench.py", "speed", "--model"], "expected one argument"),
    (["bench.py", "speed", "--n_layer", "x"], "invalid int value"),
    (["bench.py", "attention", "--batch", "x"], "invalid int value"),
    (["bench.py", "kvcache", "--bogus"], "unrecognized arguments"),
    (["bench.py", "lora", "--lora_rank", "x"], "invalid int value"),
    (["bench.py", "curves"], "required: runs"),
    (["bench.py", "curves", "/nonexistent/run"], "no log.jsonl"),
    (["-m", "omnitron.kernels.compile_check", "--bogus"], "unrecognized arguments"),
    (["-m", "omnitron.kernels.compile_check", "--targets", "x"], "--targets"),
    (["-m", "omnitron.kernels.compile_check", "--targets", "70"], "sm_70"),
    # sampling settings out of range (sample.py refuses them before loading anything)
    (["sample.py", "--temperature", "-1"], "temperature must be >= 0"),
    (["sample.py", "--top_p", "1.5"], "top_p must be between 0 and 1"),
    (["sample.py", "--min_p", "-0.5"], "min_p must be between 0 and 1"),
    (["sample.py", "--top_k", "-3"], "top_k must be an integer >= 0"),
    (["sample.py", "--num_samples", "0"], "--num_samples must be >= 1"),
    (["sample.py", "--out_dir", "/nonexistent/dir"], "model directory not found"),
    (["sample.py", "--device", "meta"], "not a device to run on"),
    # corrupt and mismatched files
    (["sample.py", "--out_dir", "{truncated_safetensors}"], "cannot load"),
    (["sample.py", "--out_dir", "{garbage_safetensors}"], "cannot load"),
    (["sample.py", "--out_dir", "{config_not_json}"], "config.json: not valid JSON"),
    (["sample.py", "--out_dir", "{config_no_model_type}"], "model_type"),
    (["sample.py", "--out_dir", "{config_wrong_shape}"], "shape"),
    (["sample.py", "--out_dir", "{tokenizer_not_json}"], "tokenizer.json"),
    (["sample.py", "--out_dir", "{tokenizer_truncated}"], "tokenizer.json"),
    (["sample.py", "--out_dir", "{omnitron_tokenizer_not_json}"], "tokenizer_omnitron.json: not valid JSON"),
    (["sample.py", "--out_dir", "{adapter_not_json}"], "adapter_config.json: not valid JSON"),
    (["sample.py", "--out_dir", "{tokenizer_too_big}"], "300 tokens"),
    (["sample.py", "--out_dir", "{no_weights}"], ""),
    (["sample.py", "--out_dir", "{good}", "--fewshot", "/nonexistent.jsonl"], "few-shot file not found"),
    (["sample.py", "--out_dir", "{good}", "--prompt", "@/nonexistent.txt"], "cannot read prompt file"),
    (["sample.py", "--out_dir", "{good}", "--image", "0"], "needs a multimodal bridge"),
    (["train.py", "--mm_images", "digits"], "--mm_freeze freezes a trained language model"),
    (["train.py", "--mm_images", "digits", "--mm_freeze", "false", "--mm_inject", "side"], "--mm_inject must be"),
    (["train.py", "--init_from", "{config_not_json}", "--max_iters", "1"], "config.json: not valid JSON"),
    (["train.py", "--init_from", "{truncated_safetensors}", "--max_iters", "1"], "cannot load"),
    (["train.py", "--init_from", "{tokenizer_not_json}", "--max_iters", "1"], "tokenizer.json"),
    # flags that would change nothing, or values that compute nonsense
    (["train.py", "--performer_features", "64", "--max_iters", "1"], "needs --attn performer"),
    (["train.py", "--model", "gpt", "--pos", "rope", "--rope_type", "linear", "--rope_factor", "0", "--max_iters", "1"],
     "rope_factor must be positive"),
    (["bench.py", "attention", "--window", "0"], "--window must be at least 1"),
    (["bench.py", "scaling", "--sizes", "2x7"], "multiple of the head size"),
    # a flag cut short is never taken for the flag it starts: the flag meant is named
    (["train.py", "--max_iter", "10"], "unrecognized arguments: --max_iter 10 (did you mean --max_iters?)"),
    (["sample.py", "--temp", "0"], "(did you mean --temperature?)"),
    (["bench.py", "speed", "--n_lay", "2"], "(did you mean --n_layer?)"),
    (["bench.py", "switch", "--max_iter", "3"], "(did you mean --max_iters?)"),
    (["-m", "experiments.icl", "--shot", "2"], "(did you mean --shots?)"),
]


@pytest.mark.parametrize("argv,message", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_user_errors_are_one_error_line_and_exit_1(argv, message, tmp_path_factory, capsys, monkeypatch):
    dirs = bad_files(tmp_path_factory.getbasetemp() / "bad_files") | {}
    dirs["good"] = tmp_path_factory.getbasetemp() / "bad_files" / "good"
    argv = [a.format(**dirs) for a in argv]
    if argv[0] == "train.py":  # a sampling_corpus, and nothing written beside the repository
        sampling_corpus = tmp_path_factory.getbasetemp() / "sampling_corpus.txt"
        sampling_corpus.write_text("ROMEO: the night is sweet, my love.\n" * 40)
        argv += [f"--data={sampling_corpus}", f"--data_dir={tmp_path_factory.mktemp('d')}",
                 f"--out_dir={tmp_path_factory.mktemp('o')}", "--device=cpu"]
    code, lines = run_entry_point(argv, capsys, monkeypatch)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("argv", [["sample.py", "--top_p", "2"], ["bench.py", "speed", "--model"],
                                  ["-m", "omnitron.kernels.compile_check", "--targets", "x"]])


def test_user_errors_through_the_interpreter(argv):
    """The same, as a separate process: nothing else (a warning, a traceback) reaches stderr."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "OMNITRON_DEBUG"})
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr


# ----------------------------------------------------------------------------- command lines


def test_attention_flags_reach_every_command():
    """--attn performer, --attn_window, --performer_features and --performer_redraw: train.py's flag
    table, and sample.py's and bench.py's parsers (runtime.add_attention_flags)."""
    import bench
    import sample
    import train
    names = {name for name, _, _ in runtime.ATTENTION_FLAGS}
    assert names <= {name for name, _, _ in train.TRAIN_FLAGS}
    runtime.configure_attention(sample.parser().parse_args(["--attn", "performer", "--performer_features", "32"]))
    assert kernels.get_backend("cpu") == "performer" and performer.num_features(64) == 32
    runtime.configure_attention(bench.parser(["speed"]).parse_args(["speed", "--attn", "sdpa", "--attn_window", "16"]))
    assert kernels.get_window() == 16 and kernels.get_backend("cpu") == "sdpa" and performer.num_features(64) == 266


def test_train_and_sample_with_performer_and_a_window(tmp_path, capsys):
    """--attn performer (with redraws) and --attn_window through train.run and sample.py end to end."""
    import sample
    import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO: but soft, what light through yonder window breaks?\n" * 60)
    common = dict(data=str(corpus), data_dir=str(tmp_path / "d"), max_iters=3, batch_size=2, block_size=32,
                  eval_interval=3, eval_iters=1, log_interval=1, sample_tokens=0, device="cpu", n_layer=1,
                  n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64)
    runs = {"performer": dict(attn="performer", performer_features=8, performer_redraw=2), "window": dict(attn_window=8)}
    for name, flags in runs.items():
        result = train.run(model="llama", out_dir=str(tmp_path / name), **common, **flags)
        assert math.isfinite(result["val_loss"])
        if name == "performer":  # steps 0..3, redrawn every 2 steps: the last evaluation's draw is 3 // 2
            assert performer.draw() == 1
    out = capsys.readouterr().out
    assert "attention performer (m = 8 random features)" in out and "window 8" in out
    assert sample.main(["--out_dir", str(tmp_path / "performer"), "--prompt", "ROMEO:", "--max_new_tokens", "5",
                        "--device", "cpu", "--attn", "performer", "--performer_features", "8"]) == 0
    assert kernels.get_backend("cpu") == "performer"


def test_bench_scaling_slope_and_crossover():
    """bench.py attention --scaling's fits: the exponent of a power law, and where one cost curve
    crosses another (interpolated in log-log between the measured lengths around it)."""
    import bench
    assert abs(bench.loglog_slope([(T, 3e-6 * T ** 2) for T in (2048, 4096, 8192)]) - 2.0) < 1e-9
    rows = [{"backend": "sdpa", "T": T, "fwdbwd_ms": 1e-4 * T ** 2} for T in (512, 1024, 2048, 4096)]
    rows += [{"backend": "performer", "T": T, "fwdbwd_ms": 0.2 * T} for T in (512, 1024, 2048, 4096)]
    assert bench.crossover(rows, "performer", "sdpa") == 2000  # 0.2 T = 1e-4 T^2
    assert bench.crossover(rows, "sdpa", "performer") == "below"
    assert bench.quadratic("sdpa") and not bench.quadratic("performer") and not bench.quadratic("sdpa+window")
