"""Per-step metrics: ``metrics.jsonl`` in the run folder (one JSON object per step), wandb, and any
extra sinks (the Ray exporter, :mod:`jobs.ray_metrics`).

Keys are grouped (:mod:`miles_ray.utils.metric_names`) when a row is written: drivers keep their flat names
in memory; every reader of ``metrics.jsonl``, wandb and Ray sees ``train/loss``,
``rollout/reward_mean``, ... List-valued fields (the ledger) go to ``metrics.jsonl`` only.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

from miles_ray.utils.metric_names import grouped, scalars

Probe = Callable[[], dict]  # extra fields measured when a row is logged (engine states, restarts)
Sink = Callable[[int, dict], None]  # gets each grouped row (step, row)


class MetricsLogger:
    def __init__(self, output_dir: str | Path, logging_cfg, run_name: str, config: dict,
                 probes: Iterable[Probe] = (), sinks: Iterable[Sink] = ()):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self.probes, self.sinks = list(probes), list(sinks)
        self._wandb = None
        if logging_cfg.wandb and logging_cfg.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(project=logging_cfg.project, name=run_name, config=config,
                                     mode=logging_cfg.wandb_mode, dir=str(self.path.parent))

    def log(self, step: int, metrics: dict) -> dict:
        """Write one row (probes' fields added, keys grouped); returns it."""
        extra = {k: v for probe in self.probes for k, v in probe().items()}
        row = {"step": step, **grouped({k: _clean(v) for k, v in {**metrics, **extra}.items()})}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(scalars(row), step=step)
        for sink in self.sinks:
            sink(step, row)
        return row

    def rewind(self, step: int) -> None:
        """Forget rows of steps >= ``step`` (they are redone after a restore)."""
        self._file.close()
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] < step]
        self.path.write_text("".join(r + "\n" for r in rows))
        self._file = self.path.open("a", buffering=1)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
