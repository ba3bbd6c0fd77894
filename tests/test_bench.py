"""bench.py's own subcommands (attention, kvcache, speed, lora, curves, moe, decode) end to end at tiny sizes."""
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import train
from omnitron import kernels
from tests.helpers import run_cli, train_args

# ----------------------------------------------------------------------------- bench (bench.py)


def test_bench_attention_runs_end_to_end(tmp_path):
    rows = bench.bench_attention(bench.parser().parse_args(
        ["attention", "--seq_lens", "16,40", "--backends", "naive,sdpa,triton", "--reps", "1", "--head_dim", "16",
         "--n_head", "4", "--gqa_group", "2", "--plot", ""]))
    assert len(rows) == 18 and all(row["fwdbwd_ms"] > 0 for row in rows)  # triton under the interpreter
    assert all(row["first_call_s"] > 0 for row in rows)  # every measured row: the first call, compilation included
    r = run_cli("bench.py", "attention", "--seq_lens", "64,128", "--reps", "1", "--plot", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    for column in ("case", "heads", "backend", "first fwd+bwd s", "fwd ms", "fwd TFLOP/s", "fwd MiB", "fwd+bwd ms",
                   "fwd+bwd TFLOP/s", "fwd+bwd MiB"):
        assert column in r.stdout
    assert r.stdout.count("naive") == 6 and r.stdout.count("sdpa") == 6
    r = run_cli("bench.py", "attention", "--seq_lens", "256", "--reps", "1", "--json", "--plot", "")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 6 and all(row["fwdbwd_ms"] > 0 and row["fwd_tflops"] > 0 for row in rows)
    assert all(row["first_call_s"] > 0 for row in rows)
    naive = [row for row in rows if row["backend"] == "naive" and row["case"] == "full"][0]
    assert naive["fwd_mib"] >= 8 * 256 * 256 * 4 / 2 ** 20  # it holds the 8 x 256 x 256 fp32 scores


def test_attention_flop_count():
    """bench.attention_flops against torch's FlopCounterMode on the naive attention's matrix products."""
    B, Hq, Hkv, D = 2, 6, 3, 8

    def counted(fn, T, S, backward=False):
        q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for H, n in ((Hq, T), (Hkv, S), (Hkv, S)))
        with FlopCounterMode(display=False) as counter:
            out = fn(q, k, v)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()
    naive = lambda q, k, v: kernels.naive_attention(q, k, v, causal=False)  # noqa: E731
    scores = lambda q, k, v: q @ k.repeat_interleave(Hq // Hkv, dim=1).transpose(-2, -1)  # noqa: E731
    for T, S in ((5, 12), (12, 12)):
        fwd = counted(naive, T, S)
        assert bench.attention_flops(B, Hq, T, S, D, causal=False, backward=False) == fwd
        # autograd's backward is four products (dq, dk, dv, dp); FlashAttention-2's convention adds a
        # fifth, the recomputed scores q k^T
        fwd_bwd = counted(naive, T, S, backward=True) + counted(scores, T, S)
        assert bench.attention_flops(B, Hq, T, S, D, causal=False, backward=True) == fwd_bwd
    # causal (T == S): the naive kernel multiplies the whole square; the formula counts half of it
    assert bench.attention_flops(B, Hq, 12, 12, D, causal=True, backward=False) == fwd / 2
    assert bench.attention_flops(B, Hq, 12, 12, D, causal=True, backward=True) == fwd_bwd / 2


def test_bench_speed_runs_end_to_end(capsys):
    argv = ["speed", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
            "--new_tokens", "8", "--reps", "1", "--decode_reps", "1", "--compile", "false"]
    args = bench.parser(argv).parse_args(argv)
    rows, decode = args.run(args)
    out = capsys.readouterr().out
    for column in ("dtype", "compile", "tokens/s", "step ms", "fwd ms", "bwd ms", "opt ms", "TFLOP/s",
                   "GEMM peak TFLOP/s", "MFU", "peak MiB", "drawing a batch", "decoding", "recompute", "KV cache",
                   "vs recompute"):
        assert column in out
    assert "float32" in out and "bfloat16" in out
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"] and len(decode) == 4  # batches 1, 8 x 2 modes
    assert all(0 < r["mfu"] < 1 and r["tok_s"] > 0 for r in rows)
    assert all(r["tok_s"] > 0 for r in decode)


def test_bench_curves_reads_run_logs(corpus, tmp_path):
    train.main(train_args(corpus, tmp_path, max_iters=4, eval_interval=2))
    runs = bench.bench_curves(bench.parser(["curves"]).parse_args(
        ["curves", str(tmp_path / "run"), "--plot", str(tmp_path / "c.png")]))
    assert [r["step"] for r in runs[str(tmp_path / "run")]] == [0, 2, 4]
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_bench_kvcache_mha_gqa_mqa():
    argv = ["kvcache", "--n_layer", "1", "--n_embd", "32", "--n_head", "4", "--block_size", "64",
            "--new_tokens", "4", "--prompt_len", "4"]
    rows = bench.bench_kvcache(bench.parser(argv).parse_args(argv))
    assert [r["attention"] for r in rows] == ["MHA", "MQA"]  # n_head // 4 == 1 here
    assert rows[0]["cache_mib"] == 4 * rows[1]["cache_mib"] == 2 * 1 * 4 * 64 * 8 * 4 / 2 ** 20  # k, v x layers x heads x T x D x fp32


def test_bench_lora_runs_end_to_end(capsys):
    argv = ["lora", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
            "--reps", "1", "--lora_rank", "2"]
    args = bench.parser(argv).parse_args(argv)
    rows, ratios = args.run(args)
    out = capsys.readouterr().out
    for column in ("trainable params", "% of the model", "optimizer state MiB", "step peak MiB", "training MiB",
                   "step ms", "full fine-tuning / LoRA"):
        assert column in out
    full, low = rows
    assert low["trainable"] == 2 * (32 + 96)  # c_attn of one layer: A 2 x 32, B 96 x 2
    assert ratios["trainable"] == full["trainable"] / low["trainable"] > 10
    assert ratios["opt_state_mib"] > 10  # AdamW keeps two moments per trainable parameter


def test_bench_moe_runs_end_to_end(capsys):
    bench.main(["moe", "--reps", "1", "--batch_size", "2", "--block_size", "16", "--tokens", "256", "--n_layer", "2",
                "--eval_batches", "1", "--plot", ""])
    out = capsys.readouterr().out
    assert "MoE / dense" in out and "grouped_mm" in out and "expert load" in out


def test_bench_decode_runs_and_reports_the_roofline(capsys):
    """bench.py decode end to end on a tiny model (no figure is checked: speed comes from bench.py
    only): every non-compiled mode of ours, greedy tokens equal to fp32 where they must be, bytes
    per token from the weights' dtypes."""
    import bench
    rows = bench.main(["decode", "--vocab_size", "100", "--n_layer", "3", "--n_embd", "64", "--n_head", "4",
                       "--n_kv_head", "2", "--intermediate_size", "128", "--block_size", "256", "--batches", "1,2",
                       "--new_tokens", "8", "--reps", "1", "--modes", "cache,bf16,int8,speculative", "--step_variants",
                       "false", "--json"])
    assert rows == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rows = [json.loads(line) for line in out]
    assert [r["mode"] for r in rows] == ["cache", "bf16", "int8", "speculative"] * 2
    by = {(r["batch"], r["mode"]): r for r in rows}
    for batch in (1, 2):
        assert by[batch, "speculative"]["same_tokens"] == 1.0 and 0 <= by[batch, "speculative"]["acceptance"] <= 1
        assert by[batch, "int8"]["mb_per_token"] < 0.5 * by[batch, "cache"]["mb_per_token"]
        assert 0 < by[batch, "cache"]["roofline"] and by[batch, "cache"]["bandwidth_gb_s"] > 0
    assert by[2, "cache"]["mb_per_token"] < by[1, "cache"]["mb_per_token"]  # weights read once for both rows
