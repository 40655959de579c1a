"""Trainer -> engines weight sync over the configured transport; every engine ends READY at the
new version (checked).

- object_store: trainer rank 0 returns its buckets once into the object store; every engine
  loads the same object (zero-copy reads on a node).
- broadcast: a torch.distributed group {trainer rank 0, engines} (gloo on CPU, NCCL on GPU),
  opened on first use; bucket metadata goes through Ray, data through the group.
- cuda_ipc: colocated on one GPU; engines open CUDA IPC handles of the trainer's buckets.
"""
from __future__ import annotations

import time

import ray

from jobs.cluster import RunActors


class WeightSync:
    def __init__(self, actors: RunActors, transport: str):
        self.actors, self.transport = actors, transport
        self._opened = False

    def sync(self, version: int) -> float:
        t0 = time.time()
        served = getattr(self, f"_{self.transport}")(version)
        if any(v != version for v in served):
            raise RuntimeError(f"engines serve weight versions {served} after syncing version {version}")
        return time.time() - t0

    def _object_store(self, version: int) -> list:
        refs = self.actors.policy.call("export_buckets", version)
        return ray.get([e.load_buckets.remote(refs[0], version) for e in self.actors.engines] + refs[1:])[
            : len(self.actors.engines)]

    def _open_broadcast(self) -> None:
        rank0, engines = self.actors.policy.actors[0], self.actors.engines
        addr, port = ray.get(rank0.master_address.remote())
        world = 1 + len(engines)
        ray.get([rank0.open_broadcast.remote(addr, port, world)] +
                [e.open_broadcast.remote(addr, port, i + 1, world) for i, e in enumerate(engines)])
        self._opened = True

    def _broadcast(self, version: int) -> list:
        if not self._opened:
            self._open_broadcast()
        metas = ray.get(self.actors.policy.call("prepare_broadcast", version))[0]
        send = self.actors.policy.actors[0].send_broadcast.remote()
        served = ray.get([e.receive_broadcast.remote(metas, version) for e in self.actors.engines])
        ray.get(send)
        return served

    def _cuda_ipc(self, version: int) -> list:
        refs = self.actors.policy.call("export_ipc", version)
        served = ray.get([e.load_ipc.remote(refs[0], version) for e in self.actors.engines])
        ray.get(self.actors.policy.call("release_ipc"))
        return served
