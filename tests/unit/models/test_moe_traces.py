"""R3 traces sized for the model's expert count, and replaying the router's own choices."""
import base64
import json

import numpy as np
import pytest
import torch

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.models.moe import Routing, decode, encode, trace_dtype
from miles_ray.rollout import SamplingParams
from miles_ray.rollout.native import NativeEngine
from miles_ray.training.fsdp import PolicyTrainer

REQS = [{"prompt": f"What is {i}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i} for i in range(3)]


@pytest.mark.parametrize("experts,dtype", [(8, "uint8"), (256, "uint8"), (300, "int16"), (40000, "int32")])
def test_trace_dtype_holds_every_expert_id(experts, dtype):
    ids = torch.randint(0, experts, (7, 3, 2))
    ids[0, 0, 0] = experts - 1  # the largest id must survive
    trace = json.loads(json.dumps(encode(ids, experts)))
    assert trace["dtype"] == dtype and torch.equal(decode(trace), ids)


def test_not_recorded_slots_and_old_traces_decode():
    ids = torch.tensor([[[3, 299]], [[-1, -1]]])
    assert torch.equal(decode(encode(ids, 300)), ids) and trace_dtype(8, signed=True) == "int8"
    assert torch.equal(decode(encode(torch.tensor([[[-1, 7]]]), 8)), torch.tensor([[[-1, 7]]]))
    old = np.array([[[0, 255]], [[12, 4]]], dtype=np.uint8)  # the original format: uint8, no dtype key
    legacy = {"shape": list(old.shape), "b64": base64.b64encode(old.tobytes()).decode()}
    assert decode(legacy).tolist() == [[[0, 255]], [[12, 4]]]
    with pytest.raises(ValueError, match="outside"):
        encode(torch.tensor([[[300, 1]]]), 300)


def _tiny_moe_300(folder, tokenizer):
    """One-layer Qwen3-MoE with 300 experts whose router only ever picks experts >= 256."""
    from transformers import AutoModelForCausalLM

    from miles_ray.models.tiny import save_once, tiny_model_config

    cfg = tiny_model_config("qwen3_moe", len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, 32, 1)
    cfg.num_experts, cfg.moe_intermediate_size = 300, 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[256:] = torch.randn(44, 32) * 5  # logits 0 for experts < 256: they never make the top-2
    return save_once(folder / "moe300", model, tokenizer)


def test_engine_traces_of_300_experts_keep_ids_past_255(tmp_path):
    from miles_ray.models.tiny import train_tokenizer

    path = _tiny_moe_300(tmp_path, train_tokenizer(0))
    engine = NativeEngine(str(path), seed=0)
    samples = engine.generate(REQS, 2, SamplingParams(6))
    routing = Routing(engine.model)
    assert routing.num_experts == 300
    for s in samples:
        assert s.routed_experts["dtype"] == "int16"
        trace = decode(s.routed_experts)
        assert trace.shape[0] == len(s.prompt_ids) + len(s.response_ids) - 1
        assert int(trace.min()) >= 256 and int(trace.max()) < 300  # uint8 would have wrapped these
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        ref = torch.full((ids.shape[1], 1, 2), -1)
        ref[:trace.shape[0]] = trace
        routing.set_reference(ref, replay=False)
        with torch.no_grad():
            engine.model(ids)
        stats = routing.take_stats()
        assert stats["slots"] == trace.shape[0] and stats["own_agree"] == stats["slots"]
    routing.set_reference(None, replay=False)


def test_replaying_the_routers_own_choices_leaves_logprobs_bit_identical(model_cache):
    """Record the trainer's own routing of a batch, replay it (R3): the log-probs must not move."""
    engine = NativeEngine("tiny:qwen3_moe", tiny_cache_dir=model_cache, seed=3)
    samples = engine.generate(REQS, 2, SamplingParams(8, temperature=1.0))
    for s in samples:
        s.routed_experts = None
    trainer = PolicyTrainer("tiny:qwen3_moe", TrainConfig(micro_batch_size=len(samples)),
                            AlgorithmConfig(routing_replay="r3"), tiny_cache_dir=model_cache)
    routing = trainer.core.routing
    routing.start_recording()
    free = trainer.compute_logprobs(samples)  # no traces: the router's own choices
    own = routing.collect()  # [tokens of the packed row, layers, k]
    offset = 0
    for s in samples:
        n = len(s.prompt_ids) + len(s.response_ids)
        s.routed_experts = encode(own[offset:offset + n - 1], routing.num_experts)
        offset += n
    routing.take_stats()
    replayed = trainer.compute_logprobs(samples)
    stats = routing.take_stats()
    assert stats["slots"] > 0 and stats["own_agree"] == stats["used_agree"] == stats["slots"]
    assert replayed == free  # bit for bit
    for s in samples:  # and a different choice does move them: the replay is really applied
        t = decode(s.routed_experts)
        s.routed_experts = encode((t + 1) % routing.num_experts, routing.num_experts)
    assert trainer.compute_logprobs(samples) != free
