"""Observability: grouped metric names (the same in metrics.jsonl, wandb and Ray), the Ray metrics
exporter scraped over HTTP from a real run's Prometheus endpoint, the dashboard URL and the
namespace of a local run, the Grafana dashboard against the exporter's registry, and
``miles-ray plot`` / ``analyze`` on a real run's metrics (tests/data/obs_run: an async run of 4
steps with an engine killed at step 1)."""
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


from helpers.paths import ROOT  # noqa: E402
RUN = ROOT / "tests" / "data" / "obs_run"


# -- names -------------------------------------------------------------------------------------


# -- a real run: Ray metrics endpoint, dashboard, namespace ------------------------------------
def _series(text: str, name: str, run: str) -> list[float]:
    pat = re.compile(rf'^{name}\{{[^}}]*run="{run}"[^}}]*\}} (\S+)$', re.M)
    return [float(v) for v in pat.findall(text)]


def _scrape_until(url: str, wanted: dict, timeout_s: float = 30.0) -> str:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        text = httpx.get(url, timeout=5).text
        if all(check(text) for check in wanted.values()) or time.time() > deadline:
            return text
        time.sleep(0.5)


def _named_actors_from_another_driver(address: str, namespace: str) -> list:
    code = ("import json, ray; ray.init(address=%r, namespace=%r, log_to_driver=False); "
            "print(json.dumps(ray.util.list_named_actors()))" % (address, namespace))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.ray
def test_real_run_exports_ray_metrics_with_dashboard_and_namespace(tmp_path, model_cache, monkeypatch, capfd):
    import httpx
    import ray

    from jobs.cluster import init_ray
    from jobs.train import run
    from miles_ray.config import load_config

    monkeypatch.setenv("RAY_metrics_report_interval_ms", "500")  # Ray exports every 10 s by default
    if ray.is_initialized():
        ray.shutdown()
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.tiny_cache_dir={model_cache}", "run_name=obs",
                             "total_steps=3", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
                             "rollout.max_new_tokens=8", "train.sft_warmup_steps=0", "cluster.local_num_cpus=6",
                             "cluster.namespace=obs-ns", "cluster.dashboard_port=0", "checkpoint.export_hf=false",
                             'faults.kills=[{"role": "rollout", "rank": 0, "step": 1}]',
                             "logging.progress_bar=false", "logging.wandb=false"])
    t0 = time.time()
    init_ray(cfg, 4)  # as jobs.train does: a local Ray, its dashboard, the run's namespace
    try:
        startup_s = time.time() - t0
        url = re.search(r"Ray dashboard .*: (http://127\.0\.0\.1:\d+)", capfd.readouterr().out).group(1)
        assert httpx.get(url, timeout=10).status_code == 200
        result = {}
        driver = threading.Thread(target=lambda: result.update(summary=run(cfg)))
        driver.start()
        while "obs-buffer-0" not in ray.util.list_named_actors() and driver.is_alive():
            time.sleep(0.2)
        names = _named_actors_from_another_driver(ray.get_runtime_context().gcs_address, "obs-ns")
        driver.join()
        assert result["summary"]["steps"] == 3 and "obs-buffer-0" in names and "obs-rollout-0" in names
        rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
        assert rows[-1]["fault/restarts"] >= 1 and rows[-1]["fault/recoveries"] >= 1
        assert rows[-1]["fault/engine_states"] == ["ready"] and rows[-1]["fault/engines_ready"] == 1
        port = ray.nodes()[0]["MetricsExportPort"]
        wanted = {
            "step time": lambda t: sum(_series(t, "ray_miles_perf_time_step_s_count", "obs")) >= 3,
            "reward": lambda t: len(_series(t, "ray_miles_rollout_reward_mean", "obs")) >= 1,
            "restarts": lambda t: sum(_series(t, "ray_miles_fault_restarts_total", "obs")) >= 1,
            "recoveries": lambda t: sum(_series(t, "ray_miles_fault_recoveries_total", "obs")) >= 1,
            "engine state": lambda t: re.search(r'ray_miles_fault_engine_state\{[^}]*engine="0"[^}]*state="ready"', t),
        }
        text = _scrape_until(f"http://127.0.0.1:{port}/metrics", wanted)
        assert [k for k, check in wanted.items() if not check(text)] == [], text[-3000:]
        print(f"ray + dashboard startup {startup_s:.1f}s")
    finally:
        ray.shutdown()


# -- Grafana -------------------------------------------------------------------------------------


# -- plot and analyze ----------------------------------------------------------------------------
