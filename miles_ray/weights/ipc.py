"""Same-node weight handoff by handle: CUDA IPC on a GPU (``cuda_ipc``, colocated trainer and
engine) and POSIX shared memory on CPU (``shm``, its CPU twin, also the fastest CPU transport).

The trainer's bucket buffers are persistent (reused across versions), so a handle is made once
and the engine maps it once; each sync is then one copy in (trainer) and one copy out (engine).
Handles are torch's multiprocessing pickles (a CUDA IPC handle or an shm file name), shipped as
bytes, so any RPC (Ray) can carry them. :class:`HandleTransport` is what both transports share
(:mod:`miles_ray.weights.shm`, :mod:`miles_ray.weights.cuda_ipc`): the payload is ``(meta, handle)``.
"""
from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

from miles_ray.weights.buckets import Bucket
from miles_ray.weights.transport import WeightTransport

torch.multiprocessing.set_sharing_strategy("file_system")  # shm by file name: works between unrelated processes


def export_handles(buckets: list[Bucket], device: str) -> list[tuple[dict, bytes]]:
    """(meta, handle bytes) per bucket. ``device`` 'cpu' moves buffers to shared memory once;
    'cuda' needs CUDA buffers. The caller keeps ``buckets`` alive (and unchanged) until loaded."""
    out = []
    for b in buckets:
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("weight_sync.transport=cuda_ipc needs CUDA; use shm or object_store on CPU")
            if not b.flat.is_cuda:
                b.flat = b.flat.cuda()
        elif not b.flat.is_shared():
            b.flat.share_memory_()
        out.append((b.meta(), bytes(ForkingPickler.dumps(b.flat))))
    return out


class HandleBucket(Bucket):
    """A bucket received as a handle, mapped on the first use of ``flat``. An engine server that
    maps the handle itself (SGLang ``flattened_bucket`` forwarding, :meth:`take_handle`) never maps
    it in this process. Each handle pickle carries one reference: it is decoded exactly once, here
    (``flat``) or by the server (after ``take_handle``), never both."""

    def __init__(self, meta: dict, handle: bytes, opener):
        self._flat, self._opener, self.handle, self.numel = None, opener, handle, meta["numel"]
        super().__init__(meta["version"], meta["index"], meta["count"], meta["dtype"], None, meta["entries"])

    @property
    def flat(self) -> torch.Tensor:
        if self._flat is None:
            if self.handle is None:
                raise RuntimeError("this bucket's handle was forwarded to the engine server: it cannot be opened here")
            self._flat = self._opener(self.handle)
        return self._flat

    @flat.setter
    def flat(self, value) -> None:
        self._flat = value

    @property
    def opened(self) -> bool:
        return self._flat is not None

    def take_handle(self) -> bytes | None:
        """The handle for another process to open (once), or None when it was opened here."""
        if self._flat is not None:
            return None
        handle, self.handle = self.handle, None
        return handle

    def meta(self) -> dict:
        return {"version": self.version, "index": self.index, "count": self.count, "dtype": self.dtype,
                "numel": self.numel, "entries": self.entries}

    def __repr__(self) -> str:
        return f"HandleBucket(version={self.version}, index={self.index}/{self.count}, opened={self.opened})"

    def __reduce__(self):
        return Bucket, (self.version, self.index, self.count, self.dtype, self.flat, self.entries)


class HandleReader:
    """Engine side: opens handles (lazily: :class:`HandleBucket`), caching the mapping of each
    buffer across syncs."""

    def __init__(self):
        self._cache: dict[bytes, torch.Tensor] = {}
        self._used: set[bytes] = set()

    def _open(self, handle: bytes) -> torch.Tensor:
        flat = ForkingPickler.loads(handle)
        self._cache[handle] = flat
        return flat

    def forget_unused(self) -> None:
        """Drop the mappings of buffers not sent since the last call (a new version starts: the
        trainer reuses its buffers, so those it did not send again are gone)."""
        self._cache = {h: t for h, t in self._cache.items() if h in self._used}
        self._used = set()

    def open(self, items: list[tuple[dict, bytes]], keep: bool = False) -> list[Bucket]:
        """Buckets for ``items``; ``keep`` adds to the cache instead of replacing it (streaming)."""
        live = dict(self._cache) if keep else {}
        out = []
        for meta, handle in items:
            self._used.add(handle)
            flat = self._cache.get(handle)
            if flat is None:
                out.append(HandleBucket(meta, handle, self._open))
                continue
            live[handle] = flat
            out.append(Bucket(meta["version"], meta["index"], meta["count"], meta["dtype"], flat, meta["entries"]))
        self._cache = live  # drop mappings of buffers no longer sent
        return out


class HandleTransport(WeightTransport):
    """Same node, by handle: rank 0 exports a handle to each (persistent) bucket buffer on
    ``device`` and keeps the buckets of the last version alive (the engines may still be reading
    them); engines map each handle once (:class:`HandleReader`) and copy out of it. An engine
    server with SGLang's ``flattened_bucket`` format gets the handle forwarded unopened."""

    device = "cpu"  # where the exported buffers live
    label = "shm"  # the transport's name, for messages

    def __init__(self):
        self.sending: list[Bucket] = []
        self.kept: list[Bucket] = []
        self.reader: HandleReader | None = None

    @classmethod
    def plan(cls, sender: dict, receivers: list[dict]) -> None:
        if any(r["node_id"] != sender["node_id"] for r in receivers):
            raise RuntimeError(f"weight_sync.transport={cls.label} needs the engines on the node of trainer rank 0; "
                               "use object_store or broadcast across nodes")
        return None

    def export(self, bucket: Bucket) -> tuple[dict, bytes]:
        self.sending.append(bucket)
        return export_handles([bucket], self.device)[0]

    def finish_export(self, trainer) -> None:
        self.kept, self.sending = self.sending, []  # the previous version's buffers: loaded (the driver waited)

    def load(self, payload: tuple[dict, bytes]) -> Bucket:
        self.reader = self.reader or HandleReader()
        if payload[0]["index"] == 0:
            self.reader.forget_unused()
        return self.reader.open([payload], keep=True)[0]

    def release(self) -> None:
        self.sending, self.kept, self.reader = [], [], None
