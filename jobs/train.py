"""Training entry point: ``python -m jobs.train [CONFIG.yaml] [key.sub=value ...]`` (the same as
``miles-ray train``), and :func:`run`, which :func:`miles_ray.run` calls.

Joins the Ray cluster in RAY_ADDRESS when set (``ray job submit --working-dir . -- python -m
jobs.train ...``), otherwise starts a local one. Dispatches to the synchronous driver or, with
``async_rl.enabled``, the async one.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import yaml

from jobs import checkpointing, steps
from jobs.async_driver import async_train_loop
from jobs.cluster import start_actors, stop_actors
from jobs.context import Run
from jobs.ray_metrics import telemetry
from jobs.serve_openai import openai_endpoint, resolve_endpoint
from jobs.reward_services import check_reward_services, start_reward_services, stop_reward_services
from jobs.sync_driver import train_loop
from miles_ray.config import Config
from miles_ray.data import PromptSampler, load_prompts
from miles_ray.errors import UserValueError
from miles_ray.training.megatron.validate import validate_config as validate_backend
from miles_ray.models import load_tokenizer
from miles_ray.rewards.registry import check_reward_spec
from miles_ray.utils.tracking import MetricsLogger

log = logging.getLogger("miles_ray.driver")


def _train(run: Run, resume_from: Path | None) -> tuple[list, dict]:
    cfg = run.cfg
    if cfg.train.sft_warmup_steps and resume_from is None:
        steps.sft_warmup(run)
    if not cfg.async_rl.enabled:
        return train_loop(run, resume_from), {}
    bar = steps.progress(cfg.total_steps, f"GRPO async S={cfg.async_rl.staleness}", cfg.logging.progress_bar)

    def on_step(step: int, m: dict) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", stale=f"{m['staleness_mean']:.2f}")

    try:
        return async_train_loop(run, on_step)
    finally:
        bar.close()


def check_agent(cfg: Config) -> None:
    """An unknown rollout function or environment fails here, before any actor starts."""
    if not cfg.rollout.fn:
        return
    from miles_ray.agents import make_env
    from miles_ray.agents.runner import resolve_rollout_fn

    resolve_rollout_fn(cfg.rollout.fn)
    if cfg.agent.env:
        make_env(cfg.agent.env)


def check_memory(cfg: Config, force: bool = False) -> None:
    """GPU runs only (``cluster.use_gpu``; CPU runs skip it): a memory plan that needs more than
    ``cluster.gpu_memory_gib`` on some GPU raises a :class:`UserValueError` naming the biggest item
    and the knob that shrinks it; ``force`` logs it instead."""
    if not cfg.cluster.use_gpu:
        return
    from miles_ray.plan import plan_for

    problem = plan_for(cfg).problem()
    if problem and not force:
        raise UserValueError(problem)
    if problem:
        log.warning("--force: starting anyway; %s", problem)


def run(cfg: Config, force: bool = False) -> dict:
    """Run a whole job; returns a summary (also written to ``summary.json``). Problems in the
    config, data, model path, reward function, resume folder or (GPU runs) the memory plan raise a
    :class:`UserError` before any actor starts; ``force`` runs a plan that does not fit anyway."""
    check_memory(cfg, force)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir)  # also writes tiny models once
    items, report = load_prompts(cfg.data, tokenizer, seed=cfg.seed)
    sampler = PromptSampler(items, seed=cfg.seed, shuffle=cfg.data.shuffle)
    check_reward_spec(cfg.reward.fn)  # an unimportable reward function fails here, not in a worker
    check_agent(cfg)
    resolve_endpoint(cfg)  # Serve's key and port, fixed before the reward workers are built
    check_reward_services(cfg)  # reward_model / llm_judge settings; writes a tiny reward model once
    backend_note = validate_backend(cfg)  # megatron layout vs model and ranks: fails before any actor starts
    if backend_note:
        log.info(backend_note)
    resume_from = checkpointing.find(cfg)
    if resume_from is not None:
        checkpointing.truncate_metrics(out_dir, checkpointing.ckpt.read_meta(resume_from)["step"])
    for name in checkpointing.set_aside_logs(out_dir) if resume_from is None else []:
        log.warning("%s already held an earlier run's log: kept as %s (this run starts a new one)", out_dir, name)
    t0 = time.time()
    actors = start_actors(cfg, engines=not cfg.rollout.replay_dump)
    log.info("actors ready in %.1fs", time.time() - t0)
    services = {}
    logger = MetricsLogger(out_dir, cfg.logging, cfg.run_name, cfg.model_dump(), **telemetry(cfg, actors))
    try:
        services = start_reward_services(cfg)  # reward workers only call the URL: before the first step
        with openai_endpoint(cfg, actors.engines):  # serve.enabled: /v1 in front of the engines
            rewards, extra = _train(Run.create(cfg, actors, sampler, tokenizer, logger), resume_from)
    finally:
        logger.close()
        stop_reward_services(services)
        stop_actors(actors)
    k = max(1, min(5, len(rewards)))
    summary = {"steps": len(rewards), "reward_first5": sum(rewards[:k]) / k, "reward_last5": sum(rewards[-k:]) / k,
               "skipped_rows": report.n_skipped, "wall_s": time.time() - t0, **extra}
    summary["reward_gain"] = summary["reward_last5"] - summary["reward_first5"]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def command(args) -> int:
    """``miles-ray train`` / ``python -m jobs.train``."""
    from jobs.entry import config_from

    cfg = config_from(args)
    summary = run(cfg, force=getattr(args, "force", False))
    print(f"done: {summary['steps']} steps, reward first 5 = {summary['reward_first5']:.3f}, "
          f"last 5 = {summary['reward_last5']:.3f} (gain {summary['reward_gain']:+.3f}); "
          f"metrics in {cfg.output_dir}/metrics.jsonl")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.entry import standalone

    return standalone("python -m jobs.train", "Train a policy (the same as `miles-ray train`).", command, argv,
                      add_train_args)


def add_train_args(p) -> None:
    p.add_argument("--force", action="store_true", help="start a GPU run whose memory plan does not fit "
                   "cluster.gpu_memory_gib (see `miles-ray plan`)")


if __name__ == "__main__":
    sys.exit(main())
