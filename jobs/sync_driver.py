"""Synchronous loop: prompts -> rollout -> rewards -> buffer -> learn -> weight sync -> log.

Every component is a Ray actor (see :mod:`jobs.cluster`); the loop only orders the shared steps
(:mod:`jobs.steps`). Step ``k`` trains on samples of weight version ``after_steps(k)`` (staleness
0) and ends with the engines serving ``after_steps(k + 1)`` (:mod:`miles_ray.versioning`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from jobs import checkpointing, evaluation, steps
from jobs.context import Run
from jobs.faults import FaultInjector
from jobs.scoring import Scoring
from miles_ray import versioning
from miles_ray.ledger import step_entry


def train_step(run: Run, step: int, replay=None) -> tuple[list, dict]:
    """One step: samples (generated and scored, or from a dump), then :func:`steps.learn`."""
    t0 = time.time()
    if replay is not None:  # pure training debug mode: samples (with rewards) come from a dump
        samples, reward_stats = replay.next_step(), {}
        t1 = time.time()
    else:
        faults: dict = {}
        scoring = Scoring(run)  # each group goes to a reward worker as soon as it is generated
        samples = steps.rollout(run, step, faults, scoring.submit)
        t1 = time.time()
        reward_stats = {**steps.speculation_metrics(run, samples, t1 - t0), **faults}
        steps.colocate_phase(run, "train")
        samples, more = scoring.results()
        reward_stats.update(more)
    buffer = run.actors.buffer
    ray.get(buffer.put.remote(samples))
    samples = ray.get(buffer.get.remote(len(samples)))
    t2 = time.time()
    train = steps.learn(run, samples)
    steps.colocate_phase(run, "rollout")
    t3 = time.time()
    return samples, {**steps.rollout_metrics(samples), **reward_stats, **train,
                     "time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_train_s": t3 - t2}


def _log_samples(sample_log, step: int, samples: list) -> None:
    for s in samples[:2]:
        sample_log.write(json.dumps({"step": step, "prompt": s.prompt, "response": s.response_text,
                                     "label": s.label, "reward": s.reward}) + "\n")


def train_loop(run: Run, resume_from: Path | None = None) -> list[float]:
    """Train ``total_steps`` steps (from a checkpoint when given); returns each step's mean reward.
    A trainer-rank death rebuilds the group from the latest checkpoint and redoes the steps since
    (with ``checkpoint.every`` a fresh run checkpoints step 0 too, so there always is one); the same
    failure ``faults.max_same_failure`` times in a row stops the run with it."""
    from miles_ray.rollout.dump import DumpReader

    cfg = run.cfg
    replay = DumpReader(cfg.rollout.replay_dump) if cfg.rollout.replay_dump else None
    steps.colocate_phase(run, "rollout")
    start = 0
    if resume_from is not None:
        start = checkpointing.restore(cfg, run.actors, run.sampler, resume_from)["step"]
    run.recovery.sync(versioning.after_steps(start))
    injector = FaultInjector(cfg, run.actors)
    evals = evaluation.Evaluator(run)
    evals.start(start)  # the initial weights, into row 0
    rewards, bar = [], steps.progress(cfg.total_steps, "GRPO", cfg.logging.progress_bar)
    bar.update(start)
    every, saved, step = cfg.checkpoint.every, start, start
    if every and start == 0 and run.actors.policy.actors:
        steps.save_checkpoint(run, 0)  # what a trainer rank lost before the first interval restores
    with (Path(cfg.output_dir) / "samples.jsonl").open("a") as sample_log:
        while step < cfg.total_steps:
            t0 = time.time()
            injector.on_step(step)
            try:
                samples, metrics = train_step(run, step, replay)
                sync = steps.synced(run, versioning.after_steps(step + 1))
            except Exception as err:  # noqa: BLE001 - a dead trainer rank: rebuild, restore, redo
                if not run.recovery.trainer_failed(err):
                    raise
                run.recovery.streak.failed(err, step)  # the same failure again: stop with it
                step = run.recovery.rebuild_trainers(cfg, run.sampler, run.logger)
                del rewards[step - start:]
                bar.n = step
                continue
            metrics.update(weight_version=versioning.after_steps(step + 1), **sync,
                           time_step_s=time.time() - t0, **run.recovery.metrics(), **step_entry(samples),
                           **injector.counts(run.recovery.events))
            metrics.update(evals.after_step(step))  # eval/ fields (held-out sets), when due
            run.recovery.streak.completed(step)
            run.logger.log(step, metrics)
            _log_samples(sample_log, step, samples)
            rewards.append(metrics["reward_mean"])
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", len=f"{metrics['response_len_mean']:.1f}")
            step += 1
            if every and step % every == 0:
                steps.save_checkpoint(run, step)
                saved = step
    if saved != cfg.total_steps and run.actors.policy.actors:
        steps.save_checkpoint(run, cfg.total_steps)
    evals.close()
    bar.close()
    return rewards
