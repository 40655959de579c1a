"""Observability: grouped metric names (the same in metrics.jsonl, wandb and Ray), the Ray metrics
exporter scraped over HTTP from a real run's Prometheus endpoint, the dashboard URL and the
namespace of a local run, the Grafana dashboard against the exporter's registry, and
``miles-ray plot`` / ``analyze`` on a real run's metrics (tests/data/obs_run: an async run of 4
steps with an engine killed at step 1)."""
import json
import re
import shutil
from pathlib import Path

import pytest

from miles_ray.utils.metric_names import GROUPS, group_key, grouped, prom_name, scalars

from helpers.paths import ROOT  # noqa: E402
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
