"""Per-step metrics: ``metrics.jsonl`` in the run folder (one JSON object per step) and wandb."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, logging_cfg, run_name: str, config: dict):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._wandb = None
        if logging_cfg.wandb and logging_cfg.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(project=logging_cfg.project, name=run_name, config=config,
                                     mode=logging_cfg.wandb_mode, dir=str(self.path.parent))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(row, step=step)

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
