"""The SGLang path on Ray, on CPU: engine actors launch our server in strict SGLang mode
(``rollout.strict_sglang``), with fake GPUs: a multi-GPU engine (``gpus_per_engine=2`` -> one
actor holding 2 GPUs, server ``--tp-size 2``), bound beyond loopback with the run's token, and
every weight path (object store and shm -> update_weights_from_tensor per TP rank; broadcast ->
init_weights_update_group + update_weights_from_distributed); then an async training run (partial
rollout) against strict servers."""
import json

import httpx
import pytest
import ray

from jobs.cluster import start_actors, stop_actors
from miles_ray.config import load_config
from tests.helpers.engine_checks import HOST

pytestmark = pytest.mark.ray
STRICT = ("rollout.backend=native", "rollout.serve_http=true", "rollout.strict_sglang=true")


def _cfg(tmp_path, model_cache, *extra):
    return load_config(None, [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}",
                              "logging.progress_bar=false", "logging.wandb=false", *extra])


def test_plan_gives_one_engine_all_its_gpus():
    from miles_ray.config import ClusterConfig
    from placement.plan import plan_placement

    plan = plan_placement(ClusterConfig(num_trainers=1, use_gpu=True, gpus_per_engine=2), 2, 1)
    assert [g.bundles for g in plan.groups if g.name == "rollout"] == [[{"CPU": 0.5, "GPU": 2.0}] * 2]
    assert [(a.bundle_index, a.num_gpus) for a in plan.for_role("rollout")] == [(0, 2.0), (1, 2.0)]
    with pytest.raises(ValueError, match="colocate=false"):
        load_config(None, ["cluster.use_gpu=true", "cluster.colocate=true", "cluster.gpus_per_engine=2"])


def test_multi_gpu_strict_engine_beyond_loopback_all_weight_paths(local_ray_gpus, tmp_path, model_cache):
    from jobs.weight_sync import WeightSync
    from miles_ray.data import synthetic_rows, validate_rows
    from miles_ray.models import load_tokenizer
    from miles_ray.rollout import SamplingParams
    from miles_ray.rollout.sglang.client import EngineClient
    from miles_ray.training.sft import sft_samples

    cfg = _cfg(tmp_path, model_cache, *STRICT, "cluster.use_gpu=true", "cluster.gpus_per_engine=2",
               f"rollout.server_host={HOST}", "run_name=tp2", "weight_sync.bucket_mb=0.05")
    actors = start_actors(cfg)
    try:
        engine = actors.engines[0]
        where = ray.get(engine.where.remote())
        assert len(where["gpu_ids"]) == 2  # one actor, two (fake) GPUs, one node
        url = ray.get(engine.url.remote())
        assert url.startswith(f"http://{HOST}:")
        info = EngineClient(url).server_info()  # the driver holds the run's token
        assert info["tp_size"] == 2 and info["strict_sglang"] is True
        assert info["visible_devices"] is not None and len(info["visible_devices"].split(",")) == 2
        assert httpx.post(f"{url}/generate", json={"input_ids": [1]}).status_code == 401
        assert httpx.post(f"{actors.router_url}/generate", json={"input_ids": [1]}).status_code == 401
        tok = load_tokenizer("tiny:qwen3", model_cache)
        items, _ = validate_rows(synthetic_rows("arithmetic", 8, 9, 0), tok)
        reqs = [{"prompt": i.prompt, "label": i.label, "prompt_index": i.index, "group_id": k}
                for k, i in enumerate(items)]
        for version, transport in enumerate(["object_store", "shm", "broadcast", "shm"], start=2):
            actors.policy.sft_step(sft_samples(items, tok), 1e-2)  # move the weights
            WeightSync(actors, transport).sync(version)
            assert ray.get(engine.health.remote()) == {"state": "ready", "weight_version": version}
            samples = ray.get(engine.generate.remote(reqs[:4], 2, SamplingParams(6)))
            assert {s.weight_version for s in samples} == {version}
            prepared = actors.policy.scatter("prepare", samples)
            diffs = [abs(a - b) for s in prepared for a, b in zip(s.old_logprobs, s.response_logprobs)]
            assert max(diffs) < 1e-5, (transport, max(diffs))
        routed = EngineClient(actors.router_url).generate_samples(reqs[:2], 2, SamplingParams(4), tok)
        assert len(routed) == 4 and {s.weight_version for s in routed} == {5}  # the sync driver's rollout path
    finally:
        stop_actors(actors)


