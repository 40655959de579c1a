"""``train.backend`` -> the policy trainer rank class, built from a run config (a registry, so the
actor never branches on the backend). Every backend presents
:class:`miles_ray.training.interface.PolicyTrainerBackend` to the actor and driver: prepare /
compute_logprobs / train_step / sft_step, checkpoints, HF export and weight export.
A ``pkg.module:function`` import path works too (``fn(cfg) -> trainer``)."""
from __future__ import annotations

from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract

POLICY_BACKENDS = Registry("training backend", "train.backend", Contract(
    "fn(cfg: Config)", "a policy trainer (the interface of training.fsdp.trainer.PolicyTrainer)", args=("cfg",)))


def _common(c) -> dict:
    return dict(dtype=c.model.dtype, tiny_cache_dir=c.model.tiny_cache_dir, temperature=c.rollout.temperature,
                seed=c.seed, off_policy=c.async_rl.off_policy, schedule_steps=c.optimizer_steps)


@POLICY_BACKENDS.register("fsdp")
def _fsdp(c):
    from miles_ray.training.fsdp.trainer import PolicyTrainer

    return PolicyTrainer(c.model.path, c.train, c.algorithm, exact_max_len=c.exact_max_len,
                         engine_quant=c.rollout.precision if c.rollout.precision != "bf16" else None, **_common(c))


@POLICY_BACKENDS.register("megatron")
def _megatron(c):
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    return MegatronPolicyTrainer(c.model.path, c.train, c.algorithm, parallel_cfg=c.megatron, **_common(c))


def build_policy_trainer(cfg):
    """The policy trainer of this rank for ``cfg.train.backend``."""
    return POLICY_BACKENDS.get_fn(cfg.train.backend)(cfg)
