"""The client a rollout function talks to: token-level turns on the engine it runs next to, and an
OpenAI-style ``chat.completions.create`` over them (same prompt rendering and tool-call parsing as
the OpenAI endpoint, :mod:`miles_ray.openai_api`).

Every call is one engine request with exact input ids; a conversation's turns are registered so
that :meth:`TurnClient.abort` stops the one running (partial rollout and aborts work mid-conversation).

MoE routing (R3): each call's trace (the experts of every token that call fed the model) is kept;
:meth:`TurnClient.routing_trace` lays them out over a conversation's tokens, each token taking the
experts recorded when it was first fed (-1 where no call fed that prefix, e.g. trailing tool tokens).
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
        self.fed: list[tuple[list, dict]] = []  # per call: (token ids it fed the model, its routing trace)
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
        if s.routed_experts:  # MoE: experts of input_ids + every sampled token but the last
            self.fed.append((list(input_ids) + list(s.response_ids)[:-1], s.routed_experts))
        return TurnOutput(list(s.response_ids), list(s.response_logprobs), s.response_text, s.finish_reason,
                          s.weight_version)

    def routing_trace(self, ids: list) -> dict | None:
        """The routing trace of a conversation's tokens ``ids`` (prompt + response) from this
        client's calls: token ``p`` gets the experts of the first call that fed ``ids[:p + 1]``
        (the routing its log-prob and the later ones were sampled under); -1 where none did. Rows:
        ``len(ids) - 1`` (the last token is never fed).
        None for a dense model (no call returned a trace)."""
        if not self.fed:
            return None
        import torch

        from miles_ray.models.moe import decode, encode

        rows, covered, total = [], 0, len(ids) - 1  # the last token is never fed (the engine's convention)
        for fed, trace in self.fed:
            n = min(_common_prefix(fed, ids), total)
            if n > covered:
                rows.append(decode(trace)[covered:n])
                covered = n
        shape = decode(self.fed[0][1]).shape[1:]
        rows.append(torch.full((total - covered, *shape), -1, dtype=torch.long))
        return encode(torch.cat(rows))

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


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
