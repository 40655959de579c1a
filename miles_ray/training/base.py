"""What every torch trainer rank shares: the torch.distributed group, DDP / FSDP2 wrapping, AdamW,
micro-batch planning (by count or by tokens), gradient sync, clipping, optimizer offload and
weight export.

Data parallelism and loss normalisation
- A global mini-batch is split across ranks; each rank reports its token and sequence counts and
  they are summed over ranks, so every rank normalises by the *global* counts.
- DDP and FSDP2 average gradients over ranks, so the local loss is multiplied by the world size:
  the result equals the gradient of the global mini-batch loss, whatever the split (tested: DP=1
  and DP=2 give the same gradients).
- Every rank runs the same number of micro-batches per mini-batch (short ranks run zero-weight
  padding micro-batches), because DDP's gradient sync and FSDP2's all-gathers are collectives.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from miles_ray.training.batching import split


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str = "gloo") -> None:
    if dist.is_initialized():
        return
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float]) -> list[float]:
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: int) -> int:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def plan_micro_batches(samples: list, micro_batch_size: int, max_tokens: int = 0) -> list[list]:
    """Split in order: by count, or (``max_tokens`` > 0) so that each padded micro-batch holds at
    most ``max_tokens`` tokens (a longer single sample still gets its own micro-batch)."""
    if max_tokens <= 0:
        return split(samples, micro_batch_size)
    out, cur, longest = [], [], 0
    for s in samples:
        n = len(s.prompt_ids) + len(s.response_ids)
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(s)
        longest = max(longest, n)
    return out + ([cur] if cur else [])


def padded_micro_batches(samples: list, micro_batch_size: int, max_tokens: int = 0) -> list[tuple[list, float]]:
    """Micro-batches with a weight (1 real, 0 padding) so every rank runs the same number."""
    chunks = plan_micro_batches(samples, micro_batch_size, max_tokens)
    n = all_max(len(chunks))
    filler = chunks[0][:1] if chunks else []
    return [(c, 1.0) for c in chunks] + [(filler, 0.0)] * (n - len(chunks))


class TorchTrainerBase:
    """A trainer rank: ``self.model`` (wrapped for DP), ``self.optimizer``; subclasses add losses."""

    def __init__(self, model: torch.nn.Module, train_cfg, lr: float, strategy: str = "ddp"):
        self.cfg = train_cfg
        self.rank, self.world_size = world()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model.to(self.device)
        self.module = model  # unwrapped, for state_dict names
        self.model = self._wrap(model, strategy) if self.world_size > 1 else model
        self.strategy = strategy if self.world_size > 1 else "none"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=train_cfg.weight_decay)
        self.offloaded = False

    @staticmethod
    def _wrap(model, strategy: str):
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model)
        if strategy == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            layers = getattr(getattr(model, "model", None), "layers", None) or []
            for layer in layers:
                fully_shard(layer)
            return fully_shard(model)
        raise ValueError(f"train.strategy='{strategy}' is unknown; choose ddp or fsdp2")

    def _sync_context(self, last: bool):
        """Skip the gradient sync on all but the last micro-batch of a mini-batch."""
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()
        if self.strategy == "fsdp2":
            self.model.set_requires_gradient_sync(last)
        import contextlib

        return contextlib.nullcontext()

    def backward_micro_batches(self, micro, loss_fn) -> dict:
        """Run ``loss_fn(chunk) -> (loss, metrics)`` for each (chunk, weight) and backprop the
        loss times weight times world size. Returns the summed metrics of real micro-batches."""
        totals: dict = {}
        for i, (chunk, weight) in enumerate(micro):
            with self._sync_context(last=i == len(micro) - 1):
                loss, metrics = loss_fn(chunk)
                (loss * weight * self.world_size).backward()
            if weight:
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
        return totals

    def optimizer_step(self) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)  # never let NaN/inf reach the weights
            return {"grad_norm": float("nan"), "skipped_step": 1.0}
        self.optimizer.step()
        return {"grad_norm": grad_norm.item(), "skipped_step": 0.0}

    # -- colocation: free accelerator memory while the engines run -----------------------------
    def offload_optimizer(self) -> None:
        self._move_optimizer("cpu")
        self.offloaded = True

    def reload_optimizer(self, device: str | None = None) -> None:
        self._move_optimizer(device or next(self.module.parameters()).device)
        self.offloaded = False

    def _move_optimizer(self, device) -> None:
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(device, non_blocking=True)

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's model and optimizer state and RNG (per rank: restore with the same world size)."""
        import random

        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "version": getattr(self, "version", 0)}

    def load_state_dict(self, state: dict) -> None:
        import random

        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if hasattr(self, "version"):
            self.version = state["version"]

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

    def export_buckets(self, version: int, bucket_bytes: int, to_cpu: bool = True) -> list | None:
        """Weights as size-bounded buckets on rank 0 (None elsewhere); call on all ranks."""
        state = self.full_state_dict(to_cpu=to_cpu)
        return list(self.iter_export(state, version, bucket_bytes)) if state is not None else None

    def iter_export(self, state: dict, version: int, bucket_bytes: int):
        """Yield buckets of ``state``, reusing the buffers of the previous export (persistent)."""
        from miles_ray.weights.buckets import iter_buckets

        previous, fresh = getattr(self, "_buckets", None), []
        for bucket in iter_buckets(state, version, bucket_bytes, reuse=previous):
            fresh.append(bucket)
            yield bucket
        self._buckets = fresh
