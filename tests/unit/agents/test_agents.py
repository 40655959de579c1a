"""Multi-turn rollout, in one process: token-exact trajectories with loss masks, the calculator
environment, rollout functions on a real native engine (failures scored, never a crash), and the
trainer's batches honouring ``Sample.loss_mask``."""
import json

import pytest
import torch

from miles_ray.agents import Trajectory, make_env
from miles_ray.agents.calculator import demonstration, evaluate
from miles_ray.agents.runner import AgentEngine, AgentLimits
from miles_ray.algorithms import assign_advantages
from miles_ray.config import AlgorithmConfig, load_config
from miles_ray.openai_api.chat import parse_tool_calls, render_prompt
from miles_ray.rewards import RewardRunner
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample
from miles_ray.training.batching import loss_tokens, pack


def _demo_traj(tokenizer, max_tokens=512):
    env = make_env("calculator")
    obs = env.reset("What is 47*86?", "4042")
    traj = Trajectory(tokenizer, obs.messages, obs.tools, max_tokens)
    for msg in env.demonstration("What is 47*86?", "4042"):
        traj.add_demonstration_turn(msg) if msg["role"] == "assistant" else traj.add_env_messages([msg])
    return traj


def test_trajectory_tokens_are_the_rendered_conversation_and_mask_marks_model_turns(tokenizer):
    traj = _demo_traj(tokenizer)
    n = len(traj.response_ids)
    assert len(traj.loss_mask) == len(traj.logprobs) == n
    full = render_prompt(tokenizer, traj.messages, add_generation_prompt=False)
    assert tokenizer.decode(traj.ids) == full.rstrip("\n")  # the template's newline after the last turn is not sampled
    model = tokenizer.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if m])
    env = tokenizer.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if not m])
    assert "<tool_call>" in model and "4042<|im_end|>" in model and "<tool_response>" not in model
    assert "<tool_response>\n4042\n</tool_response>" in env and "<tool_call>" not in env
    assert traj.final_answer() == "4042"


def test_trajectory_budget_truncates_and_reports(tokenizer):
    traj = _demo_traj(tokenizer, max_tokens=90)
    assert len(traj.response_ids) == 90 and traj.truncated and traj.remaining == 0


def test_calculator_evaluates_arithmetic_only():
    assert evaluate("47*86") == "4042" and evaluate("(1+2)/4") == "0.75" and evaluate("2**10") == "1024"
    for bad in ("__import__('os').system('true')", "open('/etc/passwd')", "9**999999", "1/0", "x+1", 5):
        assert evaluate(bad).startswith("error:"), bad
    env = make_env("calculator")
    env.reset("What is 2*3?", "6")
    call = parse_tool_calls('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>')[1]
    out = env.step("", call)
    assert out.messages[0]["role"] == "tool" and out.messages[0]["content"] == "6" and not out.done
    assert env.step("6", []).done
    wrong = [{"id": "c", "function": {"name": "shell", "arguments": "{}"}}]
    assert "unknown tool" in env.step("", wrong).messages[0]["content"]


def test_tool_call_parsing_keeps_text_and_skips_broken_blocks():
    content, calls = parse_tool_calls('Let me compute. <tool_call>{"name": "calculator", "arguments": '
                                      '{"expression": "1+1"}}</tool_call><tool_call>{broken</tool_call>')
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"expression": "1+1"}]
    assert content.startswith("Let me compute.") and "{broken" in content


def test_packed_batches_and_advantages_honour_the_loss_mask(tokenizer):
    traj = _demo_traj(tokenizer)
    s = Sample(0, 0, "p", "4042", traj.prompt_ids, traj.response_ids, traj.logprobs, reward=1.0,
               loss_mask=traj.loss_mask)
    plain = Sample(1, 0, "p", "0", traj.prompt_ids[:5], [5, 6, 7], [0.0] * 3, reward=0.0)
    batch = pack([s, plain], packed=True)
    row, start, r = batch.spans[0]
    assert batch.mask[row, start:start + r].tolist() == [float(m) for m in traj.loss_mask]
    assert batch.sample_mask[0, :r].tolist() == [float(m) for m in traj.loss_mask]
    assert loss_tokens([s, plain]) == sum(traj.loss_mask) + 3
    assign_advantages([s, plain], AlgorithmConfig(advantage="reinforce_pp"))
    assert all(a == 0.0 for a, m in zip(s.advantages, traj.loss_mask) if not m)
    assert any(a != 0.0 for a, m in zip(s.advantages, traj.loss_mask) if m)
    bad = Sample(2, 0, "p", "0", [1], [2, 3], [0.0, 0.0], loss_mask=[1])
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2 response tokens"):
        pack([bad])


@pytest.fixture(scope="module")
def native(model_cache):
    from miles_ray.rollout.in_process import InProcessEngine

    cfg = load_config(None, ["rollout.backend=native", f"model.tiny_cache_dir={model_cache}"])
    engine = InProcessEngine.from_config(cfg, 0)
    yield engine
    engine.close()


