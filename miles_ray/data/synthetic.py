"""Synthetic tasks a small model can learn on CPU: the data-source registry (``data.source:
synthetic:<name>``). A data source is ``fn(n, max_operand=, seed=) -> list[dict]`` of rows; a
``pkg.module:function`` import path (``data.source: my_pkg.data:rows``) is called the same way."""
from __future__ import annotations

import math
import random
from pathlib import Path

from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract, PluginError, is_import_path

DATA_SOURCES = Registry("data source", "data.source", Contract(
    "fn(n: int, max_operand=: int, seed=: int)", "a list of dict rows (data.prompt_key and data.label_key)",
    args=("n",), kwargs=("max_operand", "seed")))
SYNTHETIC_TASKS = DATA_SOURCES  # the name it had before import paths


def _register(name):
    return DATA_SOURCES.register(name)


@_register("arithmetic")
def arithmetic_rows(n: int, max_operand: int = 9, seed: int = 0) -> list[dict]:
    """Rows {"prompt": "What is a+b?", "label": "a+b"} with operands in [0, max_operand]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"What is {a}+{b}?", "label": str(a + b)})
    return rows


@_register("calculator")
def calculator_rows(n: int, max_operand: int = 99, seed: int = 0) -> list[dict]:
    """Rows {"prompt": "What is a*b?", "label": "a*b"}: products a small model cannot compute itself
    (the calculator environment's task). Operands have the digits of ``max_operand`` and every
    product twice as many (e.g. 32..99, products 1024..9801), so every prompt, tool call and tool
    answer has the same layout."""
    digits = len(str(max_operand))
    low = math.isqrt(10 ** (2 * digits - 1) - 1) + 1  # smallest operand whose square has 2 * digits digits
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(low, max_operand), rng.randint(low, max_operand)
        rows.append({"prompt": f"What is {a}*{b}?", "label": str(a * b)})
    return rows


def synthetic_rows(name: str, n: int, max_operand: int, seed: int, field: str = "data.source") -> list:
    """The rows of data source ``name`` (registered or an import path); a result that is not a list is
    a :class:`~miles_ray.utils.resolve.PluginError` naming ``field``."""
    rows = DATA_SOURCES.get_fn(name, field)(n, max_operand=max_operand, seed=seed)
    if not isinstance(rows, (list, tuple)):  # rows that are not dicts are skipped and reported by validate_rows
        c = DATA_SOURCES.contract
        raise PluginError(f"{field}='{name}': wrong return type: returned {type(rows).__name__}, not a list of dict "
                          f"rows; fix: a data source is called as {c.call} and returns {c.returns}")
    return list(rows)


def source_function(source: str):
    """The data-source name or import path ``source`` selects (``synthetic:<name>``, or
    ``pkg.module:function`` that is not a file), ``None`` for a file path."""
    if source.startswith("synthetic:"):
        return source.split(":", 1)[1]
    if is_import_path(source) and not Path(source).exists():
        return source
    return None
