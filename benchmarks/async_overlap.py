"""Async vs sync step time with rollout and train times about equal (one engine, one trainer rank,
each an actor with one CPU thread, so on 2 cores they can truly overlap).

    .venv/bin/python benchmarks/async_overlap.py [--steps 12] [--new-tokens 128] [--prompts 4]

Prints the sync step time, its rollout and train(+sync) parts, the async (S=1) step time, the
speedup and the overlap efficiency max(rollout, train) / async step time.
Last line: RESULT speedup=<x> overlap_efficiency=<x>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")


def run(tmp: Path, name: str, model: Path, args, *extra) -> list[dict]:
    from jobs.train import run as run_job
    from miles_ray.config import load_config

    cfg = load_config(None, [
        f"output_dir={tmp / name}", f"run_name={name}", f"model.path={model}", f"total_steps={args.steps}",
        "rollout.backend=native", f"rollout.prompts_per_step={args.prompts}", "rollout.n_samples_per_prompt=4",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.ignore_eos=true", "train.micro_batch_size=64",
        f"train.num_minibatches={args.minibatches}", "logging.wandb=false", "logging.progress_bar=false",
        "reward.isolate=false", *extra])
    run_job(cfg)
    return [json.loads(x) for x in open(tmp / name / "metrics.jsonl")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    from miles_ray.models.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="overlap-"))
    model = write_tiny_model(tmp / "model", "qwen3", hidden=args.hidden, layers=args.layers)
    skip = 2  # warm-up steps left out of the means
    sync = run(tmp, "sync", model, args)[skip:]
    asyn = run(tmp, "async", model, args, "async_rl.enabled=true", "async_rl.staleness=1")[skip:]
    import ray

    ray.shutdown()  # its log stream must not trail the RESULT line
    mean = lambda rows, k: statistics.mean(r[k] for r in rows)  # noqa: E731
    rollout_s = mean(sync, "perf/time_rollout_s") + mean(sync, "perf/time_reward_s")
    train_s = mean(sync, "perf/time_train_s") + mean(sync, "perf/time_sync_s")
    sync_step, async_step = mean(sync, "perf/time_step_s"), mean(asyn, "perf/time_step_s")
    speedup, eff = sync_step / async_step, max(rollout_s, train_s) / async_step
    print(f"sync step {sync_step:.3f}s (rollout+reward {rollout_s:.3f}s, train+sync {train_s:.3f}s)")
    print(f"async (staleness 1) step {async_step:.3f}s, mean staleness {mean(asyn, 'async/staleness_mean'):.2f}")
    print(f"speedup {speedup:.2f}x, overlap efficiency {eff:.2f}")
    print(f"RESULT speedup={speedup:.2f} overlap_efficiency={eff:.2f}")


if __name__ == "__main__":
    main()
