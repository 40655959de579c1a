"""Synthetic tasks a small model can learn on CPU."""
from __future__ import annotations

import math
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


def synthetic_rows(name: str, n: int, max_operand: int, seed: int) -> list[dict]:
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task '{name}'; choose one of {sorted(SYNTHETIC_TASKS)}")
    return SYNTHETIC_TASKS[name](n, max_operand=max_operand, seed=seed)
