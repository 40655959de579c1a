"""Trainer -> engines weight sync over the configured transport; every engine ends READY at the
new version (checked). Versions follow :mod:`miles_ray.versioning`. "Every engine" is the rollout
engines and the evaluation engines (:attr:`RunActors.eval_engines`): they serve the same version.

- object_store: trainer rank 0 yields its buckets into the object store; every engine loads the
  same objects (zero-copy reads on a node).
- broadcast: a torch.distributed group {trainer rank 0, engines} (gloo on CPU, NCCL on GPU),
  opened on first use; bucket metadata goes through Ray, data through the group.
- shm / cuda_ipc: same node; engines open handles to the trainer's persistent bucket buffers
  (POSIX shared memory on CPU, CUDA IPC on a GPU) and copy from them. Engines over HTTP with
  ``weight_sync.sglang_load_format=flattened_bucket`` never open them: the engine actor forwards
  each handle unopened inside SGLang's ``flattened_bucket`` payload and the server maps it
  (``miles_ray.weights.sglang_flattened``); cuda_ipc over HTTP needs that (config validation).

A restarted engine or a rebuilt trainer group loses the transport's state (group, handles):
:meth:`WeightSync.reset` makes the next sync open it again; :meth:`WeightSync.refit` loads a
version into some engines over the object store (works whatever state they are in).
"""
from __future__ import annotations

import time

import ray
from ray.actor import ActorHandle

from jobs.cluster import RunActors


class WeightSync:
    def __init__(self, actors: RunActors, transport: str):
        self.actors, self.transport = actors, transport
        self._opened = False

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
        served = getattr(self, f"_{self.transport}")(version)
        self._check(served, version)
        self._push_draft(version, self.targets)
        return time.time() - t0

    def refit(self, engines: list[ActorHandle], version: int) -> None:
        """Load ``version`` into ``engines`` over the object store (restarted or stale engines).
        Without trainer ranks (inference only) there is nothing to load."""
        if not self.actors.policy.actors:
            return
        self._check(self._stream(version, "object_store", engines), version)
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

    def _stream(self, version: int, mode: str, engines: list[ActorHandle] | None = None) -> list:
        """Forward each bucket (or handle) to every engine as soon as trainer rank 0 yields it."""
        engines = self.targets if engines is None else engines
        ranks = self.actors.policy.actors
        stream = ranks[0].stream_export.options(num_returns="streaming").remote(version, mode)
        others = [r.stream_export.options(num_returns="streaming").remote(version, mode) for r in ranks[1:]]
        for ref in stream:
            for e in engines:
                e.load_part.remote(ref)
        for gen in others:  # they yield nothing; wait for them to finish the gathers
            list(gen)
        return ray.get([e.finish_load.remote(version) for e in engines])

    def _object_store(self, version: int) -> list:
        return self._stream(version, "object_store")

    def _open_broadcast(self) -> None:
        rank0, engines = self.actors.policy.actors[0], self.targets
        addr, port = ray.get(rank0.master_address.remote())
        ranks = ray.get([e.broadcast_ranks.remote() for e in engines])  # a real SGLang: one rank per TP rank
        offsets = [1 + sum(ranks[:i]) for i in range(len(engines))]
        world = 1 + sum(ranks)
        ray.get([rank0.open_broadcast.remote(addr, port, world)] +
                [e.open_broadcast.remote(addr, port, off, world) for off, e in zip(offsets, engines)])
        self._opened = True

    def _broadcast(self, version: int) -> list:
        if not self._opened:
            self._open_broadcast()
        metas = self.actors.policy.get(self.actors.policy.call("prepare_broadcast", version))[0]
        send = self.actors.policy.actors[0].send_broadcast.remote()
        served = ray.get([e.receive_broadcast.remote(metas, version) for e in self.targets])
        ray.get(send)
        return served

    def _handles(self, version: int, device: str) -> list:
        if not self._opened:
            nodes = ray.get([a.where.remote() for a in [self.actors.policy.actors[0], *self.targets]])
            if len({n["node_id"] for n in nodes}) > 1:
                raise RuntimeError(f"weight_sync.transport={self.transport} needs the engines on the node of trainer "
                                   "rank 0; use object_store or broadcast across nodes")
            self._opened = True
        return self._stream(version, device)

    def _shm(self, version: int) -> list:
        return self._handles(version, "cpu")

    def _cuda_ipc(self, version: int) -> list:
        return self._handles(version, "cuda")
