"""``broadcast``: a torch.distributed group {trainer rank 0, engines} (gloo on CPU, NCCL on GPU).

Set-up (:meth:`BroadcastTransport.plan`): rank 0 hosts the group's TCPStore at its address and a
free port; each engine takes as many ranks as it reports (an engine server: one per TP rank, a real
SGLang joins them itself through ``/init_weights_update_group``; an in-actor engine: one, joined by
its actor). Per bucket the payload is the bucket's metadata (through Ray); then rank 0 broadcasts
the data: the whole flat buffer, or one broadcast per tensor in bucket order when an engine server
is in the group (SGLang's ``update_weights_from_distributed`` receives tensor by tensor,
``model_runner.py``). In-actor engines receive the same way into one flat buffer per bucket.

:class:`BroadcastChannel` is a stand-alone process group (its own TCPStore), so it coexists with the
trainers' data-parallel group; our engine server uses it for ``update_weights_from_distributed``.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from miles_ray.weights.buckets import Bucket, iter_tensors
from miles_ray.weights.registry import WEIGHT_TRANSPORTS
from miles_ray.weights.transport import WeightTransport


GROUP_NAME = "weight_update_group"  # InitWeightsUpdateGroupReqInput.group_name's default


def sglang_process_group(backend: str, addr: str, port: int, world_size: int, rank: int, group_name: str,
                         timeout: datetime.timedelta):
    """A process group built the way SGLang builds its weight-update group, so that both sides meet
    on the rendezvous store: SGLang's ``init_custom_process_group`` (0.5.5 srt/utils/common.py:1645,
    0.5.23 common.py:2859; called by model_runner.py:1056 / model_runner_components/weight_updater.py:133
    with ``init_method=tcp://addr:port``, ``rank = rank_offset + tp_rank``) does
    ``rendezvous(init_method, rank, world_size)`` (a TCPStore; rank 0 hosts it), wraps it in
    ``PrefixStore(group_name, store)`` (common.py:1691) and calls torch's
    ``_new_process_group_helper`` (which prefixes ``"<group_name>/"`` again). A group of this name
    already in this process is destroyed first (re-init after an engine restart)."""
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    for pg, name in list(_world.pg_names.items()):
        if name == group_name:
            dist.destroy_process_group(pg)
    store, rank, world_size = next(rendezvous(f"tcp://{addr}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], dist.Backend(backend), PrefixStore(group_name, store),
                                      group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class BroadcastChannel:
    def __init__(self, rank: int, world_size: int, addr: str, port: int, backend: str = "gloo", timeout_s: float = 300,
                 group_name: str = GROUP_NAME):
        """Joins (rank 0: hosts) the group ``group_name`` at ``addr:port`` exactly as SGLang's
        ``init_weights_update_group`` does (:func:`sglang_process_group`)."""
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        self.group = sglang_process_group(backend, addr, port, world_size, rank, group_name,
                                          datetime.timedelta(seconds=timeout_s))
        self.device = "cpu" if backend == "gloo" else "cuda"

    def broadcast(self, tensor: torch.Tensor) -> None:
        """One broadcast from rank 0 (sender: ``tensor`` is sent; receiver: filled in place)."""
        self._broadcast(tensor)

    def send(self, buckets: list[Bucket]) -> None:
        """One broadcast per bucket: its flat buffer."""
        for b in buckets:
            self._broadcast(b.flat.to(self.device))

    def send_tensors(self, buckets: list[Bucket]) -> None:
        """SGLang's update_weights_from_distributed order: one broadcast per tensor, in bucket order
        (views of the bucket buffers: nothing is copied on the sender)."""
        for b in buckets:
            flat = b.flat if b.flat.device.type == self.device or self.device == "cpu" else b.flat.to(self.device)
            for _, t in iter_tensors(Bucket(b.version, b.index, b.count, b.dtype, flat, b.entries)):
                self._broadcast(t)

    def receive(self, metas: list[dict], per_tensor: bool = False) -> list[Bucket]:
        """The buckets ``metas`` describe, as :meth:`send` (or :meth:`send_tensors`) sends them."""
        out = []
        for m in metas:
            flat = torch.empty(m["numel"], dtype=m["dtype"], device=self.device)
            bucket = Bucket(m["version"], m["index"], m["count"], m["dtype"], flat, m["entries"])
            for t in ([t for _, t in iter_tensors(bucket)] if per_tensor else [flat]):
                self._broadcast(t)
            bucket.flat = flat.cpu() if self.device != "cpu" else flat
            out.append(bucket)
        return out

    def receive_named(self, names: list, dtypes: list, shapes: list) -> list:
        """``[(name, tensor)]`` sent one broadcast per tensor (update_weights_from_distributed)."""
        named = []
        for n, d, s in zip(names, dtypes, shapes):
            t = torch.empty(s, dtype=d, device=self.device)
            self._broadcast(t)
            named.append((n, t))
        return named

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
        self.group = None

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()


@WEIGHT_TRANSPORTS.register("broadcast")
class BroadcastTransport(WeightTransport):
    """Payload: the bucket's metadata; data: broadcast by :meth:`push` from rank 0."""

    def __init__(self):
        self.channel: BroadcastChannel | None = None
        self.per_tensor = False

    @classmethod
    def plan(cls, sender: dict, receivers: list[dict]) -> tuple[dict, list[dict]]:
        offsets, world = [], 1
        for r in receivers:
            offsets.append(world)
            world += r["ranks"]
        common = {"addr": sender["addr"], "port": sender["port"], "world_size": world, "backend": sender["backend"],
                  "per_tensor": any(r["server"] for r in receivers)}
        return {**common, "rank": 0}, [{**common, "rank": off} for off in offsets]

    # -- trainer rank 0 -------------------------------------------------------------------------
    def open_sender(self, args: dict) -> None:
        self.per_tensor = args["per_tensor"]
        self.channel = BroadcastChannel(0, args["world_size"], args["addr"], args["port"], args["backend"])

    def export(self, bucket: Bucket) -> dict:
        return bucket.meta()

    def push(self, bucket: Bucket) -> None:
        (self.channel.send_tensors if self.per_tensor else self.channel.send)([bucket])

    # -- engine ---------------------------------------------------------------------------------
    def describe(self, engine) -> dict:
        """An engine server joins the group itself (``open_broadcast``), with one rank per TP rank."""
        return {"ranks": getattr(engine, "group_ranks", 1), "server": hasattr(engine, "open_broadcast")}

    def open_receiver(self, args: dict, engine) -> None:
        self.per_tensor = args["per_tensor"]
        group = (args["addr"], args["port"], args["rank"], args["world_size"], args["backend"])
        if hasattr(engine, "open_broadcast"):
            engine.open_broadcast(*group)
        else:
            self.channel = BroadcastChannel(group[2], group[3], group[0], group[1], group[4])

    def load(self, payload: dict) -> Bucket:
        return self.channel.receive([payload], self.per_tensor)[0]

    def receive(self, payload: dict, engine) -> None:
        if self.channel is None:  # an engine server in the group: it receives the tensors itself
            engine.receive_broadcast([payload])
        else:
            engine.load_part(self.load(payload))

    def release(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel = None
