"""Synchronous GRPO loop: prompts -> rollout -> rewards -> advantages -> buffer -> train -> weight sync -> log.

Every component is a Ray actor (see :mod:`jobs.cluster`); this driver only moves data between
them and calls library functions (advantages) on the way.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray
import yaml

from jobs.cluster import RunActors, start_actors, stop_actors
from jobs.weight_sync import WeightSync
from miles_ray.algorithms import assign_advantages
from miles_ray.data import PromptSampler, load_prompts
from miles_ray.models import load_tokenizer
from miles_ray.rollout import SamplingParams
from miles_ray.training.sft import sft_samples
from miles_ray.utils.tracking import MetricsLogger

log = logging.getLogger("miles_ray.driver")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def sft_warmup(cfg, actors: RunActors, sampler: PromptSampler, tokenizer, logger: MetricsLogger) -> None:
    bar = _progress(cfg.train.sft_warmup_steps, "SFT warm-up", cfg.logging.progress_bar)
    for i in range(cfg.train.sft_warmup_steps):
        batch = sft_samples(sampler.next_batch(cfg.train.sft_batch_size), tokenizer)
        draft = actors.draft.train.remote(batch) if actors.draft is not None else None  # the draft learns it too
        m = actors.policy.sft_step(batch, cfg.train.sft_lr)
        if draft is not None:
            ray.get(draft)
        bar.update(1)
        bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
    bar.close()


def rollout(cfg, actors: RunActors, sampler: PromptSampler, step: int, params: SamplingParams, tokenizer=None) -> list:
    prompts = sampler.next_batch(cfg.rollout.prompts_per_step)
    if actors.router_url:
        return _rollout_http(cfg, actors.router_url, prompts, step, params, tokenizer)
    per_engine = [[] for _ in actors.engines]
    for j, p in enumerate(prompts):
        group_id = step * cfg.rollout.prompts_per_step + j
        per_engine[group_id % len(actors.engines)].append(
            {"prompt": p.prompt, "label": p.label, "prompt_index": p.index, "group_id": group_id})
    n, out = cfg.rollout.n_samples_per_prompt, []
    calls = [(i, reqs, actors.engines[i].generate.remote(reqs, n, params)) for i, reqs in enumerate(per_engine) if reqs]
    for i, reqs, ref in calls:
        if actors.recovery is None:
            out.extend(ray.get(ref))
        else:
            out.extend(actors.recovery.get(ref, lambda i=i, reqs=reqs: actors.engines[i].generate.remote(reqs, n, params),
                                           "rollout", i))
    return out


def _rollout_http(cfg, url: str, prompts: list, step: int, params: SamplingParams, tokenizer) -> list:
    """Engines served over HTTP: one request per prompt group to the router, in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from miles_ray.rollout.client import EngineClient

    client = EngineClient(url)
    reqs = [{"prompt": p.prompt, "label": p.label, "prompt_index": p.index,
             "group_id": step * cfg.rollout.prompts_per_step + j} for j, p in enumerate(prompts)]
    n = cfg.rollout.n_samples_per_prompt
    with ThreadPoolExecutor(min(16, len(reqs))) as pool:
        chunks = list(pool.map(lambda r: client.generate_samples([r], n, params, tokenizer), reqs))
    return [s for chunk in chunks for s in chunk]


