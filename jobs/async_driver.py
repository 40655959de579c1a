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

Checkpoints (``checkpoint.every``, and always at the end): the sync driver's contents plus the pump
state, taken while the pump is held between two iterations: buffered groups (generated, scored, not
trained on), the requests of in-flight groups (re-sent on resume: regenerated with the weights of
the checkpoint), the staleness counters, the group ledger and the next group id. The final
checkpoint is taken after a drain (no new prompts, in-flight groups finish into the buffer), so it
holds no in-flight work.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field

import ray

from jobs import checkpointing
from jobs.cluster import RunActors
from jobs.faults import (FaultInjector, Recovery, latest_checkpoint, ledger_metrics, respawn_trainers, sync_resilient,
                         trainer_failed)
from jobs.sync_driver import learn, rollout_metrics, score, speculation_metrics
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

    def lost(self, running: set, buffered: set | None = None) -> int:
        """Groups that are nowhere: not trained on, filtered, buffered (``buffered``: the buffer's
        actual contents; default: accepted and not consumed) or running."""
        consumed = set(self.consumed)
        buffered = self.accepted - consumed if buffered is None else set(buffered)
        return len(self.submitted - consumed - self.filtered - buffered - running)

    def duplicates(self) -> int:
        return len(self.consumed) - len(set(self.consumed))

    def state_dict(self) -> dict:
        return {"submitted": sorted(self.submitted), "filtered": sorted(self.filtered),
                "accepted": sorted(self.accepted), "consumed": list(self.consumed)}

    @classmethod
    def from_state(cls, state: dict) -> "Ledger":
        return cls(set(state["submitted"]), set(state["filtered"]), set(state["accepted"]), list(state["consumed"]))


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
        self.inflight: dict = {}  # ref -> (engine index, requests, start time)
        self.resend: list = []  # requests of a checkpoint's in-flight groups: sent before new prompts
        self.submitting = True  # False: drain (finish in-flight groups, take no new prompts)
        self.ledger = Ledger()
        self.last_progress = time.time()
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._work = threading.Lock()  # held for one iteration; held() takes it between two
        self._want = threading.Event()

    def set_version(self, version: int) -> None:
        with self.lock:
            self.version = version

    def stop(self) -> None:
        self._halt.set()

    @contextlib.contextmanager
    def held(self):
        """The pump parked between two iterations: its state, the buffer and the sampler agree."""
        self._want.set()
        with self._work:
            self._want.clear()
            yield

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                if self._want.is_set():
                    time.sleep(0.002)
                    continue
                with self._work:
                    busy = self._iterate()
                if not busy:
                    time.sleep(0.01)
        except BaseException as err:  # noqa: BLE001 - reported by the train pump
            self.error = err

    def _iterate(self) -> bool:
        if self.resend:
            self._send(self.resend)
            self.resend = []
        if self.submitting:
            self._submit()
        refs = list(self.inflight)
        if not refs:
            return False
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
        for ref in ready:
            self._collect(ref)
        return True

    def _submit(self) -> None:
        with self.lock:
            k = min(self.ctrl.capacity(self.version), self.cfg.rollout.prompts_per_step)
            if k <= 0:
                return
            self.ctrl.submit(k, self.version)
        reqs = []
        for p in self.sampler.next_batch(k):
            gid, self.next_group = self.next_group, self.next_group + 1
            self.ledger.submitted.add(gid)
            reqs.append({"prompt": p.prompt, "label": p.label, "prompt_index": p.index, "group_id": gid})
        self._send(reqs)

    def _send(self, reqs: list) -> None:
        engines = self.actors.engines
        per_engine = [[] for _ in engines]
        for r in reqs:
            per_engine[r["group_id"] % len(engines)].append(r)
        for i, chunk in enumerate(per_engine):
            if chunk:
                ref = engines[i].generate.remote(chunk, self.cfg.rollout.n_samples_per_prompt, self.params)
                self.inflight[ref] = (i, chunk, time.time())

    def _collect(self, ref) -> None:
        i, chunk, _ = self.inflight.pop(ref)
        n = self.cfg.rollout.n_samples_per_prompt
        # a dead engine: wait for its restart, refit it, generate the chunk again (score does the
        # same for reward workers)
        generated = self.actors.recovery.get(
            ref, lambda: self.actors.engines[i].generate.remote(chunk, n, self.params), "rollout", i)
        samples, _ = score(self.actors, generated)
        if self._halt.is_set():  # stopped meanwhile (a trainer rebuild clears the buffer): keep out
            return
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
        return {r["group_id"] for _, reqs, _ in self.inflight.values() for r in reqs} | \
            {r["group_id"] for r in self.resend}

    def state_dict(self) -> dict:
        """Call inside :meth:`held` (or with the pump stopped)."""
        inflight = [r for _, reqs, _ in self.inflight.values() for r in reqs] + self.resend
        return {"next_group": self.next_group, "ctrl": self.ctrl.state(), "sampler": self.sampler.state_dict(),
                "inflight": sorted(inflight, key=lambda r: r["group_id"]), "ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Before :meth:`start`: in-flight groups of the checkpoint are re-sent first."""
        self.next_group, self.resend = state["next_group"], list(state["inflight"])
        for key, value in state["ctrl"].items():
            setattr(self.ctrl, key, value)
        self.ctrl.check()
        self.ledger = Ledger.from_state(state["ledger"])
        self.sampler.load_state_dict(state["sampler"])

    def report(self) -> str:
        now = time.time()
        calls = [f"rollout-{i}: generate groups {reqs[0]['group_id']}..{reqs[-1]['group_id']} running for "
                 f"{now - t0:.0f}s" for i, reqs, t0 in self.inflight.values()]
        return "; ".join(calls) or "no generation in flight (staleness bound reached, buffer short of a batch)"


def _check(pump: RolloutPump, watchdog_s: float, waiting_for: str) -> None:
    if pump.error is not None:
        raise RuntimeError(f"rollout pump failed: {pump.error!r}") from pump.error
    if time.time() - pump.last_progress > watchdog_s:
        raise RuntimeError(f"stall: no rollout progress for {watchdog_s:.0f}s while {waiting_for}; {pump.report()}")


def wait_for_batch(pump: RolloutPump, actors: RunActors, groups: int, watchdog_s: float) -> None:
    while ray.get(actors.buffer.size.remote()) < groups:
        _check(pump, watchdog_s, f"the trainer waits for {groups} groups")
        time.sleep(0.01)


def drain(pump: RolloutPump, watchdog_s: float) -> None:
    """End of run: admit what the staleness bound allows, then take no new prompts, let in-flight
    groups finish into the buffer and stop the pump. The final checkpoint then holds every admitted
    group in the buffer ((S + 1) batches without filtering) and nothing in flight."""
    with pump.held():
        pump._submit()
        pump.submitting = False
    while True:
        with pump.held():
            if not pump.inflight and not pump.resend:
                break
        _check(pump, watchdog_s, "the run drains in-flight groups before its final checkpoint")
        time.sleep(0.01)
    pump.stop()
    pump.join(timeout=30)


def staleness_metrics(samples: list, trained_version: int, bound: int) -> dict:
    lags = [trained_version - s.weight_version for s in samples]
    worst = max(lags)
    if worst > bound:
        raise AssertionError(f"staleness bound violated: a sample lags {worst} versions > async_rl.staleness={bound}")
    hist = collections.Counter(lags)
    return {"staleness_max": worst, "staleness_mean": sum(lags) / len(lags),
            **{f"staleness_frac_{k}": hist[k] / len(lags) for k in range(bound + 1)}}


def snapshot(pump: RolloutPump, actors: RunActors, version: int | None = None) -> dict:
    """Pump state plus the buffer's groups, with the pump parked. Mid-run (``version``: the new
    policy version, raised here) the pump first submits what the raised bound admits: those groups
    are in flight in every mid-run checkpoint, whatever the thread timing."""
    with pump.held():
        if version is not None:
            pump.set_version(version)
        if pump.submitting and pump.is_alive():
            pump._submit()
        return {**pump.state_dict(), "buffer": ray.get(actors.buffer.snapshot.remote())}


def resume(cfg, actors: RunActors, sampler, pump: RolloutPump, path=None) -> int:
    """Restore a checkpoint (``path``, else the one ``resume`` names) into the actors and the pump;
    returns the step."""
    path = path or checkpointing.find(cfg)
    if path is None:
        return 0
    meta = checkpointing.restore(cfg, actors, sampler, path)
    state = checkpointing.load_async_state(path)
    if state is None:  # a synchronous checkpoint: nothing buffered or in flight, group ids go on
        done = meta["step"] * cfg.rollout.prompts_per_step
        state = {"next_group": done, "inflight": [], "buffer": [], "sampler": meta["sampler"],
                 "ctrl": {"submitted": done, "accepted": done, "filtered": 0, "running": 0},
                 "ledger": {"submitted": range(done), "filtered": [], "accepted": range(done), "consumed": range(done)}}
    for group in state["buffer"]:
        ray.get(actors.buffer.put_group.remote(group))
    pump.load_state_dict(state)
    return meta["step"]


def sync(weights: WeightSync, actors: RunActors, version: int) -> float:
    """Weight sync under the recovery lock (the rollout thread may be refitting a restarted engine),
    surviving an engine that dies during it; afterwards restarted engines are refit to ``version``."""
    with actors.recovery.sync_lock:
        seconds = sync_resilient(weights, version, actors.recovery)
        actors.recovery.version = version
    return seconds


def start_pump(cfg, actors: RunActors, sampler, tokenizer, weights, path=None) -> tuple[RolloutPump, int]:
    """A rollout pump restored from a checkpoint (if any), engines refit, running."""
    pump = RolloutPump(cfg, actors, sampler, tokenizer)
    step = resume(cfg, actors, sampler, pump, path)
    sync(weights, actors, step + 1)
    pump.set_version(step)
    pump.start()
    return pump, step


def rebuild(cfg, actors: RunActors, sampler, tokenizer, weights, logger, pump) -> tuple[RolloutPump, int]:
    """A trainer rank died: stop the pump, start a new trainer group, clear the buffer and restore
    the latest checkpoint into trainers, sampler, buffer and a new pump (its in-flight groups are
    generated again); metrics rows after it are rewound."""
    path, t0 = latest_checkpoint(cfg), time.time()
    pump.stop()
    pump.join(timeout=60)
    respawn_trainers(actors)
    ray.get(actors.buffer.clear.remote())
    weights._opened = False  # the broadcast group belonged to the old rank 0
    pump, step = start_pump(cfg, actors, sampler, tokenizer, weights, path)
    logger.rewind(step)
    actors.recovery.count += 1
    actors.recovery.seconds.append(time.time() - t0)
    return pump, step


def train_one(cfg, actors: RunActors, pump: RolloutPump, weights, step: int, t_prev: float) -> tuple[dict, dict | None]:
    """One async step: take a batch, train (policy, critic, draft), sync; a mid-run checkpoint's
    state is returned (saved by the caller after logging)."""
    t0 = time.time()
    wait_for_batch(pump, actors, cfg.rollout.prompts_per_step, cfg.async_rl.watchdog_s)
    t1 = time.time()
    groups = ray.get(actors.buffer.get_groups.remote(cfg.rollout.prompts_per_step, "oldest_version"))
    samples = [s for g in groups for s in g]
    pump.ledger.consumed += [g[0].group_id for g in groups]
    metrics = {**rollout_metrics(samples), **staleness_metrics(samples, step + 1, cfg.async_rl.staleness),
               **ledger_metrics(samples), **speculation_metrics(cfg, actors, samples, t1 - t_prev)}
    metrics.update(learn(cfg, actors, samples))
    t2 = time.time()
    metrics["time_sync_s"] = sync(weights, actors, step + 2)  # engines pause, load, resume in-flight requests
    every = cfg.checkpoint.every
    state = None
    if every and (step + 1) % every == 0 and step + 1 < cfg.total_steps:
        state = snapshot(pump, actors, version=step + 1)
    else:
        pump.set_version(step + 1)
    metrics.update(time_wait_s=t1 - t0, time_train_s=t2 - t1, time_step_s=time.time() - t0, _t1=t1,
                   weight_version=step + 2, **{f"groups_{k}": v for k, v in pump.ctrl.state().items()},
                   **actors.recovery.metrics())
    return metrics, state


def async_train_loop(cfg, actors: RunActors, sampler, logger, tokenizer, on_step=None) -> tuple[list, dict]:
    weights = WeightSync(actors, cfg.weight_sync.transport)
    actors.recovery, injector = Recovery(actors), FaultInjector(cfg, actors)
    pump, start = start_pump(cfg, actors, sampler, tokenizer, weights)
    rewards, step, t_prev = [], start, time.time()
    try:
        while step < cfg.total_steps:
            injector.on_step(step)
            try:
                metrics, state = train_one(cfg, actors, pump, weights, step, t_prev)
            except Exception as err:  # noqa: BLE001 - a dead trainer rank: rebuild, restore, redo
                if not trainer_failed(actors, err):
                    raise
                pump, step = rebuild(cfg, actors, sampler, tokenizer, weights, logger, pump)
                del rewards[step - start:]
                continue
            t_prev = metrics.pop("_t1")
            logger.log(step, metrics)
            rewards.append(metrics["reward_mean"])
            if on_step:
                on_step(step, metrics)
            if state is not None:
                checkpointing.save(cfg, actors, state["sampler"], step + 1, step + 2, async_state=state)
            step += 1
        drain(pump, cfg.async_rl.watchdog_s)
    finally:
        pump.stop()
        pump.join(timeout=30)
    state = snapshot(pump, actors)
    if rewards:  # the final checkpoint: drained, so nothing is in flight
        checkpointing.save(cfg, actors, state["sampler"], cfg.total_steps, cfg.total_steps + 1, async_state=state)
    ledger, buffered = pump.ledger, {g[0].group_id for g in state["buffer"]}
    counts = {"lost": ledger.lost(pump.running_groups(), buffered), "duplicates": ledger.duplicates(),
              "filtered": len(ledger.filtered), "consumed": len(ledger.consumed), "buffered": len(buffered),
              "submitted": len(ledger.submitted), "resumed_from_step": start}
    return rewards, counts
