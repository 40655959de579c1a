"""The client a rollout function talks to: token-level turns on the engine it runs next to, and an
OpenAI-style ``chat.completions.create`` over them (same prompt rendering and tool-call parsing as
the OpenAI endpoint, :mod:`miles_ray.openai_api`).

Every call is one engine request with exact input ids; a conversation's turns are registered so
that :meth:`TurnClient.abort` stops the one running (partial rollout and aborts work mid-conversation).
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, replace
from types import SimpleNamespace

from miles_ray.openai_api.chat import parse_tool_calls, render_prompt
from miles_ray.rollout.types import SamplingParams


@dataclass
class TurnOutput:
    ids: list
    logprobs: list
    text: str
    finish_reason: str  # stop | length | abort
    weight_version: int


class ConversationAborted(RuntimeError):
    pass


class TurnClient:
    """``engine``: a RolloutEngine (``generate(requests, n, params) -> list[Sample]``, ``abort(rid)``)."""

    def __init__(self, engine, tokenizer, params: SamplingParams, deadline: float | None = None):
        self.engine, self.tokenizer, self.params, self.deadline = engine, tokenizer, params, deadline
        self.current: str | None = None  # rid of the running turn
        self.aborted = threading.Event()
        self.turns = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._chat_create))

    def generate(self, input_ids: list, max_tokens: int | None = None, **sampling) -> TurnOutput:
        """One model turn continuing ``input_ids``; ``sampling`` overrides the run's parameters."""
        if self.aborted.is_set():
            raise ConversationAborted("conversation aborted")
        if self.deadline is not None and time.time() > self.deadline:
            raise TimeoutError("conversation ran past agent.timeout_s")
        params = replace(self.params, **sampling)
        if max_tokens is not None:
            params = replace(params, max_new_tokens=max(1, int(max_tokens)))
        self.current = rid = uuid.uuid4().hex
        req = {"input_ids": list(input_ids), "prompt": "", "label": "", "prompt_index": 0, "group_id": 0, "rid": rid}
        try:
            (s,) = self.engine.generate([req], 1, params)
        finally:
            self.current = None
        self.turns += 1
        return TurnOutput(list(s.response_ids), list(s.response_logprobs), s.response_text, s.finish_reason,
                          s.weight_version)

    def abort(self) -> None:
        self.aborted.set()
        rid = self.current
        if rid is not None:
            self.engine.abort(rid)

    def _chat_create(self, messages: list, tools: list | None = None, max_tokens: int | None = None,
                     temperature: float | None = None, **_ignored) -> dict:
        """An OpenAI chat completion (a dict) with the exact ``prompt_token_ids``/``token_ids``."""
        prompt_ids = self.tokenizer(render_prompt(self.tokenizer, messages, tools), add_special_tokens=False)["input_ids"]
        extra = {} if temperature is None else {"temperature": temperature}
        out = self.generate(prompt_ids, max_tokens, **extra)
        content, calls = parse_tool_calls(out.text)
        message = {"role": "assistant", "content": content or None}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else out.finish_reason
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "token_ids": out.ids,
                             "logprobs": {"content": [{"token": "", "logprob": lp} for lp in out.logprobs]}}],
                "prompt_token_ids": prompt_ids,
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out.ids),
                          "total_tokens": len(prompt_ids) + len(out.ids)}}
