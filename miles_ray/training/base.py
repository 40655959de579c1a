"""What every torch trainer rank shares: the torch.distributed group, DDP / FSDP2 wrapping with the
training precision, gradient checkpointing, varlen attention for packed rows, AdamW with a
learning-rate schedule, micro-batch planning, gradient sync, clipping, optimizer offload, sharded
checkpoints and weight export.

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

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from miles_ray.errors import UserError
from miles_ray.training import precision as prec
from miles_ray.training.packing import plan_micro_batches
from miles_ray.training.schedule import lr_factor
from miles_ray.training.varlen import use_varlen_attention


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


def all_max(value: int | float) -> int | float:
    """The maximum over ranks (ints stay ints)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long if isinstance(value, int) else torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class TrainerOutOfMemory(UserError, MemoryError):
    """A trainer rank ran out of memory: the run stops (a rebuild would fail the same way)."""


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def padded_micro_batches(samples: list, train_cfg) -> list[tuple[list, float]]:
    """This rank's micro-batches (see :func:`plan_micro_batches`), each with a weight (1 real,
    0 padding) so that every rank runs the same number."""
    chunks = plan_micro_batches(samples, train_cfg.micro_batch_size, train_cfg.token_budget, train_cfg.packing)
    n = all_max(len(chunks))
    filler = chunks[0][:1] if chunks else []
    return [(c, 1.0) for c in chunks] + [(filler, 0.0)] * (n - len(chunks))


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant); the API was renamed in transformers 5.2x."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shard_fsdp2(core: torch.nn.Module, model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """FSDP2: every decoder layer of ``model`` its own unit, the rest with ``core`` (the root)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": prec.fsdp_policy(precision)} if prec.fsdp_policy(precision) else {}
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for layer in getattr(body, "layers", None) or []:
        fully_shard(layer, **kwargs)
    return fully_shard(core, **kwargs)


