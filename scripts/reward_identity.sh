#!/usr/bin/env bash
# Refactoring check: reward_mean per step of the default demo, the 2x2 colocated demo and the async
# demo at staleness 0 (8 steps each) for the checkout TREE, written to OUT/<name>.txt.
#   git worktree add /tmp/before <commit>; bash scripts/reward_identity.sh /tmp/before /tmp/rb
#   bash scripts/reward_identity.sh "$PWD" /tmp/ra; diff -r /tmp/rb /tmp/ra --include='*.txt'   (identical = same maths)
# Uses this checkout's .venv; Ray workers import the code of TREE (the driver's working directory).
set -u
venv=$(cd "$(dirname "$0")/.." && pwd)/.venv
cd "$1"; out=$2; mkdir -p "$out"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
run() {
  name=$1; shift
  "$venv/bin/python" -m jobs.train "$@" total_steps=8 output_dir="$out/$name" run_name="id-$name" \
    logging.progress_bar=false model.tiny_cache_dir="$out/_models" > "$out/$name.log" 2>&1
  "$venv/bin/python" -c "import json, sys; [print(r['step'], repr(r.get('rollout/reward_mean'))) for r in map(json.loads, open(sys.argv[1]))]" \
    "$out/$name/metrics.jsonl" > "$out/$name.txt"
}
run demo examples/grpo_arith_tiny.yaml
run colocated2x2 examples/grpo_arith_tiny_2x2.yaml cluster.colocate=true
run async0 examples/grpo_arith_tiny_async.yaml async_rl.staleness=0
