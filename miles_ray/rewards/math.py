"""Rule-based math reward: extract the final answer from the response and compare with the label."""
from __future__ import annotations

import re
from typing import Optional

from miles_ray.rewards.registry import register_reward

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{}``, else the last number in the text, else None."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def _to_number(text: str) -> Optional[float]:
    text = text.strip().replace(",", "").rstrip(".")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(answer: Optional[str], label: str) -> bool:
    if answer is None:
        return False
    a, b = _to_number(answer), _to_number(str(label))
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return answer.strip() == str(label).strip()


@register_reward("math")
def math_reward(prompt: str, response: str, label: str) -> float:
    """1.0 if the final answer equals the label, else 0.0."""
    return 1.0 if answers_match(extract_answer(response), label) else 0.0
