"""A calculator tool environment: the model calls ``calculator`` with an arithmetic expression,
reads the result, and answers. Expressions are evaluated from their syntax tree (numbers and
+ - * / // % ** and parentheses only), never with ``eval``.
"""
from __future__ import annotations

import ast
import re
import json
import operator

from miles_ray.agents.env import Observation, StepResult, register_env

TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR_CHARS, MAX_POWER = 200, 64


def _value(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def evaluate(expression: str) -> str:
    """The value of ``expression`` as text (integers without a trailing .0), or ``error: ...``."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPR_CHARS:
        return "error: expression must be a string of at most 200 characters"
    try:
        value = _value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as err:
        return f"error: {err}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


@register_env("calculator")
class CalculatorEnv:
    """``show_tools``: put the tool schema in the prompt (Hermes preamble); small models trained with
    ``demonstration`` learn the call format without it and keep prompts short."""

    def __init__(self, show_tools: bool = False):
        self.show_tools, self.calls = show_tools, 0

    def reset(self, prompt: str, label: str, messages: list | None = None) -> Observation:
        self.calls = 0
        msgs = list(messages) if messages else [{"role": "user", "content": prompt}]
        return Observation(msgs, [TOOL] if self.show_tools else [])

    def step(self, content: str, tool_calls: list[dict]) -> StepResult:
        if not tool_calls:
            return StepResult(done=True, info={"tool_calls": self.calls})
        out = []
        for call in tool_calls:
            self.calls += 1
            fn = call.get("function", {})
            result = _run(fn.get("name"), fn.get("arguments"))
            out.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": result})
        return StepResult(out, info={"tool_calls": self.calls})


    def demonstration(self, prompt: str, label: str, messages: list | None = None) -> list[dict] | None:
        """The ideal continuation of a "What is <expression>?" task (SFT warm-up), else None."""
        text = (messages[-1]["content"] if messages else prompt) or ""
        found = _EXPRESSION.search(text)
        return demonstration(prompt, label, found.group(1).strip()) if found else None


_EXPRESSION = re.compile(r"What is ([-\d\s+*/().%]+)\?")


def _run(name, arguments) -> str:
    if name != "calculator":
        return f"error: unknown tool {name!r} (available: calculator)"
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments or {})
    except (json.JSONDecodeError, TypeError, ValueError):
        return "error: arguments must be a JSON object"
    return evaluate(args.get("expression")) if isinstance(args, dict) else "error: arguments must be a JSON object"


def demonstration(prompt: str, label: str, expression: str) -> list[dict]:
    """The ideal conversation for a calculator task: call the tool, then answer with its result."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": evaluate(expression)},
            {"role": "assistant", "content": str(label)}]
