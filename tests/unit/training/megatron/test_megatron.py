"""Megatron backend, one process: the HF <-> Megatron conversion round trip, start-time layout
checks, the run-log line, the shims' documentation. The multi-rank runs (TP=1 x DP=2, TP=2 with SP
and resume, PP=2 against HF and the FSDP backend) are in tests/system/training/megatron/
test_megatron_ranks.py; a Ray run with a trainer-rank death in test_megatron_ray.py."""
import importlib.util

import pytest
import torch

from miles_ray.errors import UserValueError
from miles_ray.training.megatron import convert
from miles_ray.training.megatron.validate import validate_layout
from miles_ray.models.tiny import tiny_model_config

TRAIN = dict(packing=False, micro_batch_size=2, grad_clip=1.0)
ALGO = dict(kl_coef=0.05, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("qwen2", False), ("llama", True), ("qwen3_moe", False)])
def test_conversion_round_trip_bit_identical(arch, tied):
    """HF -> Megatron (every TP rank of every PP stage at TP=2, PP=2) -> HF reproduces each tensor
    (Qwen3-MoE: HF's fused experts split per expert and TP rank, then stacked again)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_model_config(arch, 512, 1, 2, hidden=64, layers=4)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).state_dict()
    if tied:
        hf.pop("lm_head.weight", None)
    def parts():
        for stage, (first, last) in enumerate([(True, False), (False, True)]):
            names = convert.stage_names(cfg, 2, first, last)
            shards = [convert.to_megatron(hf, names, cfg, r, 2, 2 * stage) for r in range(2)]
            for key in names:
                if convert.exported(key, cfg):
                    split = [s[key] for s in shards] if convert.tp_dim(key) is not None else [shards[0][key]]
                    yield from convert.to_hf(key, split, cfg, 2 * stage).items()

    back = dict(convert.fuse_experts(parts(), cfg))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], v) for k, v in hf.items())


@pytest.mark.parametrize("tp,pp,world,needle", [
    (3, 1, 3, "megatron.tensor_parallel=3 does not divide the model's 4 attention heads; use one of [1, 2, 4]"),
    (4, 1, 4, "megatron.tensor_parallel=4 does not divide the model's 2 KV heads; use one of [1, 2]"),
    (1, 3, 3, "megatron.pipeline_parallel=3 does not divide the model's 2 layers; use one of [1, 2]"),
    (2, 1, 3, "cluster.num_trainers=3 is not a multiple of megatron.tensor_parallel x megatron.pipeline_parallel"
              " = 2 x 1 = 2; set cluster.num_trainers to 2"),
])
def test_bad_layout_fails_with_numbers_and_fix(tp, pp, world, needle):
    cfg = tiny_model_config("qwen3", 512, 1, 2)
    with pytest.raises(UserValueError) as err:
        validate_layout(cfg, tp, pp, world)
    assert needle in str(err.value)


def test_run_with_a_bad_layout_fails_before_any_actor(tmp_path, model_cache):
    from jobs.train import run
    from miles_ray.config import load_config

    cfg = load_config("examples/grpo_arith_tiny_megatron.yaml", [
        f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "cluster.num_trainers=3"])
    with pytest.raises(UserValueError, match="cluster.num_trainers=3 is not a multiple of"):
        run(cfg)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"qat": "int4"})})
    with pytest.raises(UserValueError, match="does not support train.qat=int4; set train.qat=none"):
        run(cfg)


def test_run_log_line_names_layout_and_layer_spec(model_cache):
    from miles_ray.config import load_config
    from miles_ray.training.megatron.validate import validate_config

    cfg = load_config("examples/grpo_arith_tiny_megatron.yaml", [f"model.tiny_cache_dir={model_cache}"])
    line = validate_config(cfg)
    assert line.startswith("train.backend=megatron: TP=2 PP=1 DP=1 sequence_parallel=False")
    assert ("te layer spec" in line) == (importlib.util.find_spec("transformer_engine") is not None)
    assert validate_config(load_config(None, [f"model.tiny_cache_dir={model_cache}"])) is None  # fsdp


def test_shims_document_what_they_replace():
    """(Applied only in the spawned ranks above: never patch torch in the pytest process.)"""
    from miles_ray.training.megatron import shims

    for target in ("torch.cuda.current_device", "torch.cuda.synchronize", "_get_cuda_rng_state", "schedules.py",
                   "torch.Tensor.cuda"):
        assert target in shims.__doc__
