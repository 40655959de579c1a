"""The steps both drivers share: SFT warm-up, rollout, scoring, learning (old/ref log-probs,
values, advantages, policy/critic/draft updates), colocation phases, metrics and checkpoints.

Each step takes the :class:`jobs.context.Run` and moves data between actors; the maths is in
``miles_ray`` (advantages here, losses in the trainer ranks).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ray

from jobs import checkpointing, generation
from jobs.context import Run
from miles_ray.algorithms import assign_advantages
from miles_ray.data import PromptItem
from miles_ray.training.sft import sft_samples


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def sft_warmup(run: Run) -> None:
    """``train.sft_warmup_steps`` SFT steps on (prompt, label) pairs; the online draft learns them too."""
    cfg, actors = run.cfg, run.actors
    bar = progress(cfg.train.sft_warmup_steps, "SFT warm-up", cfg.logging.progress_bar)
    for _ in range(cfg.train.sft_warmup_steps):
        batch = warmup_samples(run, run.sampler.next_batch(cfg.train.sft_batch_size))
        draft = actors.draft.train.remote(batch) if actors.draft is not None else None
        m = actors.policy.sft_step(batch, cfg.train.sft_lr)
        if draft is not None:
            ray.get(draft)
        bar.update(1)
        bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
    bar.close()


def warmup_samples(run: Run, items: list) -> list:
    """SFT pairs (prompt, label), or with a multi-turn environment that has demonstrations, whole
    demonstrated conversations (model turns trained, tool answers masked)."""
    from miles_ray.agents.sft import demonstration_samples, has_demonstrations

    cfg = run.cfg
    if cfg.rollout.fn and has_demonstrations(cfg.agent.env):
        return demonstration_samples(items, run.tokenizer, cfg.agent.env, cfg.agent.max_tokens)
    return sft_samples(items, run.tokenizer)


def requests_for(prompts: list[PromptItem], first_group: int) -> list[dict]:
    """Generation requests; group ids are consecutive from ``first_group``."""
    return [{"prompt": p.prompt, "label": p.label, "prompt_index": p.index, "group_id": first_group + j,
             "messages": p.messages} for j, p in enumerate(prompts)]


def rollout(run: Run, step: int, stats: dict | None = None, on_done=None) -> list:
    """Generate ``n_samples_per_prompt`` samples for the next ``prompts_per_step`` prompts; group
    ``g`` goes to engine ``g % num_engines`` (or through the router when engines serve HTTP). A
    dead or hung engine's groups move to a healthy engine (:mod:`jobs.generation`); its ``fault/``
    counters go into ``stats``. Samples come back ordered by group."""
    cfg, actors = run.cfg, run.actors
    reqs = requests_for(run.sampler.next_batch(cfg.rollout.prompts_per_step), step * cfg.rollout.prompts_per_step)
    if actors.router_url and not cfg.rollout.fn:  # a rollout function runs in the engine actors
        return _rollout_http(run, reqs, on_done)
    per_engine = [[] for _ in actors.engines]
    for r in reqs:
        per_engine[r["group_id"] % len(actors.engines)].append(r)
    out, counters = generation.generate(run, per_engine, on_done)
    if stats is not None:
        stats.update(counters)
    return sorted(out, key=lambda s: s.group_id)


def _rollout_http(run: Run, reqs: list[dict], on_done=None) -> list:
    """Engines served over HTTP: one request per prompt group to the router, in parallel."""
    from miles_ray.rollout.http.engine import router_client

    client, n = router_client(run.cfg, run.actors.router_url), run.cfg.rollout.n_samples_per_prompt

    def one(r):
        samples = client.generate_samples([r], n, run.params, run.tokenizer)
        if on_done is not None:
            on_done(samples)
        return samples

    with ThreadPoolExecutor(min(16, len(reqs))) as pool:
        chunks = list(pool.map(one, reqs))
    return [s for chunk in chunks for s in chunk]


def score(run: Run, samples: list) -> tuple[list, dict]:
    """Rewards from the reward workers (an even split); errors and timeouts counted."""
    rewards = run.actors.rewards
    size = -(-len(samples) // len(rewards))
    chunks = [samples[i * size:(i + 1) * size] for i in range(len(rewards))]
    refs = [w.score.remote(chunk) for w, chunk in zip(rewards, chunks)]
    results = [run.recovery.get(ref, lambda i=i: rewards[i].score.remote(chunks[i]), "reward", i)
               for i, ref in enumerate(refs)]
    out, stats = [], {}
    for scored, st in results:
        out.extend(scored)
        add_reward_stats(stats, st)
    return out, stats


def add_reward_stats(stats: dict, st: dict) -> None:
    """Sum one reward call's counters into a step's metrics: errors, timeouts, failed rollout
    functions (``rollout_fn_errors``) and failures by reason (``reward_fail_<reason>``)."""
    for key, name in (("errors", "reward_errors"), ("timeouts", "reward_timeouts"), ("skipped", "rollout_fn_errors")):
        stats[name] = stats.get(name, 0) + st.get(key, 0)
    for reason, count in st.get("reasons", {}).items():
        stats[f"reward_fail_{reason}"] = stats.get(f"reward_fail_{reason}", 0) + count


def colocate_phase(run: Run, phase: str) -> None:
    """Colocated mode time-shares devices: engines free memory while the trainers run, and the
    trainers offload optimizer state while the engines run."""
    actors = run.actors
    if not run.cfg.cluster.colocate or not actors.engines:
        return
    trainers = actors.trainer_ranks()
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
        **update_aborts(samples),
        **agent_metrics(samples),
    }


def synced(run: Run, version: int) -> dict:
    """Sync ``version`` to the engines: its seconds and the engine servers' prefix-cache flushes
    (one per server per update: the update protocol, :mod:`jobs.weight_sync`)."""
    before = run.weights.cache_flushes
    seconds = run.recovery.sync(version)
    return {"time_sync_s": seconds, "rollout/cache_flushes": run.weights.cache_flushes - before}


def update_aborts(samples: list) -> dict:
    """Requests of these samples that a weight update's pause aborted and the client re-submitted
    (SGLang versions whose pause aborts: :meth:`EngineClient._finish`)."""
    return {"rollout/update_aborts": sum(s.metadata.get("update_aborts", 0) for s in samples)}


def agent_metrics(samples: list) -> dict:
    """Multi-turn runs: turns and tool calls per conversation, the share of trained (model) tokens."""
    if not any("turns" in s.metadata for s in samples):
        return {}
    n, tokens = len(samples), sum(s.response_length for s in samples)
    model = sum(sum(s.loss_mask) if s.loss_mask is not None else s.response_length for s in samples)
    return {"agent_turns_mean": sum(s.metadata.get("turns", 0) for s in samples) / n,
            "agent_tool_calls_mean": sum(s.metadata.get("tool_calls", 0) for s in samples) / n,
            "agent_model_token_frac": model / max(tokens, 1),
            # conversations whose turns were sampled by more than one weight version (partial rollout)
            "agent_mixed_version_frac": sum(len(set(s.metadata.get("turn_versions", []))) > 1 for s in samples) / n}


def speculation_metrics(run: Run, samples: list, seconds: float) -> dict:
    """Rollout tokens/s, and with a draft the acceptance rate and accepted length (tokens per
    target forward per sequence), weighted over engines by their verify rounds."""
    out = {"rollout_tokens_per_s": sum(s.response_length for s in samples) / max(seconds, 1e-9)}
    engines = run.actors.engines
    if not run.cfg.draft.enabled or not engines:
        return out
    stats = [st for st in ray.get([e.spec_stats.remote() for e in engines]) if st.get("spec_rounds")]
    rounds = sum(st["spec_rounds"] for st in stats)
    if not rounds:  # async: this interval's tokens may all have come before the last report
        return out
    for key in ("spec_accept_rate", "spec_accept_len"):
        out[key] = sum(st[key] * st["spec_rounds"] for st in stats) / max(rounds, 1)
    return out


def prepare_batch(run: Run, samples: list) -> dict:
    """Old/ref log-probs from the policy ranks, values from the critic, then advantages."""
    actors = run.actors
    samples[:] = actors.policy.scatter("prepare", samples, run.cfg.old_logprob_pass)
    if actors.critic is not None:
        samples[:] = actors.critic.scatter("compute_values", samples)
    return assign_advantages(samples, run.cfg.algorithm)


def learn(run: Run, samples: list) -> dict:
    """One training step on a batch (both drivers): order by group, old/ref log-probs, values,
    advantages, then the policy (and critic) update; the online draft trains on the same batch."""
    actors, cfg = run.actors, run.cfg
    samples.sort(key=lambda s: s.group_id)  # the order does not depend on which engine finished first
    draft = actors.draft.train.remote(samples) if actors.draft is not None else None  # meanwhile, own bundle
    metrics = prepare_batch(run, samples)
    metrics.update(actors.policy.train_step(samples, cfg.train.num_minibatches))
    if actors.critic is not None:
        metrics.update(actors.critic.train_step(samples, cfg.train.num_minibatches))
    if draft is not None:
        metrics.update(ray.get(draft))
    return metrics


def save_checkpoint(run: Run, step: int, sampler_state: dict | None = None, async_state: dict | None = None) -> None:
    """Checkpoint after ``step`` train steps (weights of ``versioning.after_steps(step)``)."""
    checkpointing.save(run.cfg, run.actors, sampler_state or run.sampler, step, run.recovery.engine_rng(),
                       async_state=async_state)
