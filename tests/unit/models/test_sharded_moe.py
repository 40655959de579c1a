"""Sharded loading of MoE models whose experts transformers 5 fuses into 3-D parameters
(:mod:`miles_ray.models.sharded_moe`): files holding the experts one by one (what
``save_pretrained`` writes, Mixtral under its old ``block_sparse_moe`` names too) or already fused
load bit for bit as ``from_pretrained``, in one process and at 2 ranks (DDP, FSDP2; policy and
reference), and an FSDP2 rank reads exactly the bytes of its experts."""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from miles_ray.models.loading import load_empty, load_model, resolve_model_path
from miles_ray.models.sharded import materialize
from miles_ray.models.sharded_moe import Stacked, sources

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


def test_a_shard_of_experts_reads_only_those_experts(model_cache):
    """Rows ``[start, start + n)`` of a fused parameter (an uneven FSDP2 split, e.g. 3 ranks of 8)."""
    old = load_model("tiny:mixtral", "float32", model_cache).state_dict()
    model, files = load_empty("tiny:mixtral", "float32", model_cache)
    where = sources(model, files.shapes)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        before, out = files.read_bytes, torch.empty(2, *old[name].shape[1:])
        where[name].read(files, 6, out)
        assert torch.equal(out, old[name][6:]) and files.read_bytes - before == out.numel() * 4
