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
from safetensors import safe_open
from safetensors.torch import save_file

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.models.loading import load_empty, load_model, resolve_model_path
from miles_ray.models.sharded import materialize
from miles_ray.models.sharded_moe import Stacked, sources
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


def test_files_hold_the_experts_one_by_one(model_cache):
    """What the converter is for: ``save_pretrained`` (transformers 5) writes the per-expert layout."""
    for spec, expert in zip(SPECS, ("mlp.experts.0.gate_proj.weight", "block_sparse_moe.experts.0.w1.weight")):
        folder = Path(resolve_model_path(spec, model_cache)["path"])
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            keys = set(f.keys())
        assert f"model.layers.0.{expert}" in keys and not any("gate_up_proj" in k for k in keys)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec", [*SPECS, "fused"])
def test_one_process_equals_from_pretrained(model_cache, fused_dir, spec, dtype):
    spec = fused_dir if spec == "fused" else spec
    old = load_model(spec, dtype, model_cache)
    new, files = load_empty(spec, dtype, model_cache)
    assert files is not None and all(p.is_meta for p in new.parameters())
    where = sources(new, files.shapes)
    fused = [n for n, _ in new.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused and all(isinstance(where[n], Stacked) == (spec != fused_dir) for n in fused)
    materialize(new, new, files, torch.device("cpu"))
    assert not _equal(_full(old), _full(new))
    assert new.lm_head.weight is new.model.embed_tokens.weight


def test_gate_then_up_per_expert(model_cache):
    """``gate_up_proj[e] = cat(gate_e, up_e)``, ``down_proj[e] = down_e``: no transpose."""
    model, files = load_empty("tiny:qwen3_moe", "float32", model_cache)
    materialize(model, model, files, torch.device("cpu"))
    experts = model.model.layers[1].mlp.experts
    with safe_open(files.files["model.layers.1.mlp.experts.5.up_proj.weight"], framework="pt") as f:
        gate, up, down = (f.get_tensor(f"model.layers.1.mlp.experts.5.{w}_proj.weight") for w in ("gate", "up", "down"))
    assert torch.equal(experts.gate_up_proj[5], torch.cat([gate, up])) and torch.equal(experts.down_proj[5], down)


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


def test_a_shard_of_experts_reads_only_those_experts(model_cache):
    """Rows ``[start, start + n)`` of a fused parameter (an uneven FSDP2 split, e.g. 3 ranks of 8)."""
    old = load_model("tiny:mixtral", "float32", model_cache).state_dict()
    model, files = load_empty("tiny:mixtral", "float32", model_cache)
    where = sources(model, files.shapes)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        before, out = files.read_bytes, torch.empty(2, *old[name].shape[1:])
        where[name].read(files, 6, out)
        assert torch.equal(out, old[name][6:]) and files.read_bytes - before == out.numel() * 4