ASYNC = ("total_steps=3", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "rollout.num_engines=2",
         "async_rl.enabled=true", "async_rl.staleness=1", "rollout.max_new_tokens=12", "train.sft_warmup_steps=2")


def test_async_partial_rollout_run_against_strict_servers(local_ray_gpus, tmp_path, model_cache):
    """Rollout (the engine actors' HTTP clients), async training, syncs while requests are in
    flight (partial rollout: the servers hold them across the load), all against strict servers. (The weight-sync
    paths are covered above, a sync run with lenient servers in test_ray_local.)"""
    from jobs.train import run

    summary = run(_cfg(tmp_path, model_cache, *STRICT, "run_name=strict-async", *ASYNC))
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["steps"] == len(rows) == 3
    assert summary["lost"] == 0 and summary["duplicates"] == 0 and all(r["async/staleness_max"] <= 1 for r in rows)


def test_router_choice_builds_sglang_router_command():
    """rollout.router=sglang_router launches SGLang's router (not installable here: the command only)."""
    import sys

    from actors.router import ROUTERS
    from miles_ray.rollout.http.launch import router_command

    assert set(ROUTERS) == {"native", "sglang_router"}
    cmd = router_command(["http://a:1", "http://b:2"], "127.0.0.1", 30100, "tok")
    assert cmd[:3] == [sys.executable, "-m", "sglang_router.launch_router"]
    assert cmd[cmd.index("--worker-urls") + 1:cmd.index("--host")] == ["http://a:1", "http://b:2"]
    assert cmd[-2:] == ["--api-key", "tok"] and "tok" not in router_command(["http://a:1"], "h", 1)
    assert load_config(None, ["rollout.router=sglang_router"]).rollout.router == "sglang_router"


def test_server_args_dtype_tp_size_mem_fraction(tmp_path, model_cache):
    """HTTP engines serve model.dtype; gpus_per_engine is SGLang's --tp-size; colocated engines get
    --mem-fraction-static (config, else 0.5); strict mode reaches the native server."""
    from miles_ray.rollout.http.engine import server_args

    def args(*extra):
        return server_args(_cfg(tmp_path, model_cache, "rollout.backend=native", "rollout.serve_http=true", *extra), 0)

    a = args("model.dtype=bfloat16", "cluster.gpus_per_engine=4", "rollout.strict_sglang=true")
    assert a[a.index("--dtype") + 1] == "bfloat16" and a[a.index("--tp-size") + 1] == "4" and "--strict-sglang" in a
    assert "--mem-fraction-static" not in a
    b = args("cluster.colocate=true", "rollout.mem_fraction_static=0.7")
    assert b[b.index("--mem-fraction-static") + 1] == "0.7"
    assert "0.5" in args("cluster.colocate=true")
    sg = server_args(_cfg(tmp_path, model_cache, "rollout.backend=sglang", "model.dtype=bfloat16"), 0)
    assert sg[:4] == ["--dtype", "bfloat16", "--tp-size", "1"]


def test_sync_training_over_the_router_against_strict_servers(local_ray_gpus, tmp_path, model_cache, tokenizer):
    """The synchronous driver end to end against strict servers: rollout through the router
    (requests in SGLang's shapes), rewards scored as groups come back, weights pushed with
    init_weights_update_group + update_weights_from_distributed every step; the ledger proves every
    step once."""
    from helpers.ledger import check_run
    from jobs.train import run

    cfg = _cfg(tmp_path, model_cache, *STRICT, "run_name=strict-sync", "total_steps=2", "rollout.num_engines=2",
               "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8",
               "weight_sync.transport=broadcast", "checkpoint.every=0")
    summary = run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["steps"] == 2 and [r["train/weight_version"] for r in rows] == [2, 3]
    check_run(tmp_path / "run", cfg, tokenizer)
