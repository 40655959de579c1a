"""A weight transport written as a plug-in, the example of docs/architecture.md "Weight transports":
each bucket travels as its raw bytes plus a SHA-256 checksum, checked before the engine loads it.

Everything a transport needs is this one file: ``weight_sync.transport=tests.helpers.toy_transport:ChecksumTransport``
(or register it under a name with ``WEIGHT_TRANSPORTS.register("checksum")``). With
``MILES_TOY_TRANSPORT_LOG`` set (a folder), every load also leaves a file ``v<version>-b<index>-<pid>``
there, so a test can tell that this transport, and no other, moved the weights.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from miles_ray.weights import Bucket, WeightTransport


class ChecksumTransport(WeightTransport):
    def export(self, bucket: Bucket) -> dict:
        data = bucket.flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        return {"meta": bucket.meta(), "data": data, "sha256": hashlib.sha256(data).hexdigest()}

    def load(self, payload: dict) -> Bucket:
        data, m = payload["data"], payload["meta"]
        if hashlib.sha256(data).hexdigest() != payload["sha256"]:
            raise ValueError(f"bucket {m['index']} of version {m['version']}: checksum mismatch")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        if log := os.environ.get("MILES_TOY_TRANSPORT_LOG"):
            (Path(log) / f"v{m['version']}-b{m['index']}-{os.getpid()}").touch()
        return Bucket(m["version"], m["index"], m["count"], m["dtype"], raw.view(m["dtype"]), m["entries"])


def not_a_transport():
    """What a wrong import path names (a function, not a WeightTransport subclass)."""


class NotDerived:
    """Has the methods but not the base class (the driver needs its plan, set-up and defaults)."""

    def export(self, bucket):
        return bucket

    def load(self, payload):
        return payload
