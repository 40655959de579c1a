"""The FSDP backend's rank base: a transformers model wrapped for data parallelism (DDP or FSDP2)
with the training precision, gradient checkpointing, varlen attention for packed rows, AdamW,
gradient-sync control per micro-batch, sharded checkpoints and full-state export.
The policy, critic and draft trainers derive from it. Sharded loading (:func:`place`): a model
built on the meta device is laid out first, then each rank reads only the rows it keeps.
"""
from __future__ import annotations

import contextlib

import torch

from miles_ray.training import precision as prec
from miles_ray.training.base import TorchTrainerBase
from miles_ray.training.collectives import device, world
from miles_ray.training.fsdp.varlen import use_varlen_attention


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant); the API was renamed in transformers 5.2x."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_fsdp2(core: torch.nn.Module, model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """FSDP2: every decoder layer of ``model`` its own unit, the rest with ``core`` (the root)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": prec.fsdp_policy(precision)} if prec.fsdp_policy(precision) else {}
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for layer in getattr(body, "layers", None) or []:
        fully_shard(layer, **kwargs)
    return fully_shard(core, **kwargs)


def place(core: torch.nn.Module, model: torch.nn.Module, strategy: str, precision: str, device, weights=None,
          init: dict | None = None) -> torch.nn.Module:
    """``core`` laid out for ``strategy`` (``none``: one rank). With ``weights`` (sharded loading)
    the meta parameters are filled after FSDP2 has sharded them (each rank reads only its rows)
    and before DDP wraps (every rank reads all: DDP keeps replicas)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy='{strategy}' is unknown; choose ddp or fsdp2")
    if strategy == "fsdp2":
        core = shard_fsdp2(core, model, precision)
    if weights is not None:
        from miles_ray.models.sharded import materialize

        materialize(core, model, weights, device, init)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(core)
    return core


STRATEGIES = ("none", "ddp", "fsdp2")


class FSDPTrainerBase(TorchTrainerBase):
    """A trainer rank: ``self.module`` (the transformers model: parameter names, export),
    ``self.model`` (``core``, the forward module, wrapped for DP), ``self.optimizer``."""

    def __init__(self, model: torch.nn.Module, train_cfg, lr: float, strategy: str = "ddp", precision: str = "fp32",
                 core: torch.nn.Module | None = None, schedule_steps: int = 0, weights=None, init: dict | None = None):
        """``weights``: sharded loading (``model``'s parameters on meta, from
        :func:`miles_ray.models.loading.load_empty`): filled on this rank's device once laid out,
        ``init`` setting those the files lack; None: ``model`` is loaded (on CPU)."""
        self.cfg, self.precision = train_cfg, precision
        self.rank, self.world_size = world()
        self.device = device()
        use_varlen_attention(model)
        if train_cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        core = core if core is not None else model
        if weights is None:
            core.to(self.device)
        self.module = model  # unwrapped, for state_dict names
        self.core = core  # the forward module, unwrapped
        self.strategy = strategy if self.world_size > 1 else "none"
        self.model = place(core, model, self.strategy, self.precision, self.device, weights, init)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=train_cfg.weight_decay)
        self.base_lr, self.schedule_steps, self.opt_steps = lr, schedule_steps, 0
        self.offloaded = False

    def _sync_context(self, last: bool):
        """Skip the gradient sync on all but the last micro-batch of a mini-batch."""
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()
        if self.strategy == "fsdp2":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # -- checkpoint state: sharded, safe to load, any world size ---------------------------------
    def save_checkpoint(self, folder: str) -> None:
        """Collective: every rank writes its shards (:mod:`miles_ray.training.fsdp.checkpoint`)."""
        from miles_ray.training.fsdp.checkpoint import save_sharded

        save_sharded(folder, self.model, self.optimizer, self.counters(), self.rank)

    def load_checkpoint(self, folder: str) -> None:
        """Collective; the checkpoint may come from a different number of ranks."""
        from miles_ray.training.fsdp.checkpoint import load_sharded

        counters = load_sharded(folder, self.model, self.optimizer, self.rank)
        if hasattr(self, "version"):
            self.version = counters["version"]
        self.opt_steps = counters["opt_steps"]

    # -- weights --------------------------------------------------------------------------------
    def full_state_dict(self, to_cpu: bool = True) -> dict | None:
        """Full state dict on rank 0 (None elsewhere). Collective under FSDP2: call on all ranks.
        On CPU the tensors are the live parameters (callers copy them, e.g. into buckets)."""
        out = {}
        for name, tensor in self.module.state_dict().items():
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if self.rank == 0:
                out[name] = tensor.detach().to("cpu") if to_cpu else tensor.detach()  # no copy on CPU
        return out if self.rank == 0 else None

    def engine_state(self, to_cpu: bool = True) -> dict | None:
        """What engines load (rank 0; None elsewhere; collective): the full state dict here."""
        return self.full_state_dict(to_cpu=to_cpu)

    def adopt_export_buffers(self) -> int:
        """shm transport (:func:`miles_ray.weights.shm.adopt_buffers`): the live parameters become
        views into the persistent shared-memory export buckets, so the next export copies nothing
        and engines load straight from the trainer's memory: one copy in all. Unsharded CPU modules
        only (one rank, unquantized export). Returns parameters adopted."""
        from miles_ray.weights.shm import adopt_buffers

        buckets = getattr(self, "_buckets", None)
        if self.world_size != 1 or not buckets or getattr(self, "engine_quant", None):
            return 0
        return adopt_buffers(self.module.state_dict(keep_vars=True), buckets)
