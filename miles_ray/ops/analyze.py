"""``miles-ray analyze RUN_DIR``: a summary of a run from its files: reward rise, speed, faults,
and the ledger's lost and duplicated samples.

:data:`SECTIONS` maps each section to a small function of (rows, config, summary) -> dict; a
section with nothing to say (no faults metrics in an old run) returns {} and is left out.
Invariant: ``lost`` and ``duplicates`` are :func:`miles_ray.ledger.check_rows` on the rows, with the
groups a synchronous run must have trained (``steps x prompts_per_step``) as expected; an async
run's last groups may still be buffered, so only groups it trained count there.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from miles_ray.ledger import GROUPS_KEY, SIZES_KEY, check_rows
from miles_ray.ops import rundir
from miles_ray.ops.rundir import keys_with, series


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def reward(rows: list[dict], cfg: dict, summary: dict) -> dict:
    _, r = series(rows, "rollout/reward_mean")
    if not r:
        return {}
    k = max(1, min(5, len(r) // 2 or 1))
    out = {"first5": _mean(r[:k]), "last5": _mean(r[-k:]), "max": max(r)}
    out["rise"] = out["last5"] - out["first5"]
    for key in keys_with(rows, "eval/"):
        out[key] = series(rows, key)[1][-1]
    return out


def speed(rows: list[dict], cfg: dict, summary: dict) -> dict:
    _, step_s = series(rows, "perf/time_step_s")
    _, tok = series(rows, "perf/rollout_tokens_per_s")
    _, sync_s = series(rows, "perf/time_sync_s")
    out = {"steps": len({r["step"] for r in rows}), "step_s_mean": _mean(step_s), "tokens_per_s_mean": _mean(tok),
           "sync_s_mean": _mean(sync_s)}
    out["steps_per_s"] = 1.0 / out["step_s_mean"] if out["step_s_mean"] else None
    if summary.get("wall_s"):
        out["wall_s"] = summary["wall_s"]
    return {k: v for k, v in out.items() if v is not None}


def faults(rows: list[dict], cfg: dict, summary: dict) -> dict:
    last = rows[-1]
    out = {k.removeprefix("fault/"): last[k] for k in keys_with(rows, "fault/") if k in last
           and not k.startswith("fault/engines_")}
    each = last.get("fault/recovery_s_each") or []
    if each:
        out["recovery_s_mean"] = _mean(each)
    if any("fault/engine_states" in r for r in rows):
        out["steps_with_an_engine_not_ready"] = sum(
            1 for r in rows if (r.get("fault/engines_ready") or 0) < len(r.get("fault/engine_states") or []))
    return out


def staleness(rows: list[dict], cfg: dict, summary: dict) -> dict:
    _, mean = series(rows, "async/staleness_mean")
    _, worst = series(rows, "async/staleness_max")
    return {"mean": _mean(mean), "max": max(worst)} if mean and worst else {}


def ledger(rows: list[dict], cfg: dict, summary: dict) -> dict:
    rows = [r for r in rows if GROUPS_KEY in r and SIZES_KEY in r]  # training rows (not eval-only ones)
    if not rows:
        return {}
    n = (cfg.get("rollout") or {}).get("n_samples_per_prompt") or max(s for r in rows for s in r[SIZES_KEY])
    per_step = (cfg.get("rollout") or {}).get("prompts_per_step")
    sync = cfg and not (cfg.get("async_rl") or {}).get("enabled")
    steps = len({r["step"] for r in rows})
    expected = range(steps * per_step) if sync and per_step else None
    counts = check_rows(rows, n, expected)
    return {"samples_lost": counts["lost"], "samples_duplicated": counts["duplicates"], "groups": counts["groups"],
            "expected_groups": len(expected) if expected is not None else "n/a (async: the last groups stay buffered)"}


SECTIONS: dict[str, Callable[[list, dict, dict], dict]] = {
    "reward": reward, "speed": speed, "faults": faults, "staleness": staleness, "ledger": ledger}


def analyze_run(run_dir: str | Path) -> dict:
    """Section name -> its figures (sections without data left out)."""
    rows, cfg, summary = rundir.metrics_rows(run_dir), rundir.config(run_dir), rundir.summary(run_dir)
    report = {name: fn(rows, cfg, summary) for name, fn in SECTIONS.items()}
    return {name: body for name, body in report.items() if body}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(report: dict, run_dir: str | Path) -> str:
    lines = [f"run {run_dir}"]
    for name, body in report.items():
        lines.append(f"{name}:")
        lines += [f"  {k:<32} {_fmt(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"
