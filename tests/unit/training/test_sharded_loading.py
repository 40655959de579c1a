"""Sharded loading (:mod:`miles_ray.models.sharded`): parameters built on the meta device and
filled from the safetensors files, each rank reading only the rows it keeps. The weights equal
today's full load (``from_pretrained``) bit for bit: policy, reference and critic, 2 ranks, DDP and
FSDP2; tied embeddings stay tied; buffers (rotary ``inv_freq``, non-persistent) are right; an
FSDP2 rank reads exactly the bytes of its shards. MoE models (fused experts):
tests/unit/models/test_sharded_moe.py."""

import pytest
import torch

from miles_ray.models.loading import load_empty, load_model
from miles_ray.models.sharded import materialize


def _equal(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (values or dtype); the key sets must match."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]


@pytest.mark.parametrize("spec,dtype", [("tiny:qwen3", "float32"), ("tiny:llama", "float32"),
                                        ("tiny:qwen3", "bfloat16")])
def test_one_process_equals_from_pretrained(model_cache, spec, dtype):
    old = load_model(spec, dtype, model_cache)
    new, files = load_empty(spec, dtype, model_cache)
    assert files is not None and all(p.is_meta for p in new.parameters())
    materialize(new, new, files, torch.device("cpu"))
    assert not _equal(old.state_dict(), new.state_dict())
    assert not _equal(dict(old.named_buffers()), dict(new.named_buffers()))  # inv_freq: fp32 in a bf16 model too
    assert new.lm_head.weight is new.model.embed_tokens.weight
    assert new.config.to_dict() == old.config.to_dict() and new.generation_config == old.generation_config
    assert not new.training
