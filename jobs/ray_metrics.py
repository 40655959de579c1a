"""Metrics through ``ray.util.metrics``: every logged row also goes to Ray's Prometheus endpoint
(``ray_miles_<group>_<name>``, tagged ``run=<run_name>``), next to ``metrics.jsonl`` and wandb.
Grafana: ``docs/grafana/miles-ray.json``; names and usage: ``docs/observability.md``.

- :data:`DECLARED` is the registry of metrics created when the exporter starts (the Grafana
  dashboard only queries these): key -> :class:`Spec` (gauge, counter or histogram). Any other
  scalar of a row is exported as a gauge on first sight; list-valued fields are not exported
  except through :data:`LIST_EXPORTS` (per-engine health states as a state set).
- Counters get the increase of a row's running total (``fault/recoveries``, ``fault/restarts``);
  histograms observe each row's value.
- Probes (:func:`probes`) add fields to each row when it is logged: engine health states and Ray
  actor restarts, in ``metrics.jsonl`` too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from jobs.cluster import RunActors
from miles_ray.utils.metric_names import prom_name, scalars
from miles_ray.rollout.health import READY, RELEASED, STALE

TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ENGINE_STATES = (READY, RELEASED, STALE, "dead", "unresponsive")  # the last two: no answer from the actor
HEALTH_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Spec:
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    tags: tuple = ("run",)


def _gauges(help_: str, *keys: str) -> dict:
    return {k: Spec("gauge", f"{help_} ({k})") for k in keys}


DECLARED: dict[str, Spec] = {
    "perf/time_step_s": Spec("histogram", "seconds per train step"),
    "perf/time_sync_s": Spec("histogram", "seconds per weight sync (trainer -> engines)"),
    **_gauges("throughput and phase seconds", "perf/rollout_tokens_per_s", "perf/time_rollout_s",
              "perf/time_reward_s", "perf/time_train_s", "perf/time_wait_s"),
    **_gauges("rollout batch", "rollout/reward_mean", "rollout/reward_std", "rollout/response_len_mean",
              "rollout/frac_finished", "rollout/reward_errors", "rollout/reward_timeouts"),
    **_gauges("trainer step", "train/loss", "train/pg_loss", "train/kl", "train/entropy", "train/grad_norm",
              "train/clipfrac", "train/mismatch_abs", "train/weight_version"),
    **_gauges("async staleness and importance weights", "async/staleness_mean", "async/staleness_max",
              "async/is_weight_mean", "async/is_weight_max", "async/is_frac_truncated", "async/is_frac_masked",
              "async/groups_running"),
    **_gauges("evaluation (reserved: eval/ rows)", "eval/reward_mean"),
    "fault/recoveries": Spec("counter", "recovered failures (engine, reward worker, weight sync, trainer group)"),
    "fault/restarts": Spec("counter", "Ray restarts of this run's actors (engines, reward workers)"),
    "fault/recovery_s_max": Spec("gauge", "longest recovery so far, seconds"),
    **_gauges("engines in each health state", *(f"fault/engines_{s}" for s in ENGINE_STATES)),
    "fault/engine_state": Spec("gauge", "1 for the state each engine is in, else 0", ("run", "engine", "state")),
}


def _make(key: str, spec: Spec):
    name = prom_name(key)
    if spec.kind == "histogram":
        return Histogram(name, spec.help, boundaries=list(TIME_BUCKETS), tag_keys=spec.tags)
    return (Counter if spec.kind == "counter" else Gauge)(name, spec.help, tag_keys=spec.tags)


def _record_scalar(exporter: "RayMetrics", key: str, value: float) -> None:
    spec = DECLARED.get(key) or Spec("gauge", key)
    metric = exporter.metric(key, spec)
    tags = {"run": exporter.run}
    if spec.kind == "histogram":
        metric.observe(value, tags=tags)
    elif spec.kind == "counter":  # a row holds the running total: add the increase
        increase = value - exporter.totals.get(key, 0.0)
        exporter.totals[key] = value
        if increase > 0:
            metric.inc(increase, tags=tags)
    else:
        metric.set(value, tags=tags)


def _engine_states(exporter: "RayMetrics", states: list) -> None:
    gauge = exporter.metric("fault/engine_state", DECLARED["fault/engine_state"])
    for i, current in enumerate(states):
        for state in ENGINE_STATES:
            gauge.set(float(state == current), tags={"run": exporter.run, "engine": str(i), "state": state})


LIST_EXPORTS: dict[str, Callable] = {"fault/engine_states": _engine_states}


class RayMetrics:
    """A :data:`miles_ray.utils.tracking.Sink`: ``RayMetrics(run)(step, row)`` exports a grouped row."""

    def __init__(self, run: str):
        self.run = run
        self.metrics: dict = {}
        self.totals: dict[str, float] = {}
        for key, spec in DECLARED.items():
            self.metric(key, spec)

    def metric(self, key: str, spec: Spec):
        if key not in self.metrics:
            self.metrics[key] = _make(key, spec)
        return self.metrics[key]

    def __call__(self, step: int, row: dict) -> None:
        for key, value in scalars(row).items():
            if key != "step":
                _record_scalar(self, key, float(value))
        for key, export in LIST_EXPORTS.items():
            if key in row:
                export(self, row[key])


def registered_names() -> set[str]:
    """Prometheus series names of :data:`DECLARED` (``ray_`` + name, with ``_total`` for counters
    and ``_bucket``/``_sum``/``_count`` for histograms): what the Grafana dashboard may query."""
    suffixes = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"ray_{prom_name(k)}{s}" for k, spec in DECLARED.items() for s in suffixes[spec.kind]}


# -- probes: fields measured when a row is logged ------------------------------------------------
def _health_state(ref, done: set) -> str:
    if ref not in done:
        return "unresponsive"
    try:
        return ray.get(ref)["state"]
    except ray.exceptions.RayError:
        return "dead"


def engine_probe(actors: RunActors) -> Callable[[], dict]:
    """Each engine's health state (``fault/engine_states``, jsonl only) and how many engines are in
    each state (``fault/engines_<state>``); an engine that does not answer within
    ``HEALTH_TIMEOUT_S`` (busy loading weights, restarting) is ``unresponsive``."""
    def probe() -> dict:
        if not actors.engines:
            return {}
        refs = [e.health.remote() for e in actors.engines]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=HEALTH_TIMEOUT_S)
        states = [_health_state(r, set(done)) for r in refs]
        return {"fault/engine_states": states, **{f"fault/engines_{s}": states.count(s) for s in ENGINE_STATES}}
    return probe


def restart_probe(run: str) -> Callable[[], dict]:
    """``fault/restarts``: Ray restarts of the run's live actors (named ``<run>-<role>-<rank>``),
    from the GCS actor table."""
    from ray._private.state import actors as actor_table  # the GCS table: works without the dashboard

    def probe() -> dict:
        table = actor_table().values()
        return {"fault/restarts": sum(a.get("NumRestarts", 0) for a in table
                                      if a.get("State") != "DEAD" and str(a.get("Name", "")).startswith(f"{run}-"))}
    return probe


def telemetry(cfg, actors: RunActors) -> dict:
    """Keyword arguments for :class:`miles_ray.utils.tracking.MetricsLogger`: the probes, and the
    Ray exporter when ``logging.ray_metrics``."""
    sinks = [RayMetrics(cfg.run_name)] if cfg.logging.ray_metrics else []
    return {"probes": [engine_probe(actors), restart_probe(cfg.run_name)], "sinks": sinks}
