"""Megatron backend: bucketed weight export with tensor collectives only, and sharded loading
(each rank reads its own TP / PP / EP slices of the safetensors files), on CPU over real gloo
groups (spawned ranks, as test_megatron.py): TP=2, PP=2 (tiny Qwen3), EP=2 (tiny Qwen3-MoE, its
experts stored per expert in the files)."""

import pytest
import torch

OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "send_object_list", "recv_object_list",
                      "gather_object", "scatter_object_list")


@pytest.mark.parametrize("tp", [1, 2])
def test_lazy_view_reads_only_the_slices(tmp_path, model_cache, tp):
    """convert.to_megatron over the lazy view equals it over the full state dict, per TP rank,
    reading about 1/tp of the split tensors."""
    from miles_ray.models import load_model
    from miles_ray.training.megatron import convert
    from miles_ray.training.megatron.hf_files import hf_source

    cfg, lazy, files = hf_source("tiny:qwen3", model_cache)
    full = load_model("tiny:qwen3", "float32", model_cache).state_dict()
    names = convert.stage_names(cfg, cfg.num_hidden_layers, True, True)
    for rank in range(tp):
        before = files.read_bytes
        got, want = (convert.to_megatron(s, names, cfg, rank, tp, 0) for s in (lazy, full))
        assert all(torch.equal(got[k], want[k]) for k in names)
        total = sum(t.numel() * t.element_size() for k, t in full.items() if k != "lm_head.weight")
        assert files.read_bytes - before <= total / tp + 8 * 1024  # + the replicated norms
