"""Sharded loading of MoE models whose experts transformers 5 fuses into 3-D parameters
(:mod:`miles_ray.models.sharded_moe`): files holding the experts one by one (what
``save_pretrained`` writes, Mixtral under its old ``block_sparse_moe`` names too) or already fused
load bit for bit as ``from_pretrained``, in one process and at 2 ranks (DDP, FSDP2; policy and
reference), and an FSDP2 rank reads exactly the bytes of its experts."""
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.models.loading import load_empty, load_model, resolve_model_path
from miles_ray.training.collectives import barrier, init_distributed
from helpers.ranks import free_port

SPECS = ("tiny:qwen3_moe", "tiny:mixtral")


def _equal(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (values or dtype); the key sets must match."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]


def _full(model: torch.nn.Module) -> dict:
    return {**model.state_dict(), **{f"buffer:{n}": b for n, b in model.named_buffers()}}


@pytest.fixture(scope="module")
def fused_dir(model_cache, tmp_path_factory):
    """tiny:qwen3_moe with its experts stored fused, under the parameters' names."""
    src = Path(resolve_model_path("tiny:qwen3_moe", model_cache)["path"])
    out = tmp_path_factory.mktemp("fused") / "tiny-qwen3_moe-fused"
    shutil.copytree(src, out)
    state = load_model("tiny:qwen3_moe", "float32", model_cache).state_dict()
    state.pop("lm_head.weight")  # tied, as save_pretrained leaves it
    save_file({k: v.contiguous().clone() for k, v in state.items()}, out / "model.safetensors", {"format": "pt"})
    return str(out)


def _gather(module: torch.nn.Module) -> dict:
    out = {}
    for name, t in list(module.state_dict().items()) + [(f"buffer:{n}", b) for n, b in module.named_buffers()]:
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


def _bytes_read(spec, cache) -> tuple[int, int]:
    """(bytes read by this rank, bytes of the shards it keeps) for a policy under FSDP2 (fp32 files)."""
    from miles_ray.training.fsdp.base import place
    from miles_ray.training.fsdp.logprobs import CausalLMForTraining

    model, files = load_empty(spec, "float32", cache)
    assert files is not None
    place(CausalLMForTraining(model), model, "fsdp2", "fp32", torch.device("cpu"), files)
    return files.read_bytes, sum(p.to_local().numel() * 4 for p in model.parameters())


def _worker(rank, world_size, port, cache, fused, out):
    from miles_ray.training.fsdp import PolicyTrainer

    torch.set_num_threads(1)
    init_distributed(rank, world_size, "127.0.0.1", port)
    found = {"bytes": {spec: _bytes_read(spec, cache) for spec in (*SPECS, fused)}}
    for spec in SPECS:
        for strategy in ("ddp", "fsdp2"):
            policy = PolicyTrainer(spec, TrainConfig(strategy=strategy), AlgorithmConfig(kl_coef=0.1),
                                   tiny_cache_dir=cache)
            lm = policy.module
            found[spec, strategy] = {
                "policy": _gather(lm), "ref": _gather(policy.ref.lm),
                "tied": lm.lm_head.weight is lm.model.embed_tokens.weight,
                "local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in lm.parameters())}
    torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(model_cache, fused_dir, tmp_path_factory):
    for spec in SPECS:  # written here, once, not by both ranks at the same time
        resolve_model_path(spec, model_cache)
    out = tmp_path_factory.mktemp("sharded_moe")
    mp.spawn(_worker, args=(2, free_port(), model_cache, fused_dir, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("spec", SPECS)
def test_two_ranks_load_the_same_weights_as_from_pretrained(model_cache, two_ranks, spec, strategy):
    old = load_model(spec, "float32", model_cache)
    for found in two_ranks:
        got = found[spec, strategy]
        assert not _equal(_full(old), got["policy"]) and not _equal(_full(old), got["ref"])
        assert got["tied"]
    n_params = sum(p.numel() for p in old.parameters())
    local = [found[spec, strategy]["local"] for found in two_ranks]
    assert local == [n_params] * 2 if strategy == "ddp" else sum(local) == n_params


def test_an_fsdp2_rank_reads_only_its_experts(two_ranks):
    for found in two_ranks:
        for spec, (read, kept) in found["bytes"].items():
            assert read == kept, spec
