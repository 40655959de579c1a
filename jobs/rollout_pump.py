"""The async driver's rollout pump: a thread that keeps the engines busy within the staleness bound.

While the :class:`StalenessController` has capacity, it takes prompts, sends one chunk per engine
(a streaming call: each group comes back as soon as its samples are done), sends each finished
group to a reward worker at once (scoring overlaps generation; the pump never blocks on it), keeps
or filters each scored group (dynamic sampling; a filtered group gives its slot back, so the pump
refills) and puts kept groups in the BufferActor in the order they were submitted (a group that
finishes early waits for the earlier ones: :class:`AdmissionOrder`, without which the staleness
bound does not hold per group).
A dead engine or reward worker is recovered in place (:meth:`Recovery.get`); an engine whose call
runs past ``rollout.request_timeout_s`` is hung: it is restarted and the call regenerated.

Invariant (checked by :class:`GroupLedger` and the controller):
``submitted = consumed + filtered + buffered + running``, where running groups are being generated
(``inflight``), scored (``scoring``) or held for an earlier group (``order.held``).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time

import ray

from jobs import steps
from jobs.context import Run
from jobs.recovery import is_actor_failure
from miles_ray import versioning
from miles_ray.async_rl import GROUP_FILTERS, AdmissionOrder, StalenessController
from miles_ray.ledger import GroupLedger

log = logging.getLogger("miles_ray.rollout_pump")


class RolloutPump(threading.Thread):
    def __init__(self, run: Run):
        super().__init__(name="rollout-pump", daemon=True)
        self.ctx = run
        cfg = run.cfg
        self.ctrl = StalenessController(cfg.async_rl.staleness, cfg.rollout.prompts_per_step)
        self.keep = GROUP_FILTERS.get_fn(cfg.async_rl.filter)
        self.lock = threading.Lock()
        self.served = versioning.INITIAL  # weight version the engines serve (admission counts its steps)
        self.next_group = 0
        self.inflight: dict = {}  # stream -> (engine index, requests, start time, group ids yielded)
        self.scoring: dict = {}  # reward ref -> (worker index, samples, requests)
        self.order = AdmissionOrder()  # kept groups enter the buffer in submission order
        self.next_worker = -1  # round robin over the reward workers
        self.expired: set = set()  # in-flight refs past rollout.request_timeout_s (their engine was killed)
        self.timeouts = 0  # calls that ran past it, since the pump started
        self.resend: list = []  # requests of a checkpoint's in-flight groups: sent before new prompts
        self.submitting = True  # False: drain (finish in-flight groups, take no new prompts)
        self.ledger = GroupLedger()
        self.last_progress = time.time()
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._work = threading.Lock()  # held for one iteration; held() takes it between two
        self._want = threading.Event()

    def set_version(self, version: int) -> None:
        """The engines now serve weight ``version``: admission widens by one batch per version."""
        with self.lock:
            self.served = version

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
            self.submit_admitted()
        head = next(iter(self.scoring), None)  # groups enter the buffer in the order they were generated
        refs = list(self.inflight) + ([head] if head is not None else [])
        if not refs:
            return False
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
        for ref in ready:
            if ref in self.inflight:
                self._collect(ref)
        self._accept_scored()
        self._expire()
        return True

    def _accept_scored(self) -> None:
        """Scored groups, oldest generation first: a group whose scoring is slow (its reward worker
        restarting) holds back the ones generated after it, as the staleness bound assumes (a group
        never overtakes an earlier one into the buffer)."""
        while self.scoring:
            head = next(iter(self.scoring))
            done, _ = ray.wait([head], num_returns=1, timeout=0)
            if not done:
                return
            self._scored(head)

    def _expire(self) -> None:
        """A call past ``rollout.request_timeout_s``: its engine is hung. It is killed once (Ray
        restarts it); :meth:`_collect` then sees the call fail and regenerates the chunk on the
        restarted, refit engine (:meth:`Recovery.get`)."""
        limit, now = self.ctx.cfg.rollout.request_timeout_s, time.time()
        for ref, (i, chunk, t0, _) in self.inflight.items():
            if now - t0 > limit and ref not in self.expired:
                log.warning("rollout-%d did not answer within rollout.request_timeout_s=%gs (hung): restarting it; "
                            "its %d groups are generated again", i, limit, len(chunk))
                self.expired.add(ref)
                self.timeouts += 1
                ray.kill(self.ctx.actors.engines[i], no_restart=False)

    def submit_admitted(self) -> None:
        """Submit as many new groups as the staleness bound admits (at most one batch). Called by
        the pump thread, or by the driver with the pump :meth:`held`."""
        with self.lock:
            trained = versioning.steps_of(self.served)
            k = min(self.ctrl.capacity(trained), self.ctx.cfg.rollout.prompts_per_step)
            if k <= 0:
                return
            self.ctrl.submit(k, trained)
        reqs = steps.requests_for(self.ctx.sampler.next_batch(k), self.next_group)
        self.next_group += k
        self.ledger.submitted.update(r["group_id"] for r in reqs)
        self.order.submit(r["group_id"] for r in reqs)
        self._send(reqs)

    def _send(self, reqs: list) -> None:
        engines, run = self.ctx.actors.engines, self.ctx
        per_engine = [[] for _ in engines]
        for r in reqs:
            per_engine[r["group_id"] % len(engines)].append(r)
        for i, chunk in enumerate(per_engine):
            if chunk:
                self._stream(i, chunk)

    def _stream(self, i: int, chunk: list) -> None:
        run = self.ctx
        stream = run.actors.engines[i].generate_stream.options(num_returns="streaming").remote(
            chunk, run.cfg.rollout.n_samples_per_prompt, run.params)
        self.inflight[stream] = (i, chunk, time.time(), set())

    def _collect(self, stream) -> None:
        """The next group of a ready stream: to a reward worker. A dead (or killed, hung) engine:
        wait for its restart and refit, then re-send the groups it had not yielded."""
        i, chunk, _, done = self.inflight[stream]
        try:
            samples = ray.get(next(stream))
        except StopIteration:
            self._drop(stream)
            return
        except Exception as err:  # noqa: BLE001 - only actor failures are recovered
            if not is_actor_failure(err):
                raise
            self._drop(stream)
            t0 = time.time()
            self.ctx.recovery.restore("rollout", i)
            self.ctx.recovery.record(time.time() - t0, "rollout", i)
            left = [r for r in chunk if r["group_id"] not in done]
            log.warning("rollout-%d recovered in %.1fs; re-sending the %d of its %d groups it had not returned", i,
                        time.time() - t0, len(left), len(chunk))
            if left:
                self._stream(i, left)
            return
        done.update(s.group_id for s in samples)
        workers = self.ctx.actors.rewards
        w = self.next_worker = (self.next_worker + 1) % len(workers)
        reqs = [r for r in chunk if r["group_id"] in {s.group_id for s in samples}]
        self.scoring[workers[w].score.remote(samples)] = (w, samples, reqs)

    def _drop(self, stream) -> None:
        self.inflight.pop(stream, None)
        self.expired.discard(stream)

    def _scored(self, ref) -> None:
        w, generated, requests = self.scoring.pop(ref)
        run = self.ctx
        workers = run.actors.rewards
        samples, _ = run.recovery.get(ref, lambda: workers[w].score.remote(generated), "reward", w)
        if self._halt.is_set():  # stopped meanwhile (a trainer rebuild clears the buffer): keep out
            return
        groups = collections.defaultdict(list)
        for s in samples:
            groups[s.group_id].append(s)
        for gid, group in groups.items():
            reqs = [r for r in requests if r["group_id"] == gid]
            if self.keep(group):
                self._buffer(self.order.kept(gid, (group, reqs)))
            else:
                self.ledger.filtered.add(gid)
                with self.lock:
                    self.ctrl.filter()
                self._buffer(self.order.filtered(gid))
        self.last_progress = time.time()

    def _buffer(self, released: list) -> None:
        """Kept groups whose turn came (:class:`AdmissionOrder`), into the buffer in admission order."""
        for gid, (group, _) in released:
            ray.get(self.ctx.actors.buffer.put_group.remote(group))
            self.ledger.accepted.add(gid)
            with self.lock:
                self.ctrl.accept()

    def _running_requests(self) -> list:
        """Requests not in the buffer yet: being generated, being scored, or waiting to be re-sent."""
        generating = [r for _, reqs, _, done in self.inflight.values() for r in reqs if r["group_id"] not in done]
        held = [r for _, reqs in self.order.held.values() for r in reqs]
        return generating + [r for _, _, reqs in self.scoring.values() for r in reqs] + held + list(self.resend)

    def running_groups(self) -> set:
        return {r["group_id"] for r in self._running_requests()}

    def idle(self) -> bool:
        return not self.inflight and not self.scoring and not self.resend and not self.order.held

    def state_dict(self) -> dict:
        """Call inside :meth:`held` (or with the pump stopped)."""
        inflight = self._running_requests()
        return {"next_group": self.next_group, "ctrl": self.ctrl.state(), "sampler": self.ctx.sampler.state_dict(),
                "inflight": sorted(inflight, key=lambda r: r["group_id"]), "ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Before :meth:`start`: in-flight groups of the checkpoint are re-sent first."""
        self.next_group, self.resend = state["next_group"], list(state["inflight"])
        self.order.submit(r["group_id"] for r in self.resend)
        self.ctrl.load_state(state["ctrl"])
        self.ledger = GroupLedger.from_state(state["ledger"])
        self.ctx.sampler.load_state_dict(state["sampler"])

    def report(self) -> str:
        now = time.time()
        calls = [f"rollout-{i}: generate groups {reqs[0]['group_id']}..{reqs[-1]['group_id']} running for "
                 f"{now - t0:.0f}s" for i, reqs, t0, _ in self.inflight.values()]
        calls += [f"reward-{w}: scoring {len(samples)} samples" for w, samples, _ in self.scoring.values()]
        if self.order.held:
            calls.append(f"{len(self.order.held)} scored groups wait for group {self.order.waiting_for()} (admission order)")
        return "; ".join(calls) or "no generation in flight (staleness bound reached, buffer short of a batch)"
