"""``bf16_mixed`` at 2 FSDP2 ranks (the one-rank check is
``test_train_scale.py::test_bf16_mixed_keeps_updates_below_bf16_resolution``): FSDP2's
``MixedPrecisionPolicy`` computes in bf16 and reduces gradients in fp32 into fp32 master shards,
so Adam steps of 1e-3 on RMSNorm weights of 1.0 (below bf16's spacing there, 2^-8) accumulate,
where pure bf16 parameters never move."""
import random

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.sample import Sample
from miles_ray.training.collectives import barrier, init_distributed
from helpers.ranks import free_port


def _samples(n=4, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 9), rng.randint(1, 9)
        out.append(Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)],
                          response_ids=[rng.randint(3, 300) for _ in range(r)], response_logprobs=[-1.0] * r,
                          advantages=[rng.uniform(-2, 2)] * r))
    return out


def _worker(rank, world, port, cache, out):
    from miles_ray.training.fsdp import PolicyTrainer

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    found = {}
    for precision in ("bf16", "bf16_mixed"):
        torch.manual_seed(0)
        t = PolicyTrainer("tiny:qwen3", TrainConfig(precision=precision, lr=1e-3, grad_clip=1e9, strategy="fsdp2"),
                          AlgorithmConfig(), dtype="bfloat16", tiny_cache_dir=cache)
        norm = t.module.model.norm.weight
        found[f"{precision}_dtype"] = str(norm.dtype)
        found[f"{precision}_sharded"] = norm.to_local().numel() < norm.numel()
        for _ in range(10):
            t.sft_step(_samples()[rank::world], lr=1e-3)  # each rank half of the same 4 samples
        exported = t.full_state_dict()  # collective; rank 0 only
        if exported is not None:
            found[precision] = (exported["model.norm.weight"].to(torch.bfloat16) != 1.0).float().mean().item()
    if rank == 0:
        torch.save(found, out)
    barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(model_cache, tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bf16_mixed") / "rank0.pt")
    mp.spawn(_worker, args=(2, free_port(), model_cache, out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_bf16_mixed_keeps_updates_below_bf16_resolution_at_two_fsdp2_ranks(two_ranks):
    assert two_ranks["bf16_dtype"] == "torch.bfloat16" and two_ranks["bf16_mixed_dtype"] == "torch.float32"
    assert two_ranks["bf16_sharded"] and two_ranks["bf16_mixed_sharded"]
    assert two_ranks["bf16"] == 0.0
    assert two_ranks["bf16_mixed"] > 0.3
