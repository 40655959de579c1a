"""Chaos run: N synchronous steps with K random process kills (rollout engines and reward
workers, plus one trainer rank with --trainer-kill), on 2 engines, 2 reward workers and 2 trainer
ranks; checkpoints every step. Prints steps completed, samples lost and trained twice (from the
per-step ledger of group ids and sizes in metrics.jsonl) and the recovery time of each fault.

    .venv/bin/python benchmarks/chaos.py [--steps 12] [--faults 4] [--trainer-kill]

Last line: RESULT faults=<k> steps=<n> lost=<n> duplicates=<n> max_recovery_s=<s>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--faults", type=int, default=4)
    ap.add_argument("--trainer-kill", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from miles_ray.ledger import check_rows as ledger_counts
    from jobs.train import run
    from miles_ray.config import load_config

    out = Path(tempfile.mkdtemp(prefix="chaos-"))
    kills = [{"role": "trainer", "rank": 1, "step": args.steps // 2, "delay_s": 0.0}] if args.trainer_kill else []
    prompts, n = 8, 4
    cfg = load_config(None, [
        f"output_dir={out}", "run_name=chaos", f"total_steps={args.steps}", "rollout.backend=native",
        f"rollout.prompts_per_step={prompts}", f"rollout.n_samples_per_prompt={n}", "rollout.num_engines=2",
        "rollout.max_new_tokens=48", "rollout.ignore_eos=true", "reward.num_workers=2", "cluster.num_trainers=2",
        "checkpoint.every=1", f"faults.random_kills={args.faults - len(kills)}", f"faults.seed={args.seed}",
        f"faults.kills={json.dumps(kills)}", "logging.wandb=false", "logging.progress_bar=false"])
    summary = run(cfg)
    import ray

    ray.shutdown()  # its log stream must not trail the RESULT line
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    # the ledger in every row: which groups (and how many samples each) a step trained on
    counts = ledger_counts(rows, n, range(args.steps * prompts))
    each = rows[-1]["fault/recovery_s_each"] if rows else []
    print(f"steps completed {counts['steps']}/{args.steps} (summary: {summary['steps']} run in this job)")
    print(f"faults injected {args.faults}, recoveries {rows[-1]['fault/recoveries']}, recovery seconds {each}")
    print(f"samples lost {counts['lost']}, samples trained twice {counts['duplicates']} "
          f"({counts['groups']} of {args.steps * prompts} groups trained)")
    print(f"RESULT faults={args.faults} steps={counts['steps']} lost={counts['lost']} duplicates={counts['duplicates']} "
          f"max_recovery_s={max(each, default=0.0):.2f}")


if __name__ == "__main__":
    main()
