"""R3 on multi-turn samples: the ``multi_turn`` loop on a tiny MoE carries a routing trace laid out
over the whole conversation (each token: the experts recorded when it was first fed)."""
import pytest
import torch

from miles_ray.agents.calculator import CalculatorEnv
from miles_ray.agents.env import register_env
from miles_ray.agents.runner import AgentEngine, AgentLimits
from miles_ray.config import AlgorithmConfig, TrainConfig, load_config
from miles_ray.models.moe import Routing, decode
from miles_ray.rollout.types import SamplingParams


@register_env("r3_test_always_calls")
class AlwaysCalls(CalculatorEnv):
    """The calculator, asked to compute 6*7 after every model turn (a random model never calls it)."""

    def step(self, content, tool_calls):
        call = {"id": "c", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}
        return super().step(content, [call])


@pytest.fixture(scope="module")
def moe_native(model_cache):
    from miles_ray.rollout.in_process import InProcessEngine

    cfg = load_config(None, ["rollout.backend=native", "model.path=tiny:qwen3_moe", f"model.tiny_cache_dir={model_cache}"])
    engine = InProcessEngine.from_config(cfg, 0)
    yield engine
    engine.close()


def _covered(s) -> int:
    """Tokens fed by some turn: up to the last model token (exclusive), i.e. its turn's last input."""
    last = max(i for i, m in enumerate(s.loss_mask) if m)
    return len(s.prompt_ids) + last


def test_multi_turn_samples_carry_the_experts_of_every_turn(moe_native, tokenizer, model_cache):
    agent = AgentEngine(moe_native, "multi_turn", tokenizer,
                        AgentLimits(max_turns=3, max_tokens=80, env="r3_test_always_calls"), concurrency=4)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=list(range(0, len(tokenizer), 2)))
    reqs = [{"prompt": f"What is {i}*7?", "label": str(7 * i), "prompt_index": i, "group_id": i,
             "messages": [{"role": "user", "content": f"What is {i}*7?"}]} for i in range(2)]
    samples = agent.generate(reqs, 2, params)
    assert max(s.metadata["turns"] for s in samples) >= 2
    model = moe_native.engine.model
    routing = Routing(model)
    for s in samples:
        assert not s.error and s.routed_experts is not None
        trace, full = decode(s.routed_experts), s.prompt_ids + s.response_ids
        assert list(trace.shape) == [len(full) - 1, 2, 2]
        n = _covered(s)
        routing.start_recording()
        with torch.no_grad():
            model(torch.tensor([full], device=model.device))
        own = routing.collect().cpu()
        assert torch.equal(trace[:n], own[:n])  # every fed token: its recorded experts (fp32: the same)
        assert bool((trace[n:] == -1).all())  # tool tokens after the last turn were never fed
        if s.metadata["turns"] >= 2:  # tool tokens between turns were fed by the next turn: recorded
            tool = [len(s.prompt_ids) + i for i, m in enumerate(s.loss_mask) if not m and len(s.prompt_ids) + i < n]
            assert tool and bool((trace[tool] >= 0).all())
    from miles_ray.training.fsdp import PolicyTrainer

    trainer = PolicyTrainer("tiny:qwen3_moe", TrainConfig(), AlgorithmConfig(routing_replay="r3"),
                            tiny_cache_dir=model_cache)
    trainer.core.routing.take_stats()
    trainer.compute_logprobs(samples)
    stats = trainer.core.routing.take_stats()  # the trainer replays every recorded token of every turn
    assert stats["slots"] == 2 * sum(_covered(s) for s in samples) and stats["used_agree"] == stats["slots"]