def _agent(native, tokenizer, fn, **limits):
    return AgentEngine(native, fn, tokenizer, AgentLimits(**{"env": "calculator", **limits}), concurrency=8)


def _requests(k):
    return [{"prompt": f"What is {i}*7?", "label": str(7 * i), "prompt_index": i, "group_id": i,
             "messages": [{"role": "user", "content": f"What is {i}*7?"}]} for i in range(k)]


def test_multi_turn_on_a_native_engine_returns_n_samples_per_request_in_order(native, tokenizer):
    agent = _agent(native, tokenizer, "multi_turn", max_turns=3, max_tokens=60)
    out = agent.generate(_requests(3), 2, SamplingParams(max_new_tokens=24))
    assert [s.group_id for s in out] == [0, 0, 1, 1, 2, 2]
    for s in out:
        assert not s.error and len(s.response_ids) == len(s.loss_mask) == len(s.response_logprobs) <= 60
        assert s.metadata["turns"] >= 1 and s.prompt_ids and s.loss_mask[0] == 1
    streamed = list(agent.generate_stream(_requests(3), 2, SamplingParams(max_new_tokens=8)))
    assert sorted(len(g) for g in streamed) == [2, 2, 2] and all(len({s.group_id for s in g}) == 1 for g in streamed)


def test_chat_client_keeps_exact_token_ids(native, tokenizer):
    from tests.helpers.agent_fns import chat_once

    agent = _agent(native, tokenizer, "tests.helpers.agent_fns:chat_once")
    (s,) = agent.generate(_requests(1), 1, SamplingParams(max_new_tokens=12))
    assert not s.error
    assert s.prompt_ids == tokenizer(render_prompt(tokenizer, _requests(1)[0]["messages"]),
                                     add_special_tokens=False)["input_ids"]
    assert len(s.response_ids) == len(s.response_logprobs) >= 1 and callable(chat_once)


@pytest.mark.parametrize("fn, why", [
    ("raises_on_odd", "RuntimeError: tool server unreachable"),
    ("returns_dict", "returned dict, not a miles_ray.sample.Sample"),
    ("over_budget", "exceed agent.max_tokens=20"),
    ("too_slow", "TimeoutError"),
])
def test_a_failing_rollout_function_gives_a_counted_failure_never_a_crash(native, tokenizer, fn, why):
    agent = _agent(native, tokenizer, f"tests.helpers.agent_fns:{fn}", max_tokens=20,
                   timeout_s=0.5 if fn == "too_slow" else 60)
    out = agent.generate(_requests(2), 2, SamplingParams(max_new_tokens=4))
    failed = [s for s in out if s.error]
    assert failed and all(f"rollout.fn 'tests.helpers.agent_fns:{fn}'" in s.error and why in s.error for s in failed)
    assert all(s.loss_mask == [0] for s in failed)  # nothing of a failed conversation is trained on
    runner = RewardRunner("math", failure_score=-1.0, isolate=False)
    scores, stats = runner.score([(s.prompt, s.response_text, s.label) for s in out], [s.error for s in out])
    assert [sc for sc, s in zip(scores, out) if s.error] == [-1.0] * len(failed)
    assert stats.skipped == len(failed) and stats.reasons["rollout_fn"] == len(failed)


def test_abort_stops_one_conversation_mid_turn(native, tokenizer):
    import threading
    import time

    agent = _agent(native, tokenizer, "multi_turn", max_turns=3, max_tokens=500)
    params = SamplingParams(max_new_tokens=300, ignore_eos=True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=agent.generate(_requests(1), 2, params)))
    worker.start()
    deadline = time.time() + 30
    while "0-0" not in agent.clients and time.time() < deadline:
        time.sleep(0.01)
    native.pause()  # hold the engine between two decode steps: the abort lands mid-turn on any machine
    try:
        assert agent.abort("0-0")  # the conversation id: <group_id>-<k>
    finally:
        native.resume()
    worker.join(120)
    first, second = result["out"]
    assert first.finish_reason == "abort" and len(first.response_ids) < 300
    assert second.finish_reason == "length" and len(second.response_ids) == 300  # the other one ran on


def test_eval_requests_carry_the_chat_messages(tokenizer):
    """Environments start from the dataset's messages (not the templated prompt), in training and
    in evaluation alike."""
    from miles_ray.data import load_prompts
    from miles_ray.eval.datasets import eval_requests

    cfg = load_config(None, ["data.source=synthetic:calculator", "data.num_synthetic=4"])
    items, _ = load_prompts(cfg.data, tokenizer)
    req = eval_requests(items)[0]
    assert req["messages"] == [{"role": "user", "content": items[0].messages[0]["content"]}]
    assert req["messages"][0]["content"].startswith("What is ") and "<|im_start|>" not in req["messages"][0]["content"]
