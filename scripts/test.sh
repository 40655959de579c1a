#!/usr/bin/env bash
# Set up (if needed) and run the test suite on CPU with a real local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 WANDB_MODE=offline \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
