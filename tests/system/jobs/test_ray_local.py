"""Real local Ray: placement groups with fake GPUs, named actors, and a short synchronous run."""
import json

import pytest
import ray

from jobs.cluster import start_actors, stop_actors
from miles_ray.config import load_config

pytestmark = pytest.mark.ray


def _cfg(tmp_path, model_cache, *extra):
    return load_config(None, [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}",
                              "logging.progress_bar=false", "logging.wandb=false", *extra])


@pytest.mark.parametrize("colocate", [False, True])
def test_actors_on_their_bundles_with_fake_gpus(local_ray_gpus, tmp_path, model_cache, colocate):
    """Each role on its placement group's bundles; colocated, the engine sharing trainer rank 0's
    GPU then serves only after a refit (the same actors: no second start)."""
    cfg = _cfg(tmp_path, model_cache, "cluster.use_gpu=true", f"cluster.colocate={colocate}",
               "rollout.num_engines=2", f"run_name=place{int(colocate)}")
    actors = start_actors(cfg)
    try:
        trainer = ray.get(actors.policy.actors[0].where.remote())
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
            _colocated_engine_serves_only_after_refit(actors)
        else:
            assert trainer["placement_group_id"] == pgs["trainer"]
            assert {e["placement_group_id"] for e in engines} == {pgs["rollout"]}
            gpus = [trainer["gpu_ids"][0], *[e["gpu_ids"][0] for e in engines]]
            assert len(set(gpus)) == 3  # disaggregated: each on its own GPU
    finally:
        stop_actors(actors)


def test_weight_sync_transports_make_engines_match_trainer(local_ray_gpus, tmp_path, model_cache):
    """After each sync, the engines' log-probs for their samples equal the trainer ranks' (1e-5)."""
    from jobs.weight_sync import WeightSync
    from miles_ray.data import synthetic_rows, validate_rows
    from miles_ray.models import load_tokenizer
    from miles_ray.rollout import SamplingParams
    from miles_ray.training.sft import sft_samples

    cfg = _cfg(tmp_path, model_cache, "cluster.num_trainers=2", "rollout.num_engines=2", "run_name=wsync",
               "weight_sync.bucket_mb=0.05")  # small buckets: many per sync
    actors = start_actors(cfg)
    try:
        tok = load_tokenizer("tiny:qwen3", model_cache)
        items, _ = validate_rows(synthetic_rows("arithmetic", 8, 9, 0), tok)
        reqs = [{"prompt": i.prompt, "label": i.label, "prompt_index": i.index, "group_id": k}
                for k, i in enumerate(items)]
        syncs = {t: WeightSync(actors, t) for t in ("object_store", "broadcast", "shm")}
        order = ["object_store", "broadcast", "shm", "broadcast", "shm", "object_store"]  # reuse channels/buffers
        for version, transport in enumerate(order, start=2):
            actors.policy.sft_step(sft_samples(items, tok), 1e-2)  # move the weights
            syncs[transport].sync(version)
            assert ray.get([e.health.remote() for e in actors.engines]) == [
                {"state": "ready", "weight_version": version}] * 2
            samples = [s for e in actors.engines for s in ray.get(e.generate.remote(reqs[:4], 2, SamplingParams(6)))]
            prepared = actors.policy.scatter("prepare", samples)
            diffs = [abs(a - b) for s in prepared for a, b in zip(s.old_logprobs, s.response_logprobs)]
            assert max(diffs) < 1e-5, (transport, max(diffs))
    finally:
        stop_actors(actors)


def _colocated_engine_serves_only_after_refit(actors) -> None:
    from jobs.weight_sync import WeightSync
    from miles_ray.rollout import SamplingParams

    engine = actors.engines[0]
    ray.get(engine.release_memory.remote())
    assert ray.get(engine.health.remote())["state"] == "released"
    ray.get(engine.resume_memory.remote())
    assert ray.get(engine.health.remote())["state"] == "stale"
    req = [{"prompt": "What is 1+1?", "label": "2", "prompt_index": 0, "group_id": 0}]
    with pytest.raises(ray.exceptions.RayTaskError, match="only after a complete weight load"):
        ray.get(engine.generate.remote(req, 1, SamplingParams(4)))
    WeightSync(actors, "object_store").sync(5)
    assert ray.get(engine.health.remote()) == {"state": "ready", "weight_version": 5}
    assert len(ray.get(engine.generate.remote(req, 2, SamplingParams(4)))) == 2


@pytest.mark.parametrize("extra", [
    ("cluster.colocate=false", "weight_sync.transport=object_store", "algorithm.advantage=grpo"),
    ("cluster.colocate=true", "weight_sync.transport=broadcast", "algorithm.advantage=gae",
     "algorithm.kl_coef=0.01", "algorithm.kl_mode=reward", "train.strategy=fsdp2"),
])
def test_sync_run_two_ranks_two_engines(local_ray_gpus, tmp_path, model_cache, extra):
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, "total_steps=3", "rollout.prompts_per_step=4",
               "rollout.n_samples_per_prompt=4", "train.sft_warmup_steps=2", "rollout.num_engines=2",
               "cluster.num_trainers=2", "reward.num_workers=2", f"run_name=run{len(extra)}", *extra)
    summary = run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and summary["steps"] == 3
    assert all(r["rollout/num_samples"] == 16 and 0 <= r["rollout/reward_mean"] <= 1 for r in rows)
    assert [r["train/weight_version"] for r in rows] == [2, 3, 4]
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)  # engines served exactly the trainer's weights
    if "algorithm.advantage=gae" in extra:
        assert all(r["train/value_loss"] > 0 and "train/kl_reward_penalty" in r for r in rows)
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "samples.jsonl").is_file()


