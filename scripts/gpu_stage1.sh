#!/usr/bin/env bash
# GPU session, call 1 of 2 (device tool, carry .whl): wheels the GPU image lacks into /tmp/site,
# then the checks that need no Ray: megatron backend on CUDA, SGLang CUDA-IPC payload round trip.
set -uo pipefail
mkdir -p /tmp/site /tmp/parts && cp .whl/raypart.* /tmp/parts/
pip install -q --no-deps --target /tmp/site $(ls .whl/*.whl | grep -v megatron) 2>&1 | tail -2
python -m zipfile -e .whl/megatron_core-*.whl /tmp/site  # cp311 wheel: its Python code runs on 3.12
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
timeout 240 python benchmarks/gpu_megatron.py 2>&1 | grep -v -E "Loading weights|Warning|warn" | tee $OUT/gpu_megatron.log | tail -12
timeout 60 python scripts/gpu_sglang_ipc_check.py 2>&1 | tee $OUT/gpu_sglang_ipc.log | tail -4
