"""Placement across nodes of a ``ray.cluster_utils.Cluster`` (two raylets on this machine, fake GPUs):
trainer ranks are packed on one node, rollout engines spread over nodes, and a run trains."""
import json

import pytest
import ray
from ray.cluster_utils import Cluster

from jobs.cluster import start_actors, stop_actors
from miles_ray.config import load_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 4})
    cluster.add_node(num_cpus=4, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_trainers_packed_engines_spread_and_run(two_nodes, tmp_path, model_cache):
    overrides = [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}", "logging.progress_bar=false",
                 "logging.wandb=false", "cluster.use_gpu=true", "cluster.num_trainers=2", "rollout.num_engines=2",
                 "run_name=multinode"]
    cfg = load_config(None, overrides)
    actors = start_actors(cfg)
    try:
        trainers = ray.get([a.where.remote() for a in actors.policy.actors])
        engines = ray.get([e.where.remote() for e in actors.engines])
        assert trainers[0]["node_id"] == trainers[1]["node_id"]  # PACK: one node for the DP group
        assert engines[0]["node_id"] != engines[1]["node_id"]  # SPREAD: engines on both nodes
        assert len({n["node_id"] for n in trainers + engines}) == 2
    finally:
        stop_actors(actors)

    from jobs.train import run

    cfg = load_config(None, overrides + ["total_steps=2", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
                                         "weight_sync.transport=broadcast", "run_name=multinode-run"])
    assert run(cfg)["steps"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)
