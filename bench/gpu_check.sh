#!/usr/bin/env bash
# Issue 15, item 6, in one go on a machine with an NVIDIA GPU and the package registry (about 8 minutes): a fresh
# venv with the gpu extra, the CUDA-marked tests (provider, I/O binding, fp16 parity), then two SmolLM2 bundles
# (fp32 fused generation graph; fp16 traced) timed on CUDA beside the CPU by bench/cuda.py.
#
#   bash bench/gpu_check.sh                 # results: bench/results/cuda.json, the test log in $WORK/tests.log
#   VENV=/opt/venv WORK=/tmp/gpu bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
WORK=${WORK:-build/gpu-check}
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no NVIDIA GPU here"; exit 1; }

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0                  # export only: the GPU work is onnxruntime's
"$VENV/bin/pip" install -q -e ".[train,gpu,dev]"
"$VENV/bin/python" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()"

"$VENV/bin/python" -m pytest -q -m cuda -rs tests/test_cuda.py 2>&1 | tee "$WORK/tests.log"

BIN="$VENV/bin"
"$BIN/mpt-edge" train target --tasks tweet_sentiment,newsgroups20_name --backbone smollm2-135m --method pt --steps 2 \
    --prompt-length 20 --max-length 64 --quiet --out "$WORK/pt"
"$BIN/mpt-edge" export "$WORK/pt" --out "$WORK/fp32" --kv-cache --overwrite
"$BIN/mpt-edge" export "$WORK/pt" --out "$WORK/fp16" --kv-cache --dtype fp16 --overwrite
"$BIN/python" bench/cuda.py "$WORK/fp32" "$WORK/fp16" --devices cuda,cpu
