"""The Grafana dashboard of a run's Ray metrics (``docs/grafana/miles-ray.json``), built from
:data:`ROWS`: one collapsible row per metric group, each with its panels (title, unit, PromQL
queries). Queries select ``run=~"$run"`` (a dashboard variable listing the runs Prometheus knows).

Regenerate the file after changing :data:`ROWS`::

    python -m miles_ray.ops.grafana > docs/grafana/miles-ray.json

Invariant (tests/unit/ops/test_observability.py): every series a query names is one the Ray exporter
registers (:func:`jobs.ray_metrics.registered_names`), and the file equals :func:`dashboard`.
"""
from __future__ import annotations

import json
import sys

SEL = '{run=~"$run"}'


def gauge(name: str) -> str:
    """A driver gauge, one line per run (other labels: Ray's worker id, session)."""
    return f"max by (run) (ray_miles_{name}{SEL})"


def hist_mean(name: str) -> str:
    return f"sum by (run) (rate(ray_miles_{name}_sum{SEL}[5m])) / sum by (run) (rate(ray_miles_{name}_count{SEL}[5m]))"


def hist_p90(name: str) -> str:
    return f"histogram_quantile(0.9, sum by (run, le) (rate(ray_miles_{name}_bucket{SEL}[5m])))"


def total(name: str) -> str:
    return f"sum by (run) (ray_miles_{name}_total{SEL})"


# group -> [(panel title, unit, [(legend, query)])]
ROWS: dict[str, list] = {
    "train/": [
        ("Loss", "none", [("loss {{run}}", gauge("train_loss")), ("pg_loss {{run}}", gauge("train_pg_loss"))]),
        ("KL, entropy", "none", [("kl {{run}}", gauge("train_kl")), ("entropy {{run}}", gauge("train_entropy"))]),
        ("Train/rollout log-prob mismatch", "none", [("{{run}}", gauge("train_mismatch_abs"))]),
        ("Grad norm, clip fraction", "none", [("grad_norm {{run}}", gauge("train_grad_norm")),
                                              ("clipfrac {{run}}", gauge("train_clipfrac"))]),
        ("Weight version", "none", [("{{run}}", gauge("train_weight_version"))]),
    ],
    "rollout/": [
        ("Reward", "none", [("mean {{run}}", gauge("rollout_reward_mean")),
                            ("std {{run}}", gauge("rollout_reward_std"))]),
        ("Response length", "none", [("{{run}}", gauge("rollout_response_len_mean"))]),
        ("Finished, reward errors", "none", [("frac finished {{run}}", gauge("rollout_frac_finished")),
                                             ("errors {{run}}", gauge("rollout_reward_errors")),
                                             ("timeouts {{run}}", gauge("rollout_reward_timeouts"))]),
    ],
    "async/": [
        ("Staleness", "none", [("mean {{run}}", gauge("async_staleness_mean")),
                               ("max {{run}}", gauge("async_staleness_max"))]),
        ("Importance weights", "none", [("mean {{run}}", gauge("async_is_weight_mean")),
                                        ("max {{run}}", gauge("async_is_weight_max"))]),
        ("IS truncated / masked", "percentunit", [("truncated {{run}}", gauge("async_is_frac_truncated")),
                                                  ("masked {{run}}", gauge("async_is_frac_masked"))]),
        ("Groups in flight", "none", [("{{run}}", gauge("async_groups_running"))]),
    ],
    "eval/": [
        ("Eval reward", "none", [("{{run}}", gauge("eval_reward_mean"))]),
    ],
    "perf/": [
        ("Step time", "s", [("mean {{run}}", hist_mean("perf_time_step_s")),
                            ("p90 {{run}}", hist_p90("perf_time_step_s"))]),
        ("Weight-sync time", "s", [("mean {{run}}", hist_mean("perf_time_sync_s")),
                                   ("p90 {{run}}", hist_p90("perf_time_sync_s"))]),
        ("Rollout tokens/s", "none", [("{{run}}", gauge("perf_rollout_tokens_per_s"))]),
        ("Phase seconds", "s", [(f"{p} {{{{run}}}}", gauge(f"perf_time_{p}_s"))
                                for p in ("rollout", "reward", "train", "wait")]),
    ],
    "fault/": [
        ("Recoveries and restarts", "none", [("recoveries {{run}}", total("fault_recoveries")),
                                             ("restarts {{run}}", total("fault_restarts"))]),
        ("Longest recovery", "s", [("{{run}}", gauge("fault_recovery_s_max"))]),
        ("Engines per health state", "none", [(f"{s} {{{{run}}}}", gauge(f"fault_engines_{s}"))
                                              for s in ("ready", "released", "stale", "dead", "unresponsive")]),
        ("Engine state", "none", [("engine {{engine}} {{state}} {{run}}",
                                   f'max by (run, engine, state) (ray_miles_fault_engine_state{{run=~"$run"}}) == 1')]),
    ],
}
DS = {"type": "prometheus", "uid": "${datasource}"}


def _panel(pid: int, title: str, unit: str, queries: list, x: int, y: int) -> dict:
    return {"id": pid, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": q, "legendFormat": legend}
                        for i, (legend, q) in enumerate(queries)]}


def panels() -> list[dict]:
    out, y, pid = [], 0, 1
    for group, specs in ROWS.items():
        out.append({"id": pid, "type": "row", "title": group, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, (title, unit, queries) in enumerate(specs):
            out.append(_panel(pid, title, unit, queries, 12 * (i % 2), y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(specs) + 1) // 2)
    return out


def _variables() -> list[dict]:
    runs = "label_values(ray_miles_perf_time_step_s_count, run)"
    return [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            {"name": "run", "label": "run", "type": "query", "datasource": DS, "definition": runs,
             "query": {"query": runs, "refId": "runs"}, "refresh": 2, "multi": True, "includeAll": True,
             "current": {"text": "All", "value": "$__all"}}]


def dashboard() -> dict:
    return {"title": "miles-ray", "uid": "miles-ray", "tags": ["miles-ray", "ray"], "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser", "templating": {"list": _variables()}, "annotations": {"list": []},
            "panels": panels()}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(dashboard(), indent=2) + "\n")
