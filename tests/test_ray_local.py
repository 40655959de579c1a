"""Real local Ray: placement groups with fake GPUs, named actors, and a short synchronous run."""
import json

import pytest
import ray

from jobs.cluster import start_actors, stop_actors
from miles_ray.config import load_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, model_cache, *extra):
    return load_config(None, [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}",
                              "logging.progress_bar=false", "logging.wandb=false", *extra])


@pytest.mark.parametrize("colocate", [False, True])
def test_actors_on_their_bundles_with_fake_gpus(local_ray, tmp_path, model_cache, colocate):
    cfg = _cfg(tmp_path, model_cache, "cluster.use_gpu=true", f"cluster.colocate={colocate}",
               "rollout.num_engines=2", f"run_name=place{int(colocate)}")
    actors = start_actors(cfg)
    try:
        trainer = ray.get(actors.trainer.where.remote())
        engines = ray.get([e.where.remote() for e in actors.engines])
        reward = ray.get(actors.rewards[0].where.remote())
        for role in ("trainer-0", "rollout-0", "rollout-1", "reward-0", "buffer-0"):  # named: roles on the dashboard
            assert ray.get(ray.get_actor(f"{cfg.run_name}-{role}").ready.remote())
        pgs = {name: pg.id.hex() for name, pg in actors.groups.items()}
        assert reward["gpu_ids"] == [] and reward["placement_group_id"] == pgs["service"]
        if colocate:
            assert trainer["placement_group_id"] == engines[0]["placement_group_id"] == pgs["colocated"]
            assert trainer["gpu_ids"] == engines[0]["gpu_ids"]  # trainer rank 0 and engine 0 share a GPU
            assert engines[0]["gpu_ids"] != engines[1]["gpu_ids"]
        else:
            assert trainer["placement_group_id"] == pgs["trainer"]
            assert {e["placement_group_id"] for e in engines} == {pgs["rollout"]}
            gpus = [trainer["gpu_ids"][0], *[e["gpu_ids"][0] for e in engines]]
            assert len(set(gpus)) == 3  # disaggregated: each on its own GPU
    finally:
        stop_actors(actors)


def test_sync_run_writes_metrics(local_ray, tmp_path, model_cache):
    from jobs.sync_driver import run

    cfg = _cfg(tmp_path, model_cache, "total_steps=3", "rollout.prompts_per_step=4",
               "rollout.n_samples_per_prompt=4", "train.sft_warmup_steps=2", "rollout.num_engines=2",
               "reward.num_workers=2", "run_name=syncrun")
    summary = run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and summary["steps"] == 3
    assert all(r["num_samples"] == 16 and 0 <= r["reward_mean"] <= 1 for r in rows)
    assert [r["weight_version"] for r in rows] == [2, 3, 4]
    assert rows[0]["mismatch_abs"] < 1e-4  # engines served exactly the trainer's weights
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "samples.jsonl").is_file()
