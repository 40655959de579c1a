"""Async off-policy driver: a rollout pump (:mod:`jobs.rollout_pump`, a thread) keeps the engines
busy while the train pump (main thread) trains on buffered groups; a staleness bound keeps the two
within S versions.

Train pump: take ``prompts_per_step`` groups, train (the shared :func:`steps.learn`, with
decoupled-PPO importance weights when configured), sync weights - engines pause between decode
steps, load, and resume unfinished requests (partial rollout) - and only then raise the version.

Versions (:mod:`miles_ray.versioning`): step ``k`` trains weights ``after_steps(k)``; a sample's
staleness = that version - the version of its first token <= S (asserted every step). With S = 0
the schedule, and the metrics, equal the synchronous driver's.

Checkpoints (``checkpoint.every``, and always at the end): the sync driver's contents plus the pump
state, taken while the pump is held between two iterations: buffered groups (generated, scored, not
trained on), the requests of in-flight groups (re-sent on resume: regenerated with the weights of
the checkpoint), the staleness counters, the group ledger and the next group id. The final
checkpoint is taken after a drain (no new prompts, in-flight groups finish into the buffer), so it
holds no in-flight work.
"""
from __future__ import annotations

import collections
import time
from pathlib import Path

import ray

from jobs import checkpointing, evaluation, steps
from jobs.context import Run
from jobs.faults import FaultInjector
from jobs.rollout_pump import RolloutPump
from miles_ray import versioning
from miles_ray.ledger import GroupLedger, step_entry


def _check(pump: RolloutPump, watchdog_s: float, waiting_for: str) -> None:
    if pump.error is not None:
        raise RuntimeError(f"rollout pump failed: {pump.error!r}") from pump.error
    if time.time() - pump.last_progress > watchdog_s:
        raise RuntimeError(f"stall: no rollout progress for {watchdog_s:.0f}s while {waiting_for}; {pump.report()}")


def wait_for_batch(run: Run, pump: RolloutPump, groups: int) -> None:
    while ray.get(run.actors.buffer.size.remote()) < groups:
        _check(pump, run.cfg.async_rl.watchdog_s, f"the trainer waits for {groups} groups")
        time.sleep(0.01)


def drain(pump: RolloutPump, watchdog_s: float) -> None:
    """End of run: admit what the staleness bound allows, then take no new prompts, let in-flight
    groups finish into the buffer and stop the pump. The final checkpoint then holds every admitted
    group in the buffer ((S + 1) batches without filtering) and nothing in flight."""
    with pump.held():
        pump.submit_admitted()
        pump.submitting = False
    while True:
        with pump.held():
            if pump.idle():
                break
        _check(pump, watchdog_s, "the run drains in-flight groups before its final checkpoint")
        time.sleep(0.01)
    pump.stop()
    pump.join(timeout=30)


def staleness_metrics(samples: list, trained_version: int, bound: int) -> dict:
    lags = [versioning.staleness(trained_version, s.weight_version) for s in samples]
    worst = max(lags)
    if worst > bound:
        late = next(s for s, lag in zip(samples, lags) if lag == worst)
        raise AssertionError(f"staleness bound violated: a sample lags {worst} versions > async_rl.staleness={bound} "
                             f"(group {late.group_id}, trained version {trained_version}, spans "
                             f"{late.metadata.get('weight_versions')}, groups {sorted({s.group_id for s in samples})})")
    hist = collections.Counter(lags)
    return {"staleness_max": worst, "staleness_mean": sum(lags) / len(lags),
            **{f"staleness_frac_{k}": hist[k] / len(lags) for k in range(bound + 1)}}


def snapshot(run: Run, pump: RolloutPump, version: int | None = None) -> dict:
    """Pump state plus the buffer's groups, with the pump parked. Mid-run (``version``: the new
    weight version, raised here) the pump first submits what the raised bound admits: those groups
    are in flight in every mid-run checkpoint, whatever the thread timing."""
    with pump.held():
        if version is not None:
            pump.set_version(version)
        if pump.submitting and pump.is_alive():
            pump.submit_admitted()
        return {**pump.state_dict(), "buffer": ray.get(run.actors.buffer.snapshot.remote())}


def resume(run: Run, pump: RolloutPump, path: Path | None = None) -> int:
    """Restore a checkpoint (``path``, else the one ``resume`` names) into the actors and the pump;
    returns the step."""
    cfg = run.cfg
    path = path or checkpointing.find(cfg)
    if path is None:
        return 0
    meta = checkpointing.restore(cfg, run.actors, run.sampler, path)
    state = checkpointing.load_async_state(path)
    if state is None:  # a synchronous checkpoint: nothing buffered or in flight, group ids go on
        done = meta["step"] * cfg.rollout.prompts_per_step
        state = {"next_group": done, "inflight": [], "buffer": [], "sampler": meta["sampler"],
                 "ctrl": {"submitted": done, "accepted": done, "filtered": 0, "running": 0},
                 "ledger": GroupLedger.after_sync_steps(done).state_dict()}
    for group in state["buffer"]:
        ray.get(run.actors.buffer.put_group.remote(group))
    pump.load_state_dict(state)
    return meta["step"]


