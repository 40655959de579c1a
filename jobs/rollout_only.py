"""Pure inference debug mode: generate and score for ``total_steps`` batches of the dataset and
dump the samples to ``rollout.dump_path`` (jsonl) without training. Train from such a dump with
``python -m jobs.train CONFIG rollout.replay_dump=PATH``.

    python -m jobs.rollout_only CONFIG.yaml rollout.dump_path=runs/dump.jsonl [key=value ...]
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path


def run(cfg) -> dict:
    from jobs.cluster import start_actors, stop_actors
    from jobs.sync_driver import rollout, rollout_metrics, score
    from miles_ray.data import PromptSampler, load_prompts
    from miles_ray.models import load_tokenizer
    from miles_ray.rollout import SamplingParams
    from miles_ray.rollout.dump import write_samples
    from miles_ray.utils.tracking import MetricsLogger

    dump = Path(cfg.rollout.dump_path or Path(cfg.output_dir) / "rollouts.jsonl")
    dump.parent.mkdir(parents=True, exist_ok=True)
    dump.unlink(missing_ok=True)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir)
    items, _ = load_prompts(cfg.data, tokenizer, seed=cfg.seed)
    sampler = PromptSampler(items, seed=cfg.seed, shuffle=cfg.data.shuffle)
    actors = start_actors(cfg, trainers=False)
    logger = MetricsLogger(cfg.output_dir, cfg.logging, cfg.run_name + "-rollout", cfg.model_dump())
    params, total, t0 = SamplingParams.from_config(cfg.rollout), 0, time.time()
    try:
        for step in range(cfg.total_steps):
            samples, stats = score(actors, rollout(cfg, actors, sampler, step, params, tokenizer))
            write_samples(dump, step, samples)
            logger.log(step, {**rollout_metrics(samples), **stats})
            total += len(samples)
            print(f"step {step}: {len(samples)} samples, reward {rollout_metrics(samples)['reward_mean']:.3f}",
                  flush=True)
    finally:
        logger.close()
        stop_actors(actors)
    return {"samples": total, "dump": str(dump), "wall_s": time.time() - t0}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from miles_ray.config import ConfigError, load_config
    from miles_ray.data import DataError

    path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        summary = run(load_config(path, argv))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {summary['samples']} samples written to {summary['dump']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
