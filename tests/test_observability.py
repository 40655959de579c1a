"""Observability: grouped metric names (the same in metrics.jsonl, wandb and Ray), the Ray metrics
exporter scraped over HTTP from a real run's Prometheus endpoint, the dashboard URL and the
namespace of a local run, the Grafana dashboard against the exporter's registry, and
``miles-ray plot`` / ``analyze`` on a real run's metrics (tests/data/obs_run: an async run of 4
steps with an engine killed at step 1)."""
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from miles_ray.utils.metric_names import GROUPS, group_key, grouped, prom_name, scalars

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "data" / "obs_run"


# -- names -------------------------------------------------------------------------------------
def test_names_are_grouped_once_and_lists_stay_out_of_wandb_and_ray():
    flat = {"reward_mean": 0.5, "loss": 1.0, "time_step_s": 2.0, "rollout_tokens_per_s": 9.0, "staleness_max": 1,
            "is_weight_mean": 1.0, "recoveries": 2, "recovery_s_each": [1.5, 2.0], "ledger_groups": [0, 1],
            "spec_accept_len": 2.0, "eval_reward_mean": 0.7, "fault/retries": 1, "step": 3}
    row = grouped(flat)
    assert row == {"rollout/reward_mean": 0.5, "train/loss": 1.0, "perf/time_step_s": 2.0,
                   "perf/rollout_tokens_per_s": 9.0, "async/staleness_max": 1, "async/is_weight_mean": 1.0,
                   "fault/recoveries": 2, "fault/recovery_s_each": [1.5, 2.0], "train/ledger_groups": [0, 1],
                   "rollout/spec_accept_len": 2.0, "eval/eval_reward_mean": 0.7, "fault/retries": 1, "step": 3}
    assert grouped(row) == row  # idempotent: already grouped keys keep their name
    assert all(k == "step" or k.split("/")[0] in GROUPS for k in row)
    assert "fault/recovery_s_each" not in scalars(row) and "train/ledger_groups" not in scalars(row)
    assert prom_name(group_key("time_sync_s")) == "miles_perf_time_sync_s"


def test_metrics_logger_writes_grouped_rows_probes_and_sinks(tmp_path):
    from miles_ray.config import LoggingConfig
    from miles_ray.utils.tracking import MetricsLogger

    seen = []
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb=False), "t", {}, probes=[lambda: {"restarts": 1}],
                           sinks=[lambda step, row: seen.append((step, row))])
    logger.log(0, {"reward_mean": 0.25, "ledger_groups": [0, 1], "bad": float("nan")})
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 0, "rollout/reward_mean": 0.25, "train/ledger_groups": [0, 1], "train/bad": None,
                   "fault/restarts": 1}
    assert seen == [(0, row)]


def test_dashboard_port_falls_back_to_a_free_one_when_taken():
    import socket

    from jobs.cluster import dashboard_args
    from miles_ray.config import ClusterConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        args = dashboard_args(ClusterConfig(dashboard_port=port))
        assert args["include_dashboard"] and args["dashboard_host"] == "127.0.0.1" and args["dashboard_port"] != port
    assert dashboard_args(ClusterConfig(dashboard=False)) == {"include_dashboard": False}


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
def test_grafana_dashboard_queries_only_exported_metrics():
    from jobs.ray_metrics import registered_names
    from miles_ray.ops.grafana import dashboard

    board = json.loads((ROOT / "docs" / "grafana" / "miles-ray.json").read_text())
    assert board == dashboard(), "regenerate: python -m miles_ray.ops.grafana > docs/grafana/miles-ray.json"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [f"{g}/" for g in GROUPS]
    exprs = [t["expr"] for p in board["panels"] if p["type"] != "row" for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_miles_[a-z0-9_]+", e)}
    assert used and used <= registered_names(), used - registered_names()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["schemaVersion"] >= 36  # Grafana 10


# -- plot and analyze ----------------------------------------------------------------------------
def test_plot_writes_every_png(tmp_path):
    from miles_ray.ops.plot import PLOTS, plot_run

    written = plot_run(RUN, tmp_path)
    assert set(written) == set(PLOTS) and all(written.values()), written
    for path in written.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_analyze_counts_reward_faults_and_ledger(tmp_path):
    from miles_ray.ops.analyze import analyze_run

    report = analyze_run(RUN)
    rows = [json.loads(x) for x in open(RUN / "metrics.jsonl")]
    assert report["reward"]["last5"] - report["reward"]["first5"] == pytest.approx(report["reward"]["rise"])
    assert report["speed"]["steps"] == len(rows) == 4 and report["speed"]["steps_per_s"] > 0
    assert report["faults"]["recoveries"] >= 1 and report["faults"]["restarts"] >= 1
    assert report["ledger"]["samples_lost"] == 0 and report["ledger"]["samples_duplicated"] == 0
    bad = tmp_path / "bad"
    shutil.copytree(RUN, bad)
    with open(bad / "metrics.jsonl", "a") as f:  # step 3 logged twice: its 16 samples trained twice + 1 row
        f.write(json.dumps(rows[-1]) + "\n")
    assert analyze_run(bad)["ledger"]["samples_duplicated"] == 16 + 1
    with open(bad / "metrics.jsonl", "a") as f:  # eval rows (reserved group) are reported and plotted
        f.write(json.dumps({"step": 4, "eval/reward_mean": 0.75}) + "\n")
    again = analyze_run(bad)
    assert again["reward"]["eval/reward_mean"] == 0.75 and again["ledger"]["samples_duplicated"] == 16 + 1


def test_cli_plot_and_analyze(tmp_path, capsys):
    from jobs.cli import main

    assert main(["analyze", str(RUN)]) == 0
    out = capsys.readouterr().out
    assert "reward:" in out and "samples_lost" in out and "recoveries" in out
    assert main(["analyze", str(RUN), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ledger"]["samples_lost"] == 0
    assert main(["plot", str(RUN), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "reward.png").is_file()
    assert main(["analyze", str(tmp_path)]) == 2  # not a run folder: one error line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "metrics.jsonl" in err[0]
