"""The memory plan (miles_ray.plan): parameter counts and model-state bytes exact against real
models and a real trainer step, the published sizes of the example configs, colocated phases, and
the CLI (`miles-ray plan`; `miles-ray train` refusing a GPU plan that does not fit, and --force)
without starting Ray."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import load_config
from miles_ray.plan import read_model_config
from miles_ray.plan.trainer import gradient_bytes, optimizer_bytes, parameter_bytes, policy_rank
from miles_ray.plan.params import inventory
from miles_ray.sample import Sample

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "models"


def _samples(n=4):
    return [Sample(i, i, "p", "1", [5 + i, 6, 7], response_ids=[8, 9 + i, 10]) for i in range(n)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(trainer) -> tuple[int, int, int]:
    """Device bytes of parameters, gradients and AdamW state (exp_avg, exp_avg_sq; the 0-dim step
    counters are not counted: they live on the CPU) of a real trainer after one step."""
    params = [p for p in trainer.model.parameters()]
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 - FSDP2 shards are DTensors
    states = [local(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return _bytes(local(p) for p in params), _bytes(local(p.grad) for p in params), _bytes(states)


def _cfg(model_cache, **over):
    return load_config(None, [f"model.tiny_cache_dir={model_cache}", *(f"{k}={v}" for k, v in over.items())])


CASES = [("qwen3", "fp32", "float32"), ("qwen3", "bf16_mixed", "bfloat16"), ("qwen3", "bf16", "bfloat16"),
         ("qwen3", "fp8_unified", "bfloat16"), ("qwen3_moe", "fp32", "float32"), ("mixtral", "bf16_mixed", "bfloat16")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_worker(rank, world, port, model_cache, out_dir):
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.fsdp import PolicyTrainer

    init_distributed(rank, world, "127.0.0.1", port)
    cfg = _cfg(model_cache, **{"train.strategy": "fsdp2", "train.precision": "bf16_mixed", "model.dtype": "bfloat16",
                               "cluster.num_trainers": 2})
    trainer = PolicyTrainer(cfg.model.path, cfg.train, cfg.algorithm, "bfloat16", model_cache)
    trainer.sft_step(_samples())
    torch.save(_state_bytes(trainer), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_fsdp2_divides_model_states_by_dp(model_cache, tmp_path):
    """Two real FSDP2 ranks: their shards add up to the full bytes exactly, and each holds the plan's
    1/dp (up to FSDP2's padding of each tensor's first dimension)."""
    from miles_ray.models.loading import resolve_model_path

    resolve_model_path("tiny:qwen3", model_cache)  # written once, before the ranks race for it
    mp.spawn(_fsdp2_worker, args=(2, _free_port(), model_cache, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = read_model_config("tiny:qwen3", model_cache)
    full = policy_rank(_cfg(model_cache, **{"model.dtype": "bfloat16", "train.precision": "bf16_mixed"}),
                       inventory(model), model)
    sharded = policy_rank(_cfg(model_cache, **{"model.dtype": "bfloat16", "train.precision": "bf16_mixed",
                                               "train.strategy": "fsdp2", "cluster.num_trainers": 2}),
                          inventory(model), model)
    for i, fn in enumerate((parameter_bytes, gradient_bytes, optimizer_bytes)):
        assert got[0][i] + got[1][i] == fn(full)
        assert max(g[i] for g in got) == pytest.approx(fn(sharded), rel=0.01)