class TorchTrainerBase:
    """A trainer rank: ``self.module`` (the transformers model: parameter names, export),
    ``self.model`` (``core``, the forward module, wrapped for DP), ``self.optimizer``."""

    def __init__(self, model: torch.nn.Module, train_cfg, lr: float, strategy: str = "ddp", precision: str = "fp32",
                 core: torch.nn.Module | None = None, schedule_steps: int = 0):
        self.cfg, self.precision = train_cfg, precision
        self.rank, self.world_size = world()
        self.device = device()
        use_varlen_attention(model)
        if train_cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        core = core if core is not None else model
        core.to(self.device)
        self.module = model  # unwrapped, for state_dict names
        self.core = core  # the forward module, unwrapped
        self.strategy = strategy if self.world_size > 1 else "none"
        self.model = self._wrap(core, model, strategy) if self.world_size > 1 else core
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=train_cfg.weight_decay)
        self.base_lr, self.schedule_steps, self.opt_steps = lr, schedule_steps, 0
        self.offloaded = False

    def _wrap(self, core, model, strategy: str):
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(core)
        if strategy == "fsdp2":
            return shard_fsdp2(core, model, self.precision)
        raise ValueError(f"train.strategy='{strategy}' is unknown; choose ddp or fsdp2")

    def autocast(self):
        return prec.autocast(self.precision, self.device, fsdp=self.strategy == "fsdp2")

    def _sync_context(self, last: bool):
        """Skip the gradient sync on all but the last micro-batch of a mini-batch."""
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()
        if self.strategy == "fsdp2":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward_micro_batches(self, micro, loss_fn) -> dict:
        """Run ``loss_fn(chunk) -> (loss, metrics)`` for each (chunk, weight) under the precision's
        autocast and backprop the loss times weight times world size. Returns the summed metrics
        of real micro-batches."""
        totals: dict = {}
        for i, (chunk, weight) in enumerate(micro):
            try:
                with self._sync_context(last=i == len(micro) - 1):
                    with self.autocast():
                        loss, metrics = loss_fn(chunk)
                    (loss * weight * self.world_size).backward()
            except Exception as err:  # noqa: BLE001 - only out-of-memory is translated
                if not _is_oom(err):
                    raise
                raise self.out_of_memory(chunk, err) from None
            if weight:
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
        return totals

    def out_of_memory(self, chunk: list, err: BaseException) -> TrainerOutOfMemory:
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in chunk)
        return TrainerOutOfMemory(
            f"trainer rank {self.rank} ran out of memory on a micro-batch of {len(chunk)} samples, {tokens} tokens "
            f"({type(err).__name__}: {str(err)[:200]}); lower train.max_tokens_per_micro_batch (budget now "
            f"{self.cfg.token_budget} tokens) or train.micro_batch_size, or set train.gradient_checkpointing=true / "
            "train.precision=bf16_mixed / a smaller train.logprob_chunk_tokens")

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clip_gradients(self) -> torch.Tensor:
        """Clip to ``train.grad_clip``; the total norm before clipping (a backend may reduce first)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def optimizer_step(self, scheduled: bool = True) -> dict:
        """Clip, then step at the scheduled learning rate (``scheduled=False``: the current one)."""
        grad_norm = self.clip_gradients()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)  # never let NaN/inf reach the weights
            return {"grad_norm": float("nan"), "skipped_step": 1.0}
        out = {"grad_norm": grad_norm.item(), "skipped_step": 0.0}
        if scheduled:
            c = self.cfg
            lr = self.base_lr * lr_factor(c.lr_schedule, self.opt_steps, self.schedule_steps, c.warmup_steps,
                                          c.min_lr_ratio)
            self.set_lr(lr)
            self.opt_steps += 1
            out["lr"] = lr
        self.optimizer.step()
        return out

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

    # -- checkpoint state: sharded, safe to load, any world size ---------------------------------
    def counters(self) -> dict:
        return {"version": getattr(self, "version", 0), "opt_steps": self.opt_steps}

    def save_checkpoint(self, folder: str) -> None:
        """Collective: every rank writes its shards (:mod:`miles_ray.training.checkpoint_io`)."""
        from miles_ray.training.checkpoint_io import save_sharded

        save_sharded(folder, self.model, self.optimizer, self.counters(), self.rank)

    def load_checkpoint(self, folder: str) -> None:
        """Collective; the checkpoint may come from a different number of ranks."""
        from miles_ray.training.checkpoint_io import load_sharded

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

    def export_buckets(self, version: int, bucket_bytes: int, to_cpu: bool = True) -> list | None:
        """Weights as size-bounded buckets on rank 0 (None elsewhere); call on all ranks."""
        state = self.engine_state(to_cpu=to_cpu)
        return list(self.iter_export(state, version, bucket_bytes)) if state is not None else None

    def iter_export(self, state: dict, version: int, bucket_bytes: int):
        """Yield buckets of ``state``, reusing the buffers of the previous export (persistent)."""
        from miles_ray.weights.buckets import iter_buckets

        previous, fresh = getattr(self, "_buckets", None), []
        for bucket in iter_buckets(state, version, bucket_bytes, reuse=previous):
            fresh.append(bucket)
            yield bucket
        self._buckets = fresh

    def adopt_export_buffers(self) -> int:
        """shm transport (the CPU twin of CUDA IPC zero-copy): make the live parameters views into
        the persistent shared-memory export buckets, so the next export copies nothing and engines
        load straight from the trainer's memory: one copy in all. Unsharded CPU modules only (one
        rank, unquantized export); a tied duplicate keeps its copy. Returns parameters adopted."""
        buckets = getattr(self, "_buckets", None)
        if self.world_size != 1 or not buckets or getattr(self, "engine_quant", None):
            return 0
        params, seen = self.module.state_dict(keep_vars=True), set()
        for b in buckets:
            for name, shape, offset, numel in b.entries:
                p = params.get(name)
                fits = p is not None and p.device.type == "cpu" and p.dtype == b.dtype and tuple(p.shape) == shape
                if fits and id(p) not in seen and b.flat.is_shared():
                    seen.add(id(p))
                    p.data = b.flat[offset:offset + numel].view(shape)
        return len(seen)
