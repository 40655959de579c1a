#!/usr/bin/env bash
# Set up (if needed) and run the tests on CPU with a real local Ray.
#   bash scripts/test.sh            both tiers: tests/unit (no Ray) then tests/system (Ray, HTTP, processes)
#   bash scripts/test.sh unit       the fast tier only (under 3 minutes on 2 cores)
#   bash scripts/test.sh system     the system tier only
# Other arguments are passed to pytest (e.g. bash scripts/test.sh unit -k config).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 WANDB_MODE=offline \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
tier=(tests/unit tests/system)
case "${1:-}" in
  unit) tier=(tests/unit); shift ;;
  system) tier=(tests/system); shift ;;
esac
exec .venv/bin/python -m pytest -q "${tier[@]}" "$@"
