"""What every trainer rank shares, whatever the backend: micro-batch planning, backward under the
training precision, clipping, AdamW with a learning-rate schedule, optimizer offload, counters and
bucketed weight export. The backends (:mod:`.fsdp`, :mod:`.megatron`) build the model and
the optimizer; collectives are in :mod:`.collectives`.

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

import torch

from miles_ray.errors import UserError
from miles_ray.training import precision as prec
from miles_ray.training.collectives import all_max
from miles_ray.training.packing import plan_micro_batches
from miles_ray.training.schedule import lr_factor


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


class TorchTrainerBase:
    """A trainer rank, backend-neutral: a subclass sets ``self.cfg``, ``self.precision``,
    ``self.strategy``, ``self.rank``, ``self.world_size``, ``self.device``, ``self.module`` (names,
    export), ``self.model`` (the forward module), ``self.optimizer``, ``self.base_lr``,
    ``self.schedule_steps``, ``self.opt_steps``, ``self.offloaded``."""

    def autocast(self):
        return prec.autocast(self.precision, self.device, fsdp=self.strategy == "fsdp2")

    def _sync_context(self, last: bool):
        """Gradient sync on the last micro-batch only (a backend with its own sync overrides)."""
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

    # -- counters and weights ------------------------------------------------------------------
    def counters(self) -> dict:
        return {"version": getattr(self, "version", 0), "opt_steps": self.opt_steps}

    def iter_export(self, state: dict, version: int, bucket_bytes: int):
        """Yield buckets of ``state``, reusing the buffers of the previous export (persistent); a
        weight transport (:mod:`miles_ray.weights`) turns each into its payload as it comes."""
        from miles_ray.weights.buckets import iter_buckets

        previous, fresh = getattr(self, "_buckets", None), []
        for bucket in iter_buckets(state, version, bucket_bytes, reuse=previous):
            fresh.append(bucket)
            yield bucket
        self._buckets = fresh
