#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: GRPO on addition, tiny Qwen3,
# local Ray on CPU. Extra arguments are config overrides, e.g. total_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m jobs.train examples/grpo_arith_tiny.yaml "$@"
