"""MoE routing traces, routing replay (R3) and true on-policy mode."""
import copy
import json

import pytest
import torch

from miles_ray.config import AlgorithmConfig, TrainConfig, load_config
from miles_ray.models.exact import ExactForward, self_test
from miles_ray.models.moe import Routing, decode, encode, find_routers
from miles_ray.rollout.native import NativeEngine
from miles_ray.rollout import SamplingParams
from miles_ray.training.fsdp import PolicyTrainer

REQS = [{"prompt": f"What is {i}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i} for i in range(6)]


@pytest.fixture(scope="module")
def moe_engine(model_cache):
    return NativeEngine("tiny:qwen3_moe", tiny_cache_dir=model_cache, seed=0)


def test_trace_round_trip():
    ids = torch.randint(0, 8, (5, 2, 2))
    assert torch.equal(decode(json.loads(json.dumps(encode(ids)))), ids)


def test_engine_records_the_experts_of_every_fed_token(moe_engine):
    samples = moe_engine.generate(REQS, 2, SamplingParams(8))
    model = moe_engine.model
    routing = Routing(model)
    for s in samples[:4]:
        trace = decode(s.routed_experts)
        assert list(trace.shape) == [len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2]
        ids = torch.tensor([s.prompt_ids + s.response_ids], device=model.device)
        ref = torch.full((ids.shape[1], 2, 2), -1)
        ref[:trace.shape[0]] = trace
        routing.set_reference(ref, replay=False)
        with torch.no_grad():
            model(ids)
        stats = routing.take_stats()
        assert stats["slots"] == trace.shape[0] * 2 and stats["own_agree"] == stats["slots"]  # fp32: same routing
    routing.set_reference(None, replay=False)  # the engine's model is shared with the next test


def test_replay_uses_recorded_experts_and_the_router_still_learns(moe_engine, model_cache):
    samples = moe_engine.generate(REQS[:3], 2, SamplingParams(6))
    for s in samples:  # pretend rollout routed every token to experts (6, 7)
        trace = decode(s.routed_experts)
        s.routed_experts = encode(torch.stack([torch.full_like(trace[..., 0], 6), torch.full_like(trace[..., 0], 7)], -1))
        s.advantages = [1.0] * len(s.response_ids)
    trainer = PolicyTrainer("tiny:qwen3_moe", TrainConfig(), AlgorithmConfig(routing_replay="r3"),
                            tiny_cache_dir=model_cache)
    trainer.optimizer.step = lambda: None
    m = trainer.train_step([samples])
    assert m["routing_agreement"] == 1.0 and m["routing_agreement_own"] < 0.5
    routers = find_routers(trainer.module)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)
    free = PolicyTrainer("tiny:qwen3_moe", TrainConfig(), AlgorithmConfig(), tiny_cache_dir=model_cache)
    m_free = free.train_step([copy.deepcopy(samples)])
    assert m_free["routing_agreement"] == m_free["routing_agreement_own"] < 0.5


@pytest.mark.parametrize("spec", ["tiny:qwen3", "tiny:qwen3_moe"])
def test_true_on_policy_rollout_equals_trainer_bit_for_bit(model_cache, spec):
    """Accepted means exact: where the startup self-test refuses the mode (a device whose kernels
    are not batch-invariant) the test only checks the refusal; on this CPU it never refuses."""
    from miles_ray.errors import UserError

    try:
        engine = NativeEngine(spec, tiny_cache_dir=model_cache, seed=1, exact_max_len=64)
        trainer = PolicyTrainer(spec, TrainConfig(lr=1e-2), AlgorithmConfig(true_on_policy=True),
                                tiny_cache_dir=model_cache, exact_max_len=64)
    except UserError as err:
        assert torch.cuda.is_available() and "self-test" in str(err)
        pytest.skip(f"refused on this device: {err}")
    for version in (1, 2):  # before and after an update synced to the engine
        engine.weights.update(trainer.get_weights(), version)
        samples = engine.generate(REQS, 4, SamplingParams(12, temperature=0.8))
        trainer.temperature = 0.8
        got = trainer.compute_logprobs(samples)
        assert all(s.response_logprobs == lp for s, lp in zip(samples, got))  # exact floats, every token
        for s in samples:
            s.advantages = [float(s.group_id % 2) - 0.5] * len(s.response_ids)
        m = trainer.train_step([samples])
        assert m["mismatch_max"] == 0.0 and m["mismatch_abs"] == 0.0


def test_self_test_refuses_a_forward_that_is_not_batch_invariant(model_cache):
    from miles_ray.errors import UserError
    from miles_ray.models import load_model

    class Drifting(ExactForward):  # a forward whose rows depend on the batch: what the guard exists for
        def logits(self, x):
            return super().logits(x) + 1e-6 * x.shape[0]

    model = load_model("tiny:qwen3", "float32", model_cache)
    self_test(ExactForward(model, 64), model.config.vocab_size)
    with pytest.raises(UserError, match="true_on_policy: the startup self-test"):
        self_test(Drifting(model, 64), model.config.vocab_size)


def test_config_guards():
    with pytest.raises(ValueError, match="needs rollout.backend=native or sglang"):
        load_config(None, ["algorithm.routing_replay=r3"])
    with pytest.raises(ValueError, match="engines' dtype"):
        load_config(None, ["algorithm.true_on_policy=true", "rollout.backend=native", "model.dtype=bfloat16"])
    cfg = load_config(None, ["algorithm.true_on_policy=true", "rollout.backend=native", "data.max_prompt_tokens=50",
                             "rollout.max_new_tokens=8"])
    assert cfg.exact_max_len == 64


def test_mixtral_routing_is_recorded(model_cache):
    engine = NativeEngine("tiny:mixtral", tiny_cache_dir=model_cache, seed=0)
    s = engine.generate(REQS[:1], 1, SamplingParams(5))[0]
    assert list(decode(s.routed_experts).shape) == [len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2]
