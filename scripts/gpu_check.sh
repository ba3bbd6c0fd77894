#!/usr/bin/env bash
# The FlashAttention GPU check (about 9 minutes on one H100/H200): the kernel tests compiled for
# the GPU (no interpreter), then bench.py attention in bf16 for head_dim 64 and 128, T = 1k..16k,
# ours against torch SDPA (its flash backend and its default). Results go to $OUT (or out/gpu).
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 240 python -m pytest test_all.py -q -x \
    -k "float64_reference or nan_buffers or queries_than_keys or deterministic" 2>&1 | tee "$OUT/tests.txt"
for D in 64 128; do
    timeout 130 python bench.py attention --dtype bfloat16 --head_dim "$D" --batch 4 --n_head 16 \
        --backends sdpa,sdpa_flash,triton --plot "$OUT/attention_d$D.png" 2>&1 | tee "$OUT/attention_d$D.txt"
done
