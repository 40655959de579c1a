"""Node loss on a ``ray.cluster_utils.Cluster`` (several raylets on this machine, fake GPUs): the
node holding the rollout engine (or the trainer ranks) is removed mid-run. With no node left that fits the engine's
bundle, the driver logs that the placement group waits for resources; once a spare node joins,
Ray reschedules the bundle there, the engine restarts (STALE until refit) and the run ends with
every step, nothing lost, nothing trained twice. The trainer's node: the group is rebuilt on the same
bundles, which wait (logged) for a spare node, and restored from the latest checkpoint."""
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from miles_ray.config import load_config
from tests.helpers.ledger import check_run, rows

pytestmark = pytest.mark.ray
STEPS = 4


FAST_DETECTION = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture
def cluster(request):
    # engine node lost: head with 2 fake GPUs, so the trainer group (PACK, 2 ranks) can only go
    # there; the engine's bundle (1 GPU) then only fits the worker node. Trainer node lost
    # (param "trainer"): the other way round
    head_gpus, worker = (1, {"num_cpus": 2, "num_gpus": 2}) if getattr(request, "param", "") == "trainer" else \
        (2, {"num_cpus": 1, "num_gpus": 1})
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": head_gpus,
                                                      "_system_config": FAST_DETECTION})
    worker = c.add_node(**worker)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, worker
    ray.shutdown()
    for node in [*c.worker_nodes, c.head_node]:  # not gracefully: a graceful stop takes ~10 s more
        c.remove_node(node, allow_graceful=False)
    c.shutdown()


def _config(out, model_cache, name: str):
    return load_config(None, [
        f"output_dir={out}", f"model.tiny_cache_dir={model_cache}", f"run_name={name}", f"total_steps={STEPS}",
        "cluster.use_gpu=true", "cluster.num_trainers=2", "rollout.num_engines=1", "rollout.backend=native",
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=32",
        "rollout.ignore_eos=true", "checkpoint.export_hf=false", "logging.progress_bar=false", "logging.wandb=false"])


def _start(cfg) -> tuple[threading.Thread, dict]:
    from jobs.train import run

    result: dict = {}

    def drive():
        try:
            result["summary"] = run(cfg)
        except BaseException as err:  # noqa: BLE001 - reported below
            result["error"] = err

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    return driver, result


def _wait(what: str, cond, driver: threading.Thread, timeout_s: float = 180):
    deadline = time.time() + timeout_s
    while not cond():
        assert driver.is_alive(), f"the run ended while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_node_lost_mid_run_engine_rescheduled_on_spare_node(cluster, tmp_path, model_cache, tokenizer, caplog,
                                                             monkeypatch):
    monkeypatch.setattr("jobs.recovery.STATUS_EVERY_S", 2.0)  # the waiting status sooner

    c, worker = cluster
    out = tmp_path / "run"
    cfg = _config(out, model_cache, "nodeloss")
    driver, result = _start(cfg)
    metrics = out / "metrics.jsonl"
    _wait("two steps", lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, driver)
    engine = ray.get_actor("nodeloss-rollout-0")
    trainer = ray.get_actor("nodeloss-trainer-0")
    assert ray.get(engine.where.remote())["node_id"] == worker.node_id
    head = ray.get(trainer.where.remote())["node_id"]
    assert head != worker.node_id

    c.remove_node(worker, allow_graceful=False)  # the engine's node dies; no other node has a free GPU
    waiting = "waiting for resources: placement group 'nodeloss-rollout' (rollout) is RESCHEDULING"
    _wait("the waiting-for-resources status", lambda: waiting in caplog.text, driver)
    assert len(metrics.read_text().splitlines()) < STEPS  # it really waits
    spare = c.add_node(num_cpus=1, num_gpus=1)
    driver.join(timeout=300)
    assert not driver.is_alive() and "error" not in result, result.get("error")

    assert result["summary"]["steps"] == STEPS
    assert f"on nodes ['{spare.node_id}']" in caplog.text or f"on node {spare.node_id}" in caplog.text
    got = rows(out)
    assert got[-1]["fault/recoveries"] >= 1
    assert all(r["train/mismatch_abs"] < 1e-4 for r in got)  # the restarted engine served refit weights only
    check_run(out, cfg, tokenizer)


@pytest.mark.parametrize("cluster", ["trainer"], indirect=True)
def test_trainer_node_lost_group_rebuilt_on_spare_node(cluster, tmp_path, model_cache, tokenizer, caplog, monkeypatch):
    """Both trainer ranks' node dies after step 0: the new ranks' bundles wait for a node (logged),
    a spare node joins, the group comes up there and restores the step-0 checkpoint
    (checkpoint.every keeps its default); every step once, nothing lost or trained twice."""
    monkeypatch.setattr("jobs.recovery.STATUS_EVERY_S", 2.0)
    c, worker = cluster
    out = tmp_path / "run"
    cfg = _config(out, model_cache, "tnode")
    driver, result = _start(cfg)
    metrics = out / "metrics.jsonl"
    _wait("one step", lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 1, driver)
    trainer = ray.get_actor("tnode-trainer-1")
    assert ray.get(trainer.where.remote())["node_id"] == worker.node_id
    assert ray.get(ray.get_actor("tnode-rollout-0").where.remote())["node_id"] != worker.node_id

    c.remove_node(worker, allow_graceful=False)  # both trainer ranks die; no other node has 2 free GPUs
    waiting = "waiting for resources: placement group 'tnode-trainer' (trainer) is RESCHEDULING"
    _wait("the waiting-for-resources status", lambda: waiting in caplog.text, driver)
    spare = c.add_node(num_cpus=2, num_gpus=2)
    driver.join(timeout=300)
    assert not driver.is_alive() and "error" not in result, result.get("error")
    assert result["summary"]["steps"] == STEPS
    assert f"new trainer ranks on nodes ['{spare.node_id}', '{spare.node_id}']" in caplog.text
    got = rows(out)
    assert got[-1]["fault/recoveries"] >= 1 and all(r["train/mismatch_abs"] < 1e-4 for r in got)
    check_run(out, cfg, tokenizer)
