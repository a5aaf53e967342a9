#!/usr/bin/env bash
# One call on a lent GPU runs every CUDA path of azllm and writes the figures to $OUT:
#   device tool: run  command="bash bench/gpu_check.sh"  timeout_s=540
# Under 8 minutes on an H200. The device image has torch, tokenizers, safetensors, numpy, tqdm and
# matplotlib (azllm's core needs) but nothing can be installed there, so azllm runs from the
# checkout (PYTHONPATH), not from a pip install. Figures: $OUT/gpu_check.json and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 450 python3 bench/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
# The memory model's own comparison for the other presets (CUDA context, fragmentation terms).
timeout 60 python3 bench/memory.py --device cuda 2>&1 | tee "$OUT/memory.log" || true
exit "$status"
