"""The one interface every policy-trainer backend presents to the trainer actor
(``actors/trainer.py``) and, through it, to the drivers: the actor never branches on the backend.

A backend is a class whose instances are built by a :data:`miles_ray.training.backends.POLICY_BACKENDS`
entry (``train.backend``: ``fsdp`` -> :class:`miles_ray.training.fsdp.PolicyTrainer`, ``megatron`` ->
:class:`miles_ray.training.megatron.trainer.MegatronPolicyTrainer`, or ``pkg.module:fn``).

Invariants (tests/unit/training/test_trainer_interface.py): both built-in backends define every
method below with these parameter names; every method is called on all ranks of the trainer group
(they may be collective); ``version`` after ``k`` optimizer versions is ``k`` (``miles_ray.versioning``).
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable


@runtime_checkable
class PolicyTrainerBackend(Protocol):
    version: int

    def prepare(self, samples: list, old: bool = True) -> list:
        """This rank's samples with old (and reference) log-probs filled in; collective."""

    def compute_logprobs(self, samples, core=None) -> list[list[float]]:
        """Per-sample response log-probs under ``core`` (default: the trained model)."""

    def train_step(self, minibatches: list[list]) -> dict:
        """One optimizer step per mini-batch (this rank's part of each); summed metrics."""

    def sft_step(self, samples, lr: float | None = None) -> dict:
        """One supervised step (warm-up, demonstrations)."""

    def save_checkpoint(self, folder: str) -> None:
        """Collective: this rank's shards of model and optimizer; loadable at another world size."""

    def load_checkpoint(self, folder: str) -> None: ...

    def offload_optimizer(self) -> None:
        """Colocation: optimizer state to host memory while the engines run."""

    def reload_optimizer(self, device: str | None = None) -> None: ...

    def engine_state(self, to_cpu: bool = True) -> dict | None:
        """What the engines load (rank 0; None elsewhere); collective."""

    def iter_export(self, state, version: int, bucket_bytes: int) -> Iterator:
        """``state`` as HF-named buckets of at most ``bucket_bytes`` (the weight transports send them)."""

    def save_hf(self, folder: str) -> None:
        """The policy as an HF folder ``transformers`` loads (rank 0 writes; all ranks gather)."""


METHODS = ("prepare", "compute_logprobs", "train_step", "sft_step", "save_checkpoint", "load_checkpoint",
           "offload_optimizer", "reload_optimizer", "engine_state", "iter_export", "save_hf")
