"""Pure inference debug mode: generate and score ``total_steps`` batches of the dataset and dump
the samples to ``rollout.dump_path`` (jsonl) without training. Train from such a dump with
``miles-ray train CONFIG rollout.replay_dump=PATH``.

    miles-ray rollout CONFIG.yaml rollout.dump_path=runs/dump.jsonl [key=value ...]
    python -m jobs.rollout_only CONFIG.yaml ...   (the same)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from jobs import steps
from jobs.cluster import start_actors, stop_actors
from jobs.context import Run
from jobs.ray_metrics import telemetry
from jobs.reward_services import check_reward_services, start_reward_services, stop_reward_services
from jobs.serve_openai import openai_endpoint, resolve_endpoint
from jobs.train import check_agent
from miles_ray.config import Config
from miles_ray.data import PromptSampler, load_prompts
from miles_ray.models import load_tokenizer
from miles_ray.rewards.registry import check_reward_spec
from miles_ray.rollout.dump import write_samples
from miles_ray.utils.tracking import MetricsLogger


def run(cfg: Config) -> dict:
    dump = Path(cfg.rollout.dump_path or Path(cfg.output_dir) / "rollouts.jsonl")
    dump.parent.mkdir(parents=True, exist_ok=True)
    dump.unlink(missing_ok=True)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir)
    items, _ = load_prompts(cfg.data, tokenizer, seed=cfg.seed)
    check_reward_spec(cfg.reward.fn)
    check_agent(cfg)
    resolve_endpoint(cfg)
    check_reward_services(cfg)
    actors = start_actors(cfg, trainers=False)
    logger = MetricsLogger(cfg.output_dir, cfg.logging, cfg.run_name + "-rollout", cfg.model_dump(),
                           **telemetry(cfg, actors))
    run_ = Run.create(cfg, actors, PromptSampler(items, seed=cfg.seed, shuffle=cfg.data.shuffle), tokenizer, logger)
    total, t0, services = 0, time.time(), {}
    try:
        services = start_reward_services(cfg)
        with openai_endpoint(cfg, actors.engines):
            for step in range(cfg.total_steps):
                samples, stats = steps.score(run_, steps.rollout(run_, step))
                write_samples(dump, step, samples)
                metrics = steps.rollout_metrics(samples)
                logger.log(step, {**metrics, **stats})
                total += len(samples)
                print(f"step {step}: {len(samples)} samples, reward {metrics['reward_mean']:.3f}", flush=True)
    finally:
        logger.close()
        stop_reward_services(services)
        stop_actors(actors)
    return {"samples": total, "dump": str(dump), "wall_s": time.time() - t0}


def command(args) -> int:
    """``miles-ray rollout`` / ``python -m jobs.rollout_only``."""
    from jobs.entry import config_from

    summary = run(config_from(args))
    print(f"done: {summary['samples']} samples written to {summary['dump']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.entry import standalone

    return standalone("python -m jobs.rollout_only", "Inference only (the same as `miles-ray rollout`).", command,
                      argv)


if __name__ == "__main__":
    sys.exit(main())
