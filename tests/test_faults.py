"""Real processes killed mid-run: rollout engines and reward workers restart (Ray max_restarts), a
restarted engine is refit before it serves, its work is re-sent; a dead trainer rank's group is
rebuilt from the last checkpoint. Each run ends with every step once, no sample lost, none trained
twice (the ledger in metrics.jsonl). Driver death: test_faults_driver.py; node loss:
test_faults_node.py."""
import json

import pytest

from miles_ray.config import load_config
from tests.helpers.ledger import check_run, final_weights

pytestmark = pytest.mark.ray


def _faults_run(tmp_path, model_cache, name: str, kills: str, *extra):
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "total_steps=5",
                             "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "rollout.num_engines=2",
                             "reward.num_workers=2", "rollout.max_new_tokens=64", "rollout.ignore_eos=true",
                             f"faults.kills={kills}", f"run_name={name}", "checkpoint.export_hf=false",
                             "logging.progress_bar=false", "logging.wandb=false", *extra])
    summary = run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert summary["steps"] == 5 and [r["step"] for r in rows] == list(range(5))
    assert all(r["rollout/num_samples"] == 16 for r in rows)
    return cfg, rows


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_rollout_engine_killed_mid_run(local_ray, tmp_path, model_cache, tokenizer, backend):
    """Engine 0 dies while generating (step 1), engine 1 at the start of step 3."""
    kills = ('[{"role": "rollout", "rank": 0, "step": 1, "delay_s": 0.05}, '
             '{"role": "rollout", "rank": 1, "step": 3, "delay_s": 0.0}]')
    cfg, rows = _faults_run(tmp_path, model_cache, f"faults-{backend}", kills, f"rollout.backend={backend}")
    assert rows[-1]["fault/recoveries"] >= 2  # both engines came back (refit, their work re-sent)
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)  # restarted engines served refit weights only
    check_run(tmp_path, cfg, tokenizer)  # every step once, no sample lost or trained twice


def test_reward_worker_killed_mid_run(local_ray, tmp_path, model_cache, tokenizer):
    kills = ('[{"role": "reward", "rank": 1, "step": 1, "delay_s": 0.0}, '
             '{"role": "reward", "rank": 0, "step": 3, "delay_s": 0.05}]')
    cfg, rows = _faults_run(tmp_path, model_cache, "faults-reward", kills, "rollout.backend=native")
    assert rows[-1]["fault/recoveries"] >= 2
    check_run(tmp_path, cfg, tokenizer)


def test_trainer_rank_killed_group_rebuilt_from_checkpoint(local_ray, tmp_path, model_cache, tokenizer):
    """Rank 1 of 2 dies in step 2: the group is rebuilt on the same bundles, the last checkpoint
    (every step) restored, and the run ends exactly as an uninterrupted one."""
    import torch

    from jobs.train import run

    base = [f"model.tiny_cache_dir={model_cache}", "total_steps=4", "rollout.prompts_per_step=4",
            "rollout.n_samples_per_prompt=4", "cluster.num_trainers=2", "checkpoint.every=1",
            "logging.progress_bar=false", "logging.wandb=false"]
    run(load_config(None, base + [f"output_dir={tmp_path / 'ref'}", "run_name=tref"]))
    cfg = load_config(None, base + [f"output_dir={tmp_path / 'kill'}", "run_name=tkill",
                                    'faults.kills=[{"role": "trainer", "rank": 1, "step": 2}]'])
    summary = run(cfg)
    ref = [json.loads(x) for x in open(tmp_path / "ref" / "metrics.jsonl")]
    got = [json.loads(x) for x in open(tmp_path / "kill" / "metrics.jsonl")]
    assert [r["step"] for r in got] == [0, 1, 2, 3] and got[-1]["fault/recoveries"] >= 1
    for a, b in zip(ref, got):
        assert a["rollout/reward_mean"] == pytest.approx(b["rollout/reward_mean"])
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-7)
    wa, wb = final_weights(tmp_path / "ref"), final_weights(tmp_path / "kill")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and summary["steps"] == 4
    check_run(tmp_path / "kill", cfg, tokenizer)  # the redone steps replaced the lost ones: none twice


def test_async_engine_and_reward_worker_killed_mid_run(local_ray, tmp_path, model_cache, tokenizer):
    """Async (S=1, partial rollout): the rollout thread recovers a dead engine (waits, refits it under
    the lock the main thread's weight sync also holds, regenerates its chunk) and a dead reward
    worker; the run ends with every step once and every submitted group trained or buffered."""
    kills = ('[{"role": "rollout", "rank": 0, "step": 1, "delay_s": 0.05}, '
             '{"role": "reward", "rank": 1, "step": 2, "delay_s": 0.0}, '
             '{"role": "rollout", "rank": 1, "step": 3, "delay_s": 0.1}]')
    cfg, rows = _faults_run(tmp_path, model_cache, "faults-async", kills, "rollout.backend=native",
                            "async_rl.enabled=true", "async_rl.staleness=1")
    assert rows[-1]["fault/recoveries"] >= 3
    check_run(tmp_path, cfg, tokenizer)


def test_async_trainer_rank_killed_rebuilt_from_checkpoint(local_ray, tmp_path, model_cache, tokenizer):
    """Async: rank 1 of 2 dies in step 2; the pump stops, a new trainer group restores the last
    checkpoint with its buffered and in-flight groups, and the run goes on with nothing lost."""
    cfg, rows = _faults_run(tmp_path, model_cache, "faults-async-trainer", '[{"role": "trainer", "rank": 1, "step": 2}]',
                            "rollout.backend=native", "async_rl.enabled=true", "async_rl.staleness=1",
                            "cluster.num_trainers=2", "checkpoint.every=1")
    assert rows[-1]["fault/recoveries"] >= 1
    check_run(tmp_path, cfg, tokenizer)


def test_critic_rank_killed_groups_rebuilt_from_checkpoint(local_ray, tmp_path, model_cache, tokenizer):
    """PPO with GAE: the critic rank dies in step 2; policy and critic groups are rebuilt and both
    restored from the last checkpoint."""
    cfg, rows = _faults_run(tmp_path, model_cache, "faults-critic", '[{"role": "critic", "rank": 0, "step": 2}]',
                            "rollout.backend=native", "algorithm.advantage=gae", "checkpoint.every=1")
    assert rows[-1]["fault/recoveries"] >= 1 and all("train/value_loss" in r for r in rows)
    check_run(tmp_path, cfg, tokenizer)
