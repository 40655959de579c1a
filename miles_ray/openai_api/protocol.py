"""OpenAI request validation: a request body becomes prompt token ids and :class:`SamplingParams`.

Field names, ranges and error bodies follow the OpenAI API (``openai-python``'s
``_make_status_error`` reads ``body["error"]`` and :class:`openai.APIError` its ``param``): every
bad request raises :class:`RequestError` naming the offending field, answered as
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}`` with status 400.
Extensions taken from vLLM's OpenAI server (``vllm/entrypoints/openai/chat_completion/protocol.py``):
``top_k``, ``min_p``, ``stop_token_ids``, ``ignore_eos``; ``return_token_ids`` is accepted and
always on. Sampling options the engines cannot honour (penalties, logit bias, top-k alternatives
of log-probs, forced tool choice, ...) are refused, never silently dropped: RL needs the log-prob
of what was actually sampled under the stated parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from miles_ray.openai_api.chat import ChatFormatError, check_tools, render_prompt
from miles_ray.rollout.types import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI: "Up to 4 sequences"


class RequestError(ValueError):
    """A request the endpoint refuses; ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.param, self.kind, self.code)


def error_body(message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ServeSettings:
    """What the endpoint serves and its limits (from the ``serve`` config section)."""
    model_name: str = "miles-ray"
    max_tokens: int = 256  # default max_tokens of a request
    max_n: int = 16  # most choices one request may ask for (n x prompts)
    api_key: Optional[str] = None  # bearer key clients must send (None: none required)


@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completion"
    prompts: list  # token ids of each prompt (chat: exactly one)
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    parse_tools: bool = False  # chat with tools: read <tool_call> blocks into tool_calls


# -- field readers: each raises RequestError naming the field ------------------------------------
def _number(body: dict, key: str, default, lo=None, hi=None, integer: bool = False, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        bounds = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise RequestError(f"'{key}' must be {bounds}, got {value!r}", key)
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be a boolean, got {value!r}", key)
    return value


def _stop(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop) > MAX_STOP:
        raise RequestError(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    return stop


def _token_ids(value: Any, key: str, vocab: int) -> list:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"'{key}' must be a list of token ids (integers)", key)
    bad = [t for t in value if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"'{key}' holds token id(s) {bad[:3]} outside the vocabulary [0, {vocab})", key)
    return value


UNSUPPORTED = {  # field -> (is it a non-default value?, why it is refused)
    "presence_penalty": (lambda v: v not in (None, 0, 0.0), "penalties are not applied by the engines"),
    "frequency_penalty": (lambda v: v not in (None, 0, 0.0), "penalties are not applied by the engines"),
    "repetition_penalty": (lambda v: v not in (None, 1, 1.0), "penalties are not applied by the engines"),
    "logit_bias": (lambda v: bool(v), "logit bias is not applied by the engines"),
    "top_logprobs": (lambda v: v not in (None, 0), "the engines return the sampled token's log-prob only "
                     "(logprobs=true gives it; top_logprobs must be 0 or absent)"),
    "response_format": (lambda v: v not in (None, {"type": "text"}), "structured output is not supported"),
    "use_beam_search": (lambda v: bool(v), "beam search is not supported"),
    "min_tokens": (lambda v: v not in (None, 0), "min_tokens is not supported"),
    "echo": (lambda v: bool(v), "echo is not supported"),
    "suffix": (lambda v: v is not None, "suffix (insertion) is not supported"),
}


def _refuse_unsupported(body: dict) -> None:
    for key, (set_, why) in UNSUPPORTED.items():
        if set_(body.get(key)):
            raise RequestError(f"'{key}' is not supported here: {why}", key)
    best_of = body.get("best_of")
    if best_of not in (None, 1, body.get("n", 1)):
        raise RequestError("'best_of' is not supported (ask for n choices and rank them yourself)", "best_of")


def sampling(body: dict, settings: ServeSettings, vocab: int) -> SamplingParams:
    """:class:`SamplingParams` of a request (OpenAI defaults: temperature 1, top_p 1)."""
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    top_k = _number(body, "top_k", 0, lo=-1, integer=True)
    return SamplingParams(
        max_new_tokens=_number(body, key, settings.max_tokens, lo=1, integer=True),
        temperature=float(_number(body, "temperature", 1.0, lo=0, hi=2)),
        top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
        top_k=max(top_k, 0),  # vLLM: -1 disables top-k; here 0 does
        min_p=float(_number(body, "min_p", 0.0, lo=0, hi=1)),
        stop=_stop(body),
        stop_token_ids=_token_ids(body.get("stop_token_ids") or [], "stop_token_ids", vocab),
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _common(body: Any, settings: ServeSettings, vocab: int) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required (a string)", "model")
    if model != settings.model_name:
        raise RequestError(f"The model '{model}' does not exist; this endpoint serves '{settings.model_name}'",
                           "model", status=404, code="model_not_found")
    _refuse_unsupported(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise RequestError("'stream_options' is an object, allowed only with stream=true", "stream_options")
    return {"params": sampling(body, settings, vocab), "n": _number(body, "n", 1, lo=1, hi=settings.max_n, integer=True),
            "stream": stream, "include_usage": bool((options or {}).get("include_usage"))}


def _content(m: dict, i: int) -> Optional[str]:
    """A message's text: a string, or the ``text`` parts of a content list joined."""
    content = m.get("content")
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content[{j}]: only text parts are supported",
                                   f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be an object whose 'role' is one of {list(ROLES)}",
                               f"messages[{i}].role")
        msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)}
        calls = m.get("tool_calls")
        if calls:
            if m["role"] != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise RequestError(f"messages[{i}].tool_calls must be a list of {{'function': {{'name', "
                                   "'arguments'}}}} on an assistant message", f"messages[{i}].tool_calls")
            msg["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def _tool_choice(body: dict, tools: Optional[list]) -> bool:
    """Whether tool calls are read from the output: ``auto`` (the default with tools) or ``none``."""
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return bool(tools)
    if choice == "none":
        return False
    raise RequestError("'tool_choice' must be 'auto' or 'none': the engines cannot force a tool call "
                       "('required' or a named function)", "tool_choice")


def parse_chat(body: Any, tokenizer, settings: ServeSettings) -> ParsedRequest:
    """A ``/v1/chat/completions`` body: messages rendered with the tokenizer's chat template (tools
    in it, :func:`render_prompt`), tokenised once; these ids are what the engine continues."""
    common = _common(body, settings, len(tokenizer))
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("'tools' must be a list of function tools", "tools")
    try:
        check_tools(tools)
    except ChatFormatError as err:
        raise RequestError(str(err), "tools") from None
    messages = _messages(body)
    parse_tools = _tool_choice(body, tools)
    logprobs = _bool(body, "logprobs")
    try:
        text = render_prompt(tokenizer, messages, tools or None)
    except ChatFormatError as err:
        raise RequestError(str(err), "messages") from None
    except Exception as err:  # noqa: BLE001 - a template that cannot render these messages
        raise RequestError(f"the chat template cannot render these messages: {err}", "messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ParsedRequest("chat", [ids], logprobs=logprobs, parse_tools=parse_tools, **common)


def _prompts(body: dict, tokenizer) -> list:
    """``prompt``: a string, a list of token ids, or a list of either (a batch)."""
    prompt, vocab = body.get("prompt"), len(tokenizer)
    if isinstance(prompt, str) and prompt:
        return [tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [_token_ids(prompt, "prompt", vocab)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) and p for p in prompt):
        return [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
                else _token_ids(p, "prompt", vocab) for p in prompt]
    raise RequestError("'prompt' must be a non-empty string, a list of token ids, or a list of those", "prompt")


def parse_completion(body: Any, tokenizer, settings: ServeSettings) -> ParsedRequest:
    """A ``/v1/completions`` body. ``logprobs`` is the legacy integer: 0 gives the sampled tokens'
    log-probs; more (top alternatives) is refused."""
    common = _common(body, settings, len(tokenizer))
    prompts = _prompts(body, tokenizer)
    if len(prompts) * common["n"] > settings.max_n:
        raise RequestError(f"{len(prompts)} prompts x n={common['n']} exceeds the {settings.max_n} choices one "
                           "request may ask for", "n")
    logprobs = _number(body, "logprobs", None, lo=0, integer=True)
    if logprobs:
        raise RequestError("'logprobs' must be 0 (the sampled tokens' log-probs): top alternatives are not "
                           "returned by the engines", "logprobs")
    return ParsedRequest("completion", prompts, logprobs=logprobs is not None, **common)


PARSERS = {"chat": parse_chat, "completion": parse_completion}
