"""Sharded loading (:mod:`miles_ray.models.sharded`): parameters built on the meta device and
filled from the safetensors files, each rank reading only the rows it keeps. The weights equal
today's full load (``from_pretrained``) bit for bit: policy, reference and critic, 2 ranks, DDP and
FSDP2; tied embeddings stay tied; buffers (rotary ``inv_freq``, non-persistent) are right; an
FSDP2 rank reads exactly the bytes of its shards. MoE models (fused experts):
tests/unit/models/test_sharded_moe.py."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.models.loading import load_empty, load_model
from miles_ray.training.collectives import barrier, init_distributed
from helpers.ranks import free_port


def _equal(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (values or dtype); the key sets must match."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]


def _gather(module: torch.nn.Module) -> dict:
    """Full parameters and buffers of ``module`` (collective under FSDP2)."""
    out = {}
    for name, t in list(module.state_dict().items()) + [(f"buffer:{n}", b) for n, b in module.named_buffers()]:
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


def _bytes_read(cache) -> tuple[int, int]:
    """(bytes read by this rank, bytes of the shards it keeps) for a policy under FSDP2."""
    from miles_ray.training.fsdp.base import place
    from miles_ray.training.fsdp.logprobs import CausalLMForTraining

    model, files = load_empty("tiny:qwen3", "float32", cache)
    place(CausalLMForTraining(model), model, "fsdp2", "fp32", torch.device("cpu"), files)
    kept = sum(p.to_local().numel() * 4 for p in model.parameters())  # the file is fp32
    return files.read_bytes, kept


def _worker(rank, world_size, port, cache, out):
    from miles_ray.training.fsdp import PolicyTrainer
    from miles_ray.training.fsdp.critic import CriticTrainer

    torch.set_num_threads(1)
    init_distributed(rank, world_size, "127.0.0.1", port)
    found = {"bytes": _bytes_read(cache)}
    for strategy in ("ddp", "fsdp2"):
        train = TrainConfig(strategy=strategy)
        policy = PolicyTrainer("tiny:qwen3", train, AlgorithmConfig(kl_coef=0.1), tiny_cache_dir=cache)
        lm = policy.module
        found[strategy] = {"policy": _gather(lm), "ref": _gather(policy.ref.lm),
                           "critic": _gather(CriticTrainer("tiny:qwen3", train, tiny_cache_dir=cache).module),
                           "tied": lm.lm_head.weight is lm.model.embed_tokens.weight,
                           "ref_frozen": not any(p.requires_grad for p in policy.ref.parameters()),
                           "local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                        for p in lm.parameters())}
    torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(model_cache, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_loading")
    mp.spawn(_worker, args=(2, free_port(), model_cache, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_load_the_same_weights_as_today(model_cache, two_ranks, strategy):
    from miles_ray.training.fsdp.critic import load_value_model

    old = load_model("tiny:qwen3", "float32", model_cache)
    policy = {**old.state_dict(), **{f"buffer:{n}": b for n, b in old.named_buffers()}}
    value = load_value_model("tiny:qwen3", "float32", model_cache)
    critic = {**value.state_dict(), **{f"buffer:{n}": b for n, b in value.named_buffers()}}
    for found in two_ranks:
        got = found[strategy]
        assert not _equal(policy, got["policy"]) and not _equal(policy, got["ref"])
        assert not _equal(critic, got["critic"])
        assert got["tied"] and got["ref_frozen"]
    n_params = sum(p.numel() for p in old.parameters())
    local = [found[strategy]["local"] for found in two_ranks]
    assert local == [n_params] * 2 if strategy == "ddp" else sum(local) == n_params


def test_an_fsdp2_rank_reads_only_its_shards(two_ranks):
    for found in two_ranks:
        read, kept = found["bytes"]
        assert read == kept
