"""Weight sync from trainer rank 0 to the engines (no Ray here): the bucket format
(:mod:`.buckets`), the interfaces (:mod:`.transport`: :class:`WeightTransport`, :class:`PayloadFormat`),
the registries (:mod:`.registry`) and one module per transport / payload format, each holding both
its sending and its receiving side:

- transports (``weight_sync.transport``): ``object_store`` (:mod:`.object_store`), ``broadcast``
  (:mod:`.broadcast`, gloo/NCCL), ``shm`` (:mod:`.shm`) and ``cuda_ipc`` (:mod:`.cuda_ipc`), the
  last two same-node by handle (:mod:`.ipc`); or any ``pkg.module:Class`` subclass of
  :class:`WeightTransport`.
- HTTP payload formats (engine actor -> engine server): ``raw`` (:mod:`.raw`, our lenient server),
  ``sglang_tensor`` (:mod:`.sglang_tensor`) and ``sglang_flattened`` (:mod:`.sglang_flattened`).

Importing this package registers the built-in ones.
"""
from miles_ray.weights import cuda_ipc, object_store, raw, sglang_flattened, sglang_tensor, shm  # noqa: F401  (register)
from miles_ray.weights.broadcast import BroadcastChannel  # noqa: F401
from miles_ray.weights.buckets import Bucket, check_complete, load_bucket, plan_buckets, to_buckets  # noqa: F401
from miles_ray.weights.registry import WEIGHT_FORMATS, WEIGHT_TRANSPORTS, payload_format, weight_transport  # noqa: F401
from miles_ray.weights.transport import PayloadFormat, WeightTransport  # noqa: F401
