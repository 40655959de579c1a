"""Atomic, rotating checkpoints: ``<dir>/step_<N>/`` written as ``step_<N>.tmp`` and renamed
when complete, so a crash mid-save never leaves a half checkpoint that resume would pick up."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_STEP = re.compile(r"^step_(\d+)$")


def checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest(root: str | Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def begin(root: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step``; half-written ones left by a run
    that died mid-save are removed (one writer per checkpoint folder)."""
    root = Path(root)
    if root.is_dir():
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"step_{step}.tmp"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, meta: dict, keep: int) -> Path:
    """Write meta.json last, rename into place, drop all but the newest ``keep``."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())