def start_pump(run: Run, path: Path | None = None) -> tuple[RolloutPump, int]:
    """A rollout pump restored from a checkpoint (if any), engines refit, running."""
    pump = RolloutPump(run)
    step = resume(run, pump, path)
    run.recovery.sync(versioning.after_steps(step))
    pump.set_version(versioning.after_steps(step))
    pump.start()
    return pump, step


def rebuild(run: Run, pump: RolloutPump) -> tuple[RolloutPump, int]:
    """A trainer rank died: stop the pump, start a new trainer group, clear the buffer and restore
    the latest checkpoint into trainers, sampler, buffer and a new pump (its in-flight groups are
    generated again); metrics rows after it are rewound."""
    t0 = time.time()
    pump.stop()
    pump.join(timeout=60)
    path = run.recovery.respawn_trainers(run.cfg)
    ray.get(run.actors.buffer.clear.remote())
    pump, step = start_pump(run, path)
    run.logger.rewind(step)
    run.recovery.record(time.time() - t0, "trainer")
    return pump, step


def train_one(run: Run, pump: RolloutPump, step: int, t_prev: float) -> tuple[dict, dict | None]:
    """One async step: take a batch, train (policy, critic, draft), sync; a mid-run checkpoint's
    state is returned (saved by the caller after logging)."""
    cfg, t0 = run.cfg, time.time()
    wait_for_batch(run, pump, cfg.rollout.prompts_per_step)
    t1 = time.time()
    groups = ray.get(run.actors.buffer.get_groups.remote(cfg.rollout.prompts_per_step, "oldest_version"))
    samples = [s for g in groups for s in g]
    pump.ledger.consumed += [g[0].group_id for g in groups]
    trained, new = versioning.after_steps(step), versioning.after_steps(step + 1)
    metrics = {**steps.rollout_metrics(samples), **staleness_metrics(samples, trained, cfg.async_rl.staleness),
               **step_entry(samples), **steps.speculation_metrics(run, samples, t1 - t_prev)}
    metrics.update(steps.learn(run, samples))
    t2 = time.time()
    metrics.update(steps.synced(run, new))  # engines pause, load, resume in-flight requests
    every, state = cfg.checkpoint.every, None
    if every and (step + 1) % every == 0 and step + 1 < cfg.total_steps:
        state = snapshot(run, pump, version=new)
    else:
        pump.set_version(new)
    metrics.update(time_wait_s=t1 - t0, time_train_s=t2 - t1, time_step_s=time.time() - t0, _t1=t1,
                   weight_version=new, **{f"groups_{k}": v for k, v in pump.ctrl.state().items()},
                   **{"fault/generate_timeouts_total": pump.timeouts},
                   **run.recovery.metrics())
    return metrics, state


def async_train_loop(run: Run, on_step=None) -> tuple[list, dict]:
    """Train ``total_steps`` async steps (resuming per ``resume``); returns each step's mean
    reward and the ledger's counts (lost, duplicates, filtered, consumed, buffered, submitted)."""
    cfg = run.cfg
    injector = FaultInjector(cfg, run.actors)
    pump, start = start_pump(run)
    evals = evaluation.Evaluator(run)
    evals.start(start, pump)  # the initial weights, into row 0 (the pump runs meanwhile)
    if cfg.checkpoint.every and start == 0:  # what a trainer rank lost before the first interval restores
        state = snapshot(run, pump)
        steps.save_checkpoint(run, 0, state["sampler"], async_state=state)
    rewards, step, t_prev = [], start, time.time()
    try:
        while step < cfg.total_steps:
            injector.on_step(step)
            try:
                metrics, state = train_one(run, pump, step, t_prev)
            except Exception as err:  # noqa: BLE001 - a dead trainer rank: rebuild, restore, redo
                if not run.recovery.trainer_failed(err):
                    raise
                run.recovery.streak.failed(err, step)  # the same failure again: stop with it
                pump, step = rebuild(run, pump)
                del rewards[step - start:]
                continue
            t_prev = metrics.pop("_t1")
            metrics.update(injector.counts(run.recovery.events))
            metrics.update(evals.after_step(step, pump))  # eval/ fields, on the eval engine (or the pump held)
            run.recovery.streak.completed(step)
            run.logger.log(step, metrics)
            rewards.append(metrics["reward_mean"])
            if on_step:
                on_step(step, metrics)
            if state is not None:
                steps.save_checkpoint(run, step + 1, state["sampler"], async_state=state)
            step += 1
        drain(pump, cfg.async_rl.watchdog_s)
    finally:
        evals.close()
        pump.stop()
        pump.join(timeout=30)
    state = snapshot(run, pump)
    if rewards:  # the final checkpoint: drained, so nothing is in flight
        steps.save_checkpoint(run, cfg.total_steps, state["sampler"], async_state=state)
    ledger, buffered = pump.ledger, {g[0].group_id for g in state["buffer"]}
    counts = {"lost": ledger.lost(pump.running_groups(), buffered), "duplicates": ledger.duplicates(),
              "filtered": len(ledger.filtered), "consumed": len(ledger.consumed), "buffered": len(buffered),
              "submitted": len(ledger.submitted), "resumed_from_step": start}
    return rewards, counts