def score(actors: RunActors, samples: list) -> tuple[list, dict]:
    n = len(actors.rewards)
    size = -(-len(samples) // n)
    chunks = [samples[i * size:(i + 1) * size] for i in range(n)]
    refs = [w.score.remote(chunk) for w, chunk in zip(actors.rewards, chunks)]
    if actors.recovery is not None:
        results = [actors.recovery.get(ref, lambda i=i: actors.rewards[i].score.remote(chunks[i]), "reward", i)
                   for i, ref in enumerate(refs)]
    else:
        results = ray.get(refs)
    out, stats = [], {"reward_errors": 0, "reward_timeouts": 0}
    for scored, st in results:
        out.extend(scored)
        stats["reward_errors"] += st["errors"]
        stats["reward_timeouts"] += st["timeouts"]
    return out, stats


def prepare_batch(cfg, actors: RunActors, samples: list) -> dict:
    """Old/ref log-probs from the policy ranks, values from the critic, then advantages."""
    samples[:] = actors.policy.scatter("prepare", samples)
    if actors.critic is not None:
        samples[:] = actors.critic.scatter("compute_values", samples)
    return assign_advantages(samples, cfg.algorithm)


def colocate_phase(cfg, actors: RunActors, phase: str) -> None:
    """Colocated mode time-shares devices: engines free memory while the trainers run, and the
    trainers offload optimizer state while the engines run."""
    if not cfg.cluster.colocate or not actors.engines:
        return
    trainers = actors.policy.actors + (actors.critic.actors if actors.critic else [])
    if phase == "train":
        ray.get([e.release_memory.remote() for e in actors.engines] + [t.reload_optimizer.remote() for t in trainers])
    else:
        ray.get([t.offload_optimizer.remote() for t in trainers] + [e.resume_memory.remote() for e in actors.engines])


def rollout_metrics(samples: list) -> dict:
    rewards = [s.reward for s in samples]
    mean = sum(rewards) / len(rewards)
    return {
        "reward_mean": mean,
        "reward_std": (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5,
        "response_len_mean": sum(s.response_length for s in samples) / len(samples),
        "frac_finished": sum(s.finish_reason == "stop" for s in samples) / len(samples),
        "num_samples": len(samples),
    }


def train_step(cfg, actors: RunActors, sampler, params, step: int, tokenizer=None, replay=None) -> tuple[list, dict]:
    t0 = time.time()
    if replay is not None:  # pure training debug mode: samples (with rewards) come from a dump
        samples, reward_stats = replay.next_step(), {}
        t1 = time.time()
    else:
        samples = rollout(cfg, actors, sampler, step, params, tokenizer)
        t1 = time.time()
        reward_stats = speculation_metrics(cfg, actors, samples, t1 - t0)
        colocate_phase(cfg, actors, "train")
        samples, more = score(actors, samples)
        reward_stats.update(more)
    ray.get(actors.buffer.put.remote(samples))
    samples = ray.get(actors.buffer.get.remote(len(samples)))
    t2 = time.time()
    train = learn(cfg, actors, samples)
    colocate_phase(cfg, actors, "rollout")
    t3 = time.time()
    return samples, {**rollout_metrics(samples), **reward_stats, **train,
                     "time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_train_s": t3 - t2}


def speculation_metrics(cfg, actors: RunActors, samples: list, seconds: float) -> dict:
    """Rollout tokens/s, and with a draft the acceptance rate and accepted length (tokens per
    target forward per sequence), weighted over engines by their verify rounds."""
    out = {"rollout_tokens_per_s": sum(s.response_length for s in samples) / max(seconds, 1e-9)}
    if not cfg.draft.enabled or not actors.engines:
        return out
    stats = [st for st in ray.get([e.spec_stats.remote() for e in actors.engines]) if st.get("spec_rounds")]
    rounds = sum(st["spec_rounds"] for st in stats)
    if not rounds:  # async: this interval's tokens may all have come before the last report
        return out
    for key in ("spec_accept_rate", "spec_accept_len"):
        out[key] = sum(st[key] * st["spec_rounds"] for st in stats) / max(rounds, 1)
    return out


def learn(cfg, actors: RunActors, samples: list) -> dict:
    """One training step on a batch (both drivers): order by group, old/ref log-probs, values,
    advantages, then the policy (and critic) update; the online draft trains on the same batch."""
    samples.sort(key=lambda s: s.group_id)  # the order does not depend on which engine finished first
    draft = actors.draft.train.remote(samples) if actors.draft is not None else None  # meanwhile, own bundle
    metrics = prepare_batch(cfg, actors, samples)
    metrics.update(actors.policy.train_step(samples, cfg.train.num_minibatches))
    if actors.critic is not None:
        metrics.update(actors.critic.train_step(samples, cfg.train.num_minibatches))
    if draft is not None:
        metrics.update(ray.get(draft))
    return metrics


def train_loop(cfg, actors: RunActors, sampler, logger: MetricsLogger, out_dir: Path, tokenizer=None,
               resume_from=None) -> list[float]:
    from jobs import checkpointing
    from miles_ray.rollout.dump import DumpReader

    replay = DumpReader(cfg.rollout.replay_dump) if cfg.rollout.replay_dump else None
    params = SamplingParams.from_config(cfg.rollout)
    weights = WeightSync(actors, cfg.weight_sync.transport)
    colocate_phase(cfg, actors, "rollout")
    start, version = 0, 1
    if resume_from is not None:
        meta = checkpointing.restore(cfg, actors, sampler, resume_from)
        start, version = meta["step"], meta["version"]
    weights.sync(version)
    from jobs.faults import FaultInjector, Recovery, ledger_metrics, rebuild_trainers, sync_resilient, trainer_failed

    actors.recovery, injector = Recovery(actors), FaultInjector(cfg, actors)
    rewards, bar = [], _progress(cfg.total_steps, "GRPO", cfg.logging.progress_bar)
    bar.update(start)
    every, saved, step = cfg.checkpoint.every, start, start
    with (out_dir / "samples.jsonl").open("a") as sample_log:
        while step < cfg.total_steps:
            t0 = time.time()
            actors.recovery.version = version
            injector.on_step(step)
            try:
                samples, metrics = train_step(cfg, actors, sampler, params, step, tokenizer, replay)
                version += 1
                sync_s = sync_resilient(weights, version, actors.recovery)
            except Exception as err:  # noqa: BLE001 - a dead trainer rank: rebuild, restore, redo
                if not trainer_failed(actors, err):
                    raise
                step, version = rebuild_trainers(cfg, actors, sampler, weights, logger)
                del rewards[step - start:]
                bar.n = step
                continue
            metrics.update(weight_version=version, time_sync_s=sync_s, time_step_s=time.time() - t0,
                           **actors.recovery.metrics(), **ledger_metrics(samples))
            logger.log(step, metrics)
            for s in samples[:2]:
                sample_log.write(json.dumps({"step": step, "prompt": s.prompt, "response": s.response_text,
                                             "label": s.label, "reward": s.reward}) + "\n")
            rewards.append(metrics["reward_mean"])
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", len=f"{metrics['response_len_mean']:.1f}")
            step += 1
            if every and step % every == 0:
                checkpointing.save(cfg, actors, sampler, step, version)
                saved = step
    if saved != cfg.total_steps and actors.policy.actors:
        checkpointing.save(cfg, actors, sampler, cfg.total_steps, version)
    bar.close()
    return rewards


def run(cfg) -> dict:
    """Run a whole job (synchronous, or async with ``async_rl.enabled``); returns a summary (also
    written to ``summary.json``)."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir)  # also writes tiny models once
    items, report = load_prompts(cfg.data, tokenizer, seed=cfg.seed)
    sampler = PromptSampler(items, seed=cfg.seed, shuffle=cfg.data.shuffle)
    from jobs import checkpointing

    resume_from = checkpointing.find(cfg)
    if resume_from is not None:
        checkpointing.truncate_metrics(out_dir, checkpointing.ckpt.read_meta(resume_from)["step"])
    t0 = time.time()
    actors = start_actors(cfg, engines=not cfg.rollout.replay_dump)
    log.info("actors ready in %.1fs", time.time() - t0)
    logger = MetricsLogger(out_dir, cfg.logging, cfg.run_name, cfg.model_dump())
    try:
        if cfg.train.sft_warmup_steps and resume_from is None:
            sft_warmup(cfg, actors, sampler, tokenizer, logger)
        extra = {}
        if cfg.async_rl.enabled:
            from jobs.async_driver import async_train_loop

            bar = _progress(cfg.total_steps, f"GRPO async S={cfg.async_rl.staleness}", cfg.logging.progress_bar)
            rewards, extra = async_train_loop(cfg, actors, sampler, logger, tokenizer, on_step=lambda step, m: (
                bar.update(1), bar.set_postfix(reward=f"{m['reward_mean']:.3f}", stale=f"{m['staleness_mean']:.2f}")))
            bar.close()
        else:
            rewards = train_loop(cfg, actors, sampler, logger, out_dir, tokenizer, resume_from)
    finally:
        logger.close()
        stop_actors(actors)
    k = max(1, min(5, len(rewards)))
    summary = {"steps": len(rewards), "reward_first5": sum(rewards[:k]) / k, "reward_last5": sum(rewards[-k:]) / k,
               "skipped_rows": report.n_skipped, "wall_s": time.time() - t0, **extra}
    summary["reward_gain"] = summary["reward_last5"] - summary["reward_first5"]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
