"""Process setup shared by the actors: quiet libraries, deterministic seeds, CPU threads."""
from __future__ import annotations

import logging
import os


def setup_worker_process(seed: int, cfg=None, role: str = "") -> None:
    """Quiet libraries, seed torch and, for trainer ranks and engines (``cfg`` and ``role``), give
    torch its share of the node's cores (:func:`miles_ray.utils.threads.torch_threads`; logged)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if cfg is not None and role:
        from miles_ray.utils.threads import torch_threads

        threads, why = torch_threads(cfg, role, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        logging.getLogger("miles_ray.actors").info("%s: torch uses %d CPU threads (%s)", role, threads, why)
    torch.manual_seed(seed)


def dist_backend(cfg) -> str:
    """torch.distributed backend for trainer groups and weight broadcasts: NCCL on GPU, else gloo."""
    import torch

    return "nccl" if cfg.cluster.use_gpu and torch.cuda.is_available() else "gloo"


class ActorBase:
    """Methods every actor shares: readiness and where it runs (for tests and the dashboard)."""

    def ready(self) -> bool:
        return True

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "gpu_ids": ray.get_gpu_ids(),
                "placement_group_id": ctx.get_placement_group_id(),
                "resources": ctx.get_assigned_resources(), "torch_threads": _torch_threads()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
