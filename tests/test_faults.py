"""Real processes killed mid-run: rollout engines and reward workers restart (Ray max_restarts), a
restarted engine is refit before it serves, its work is re-sent, and no sample is lost."""
import json

import pytest
import ray

from miles_ray.config import load_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_engine_and_reward_worker_killed_mid_run(local_ray, tmp_path, model_cache, backend):
    from jobs.sync_driver import run

    kills = ('[{"role": "rollout", "rank": 0, "step": 1, "delay_s": 0.05}, '
             '{"role": "reward", "rank": 1, "step": 2, "delay_s": 0.0}, '
             '{"role": "rollout", "rank": 1, "step": 3, "delay_s": 0.0}]')
    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "total_steps=5",
                             "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "rollout.num_engines=2",
                             "reward.num_workers=2", f"rollout.backend={backend}", "rollout.max_new_tokens=64",
                             "rollout.ignore_eos=true", f"faults.kills={kills}", f"run_name=faults-{backend}",
                             "logging.progress_bar=false", "logging.wandb=false"])
    summary = run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert summary["steps"] == 5 and [r["step"] for r in rows] == list(range(5))
    assert all(r["num_samples"] == 16 for r in rows)  # nothing lost
    assert rows[-1]["recoveries"] >= 2  # the engine and the reward worker came back
    assert all(r["mismatch_abs"] < 1e-4 for r in rows)  # restarted engines served refit weights only


def test_trainer_rank_killed_group_rebuilt_from_checkpoint(local_ray, tmp_path, model_cache):
    """Rank 1 of 2 dies in step 2: the group is rebuilt on the same bundles, the last checkpoint
    (every step) restored, and the run ends exactly as an uninterrupted one."""
    import torch

    from jobs.sync_driver import run
    from miles_ray import checkpoint as ckpt

    base = [f"model.tiny_cache_dir={model_cache}", "total_steps=4", "rollout.prompts_per_step=4",
            "rollout.n_samples_per_prompt=4", "cluster.num_trainers=2", "checkpoint.every=1",
            "logging.progress_bar=false", "logging.wandb=false"]
    run(load_config(None, base + [f"output_dir={tmp_path / 'ref'}", "run_name=tref"]))
    summary = run(load_config(None, base + [f"output_dir={tmp_path / 'kill'}", "run_name=tkill",
                                            'faults.kills=[{"role": "trainer", "rank": 1, "step": 2}]']))
    ref = [json.loads(x) for x in open(tmp_path / "ref" / "metrics.jsonl")]
    got = [json.loads(x) for x in open(tmp_path / "kill" / "metrics.jsonl")]
    assert [r["step"] for r in got] == [0, 1, 2, 3] and got[-1]["recoveries"] >= 1
    for a, b in zip(ref, got):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"]) and a["loss"] == pytest.approx(b["loss"], abs=1e-7)
    wa = torch.load(ckpt.latest(tmp_path / "ref" / "checkpoints") / "policy_rank0.pt", weights_only=False)["model"]
    wb = torch.load(ckpt.latest(tmp_path / "kill" / "checkpoints") / "policy_rank0.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and summary["steps"] == 4
