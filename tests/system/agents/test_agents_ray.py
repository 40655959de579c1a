"""Multi-turn rollout through real Ray runs: rewards scored while groups still generate, failing
rollout functions counted (never a crash), the calculator agent loop end to end, and conversations
that continue across a weight update in the async driver; every step's ledger checked."""
import json

from helpers.ledger import check_run, rows
from miles_ray.config import load_config


def _run(tmp_path, model_cache, *extra):
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "logging.wandb=false",
                             "logging.progress_bar=false", "rollout.backend=native", "rollout.prompts_per_step=4",
                             "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8", "train.micro_batch_size=8",
                             "checkpoint.every=0", *extra])
    run(cfg)
    return cfg


def test_rewards_are_scored_while_other_groups_still_generate(local_ray, tmp_path, model_cache, tokenizer):
    stamps = tmp_path / "stamps.txt"  # every row's label: where the engine and reward processes write times
    data = tmp_path / "stamps.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "label": str(stamps)}) + "\n" for i in range(8)))
    cfg = _run(tmp_path / "run", model_cache, "total_steps=1", "rollout.fn=tests.helpers.agent_fns:chat_once",
               "reward.fn=tests.helpers.custom_rewards:stamp_reward", "rollout.prompts_per_step=8",
               f"data.source={data}")
    events = [line.split() for line in stamps.read_text().splitlines()]
    generated = [float(t) for kind, t in events if kind == "generated"]
    scored = [float(t) for kind, t in events if kind == "reward"]
    assert len(generated) == len(scored) == 16
    # groups finish 0.3 s apart (chat_once): the first ones are scored before the last ones are generated
    assert min(scored) < max(generated), "scoring waited for the whole rollout"
    check_run(tmp_path / "run", cfg, tokenizer)


def test_failing_rollout_function_is_counted_and_the_run_goes_on(local_ray, tmp_path, model_cache, tokenizer):
    cfg = _run(tmp_path, model_cache, "total_steps=2", "rollout.fn=tests.helpers.agent_fns:raises_on_odd",
               "reward.failure_score=-1")
    got = rows(tmp_path)
    assert all(r["rollout/rollout_fn_errors"] == 4 for r in got)  # groups 1 and 3 of each step, 2 samples each
    assert all(r["rollout/reward_fail_rollout_fn"] == 4 for r in got)
    check_run(tmp_path, cfg, tokenizer)


def test_calculator_agent_loop_runs_end_to_end(local_ray, tmp_path, model_cache, tokenizer):
    """SFT warm-up on demonstrated conversations, then multi-turn GRPO steps: the metrics show the
    conversations (turns, tool calls, the share of model tokens) and every step is trained once."""
    cfg = _run(tmp_path, model_cache, "total_steps=2", "rollout.fn=multi_turn", "agent.env=calculator",
               "data.source=synthetic:calculator", "data.synthetic_max_operand=99", "rollout.max_new_tokens=90",
               "agent.max_tokens=140", "train.sft_warmup_steps=2", "train.sft_batch_size=4")
    got = rows(tmp_path)
    for r in got:
        assert r["rollout/agent_turns_mean"] >= 1 and 0 < r["rollout/agent_model_token_frac"] <= 1
        assert "rollout/agent_tool_calls_mean" in r and r["rollout/rollout_fn_errors"] == 0
    check_run(tmp_path, cfg, tokenizer)


def test_async_conversations_continue_across_weight_updates(local_ray, tmp_path, model_cache, tokenizer):
    cfg = _run(tmp_path, model_cache, "total_steps=4", "async_rl.enabled=true", "async_rl.staleness=1",
               "rollout.fn=tests.helpers.agent_fns:three_turns", "checkpoint.every=2")
    got = rows(tmp_path)
    fracs = [r["rollout/agent_mixed_version_frac"] for r in got]
    assert all(0.0 <= f <= 1.0 for f in fracs)
    print("conversations spanning a weight update, per step:", fracs)
    check_run(tmp_path, cfg, tokenizer)
