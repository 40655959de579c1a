"""Process setup shared by the actors: quiet libraries, deterministic seeds, CPU threads."""
from __future__ import annotations

import os


def setup_worker_process(seed: int, torch_threads: int | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if torch_threads:
        torch.set_num_threads(torch_threads)
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
                "resources": ctx.get_assigned_resources()}
