"""Chat prompts with tools, and tool calls read back from model text (Hermes / Qwen style).

Qwen2.5/Qwen3 chat templates (``tokenizer_config.json`` of Qwen/Qwen3-0.6B) put the tool schemas
in the system turn between ``<tools></tools>``, render an assistant's ``tool_calls`` as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` and a ``tool`` message as a user
turn wrapping ``<tool_response>\\n...\\n</tool_response>``. A tokenizer whose template knows tools is
used as is; one that does not (the tiny test models) gets the same conventions rendered here
before its template runs, so prompts and parsing agree either way.
"""
from __future__ import annotations

import json
import re
import uuid

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
                  "</tools>\n\nFor each function call, return a json object with function name and arguments within "
                  "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
                  "<args-json-object>}}\n</tool_call>")


class ChatFormatError(ValueError):
    """A malformed message list or tool definition; the message names the entry."""


def _template(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) else ""


def format_tool_call(call: dict) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}) + "\n</tool_call>"


def _inline(messages: list, tools: list | None) -> list:
    """Tools and tool calls as plain text, for templates that know neither."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatFormatError(f"messages[{i}] must be an object with a 'role'")
        m = dict(m)
        if m.get("tool_calls"):
            calls = "\n".join(format_tool_call(c) for c in m.pop("tool_calls"))
            m["content"] = ((m.get("content") or "") + ("\n" if m.get("content") else "") + calls)
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        m["content"] = m.get("content") or ""
        out.append(m)
    if tools:
        text = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def check_tools(tools: list | None) -> None:
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise ChatFormatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                  "'parameters': {...}}}}")


def render_prompt(tokenizer, messages: list, tools: list | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` (OpenAI format) with ``tools`` (OpenAI function schemas)."""
    check_tools(tools)
    template = _template(tokenizer)
    if "tools" in template and "tool_call" in template:  # the model's own template knows tools
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(_inline(messages, tools), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """``(content, tool_calls)`` of an assistant turn: each ``<tool_call>{json}</tool_call>`` whose
    JSON has a string ``name`` becomes an OpenAI tool call (arguments as a JSON string); the text
    outside them is the content. A block that is not valid JSON stays in the content."""
    calls, kept, last = [], [], 0
    for m in TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args)}})
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls
