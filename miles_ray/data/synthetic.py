"""Synthetic tasks a small model can learn on CPU."""
from __future__ import annotations

import random

SYNTHETIC_TASKS = {}


def _register(name):
    def deco(fn):
        SYNTHETIC_TASKS[name] = fn
        return fn
    return deco


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
def calculator_rows(n: int, max_operand: int = 999, seed: int = 0) -> list[dict]:
    """Rows {"prompt": "What is a*b?", "label": "a*b"}: products a small model cannot compute itself
    (the calculator environment's task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
        rows.append({"prompt": f"What is {a}*{b}?", "label": str(a * b)})
    return rows


def synthetic_rows(name: str, n: int, max_operand: int, seed: int) -> list[dict]:
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task '{name}'; choose one of {sorted(SYNTHETIC_TASKS)}")
    return SYNTHETIC_TASKS[name](n, max_operand=max_operand, seed=seed)
