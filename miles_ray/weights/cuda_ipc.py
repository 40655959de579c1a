"""``cuda_ipc``: same GPU node, by CUDA IPC handle (colocated trainer and engines). Rank 0 packs the
buckets on its GPU (``to_cpu`` False) into persistent buffers; engines map each handle once and
copy out of the trainer's memory. Engines over HTTP need SGLang's ``flattened_bucket`` format:
the engine actor forwards each handle unopened (a CUDA tensor received over IPC cannot be shared
again by the process that opened it)."""
from __future__ import annotations

from miles_ray.weights.ipc import HandleTransport
from miles_ray.weights.registry import WEIGHT_TRANSPORTS


@WEIGHT_TRANSPORTS.register("cuda_ipc")
class CudaIpcTransport(HandleTransport):
    device, label, to_cpu = "cuda", "cuda_ipc", False

    @classmethod
    def config_problem(cls, cfg) -> str | None:
        c = cfg.cluster
        forwarded = (c.colocate and c.use_gpu and cfg.rollout.sglang_api
                     and cfg.weight_sync.sglang_load_format == "flattened_bucket")  # CUDA IPC handle forwarding
        if cfg.rollout.over_http and not forwarded:
            return ("engines served over HTTP take weights through object_store, shm (handles forwarded to "
                    "update_weights_from_tensor) or broadcast (update_weights_from_distributed); "
                    "weight_sync.transport=cuda_ipc over HTTP needs cluster.colocate=true, "
                    "cluster.use_gpu=true, an SGLang-API engine (rollout.backend=sglang or "
                    "rollout.strict_sglang=true) and weight_sync.sglang_load_format=flattened_bucket")
        if not (c.colocate and c.use_gpu):
            return "weight_sync.transport=cuda_ipc needs cluster.colocate=true and cluster.use_gpu=true"
        return None
