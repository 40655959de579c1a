"""A finished (or running) run folder, read back: ``metrics.jsonl`` rows with grouped keys (rows
of runs from before the grouping are grouped on read), ``config.yaml`` and ``summary.json`` when
present."""
from __future__ import annotations

import json
from pathlib import Path

from miles_ray.errors import UserPathError
from miles_ray.utils.metric_names import grouped


def metrics_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl``, keys grouped; a folder without one is a user error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserPathError(f"{run_dir} is not a run folder: no metrics.jsonl in it (give the output_dir of a run)")
    rows = [grouped(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise UserPathError(f"{path} has no rows yet (the run has not finished a step)")
    return rows


def config(run_dir: str | Path) -> dict:
    """The run's resolved config (``config.yaml``), or {} when absent."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a number under ``key``."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def keys_with(rows: list[dict], prefix: str) -> list[str]:
    """Scalar keys starting with ``prefix`` in any row, in first-seen order."""
    seen: dict = {}
    for r in rows:
        seen.update({k: None for k, v in r.items() if k.startswith(prefix) and isinstance(v, (int, float))})
    return list(seen)
