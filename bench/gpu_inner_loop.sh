#!/usr/bin/env bash
# The inner-loop benchmarks on one CUDA GPU, as one script of about 6 minutes (H200/H100).
#
# Needs only a CUDA build of torch (>= 2.4) and numpy: bench/inner_loop_throughput.py imports
# neither Flower nor the data stack. Where torch is not installed, install the wheel that
# matches the driver (`nvidia-smi` shows its version): cu130 needs driver >= 580, cu128 and
# cu126 run on any driver >= 525, e.g.
#     pip install torch --index-url https://download.pytorch.org/whl/cu130
# Writes each run's output to $OUT (default ./gpu-bench) and prints the figures as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/device.txt"
bench() { local name=$1; shift; "$PYTHON" bench/inner_loop_throughput.py --device cuda "$@" 2>&1 | tee "$OUT/$name.txt"; }
# 1. the paper's 1b model at sequence length 2048, bf16, compiled: the MFU goal (>= 45 %)
bench 1b-bf16-compile --model 1b --seq-len 2048 --batch-size 8 --precision bf16 --compile --steps 10 --reps 4
# 2. the same without compilation
bench 1b-bf16-eager --model 1b --seq-len 2048 --batch-size 8 --precision bf16 --steps 10 --reps 4
# 3. a small model, where per-step overheads (launches, syncs) show most
bench 35m-bf16-eager --model 35m --seq-len 1024 --batch-size 16 --precision bf16 --steps 20 --reps 6
