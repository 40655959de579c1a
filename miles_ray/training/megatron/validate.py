"""Start-time checks of the megatron layout against the model and the trainer world size: each
failure is a :class:`~miles_ray.errors.UserValueError` that names the numbers and a fix.

- TP divides the attention heads, the KV heads (megatron shards whole query groups) and the
  vocabulary (the embedding and output layer are vocab-parallel);
- PP divides the decoder layers (every stage gets the same number);
- the number of trainer ranks is a multiple of TP x PP (DP = ranks / (TP x PP));
- expert parallelism (MoE only): EP divides the experts, expert TP (default TP) divides the
  experts' FFN size, and the ranks are a multiple of expert-TP x EP x PP (megatron decomposes the
  world a second time for the experts, ``parallel_state.initialize_model_parallel``).
"""
from __future__ import annotations

from miles_ray.errors import UserValueError
from miles_ray.training.megatron.model import arch_flags, spec_name
from miles_ray.training.megatron.options import SUPPORTED_PRECISIONS, resolve_precision


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check(total: int, size: int, what: str, knob: str) -> None:
    if total % size:
        raise UserValueError(f"{knob}={size} does not divide the model's {total} {what}; use one of "
                             f"{_divisors(total)}")


def validate_experts(hf_config, tp: int, pp: int, world_size: int, ep: int, etp: int | None) -> None:
    experts = getattr(hf_config, "num_experts", None) or 0
    if not experts:
        if ep > 1 or (etp or tp) != tp:
            raise UserValueError(f"megatron.expert_parallel={ep} / expert_tensor_parallel={etp} with a dense model; "
                                 "set megatron.expert_parallel=1 and megatron.expert_tensor_parallel=0")
        return
    etp = etp or tp
    _check(experts, ep, "experts", "megatron.expert_parallel")
    _check(hf_config.moe_intermediate_size, etp, "expert FFN columns", "megatron.expert_tensor_parallel")
    if world_size % (etp * ep * pp):
        raise UserValueError(
            f"cluster.num_trainers={world_size} is not a multiple of megatron.expert_tensor_parallel x "
            f"megatron.expert_parallel x megatron.pipeline_parallel = {etp} x {ep} x {pp} = {etp * ep * pp}; "
            f"set cluster.num_trainers to a multiple of {etp * ep * pp} or shrink expert_parallel")


def validate_layout(hf_config, tp: int, pp: int, world_size: int, ep: int = 1, etp: int | None = None) -> None:
    _check(hf_config.num_attention_heads, tp, "attention heads", "megatron.tensor_parallel")
    _check(hf_config.num_key_value_heads, tp, "KV heads", "megatron.tensor_parallel")
    _check(hf_config.vocab_size, tp, "vocabulary entries", "megatron.tensor_parallel")
    _check(hf_config.num_hidden_layers, pp, "layers", "megatron.pipeline_parallel")
    if world_size % (tp * pp):
        raise UserValueError(
            f"cluster.num_trainers={world_size} is not a multiple of megatron.tensor_parallel x "
            f"megatron.pipeline_parallel = {tp} x {pp} = {tp * pp}; set cluster.num_trainers to "
            f"{tp * pp * max(1, world_size // (tp * pp))} (or another multiple of {tp * pp}) or shrink TP/PP")
    validate_experts(hf_config, tp, pp, world_size, ep, etp)


def _precision(cfg) -> str:
    return resolve_precision(getattr(cfg.megatron, "precision", "auto"), cfg.train.precision, cfg.model.dtype)


# settings the megatron backend does not implement: (description, is-set test, fix)
UNSUPPORTED = [
    ("train.precision bf16 (pure) or fp8_unified", lambda c: _precision(c) not in SUPPORTED_PRECISIONS,
     "set megatron.precision=bf16_mixed (or fp32), or train.precision=bf16_mixed"),
    ("train.qat=int4", lambda c: c.train.qat != "none", "set train.qat=none"),
    ("quantized rollout.precision", lambda c: c.rollout.precision != "bf16", "set rollout.precision=bf16"),
    ("algorithm.true_on_policy", lambda c: bool(c.exact_max_len), "set algorithm.true_on_policy=false"),
    ("algorithm.routing_replay=r3 with train.gradient_checkpointing (a recomputed layer would route again "
     "without the recording)", lambda c: c.algorithm.routing_replay != "none" and c.train.gradient_checkpointing,
     "set train.gradient_checkpointing=false"),
]


def validate_config(cfg) -> str | None:
    """Check a run's config before any actor starts; returns the line the run log shows (None
    unless ``train.backend=megatron``): the layout and which layer spec the ranks build."""
    if cfg.train.backend != "megatron":
        return None
    for what, is_set, fix in UNSUPPORTED:
        if is_set(cfg):
            raise UserValueError(f"train.backend=megatron does not support {what}; {fix} or use train.backend=fsdp")
    from transformers import AutoConfig

    from miles_ray.models import resolve_model_path

    where = resolve_model_path(cfg.model.path, cfg.model.tiny_cache_dir)
    m = cfg.megatron
    hf_config = AutoConfig.from_pretrained(where["path"])
    arch_flags(hf_config)  # a model family the converter knows
    ep, etp = getattr(m, "expert_parallel", 1), getattr(m, "expert_tensor_parallel", 0) or None
    validate_layout(hf_config, m.tensor_parallel, m.pipeline_parallel, cfg.cluster.num_trainers, ep, etp)
    spec = spec_name(m.layer_spec)
    dp = cfg.cluster.num_trainers // (m.tensor_parallel * m.pipeline_parallel)
    moe = bool(getattr(hf_config, "num_experts", None))  # the trainer turns SP on for MoE under TP
    experts = f" EP={ep} ETP={etp or m.tensor_parallel}" if moe else ""
    return (f"train.backend=megatron: TP={m.tensor_parallel} PP={m.pipeline_parallel} DP={dp}{experts} "
            f"sequence_parallel={(m.sequence_parallel or moe) and m.tensor_parallel > 1}, {spec} layer spec "
            f"({'Transformer Engine' if spec == 'te' else 'megatron-core local: transformer_engine does not import'})")
