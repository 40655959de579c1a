"""Async off-policy driver: a rollout pump (thread) keeps the engines busy while the train pump
(main thread) trains on buffered groups; a staleness bound keeps the two within S versions.

Rollout pump: while the :class:`StalenessController` has capacity, take prompts, send one chunk
per engine, score finished chunks on the reward workers, keep or filter each group (dynamic
sampling; a filtered group gives its slot back, so the pump refills) and put kept groups in the
BufferActor.
Train pump: take ``prompts_per_step`` groups, train (the same ``learn`` as the sync driver, with
decoupled-PPO importance weights when configured), sync weights - engines pause between decode
steps, load, and resume unfinished requests (partial rollout) - and only then raise the version.

Versions: after k train steps the trainer holds weights k + 1 (version 1 = initial weights, as in
the sync driver). A sample's staleness = trained version - version of its first token <= S.
With S = 0 the schedule, and the metrics, equal the synchronous driver's.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import ray

from jobs.cluster import RunActors
from jobs.sync_driver import learn, rollout_metrics, score
from jobs.weight_sync import WeightSync
from miles_ray.async_rl import GROUP_FILTERS, StalenessController
from miles_ray.rollout import SamplingParams


@dataclass
class Ledger:
    """Where every group went: submitted = consumed + filtered + buffered + running (checked)."""
    submitted: set = field(default_factory=set)
    filtered: set = field(default_factory=set)
    accepted: set = field(default_factory=set)
    consumed: list = field(default_factory=list)

    def lost(self, running: set) -> int:
        consumed = set(self.consumed)
        return len(self.submitted - consumed - self.filtered - (self.accepted - consumed) - running)

    def duplicates(self) -> int:
        return len(self.consumed) - len(set(self.consumed))


class RolloutPump(threading.Thread):
    def __init__(self, cfg, actors: RunActors, sampler, tokenizer):
        super().__init__(name="rollout-pump", daemon=True)
        self.cfg, self.actors, self.sampler = cfg, actors, sampler
        self.params = SamplingParams.from_config(cfg.rollout)
        a = cfg.async_rl
        self.ctrl = StalenessController(a.staleness, cfg.rollout.prompts_per_step)
        self.keep = GROUP_FILTERS.get_fn(a.filter)
        self.lock = threading.Lock()
        self.version = 0  # train steps whose weights the engines already serve
        self.next_group = 0
        self.inflight: dict = {}  # ref -> (engine index, group ids, start time)
        self.ledger = Ledger()
        self.last_progress = time.time()
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def set_version(self, version: int) -> None:
        with self.lock:
            self.version = version

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self._submit()
                refs = list(self.inflight)
                if not refs:
                    time.sleep(0.01)
                    continue
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
                for ref in ready:
                    self._collect(ref)
        except BaseException as err:  # noqa: BLE001 - reported by the train pump
            self.error = err

    def _submit(self) -> None:
        with self.lock:
            k = min(self.ctrl.capacity(self.version), self.cfg.rollout.prompts_per_step)
            if k <= 0:
                return
            self.ctrl.submit(k, self.version)
        engines = self.actors.engines
        per_engine = [[] for _ in engines]
        for p in self.sampler.next_batch(k):
            gid, self.next_group = self.next_group, self.next_group + 1
            self.ledger.submitted.add(gid)
            per_engine[gid % len(engines)].append(
                {"prompt": p.prompt, "label": p.label, "prompt_index": p.index, "group_id": gid})
        for i, reqs in enumerate(per_engine):
            if reqs:
                ref = engines[i].generate.remote(reqs, self.cfg.rollout.n_samples_per_prompt, self.params)
                self.inflight[ref] = (i, [r["group_id"] for r in reqs], time.time())

    def _collect(self, ref) -> None:
        self.inflight.pop(ref)
        samples, _ = score(self.actors, ray.get(ref))
        groups = collections.defaultdict(list)
        for s in samples:
            groups[s.group_id].append(s)
        for gid, group in groups.items():
            if self.keep(group):
                ray.get(self.actors.buffer.put_group.remote(group))
                self.ledger.accepted.add(gid)
                with self.lock:
                    self.ctrl.accept()
            else:
                self.ledger.filtered.add(gid)
                with self.lock:
                    self.ctrl.filter()
        self.last_progress = time.time()

    def running_groups(self) -> set:
        return {g for _, gids, _ in self.inflight.values() for g in gids}

    def report(self) -> str:
        now = time.time()
        calls = [f"rollout-{i}: generate groups {gids[0]}..{gids[-1]} running for {now - t0:.0f}s"
                 for i, gids, t0 in self.inflight.values()]
        return "; ".join(calls) or "no generation in flight (staleness bound reached, buffer short of a batch)"


def wait_for_batch(pump: RolloutPump, actors: RunActors, groups: int, watchdog_s: float) -> None:
    while ray.get(actors.buffer.size.remote()) < groups:
        if pump.error is not None:
            raise RuntimeError(f"rollout pump failed: {pump.error!r}") from pump.error
        if time.time() - pump.last_progress > watchdog_s:
            raise RuntimeError(f"stall: no rollout progress for {watchdog_s:.0f}s while the trainer waits for "
                               f"{groups} groups; {pump.report()}")
        time.sleep(0.01)


def staleness_metrics(samples: list, trained_version: int, bound: int) -> dict:
    lags = [trained_version - s.weight_version for s in samples]
    worst = max(lags)
    if worst > bound:
        raise AssertionError(f"staleness bound violated: a sample lags {worst} versions > async_rl.staleness={bound}")
    hist = collections.Counter(lags)
    return {"staleness_max": worst, "staleness_mean": sum(lags) / len(lags),
            **{f"staleness_frac_{k}": hist[k] / len(lags) for k in range(bound + 1)}}


def async_train_loop(cfg, actors: RunActors, sampler, logger, tokenizer, on_step=None) -> tuple[list, dict]:
    weights = WeightSync(actors, cfg.weight_sync.transport)
    weights.sync(1)
    pump = RolloutPump(cfg, actors, sampler, tokenizer)
    pump.start()
    rewards, batch = [], cfg.rollout.prompts_per_step
    try:
        for step in range(cfg.total_steps):
            t0 = time.time()
            wait_for_batch(pump, actors, batch, cfg.async_rl.watchdog_s)
            t1 = time.time()
            groups = ray.get(actors.buffer.get_groups.remote(batch, "oldest_version"))
            samples = [s for g in groups for s in g]
            pump.ledger.consumed += [g[0].group_id for g in groups]
            metrics = {**rollout_metrics(samples), **staleness_metrics(samples, step + 1, cfg.async_rl.staleness)}
            metrics.update(learn(cfg, actors, samples))
            t2 = time.time()
            metrics["time_sync_s"] = weights.sync(step + 2)  # engines pause, load, resume in-flight requests
            pump.set_version(step + 1)
            metrics.update(time_wait_s=t1 - t0, time_train_s=t2 - t1, time_step_s=time.time() - t0,
                           weight_version=step + 2, **{f"groups_{k}": v for k, v in pump.ctrl.state().items()})
            logger.log(step, metrics)
            rewards.append(metrics["reward_mean"])
            if on_step:
                on_step(step, metrics)
    finally:
        pump.stop()
        pump.join(timeout=30)
    ledger = pump.ledger
    counts = {"lost": ledger.lost(pump.running_groups()), "duplicates": ledger.duplicates(),
              "filtered": len(ledger.filtered), "consumed": len(ledger.consumed)}
    return rewards, counts
