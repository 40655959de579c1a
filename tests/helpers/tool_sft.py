"""A tiny SFT data set that teaches a tiny model one Hermes tool-calling conversation, as the
OpenAI endpoint renders it: turn 1 (the user's question, with the tools) -> a ``calculator`` tool
call; turn 2 (the call and its result appended) -> a final answer. Prompts are rendered with
:func:`miles_ray.openai_api.render_prompt` (``data.apply_chat_template=false``) so the trained text
is exactly what the served endpoint feeds the engine."""
import json
from pathlib import Path

from miles_ray.openai_api import render_prompt
from miles_ray.openai_api.chat import format_tool_call

CALCULATOR = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
TOOLS = [CALCULATOR]
QUESTIONS = {"What is 12*34?": ("12*34", "408")}  # one conversation: two SFT rows


def tool_call(expression: str) -> dict:
    return {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}


def turns(question: str) -> list[tuple[list, str]]:
    """(messages, assistant target) of both turns of ``question``'s conversation."""
    expression, result = QUESTIONS[question]
    first = [{"role": "user", "content": question}]
    second = first + [{"role": "assistant", "content": "", "tool_calls": [tool_call(expression)]},
                      {"role": "tool", "tool_call_id": "call_0", "content": result}]
    return [(first, format_tool_call(tool_call(expression))), (second, f"{expression} = {result}")]


def write_dataset(path: Path, tokenizer) -> Path:
    rows = [{"prompt": render_prompt(tokenizer, messages, TOOLS), "label": target}
            for q in QUESTIONS for messages, target in turns(q)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