def test_engines_over_http_behind_router(local_ray_gpus, tmp_path, model_cache):
    """Native engine servers launched inside the engine actors, rollout through the router."""
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, "total_steps=2", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
               "rollout.backend=native", "rollout.serve_http=true", "rollout.num_engines=2", "run_name=http")
    assert run(cfg)["steps"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(r["rollout/num_samples"] == 8 and r["train/mismatch_abs"] < 1e-4 for r in rows)


def test_rollout_only_then_train_from_dump(local_ray_gpus, tmp_path, model_cache):
    from jobs import rollout_only
    from jobs.train import run

    dump = tmp_path / "dump.jsonl"
    cfg = _cfg(tmp_path, model_cache, "total_steps=2", "rollout.prompts_per_step=3", "rollout.n_samples_per_prompt=2",
               f"rollout.dump_path={dump}", "rollout.backend=native", "run_name=ro")
    summary = rollout_only.run(cfg)
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    assert summary["samples"] == 12 and len(lines) == 12 and {x["step"] for x in lines} == {0, 1}
    assert all(len(x["response_ids"]) == len(x["response_logprobs"]) for x in lines)
    cfg = _cfg(tmp_path / "t", model_cache, "total_steps=3", f"rollout.replay_dump={dump}", "run_name=replay",
               "rollout.prompts_per_step=3", "rollout.n_samples_per_prompt=2")
    assert run(cfg)["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "t" / "run" / "metrics.jsonl")]
    assert [r["rollout/num_samples"] for r in rows] == [6, 6, 6]
    assert rows[0]["rollout/reward_mean"] == pytest.approx(sum(x["reward"] for x in lines if x["step"] == 0) / 6)


ASYNC_BASE = ("total_steps=4", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "rollout.backend=native",
              "rollout.num_engines=2", "train.sft_warmup_steps=3", "train.sft_lr=3e-3", "train.lr=1e-3")


def test_async_s0_equals_sync(local_ray_gpus, tmp_path, model_cache):
    from jobs.train import run

    run(_cfg(tmp_path / "sync", model_cache, *ASYNC_BASE, "run_name=s0sync"))
    summary = run(_cfg(tmp_path / "async", model_cache, *ASYNC_BASE, "run_name=s0async", "async_rl.enabled=true",
                       "async_rl.staleness=0"))
    sync = [json.loads(x) for x in open(tmp_path / "sync" / "run" / "metrics.jsonl")]
    asyn = [json.loads(x) for x in open(tmp_path / "async" / "run" / "metrics.jsonl")]
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    for a, b in zip(sync, asyn):
        for key in ("rollout/reward_mean", "rollout/response_len_mean", "train/loss", "train/pg_loss", "train/grad_norm",
                    "train/advantage_abs_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
        assert b["async/staleness_max"] == 0


@pytest.mark.parametrize("staleness,extra", [
    (1, ("async_rl.off_policy.mode=tis", "async_rl.filter=nonzero_std")),
    (2, ("async_rl.off_policy.mode=mis", "async_rl.off_policy.level=sequence", "async_rl.off_policy.mask_low=0.1",
         "async_rl.off_policy.mask_high=10")),
])
def test_async_staleness_bound_no_loss_no_duplicates(local_ray_gpus, tmp_path, model_cache, staleness, extra):
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, *ASYNC_BASE, f"run_name=as{staleness}", "async_rl.enabled=true",
               f"async_rl.staleness={staleness}", "rollout.max_new_tokens=12", *extra)
    summary = run(cfg)  # the driver raises if any trained sample lags more than the bound
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["steps"] == 4 and summary["lost"] == 0 and summary["duplicates"] == 0
    assert summary["consumed"] == 4 * 4
    assert all(r["async/staleness_max"] <= staleness for r in rows)
    assert max(r["async/staleness_max"] for r in rows) >= 1  # it did run ahead of the trainer
    assert all("async/is_weight_mean" in r and "async/kl_behav_prox" in r for r in rows)
    for r in rows:
        assert r["async/groups_submitted"] == (r["async/groups_accepted"] + r["async/groups_filtered"]
                                               + r["async/groups_running"])


def test_async_watchdog_names_the_stuck_actor(local_ray_gpus, tmp_path, model_cache):
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, "total_steps=2", "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2",
               "rollout.backend=native", "rollout.max_new_tokens=400", "rollout.ignore_eos=true", "run_name=stall",
               "async_rl.enabled=true", "async_rl.watchdog_s=0.3")
    with pytest.raises(RuntimeError, match=r"stall: no rollout progress .* rollout-0: generate groups 0\.\.1"):
        run(cfg)
