#!/usr/bin/env bash
# The project's one GPU check (under 8 minutes on one H100/H200): everything the CPU tests cannot
# show, run once, with one summary at the end. Results go to $OUT (default out/gpu).
#   1. the Triton kernel tests on CUDA (compiled, no interpreter)
#   2. bench.py attention, bf16, head dim 64 and 128, T = 1k..16k: ours vs torch SDPA's FA2 and
#      cuDNN kernels, with each shape's first-call time; then once more in a new process, whose
#      first calls show the on-disk autotune cache (goal: first call <= 10 s, later process <= 2 s)
#   3. bench.py speed at GPT-2 124M shapes (bf16, batch 16 x 1024, vocab 50304): training tokens/s
#      and MFU against an 8192^3 GEMM peak, eager and compiled; decoding tokens/s (KV cache, and the
#      compiled step sample.py --compile uses), batch 1 and 8
#   4. train.py --model llama on CUDA with --attn auto and --attn triton (a short run each), then
#      sample.py --compile from it
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python -c "import torch; from omnitron import kernels; print('attn auto on this GPU:', kernels.get_backend('cuda'), torch.cuda.get_device_capability())" | tee -a "$OUT/gpu.txt"

# 1. kernel tests, compiled for this GPU
timeout 120 python -m pytest tests/test_kernels.py -q -x \
    -k "matches_float64_reference or nan_buffers or queries_than_keys or deterministic or whole_model_same_loss" \
    2>&1 | tail -n 5 | tee "$OUT/tests.txt"

# 2. attention: first process (compiles, tunes), then a second one (tuning results from disk)
for D in 64 128; do
    timeout 90 python bench.py attention --dtype bfloat16 --head_dim "$D" --batch 4 --n_head 16 --reps 5 \
        --backends sdpa_flash,sdpa_cudnn,triton --plot "$OUT/attention_d$D.png" 2>&1 | tee "$OUT/attention_d$D.txt"
done
timeout 40 python bench.py attention --dtype bfloat16 --head_dim 128 --batch 4 --n_head 16 --reps 1 \
    --backends triton --seq_lens 1024,4096 --plot "" 2>&1 | tee "$OUT/attention_d128_second_process.txt"

# 3. training step and decoding at GPT-2 124M shapes
gpt2="--model gpt --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50304 --bias false"
timeout 150 python bench.py speed $gpt2 --batch_size 16 --dtypes bfloat16 --compile both --reps 10 \
    --new_tokens 256 --decode_batches 1,8 2>&1 | tee "$OUT/speed_gpt2.txt"

# 4. train.py and sample.py end to end on CUDA
for attn in auto triton; do
    timeout 45 python train.py --model llama --device cuda --attn "$attn" --max_iters 50 --eval_interval 50 \
        --eval_iters 2 --log_interval 10 --sample_tokens 0 --out_dir "$OUT/llama_$attn" 2>&1 | tail -n 4 \
        | tee "$OUT/train_llama_$attn.txt"
done
timeout 45 python sample.py --out_dir "$OUT/llama_auto" --prompt "ROMEO:" --prompt "JULIET: O" --compile \
    --max_new_tokens 100 --temperature 0 2>&1 | tail -n 6 | tee "$OUT/sample_compile.txt"

# summary
{
    echo "== GPU check summary ($(( $(date +%s) - t0 )) s) =="
    cat "$OUT/gpu.txt"
    echo "-- kernel tests on CUDA:"; tail -n 1 "$OUT/tests.txt"
    for f in "$OUT"/attention_d*.txt; do
        echo "-- $(basename "$f" .txt): causal rows (backend, T, first call s, fwd / fwd+bwd TFLOP/s)"
        grep -E "^ *causal +[0-9]+/[0-9]+ " "$f" | awk '{print "  " $4, $3, $5, $7, $10}'
    done
    echo "-- training step and decoding (GPT-2 124M shapes):"; grep -E "bfloat16|recompute|KV cache|MFU" "$OUT/speed_gpt2.txt"
    for attn in auto triton; do echo "-- train.py --attn $attn:"; grep -E "^done|error" "$OUT/train_llama_$attn.txt"; done
    echo "-- sample.py --compile:"; tail -n 2 "$OUT/sample_compile.txt"
} | tee "$OUT/summary.txt"
