#!/usr/bin/env bash
# GPU session, call 2 of 2 (carry .whl2, right after call 1 while the machine is warm): join the
# Ray wheel, then the GPU example config end to end through Ray (model swapped for a local tiny one:
# no network there) and the weight-sync benchmark on the host's otherwise idle CPUs.
set -uo pipefail
cat /tmp/parts/raypart.aa .whl2/raypart.ab > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
pip install -q --no-deps --target /tmp/site /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 WANDB_MODE=disabled \
  TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
timeout 300 python -m jobs.train examples/grpo_arith_qwen3_gpu.yaml model.path=tiny:qwen3:512x4 total_steps=6 \
  rollout.prompts_per_step=16 rollout.max_new_tokens=32 checkpoint.every=3 logging.wandb=false \
  cluster.dashboard=false output_dir=/tmp/gpu_example > $OUT/gpu_example.log 2>&1; echo "example rc=$?" | tee -a $OUT/gpu_example.log
tail -5 $OUT/gpu_example.log; cp /tmp/gpu_example/metrics.jsonl $OUT/gpu_example_metrics.jsonl 2>/dev/null
python - <<'PY' 2>/dev/null
import json; rows=[json.loads(l) for l in open("/tmp/gpu_example/metrics.jsonl")]; print("steps", len(rows), {k: rows[-1][k] for k in rows[-1] if k.split("/")[-1] in ("reward_mean","mismatch_abs","time_sync_s","rollout_tokens_per_s")})
PY
timeout 200 python benchmarks/weight_sync.py --engines 1 --transports shm,object_store --repeats 3 2>&1 | tee $OUT/weight_sync.log | tail -4
