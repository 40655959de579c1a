"""Start-time checks of the megatron layout against the model and the trainer world size: each
failure is a :class:`~miles_ray.errors.UserValueError` that names the numbers and a fix.

- TP divides the attention heads, the KV heads (megatron shards whole query groups) and the
  vocabulary (the embedding and output layer are vocab-parallel);
- PP divides the decoder layers (every stage gets the same number);
- the number of trainer ranks is a multiple of TP x PP (DP = ranks / (TP x PP)).
"""
from __future__ import annotations

from miles_ray.errors import UserValueError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check(total: int, size: int, what: str, knob: str) -> None:
    if total % size:
        raise UserValueError(f"{knob}={size} does not divide the model's {total} {what}; use one of "
                             f"{_divisors(total)}")


def validate_layout(hf_config, tp: int, pp: int, world_size: int) -> None:
    _check(hf_config.num_attention_heads, tp, "attention heads", "megatron.tensor_parallel")
    _check(hf_config.num_key_value_heads, tp, "KV heads", "megatron.tensor_parallel")
    _check(hf_config.vocab_size, tp, "vocabulary entries", "megatron.tensor_parallel")
    _check(hf_config.num_hidden_layers, pp, "layers", "megatron.pipeline_parallel")
    if world_size % (tp * pp):
        raise UserValueError(
            f"cluster.num_trainers={world_size} is not a multiple of megatron.tensor_parallel x "
            f"megatron.pipeline_parallel = {tp} x {pp} = {tp * pp}; set cluster.num_trainers to "
            f"{tp * pp * max(1, world_size // (tp * pp))} (or another multiple of {tp * pp}) or shrink TP/PP")


def validate_config(cfg) -> None:
    """Check a run's config before any actor starts (no-op unless ``train.backend=megatron``)."""
    if cfg.train.backend != "megatron":
        return
    from transformers import AutoConfig

    from miles_ray.models import resolve_model_path

    where = resolve_model_path(cfg.model.path, cfg.model.tiny_cache_dir)
    m = cfg.megatron
    validate_layout(AutoConfig.from_pretrained(where["path"]), m.tensor_parallel, m.pipeline_parallel,
                    cfg.cluster.num_trainers)
