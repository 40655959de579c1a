"""Megatron-backend checkpoints through megatron-core's distributed checkpointing
(``dist_checkpointing``, torch_dist format): every TP/PP shard is saved with its global offsets
(``model.sharded_state_dict()``), DP replicas write once, so a folder is resumable at another
layout.

The optimizer is the distributed optimizer (:mod:`.optimizer`, state sharded over DP): its
:meth:`~miles_ray.training.megatron.optimizer.ShardedOptimizer.state_dict` gathers, per parameter,
the fp32 main weight and the AdamW moments over DP (megatron's ``fully_reshardable`` format,
``optimizer/distrib_optimizer.py`` ``sharded_param_state_fully_reshardable``), saved as sharded
tensors laid out like their parameters (``optim_state_to_sharding_state``). On load each rank takes
the range of its (possibly different) DP shard, so a checkpoint loads at another DP (or TP) size.
Adam's ``step`` and the trainer counters go to ``counters.json`` (rank 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from miles_ray.training import collectives


def _sharded(model, optimizer) -> tuple[dict, float]:
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    model_sd = model.sharded_state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sd, optimizer.model_params)
    optim_sd = optimizer.state_dict()
    step = float(next(iter(optim_sd["state"].values()))["step"]) if optim_sd["state"] else 0.0
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    return {"model": model_sd, "optimizer": optim_sd}, step


def save(folder: str | Path, model, optimizer, counters: dict) -> None:
    """Collective over every trainer rank."""
    from megatron.core import dist_checkpointing

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sharded, step = _sharded(model, optimizer)
    dist_checkpointing.save(sharded, str(folder))
    if collectives.world()[0] == 0:
        (folder / "counters.json").write_text(json.dumps({**counters, "adam_step": step}))
    collectives.barrier()


def load(folder: str | Path, model, optimizer) -> dict:
    """Collective: the saved shards into this rank's model and optimizer; returns the counters."""
    from megatron.core import dist_checkpointing

    sharded, _ = _sharded(model, optimizer)
    loaded = dist_checkpointing.load(sharded, str(folder))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    if [k for k in missing if not k.endswith("_extra_state")] or unexpected:
        raise ValueError(f"megatron checkpoint {folder}: missing {missing}, unexpected {unexpected}")
    counters = json.loads((Path(folder) / "counters.json").read_text())
    optim = loaded["optimizer"]
    for state in optim["state"].values():
        state["step"] = torch.tensor(counters["adam_step"])
    optimizer.load_state_dict(optim)
    return counters
