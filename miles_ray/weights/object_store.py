"""``object_store``: the bucket itself is the payload. Ray puts each bucket once into its object
store and every engine reads the same object (zero-copy on a node: :meth:`Bucket.__getstate__`
ships ``flat`` as a numpy byte array). Works across nodes and in any engine state, so restarted
or stale engines are refit over it (``jobs/weight_sync.py`` ``WeightSync.refit``)."""
from __future__ import annotations

from miles_ray.weights.buckets import Bucket
from miles_ray.weights.registry import WEIGHT_TRANSPORTS
from miles_ray.weights.transport import WeightTransport


@WEIGHT_TRANSPORTS.register("object_store")
class ObjectStoreTransport(WeightTransport):
    def export(self, bucket: Bucket) -> Bucket:
        return bucket

    def load(self, payload: Bucket) -> Bucket:
        return payload
