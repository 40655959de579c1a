"""Megatron backend with Qwen3-MoE on CPU over real gloo groups (spawned ranks, as test_megatron.py):
expert parallelism (megatron's MoE layer, alltoall token dispatcher over gloo), TP x EP, MoE at
PP=2, each against the HF model (log-probs) and the FSDP backend (one GRPO step); the HF <->
Megatron conversion round trip per EP rank (bit-identical), layout errors. R3 (routing replay on
megatron's router) against the FSDP backend's R3 on the same traces."""

import pytest
import torch

from miles_ray.errors import UserValueError
from miles_ray.models.tiny import tiny_model_config
from miles_ray.training.megatron import convert
from miles_ray.training.megatron.validate import validate_layout

MODEL = "tiny:qwen3_moe"
TRAIN = dict(packing=False, micro_batch_size=2, grad_clip=1.0)
ALGO = dict(kl_coef=0.05, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)


@pytest.mark.parametrize("tp,ep,etp", [(1, 2, None), (2, 2, None), (2, 2, 1), (1, 4, None)])
def test_conversion_round_trip_per_ep_rank(tp, ep, etp):
    """HF -> Megatron (every TP x EP rank, expert-TP ``etp``) -> HF is bit-identical."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_model_config("qwen3_moe", 512, 1, 2, hidden=64, layers=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).state_dict()
    hf.pop("lm_head.weight", None)  # tied: HF ties it, the export leaves it out
    local, size = cfg.num_experts // ep, etp or tp
    names = convert.stage_names(cfg, 2, True, True, ep)
    assert sum(convert.is_expert(n) for n in names) == 2 * 2 * local

    def parts():
        for e in range(ep):
            for key in names:
                if not convert.exported(key, cfg):
                    continue
                if convert.is_expert(key):  # this EP rank's block, from its expert-TP shards
                    shards = [convert.to_megatron(hf, [key], cfg, 0, tp, 0, convert.Experts(e * local, r, size))[key]
                              for r in range(size)]
                    yield from convert.to_hf(key, shards, cfg, 0, e * local).items()
                elif e == 0:  # dense: the same on every EP rank
                    ranks = range(tp) if convert.tp_dim(key) is not None else [0]
                    yield from convert.to_hf(key, [convert.to_megatron(hf, [key], cfg, r, tp, 0)[key] for r in ranks],
                                             cfg, 0).items()

    back = dict(convert.fuse_experts(parts(), cfg))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], v) for k, v in hf.items())


@pytest.mark.parametrize("tp,pp,world,ep,etp,needle", [
    (1, 1, 2, 3, None, "megatron.expert_parallel=3 does not divide the model's 8 experts; use one of [1, 2, 4, 8]"),
    (1, 1, 2, 4, None, "cluster.num_trainers=2 is not a multiple of megatron.expert_tensor_parallel x "
                       "megatron.expert_parallel x megatron.pipeline_parallel = 1 x 4 x 1 = 4"),
    (1, 1, 2, 1, 3, "megatron.expert_tensor_parallel=3 does not divide the model's 128 expert FFN columns"),
])
def test_bad_expert_layout_fails_with_numbers_and_fix(tp, pp, world, ep, etp, needle):
    cfg = tiny_model_config("qwen3_moe", 512, 1, 2)
    with pytest.raises(UserValueError) as err:
        validate_layout(cfg, tp, pp, world, ep, etp)
    assert needle in str(err.value)


def test_expert_parallel_on_a_dense_model_fails():
    with pytest.raises(UserValueError, match="megatron.expert_parallel=2 / expert_tensor_parallel=None with a dense"):
        validate_layout(tiny_model_config("qwen3", 512, 1, 2), 1, 1, 2, 2, None)
