"""Real processes killed mid-run: rollout engines and reward workers restart (Ray max_restarts), a
restarted engine is refit before it serves, its work is re-sent; a dead trainer rank's group is
rebuilt from the last checkpoint. Each run ends with every step once, no sample lost, none trained
twice (the ledger in metrics.jsonl). Driver death: test_faults_driver.py; node loss:
test_faults_node.py."""
import json

import pytest
import ray

from miles_ray.config import load_config
from tests.helpers.ledger import check_run, final_weights

pytestmark = pytest.mark.ray


def _faults_run(tmp_path, model_cache, name: str, kills: str, *extra, steps: int = 5):
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", f"total_steps={steps}",
                             "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "rollout.num_engines=2",
                             "reward.num_workers=2", "rollout.max_new_tokens=64", "rollout.ignore_eos=true",
                             f"faults.kills={kills}", f"run_name={name}", "checkpoint.export_hf=false",
                             "logging.progress_bar=false", "logging.wandb=false", *extra])
    summary = run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert summary["steps"] == steps and [r["step"] for r in rows] == list(range(steps))
    assert all(r["rollout/num_samples"] == 16 for r in rows)
    return cfg, rows


ENGINE_KILLS = ('{"role": "rollout", "rank": 0, "step": 1, "delay_s": 0.05}, '
                '{"role": "rollout", "rank": 1, "step": 3, "delay_s": 0.0}')
# on steps of their own: each is met by the driver as in a run with reward kills only
REWARD_KILLS = ('{"role": "reward", "rank": 1, "step": 2, "delay_s": 0.0}, '
                '{"role": "reward", "rank": 0, "step": 4, "delay_s": 0.05}')


@pytest.mark.parametrize("backend,kills", [("hf", [ENGINE_KILLS]), ("native", [ENGINE_KILLS, REWARD_KILLS])],
                         ids=["hf", "native"])
def test_rollout_engine_and_reward_worker_killed_mid_run(local_ray, tmp_path, model_cache, tokenizer, backend, kills):
    """Engine 0 dies while generating (step 1), engine 1 at the start of step 3; in the native run
    also reward worker 1 at the start of step 2 and worker 0 in step 4 (one run for both roles:
    each kill fired, and each dead actor recovered by the driver)."""
    cfg, rows = _faults_run(tmp_path, model_cache, f"faults-{backend}", f"[{', '.join(kills)}]",
                            f"rollout.backend={backend}")
    assert rows[-1]["fault/fired"] == rows[-1]["fault/recovered"] == 2 * len(kills)
    assert rows[-1]["fault/recoveries"] >= 2 * len(kills)  # every killed actor came back (engines refit, work re-sent)
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)  # restarted engines served refit weights only
    check_run(tmp_path, cfg, tokenizer)  # every step once, no sample lost or trained twice


def test_trainer_rank_killed_group_rebuilt_from_checkpoint(local_ray, tmp_path, model_cache, tokenizer):
    """Rank 1 of 2 dies in step 2: the group is rebuilt on the same bundles, the last checkpoint
    restored (checkpoint.every keeps its default: the step-0 checkpoint, steps 0-1 redone), and the
    run ends exactly as an uninterrupted one."""
    import torch

    from jobs.train import run

    base = [f"model.tiny_cache_dir={model_cache}", "total_steps=4", "rollout.prompts_per_step=4",
            "rollout.n_samples_per_prompt=4", "cluster.num_trainers=2", "logging.progress_bar=false",
            "logging.wandb=false"]
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


def test_async_engine_and_reward_worker_killed_mid_run(local_ray, tmp_path, model_cache, tokenizer, caplog):
    """Async (S=1, partial rollout): the rollout thread recovers a dead engine (waits, refits it under
    the lock the main thread's weight sync also holds, regenerates its chunk), a dead reward
    worker and a hung engine (past rollout.request_timeout_s: restarted, its chunk regenerated); the
    run ends with every step once and every submitted group trained or buffered."""
    kills = ('[{"role": "rollout", "rank": 0, "step": 1, "delay_s": 0.05}, '
             '{"role": "reward", "rank": 1, "step": 2, "delay_s": 0.0}, '
             '{"role": "rollout", "rank": 1, "step": 2, "kind": "hang", "seconds": 600}]')
    cfg, rows = _faults_run(tmp_path, model_cache, "faults-async", kills, "rollout.backend=native",
                            "async_rl.enabled=true", "async_rl.staleness=1", "rollout.request_timeout_s=5")
    # every fault recovered; some recoveries may come while the run drains (after the last row): the
    # hung engine's restart, a scoring call to the dead reward worker still queued behind older groups
    assert rows[-1]["fault/recoveries"] >= 1
    assert "rollout-0 recovered in" in caplog.text and "reward-1 recovered in" in caplog.text
    assert "rollout-1 did not answer within rollout.request_timeout_s=5s (hung): restarting it" in caplog.text
    assert rows[-1]["fault/fired"] == 3
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


def test_same_trainer_failure_twice_stops_the_run(local_ray, tmp_path, model_cache, caplog):
    """Rank 1 of 2 raises in step 0 (a bug) while rank 0 waits in the gradient all-reduce: it looks
    like a lost rank, so the group is rebuilt once from the step-0 checkpoint (checkpoint.every
    keeps its default); the same error again in the redone step stops the run with it."""
    from jobs.recovery import RepeatedFailure
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "total_steps=2",
                             "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "cluster.num_trainers=2",
                             "rollout.backend=native", "run_name=repeat", "checkpoint.export_hf=false",
                             'faults.kills=[{"role": "trainer", "rank": 1, "step": 0, "kind": "raise"}]',
                             "logging.progress_bar=false", "logging.wandb=false"])
    assert cfg.checkpoint.every == 10 and cfg.faults.max_same_failure == 2
    with pytest.raises(RepeatedFailure, match="2 times in a row at step 0 .*InjectedFault: injected fault: rank 1") as err:
        run(cfg)
    assert isinstance(err.value.__cause__, ray.exceptions.RayTaskError)  # the original error, chained
    assert caplog.text.count("trainer group rebuilt from") == 1  # one rebuild, from the step-0 checkpoint
    assert f"rebuilt from {tmp_path / 'checkpoints' / 'step_0'}" in caplog.text
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text().strip() == ""  # no step completed


def test_hung_engine_times_out_and_dead_engine_work_moves(local_ray, tmp_path, model_cache, tokenizer):
    """Engine 0 hangs in step 1 (its generate sleeps 600 s): past rollout.request_timeout_s its
    prompts move to engine 1 and it is restarted; engine 1 is killed in step 2: its prompts move to
    engine 0 at once. Every step once, nothing lost, restarted engines refit before serving."""
    kills = ('[{"role": "rollout", "rank": 0, "step": 1, "kind": "hang", "seconds": 600}, '
             '{"role": "rollout", "rank": 1, "step": 2, "delay_s": 0.0}]')
    cfg, rows = _faults_run(tmp_path, model_cache, "faults-hang", kills, "rollout.backend=native",
                            "rollout.request_timeout_s=4", steps=3)
    assert rows[1]["fault/generate_timeouts"] == 1 and rows[1]["fault/generate_moved"] == 1
    assert 4 <= rows[1]["perf/time_rollout_s"] < 60  # not the 600 s hang
    assert rows[2]["fault/generate_moved"] >= 1 and rows[2]["fault/generate_timeouts"] == 0
    assert rows[-1]["fault/fired"] == rows[-1]["fault/recovered"] == 2 and rows[-1]["fault/recoveries"] >= 2
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)
    check_run(tmp_path, cfg, tokenizer)
