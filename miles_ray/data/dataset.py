"""Prompt datasets from jsonl / parquet / synthetic generators, validated row by row.

A row holds a prompt (text, or chat messages ``[{"role", "content"}, ...]``) and a label.
Bad rows (missing fields, wrong types, too long) are skipped and reported with their row
numbers in one warning; if no row is usable the load fails with :class:`DataError`.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from miles_ray.errors import UserValueError

log = logging.getLogger(__name__)


class DataError(UserValueError):
    """The dataset cannot be used; the message says which file/rows and why."""


@dataclass
class PromptItem:
    index: int  # row number in the source (0-based)
    prompt: str  # text fed to the model (chat template applied when configured)
    label: str
    messages: Optional[list] = None


@dataclass
class LoadReport:
    total: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> list of row numbers

    def skip(self, row: int, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(row)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        parts = []
        for reason, rows in self.skipped.items():
            shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
            parts.append(f"{len(rows)} {reason} (rows {shown})")
        return "; ".join(parts)


def read_rows(source: str) -> Iterable[Any]:
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.source='{source}' does not exist")
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"data.source='{source}': unsupported file type '{path.suffix}' (use .jsonl or .parquet)")


def _read_jsonl(path: Path):
    rows = []
    with path.open() as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                rows.append(_Bad("empty line"))
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(_Bad("invalid JSON"))
    return rows


class _Bad:
    def __init__(self, reason: str):
        self.reason = reason


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def validate_rows(rows: Iterable[Any], tokenizer, prompt_key: str = "prompt", label_key: str = "label",
                  apply_chat_template: bool = True, max_prompt_tokens: int = 256, source: str = "data"):
    """Turn raw rows into PromptItems, skipping and counting bad ones. Returns (items, report)."""
    report, items = LoadReport(), []
    for i, row in enumerate(rows):
        report.total += 1
        reason = _row_problem(row, prompt_key, label_key)
        if reason:
            report.skip(i, reason)
            continue
        prompt, label = row[prompt_key], row[label_key]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if apply_chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            report.skip(i, f"longer than data.max_prompt_tokens={max_prompt_tokens}")
            continue
        items.append(PromptItem(index=i, prompt=text, label=str(label), messages=messages))
    if report.n_skipped:
        log.warning("%s: skipped %d of %d rows: %s", source, report.n_skipped, report.total, report.summary())
    if not items:
        raise DataError(
            f"{source}: no usable rows out of {report.total}. {report.summary() or 'The file is empty.'} "
            f"Each row needs '{prompt_key}' (text or chat messages) and '{label_key}' (string or number); "
            "set data.prompt_key / data.label_key if your columns are named differently."
        )
    return items, report


def _row_problem(row: Any, prompt_key: str, label_key: str) -> Optional[str]:
    if isinstance(row, _Bad):
        return row.reason
    if not isinstance(row, dict):
        return "not an object"
    if prompt_key not in row or row[prompt_key] is None:
        return f"missing '{prompt_key}'"
    if label_key not in row or row[label_key] is None:
        return f"missing '{label_key}'"
    prompt = row[prompt_key]
    if not ((isinstance(prompt, str) and prompt.strip()) or _is_messages(prompt)):
        return f"'{prompt_key}' is not text or chat messages"
    if isinstance(row[label_key], bool) or not isinstance(row[label_key], (str, int, float)):
        return f"'{label_key}' is not a string or number"
    return None


class PromptSampler:
    """Endless, epoch-shuffled stream of prompts with a resumable cursor (epoch, position)."""

    def __init__(self, items: list[PromptItem], seed: int = 0, shuffle: bool = True):
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[PromptItem]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.items[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._make_order()
