"""Draft models for speculative rollout.

``draft.path`` is either ``layers:N`` (the target's embeddings, first ``N`` decoder layers, final
norm and head: a cheap draft that starts close to the target and shares its tokenizer by
construction) or any model spec :func:`~miles_ray.models.loading.load_model` accepts whose
tokenizer matches the target's (same vocabulary size and special tokens).

The engine and the draft trainer both build the draft from the *initial* target with this
function, so they start from identical weights; afterwards the trainer's weights are pushed.
"""
from __future__ import annotations

import torch

from miles_ray.models.loading import load_model, load_tokenizer


def build_draft(spec: str, target_spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models"):
    if spec.startswith("layers:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"draft.path='{spec}': expected layers:<int>, e.g. layers:1") from None
        model = load_model(target_spec, dtype, tiny_cache_dir)
        total = len(model.model.layers)
        if not 1 <= n < total:
            raise ValueError(f"draft.path='{spec}': the target has {total} layers; choose 1..{total - 1}")
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:n])
        model.config.num_hidden_layers = n
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n]
        return model
    model = load_model(spec, dtype, tiny_cache_dir)
    _check_tokenizer(spec, target_spec, tiny_cache_dir)
    return model


def _check_tokenizer(spec: str, target_spec: str, tiny_cache_dir: str) -> None:
    draft, target = load_tokenizer(spec, tiny_cache_dir), load_tokenizer(target_spec, tiny_cache_dir)
    same = len(draft) == len(target) and draft.eos_token_id == target.eos_token_id
    if not same or draft.get_vocab() != target.get_vocab():
        raise ValueError(f"draft.path='{spec}' does not share the tokenizer of model.path='{target_spec}' "
                         f"(vocab {len(draft)} vs {len(target)}); speculative decoding needs the same "
                         "tokenizer: use layers:N or a model from the same family")
