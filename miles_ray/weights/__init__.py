"""Weight packing and transports for trainer -> engine sync (no Ray here).

Transports: ``object_store`` (buckets put once; engines read the same objects — wired in actors),
``broadcast`` (:class:`BroadcastChannel`, gloo/NCCL), ``shm`` and ``cuda_ipc`` (same node, by
handle: :mod:`miles_ray.weights.ipc`).
"""
from miles_ray.weights.broadcast import BroadcastChannel  # noqa: F401
from miles_ray.weights.buckets import Bucket, check_complete, load_bucket, plan_buckets, to_buckets  # noqa: F401

TRANSPORTS = ("object_store", "broadcast", "shm", "cuda_ipc")
