"""Trainer -> engines weight sync over the configured transport; every engine ends READY at the
new version (checked). Versions follow :mod:`miles_ray.versioning`. "Every engine" is the rollout
engines and the evaluation engines (:attr:`RunActors.eval_engines`): they serve the same version.

One driver for every transport (:class:`miles_ray.weights.transport.WeightTransport`, named by
``weight_sync.transport``: a registered name or ``pkg.module:Class``): the set-up plan on the first
sync (places -> open arguments -> open on trainer rank 0 and every engine), then per version the
payloads trainer rank 0 streams, each forwarded to every engine as soon as it is yielded, then
``finish_load`` (complete, READY). What moves and how is the transport's business (its module in
``miles_ray/weights/``); the actors only hold each side's instance.

Engine servers (HTTP: SGLang or our stand-in) get SGLang's update protocol around the stream
(:mod:`miles_ray.rollout.sglang.protocol`): ``pause`` (the version's mode: retract for partial
rollout, else abort; plus ``/begin_weight_update`` where the version has sessions), the payloads,
``finish_load`` (end session, ``/flush_cache`` counted in :attr:`WeightSync.cache_flushes`, new
version with ``abort_all_requests=false``), ``resume``. In-actor engines load between decode steps.

A restarted engine or a rebuilt trainer group loses the transport's state (group, handles):
:meth:`WeightSync.reset` makes the next sync open it again; :meth:`WeightSync.refit` loads a
version into some engines over the object store (works whatever state they are in).
"""
from __future__ import annotations

import time

import ray
from ray.actor import ActorHandle

from jobs.cluster import RunActors
from miles_ray.weights.registry import weight_transport

REFIT_TRANSPORT = "object_store"  # needs no set-up: reaches engines in any state


class WeightSync:
    def __init__(self, actors: RunActors, transport: str):
        self.actors, self.transport = actors, transport
        self.kind = weight_transport(transport)  # an unknown name or a bad import path fails here
        self._opened = False
        self.cache_flushes = 0  # prefix-cache flushes of engine servers, one per server per update

    @property
    def targets(self) -> list[ActorHandle]:
        """The engines every sync loads: rollout engines, then evaluation engines."""
        return [*self.actors.engines, *self.actors.eval_engines]

    def reset(self) -> None:
        """Open the transport's group / handles again on the next sync."""
        self._opened = False

    def sync(self, version: int) -> float:
        """Push ``version`` to every engine (and the online draft's weights); returns seconds."""
        t0 = time.time()
        if not self.actors.engines or not self.actors.policy.actors:
            return 0.0  # training from a dump, or pure inference: nothing to sync
        if not self._opened:
            self._open(self.targets)
            self._opened = True
        self._check(self._stream(version, self.transport, self.targets), version)
        self._push_draft(version, self.targets)
        return time.time() - t0

    def refit(self, engines: list[ActorHandle], version: int) -> None:
        """Load ``version`` into ``engines`` over the object store (restarted or stale engines).
        Without trainer ranks (inference only) there is nothing to load."""
        if not self.actors.policy.actors:
            return
        self._check(self._stream(version, REFIT_TRANSPORT, engines), version)
        self._push_draft(version, engines)

    @staticmethod
    def _check(served: list, version: int) -> None:
        if any(v != version for v in served):
            raise RuntimeError(f"engines serve weight versions {served} after syncing version {version}")

    def _push_draft(self, version: int, engines: list[ActorHandle]) -> None:
        """The online draft's latest weights, with the policy weights (the draft is small: one
        object-store copy, read by every engine)."""
        if self.actors.draft is None:
            return
        weights = self.actors.draft.get_weights.remote()
        ray.get([e.load_draft.remote(weights, version) for e in engines])

    def _open(self, engines: list[ActorHandle]) -> None:
        """The transport's set-up: every party's place -> the plan -> open on all of them at once
        (a collective group forms while they wait for each other)."""
        rank0, name = self.actors.policy.actors[0], self.transport
        places = ray.get([rank0.transport_place.remote(name)] + [e.transport_place.remote(name) for e in engines])
        plan = self.kind.plan(places[0], places[1:])
        if plan is None:
            return
        sender, receivers = plan
        ray.get([rank0.open_transport.remote(name, sender)] +
                [e.open_transport.remote(name, args) for e, args in zip(engines, receivers)])

    def _stream(self, version: int, name: str, engines: list[ActorHandle]) -> list:
        """The update protocol around :meth:`_forward` for engine servers (pause ... resume)."""
        servers = [e for e, url in zip(engines, ray.get([e.url.remote() for e in engines])) if url]
        ray.get([e.pause.remote() for e in servers])
        try:
            served = self._forward(version, name, engines)
        finally:
            ray.get([e.resume.remote() for e in servers])
        self.cache_flushes += len(servers)
        return served

    def _forward(self, version: int, name: str, engines: list[ActorHandle]) -> list:
        """Forward each payload to every engine as soon as trainer rank 0 yields it."""
        ranks = self.actors.policy.actors
        stream = ranks[0].stream_export.options(num_returns="streaming").remote(version, name)
        others = [r.stream_export.options(num_returns="streaming").remote(version, name) for r in ranks[1:]]
        for ref in stream:
            for e in engines:
                e.load_part.remote(name, ref)
        for gen in others:  # they yield nothing; wait for them to finish the gathers
            list(gen)
        return ray.get([e.finish_load.remote(version) for e in engines])
