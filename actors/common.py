"""Process setup shared by the actors: quiet libraries, deterministic seeds, CPU threads."""
from __future__ import annotations

import logging
import os
import time


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
    """torch.distributed backend for trainer groups and weight broadcasts: NCCL on GPU, else gloo.
    A trainer group widens ``nccl`` to ``cpu:gloo,cuda:nccl`` (its CPU metric reductions need a CPU
    backend): :func:`miles_ray.training.collectives.group_backend`."""
    import torch

    return "nccl" if cfg.cluster.use_gpu and torch.cuda.is_available() else "gloo"


class InjectedFault(RuntimeError):
    """Raised by an armed ``raise`` fault (:mod:`jobs.faults`): stands for a deterministic bug."""


def _raise(seconds: float, what: str) -> None:
    raise InjectedFault(f"injected fault: {what} raises (faults.kills kind=raise)")


def _hang(seconds: float, what: str) -> None:
    time.sleep(seconds)


FAULT_ACTIONS = {"raise": _raise, "hang": _hang}  # kind -> what the next work call does


class ActorBase:
    """Methods every actor shares: readiness, where it runs (for tests and the dashboard) and the
    fault hook of :mod:`jobs.faults` (:meth:`arm_fault`; work methods call :meth:`fault_point`)."""

    armed: tuple | None = None

    def ready(self) -> bool:
        return True

    def arm_fault(self, kind: str, seconds: float = 0.0) -> bool:
        """The next work call (a trainer's ``train_step``, an engine's ``generate``) raises
        (``raise``) or sleeps ``seconds`` first (``hang``)."""
        if kind not in FAULT_ACTIONS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_ACTIONS)}")
        self.armed = (kind, seconds)
        return True

    def fault_point(self, what: str) -> None:
        armed, self.armed = self.armed, None
        if armed is not None:
            FAULT_ACTIONS[armed[0]](armed[1], what)

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "gpu_ids": ray.get_gpu_ids(),
                "placement_group_id": ctx.get_placement_group_id(),
                "resources": ctx.get_assigned_resources(), "torch_threads": _torch_threads()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
