"""Response bodies and SSE chunks of the OpenAI endpoint, built from engine :class:`Sample` records.

Shapes follow the OpenAI API (``chat.completion``, ``chat.completion.chunk``, ``text_completion``;
a stream ends with ``data: [DONE]``). Extensions keep what RL trains on, named as vLLM names them
(``return_token_ids``; ``vllm/entrypoints/openai/chat_completion/protocol.py``:
``ChatCompletionResponse.prompt_token_ids``, ``ChatCompletionResponseChoice.token_ids``, and in a
stream ``prompt_token_ids`` on the first chunk only and each chunk's ``token_ids`` delta;
``completion/protocol.py``: ``prompt_token_ids`` and ``token_ids`` on each completion choice):

- ``token_ids``: every token the engine sampled for the choice, the eos token included, exactly;
  ``logprobs`` (when asked) has one entry per token id, in order, so ids and log-probs align;
- ``prompt_token_ids``: the exact prompt the engine continued (the rendered chat template);
- ``weight_version`` on each choice: the policy version that sampled it (off-policy bookkeeping).

Invariant: concatenating a stream's content (or text) deltas gives the non-streamed content, and
concatenating its ``token_ids`` deltas gives the non-streamed ``token_ids``.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Iterator

from miles_ray.openai_api.chat import parse_tool_calls
from miles_ray.openai_api.protocol import ParsedRequest
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample


# -- stop strings and stop token ids, whatever the engine did --------------------------------------
def _first_stop_token(ids: list, stop_ids: set) -> int | None:
    return next((i for i, t in enumerate(ids) if t in stop_ids), None)


def _first_stop_string(ids: list, stop: list, tokenizer) -> int | None:
    """Index of the token whose text completes the first stop string (a prefix's text contains a
    stop string from that token on, so a binary search over prefix lengths finds it)."""
    def hit(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        return any(s in text for s in stop)

    if not stop or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo - 1


def finish(sample: Sample, params: SamplingParams, tokenizer) -> Sample:
    """The sample cut at its first stop token id or stop string (kept: the token that stopped it,
    as engines keep eos) with finish_reason ``stop`` and the text ending before the stop string
    (SGLang / OpenAI: the stop sequence is not in the output). Engines that apply ``stop``
    themselves (native) come out unchanged; the hf engine ignores it, so it is applied here."""
    ids = list(sample.response_ids)
    cuts = [c for c in (_first_stop_token(ids, set(params.stop_token_ids)),
                        _first_stop_string(ids, params.stop, tokenizer)) if c is not None]
    text = sample.response_text
    if cuts:
        end = min(cuts) + 1
        ids = ids[:end]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in params.stop:
        if s in text:
            text = text[:text.index(s)]
    if not cuts and text == sample.response_text:
        return sample
    return dataclasses.replace(sample, response_ids=ids, response_logprobs=list(sample.response_logprobs[:len(ids)]),
                               response_text=text, finish_reason="stop" if cuts else sample.finish_reason)


# -- pieces -------------------------------------------------------------------------------------
def text_pieces(ids: list, text: str, tokenizer) -> list[str]:
    """One text piece per token whose concatenation is ``text`` exactly: token ``k``'s piece is what
    the prefix ``ids[:k+1]`` adds to the text (held back while the prefix ends mid-character), the
    last token takes the rest; pieces past a cut stop string are empty."""
    pieces, done, last = [], 0, len(ids) - 1
    for k in range(len(ids)):
        end = len(text)
        if k < last:
            prefix = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
            clean = not prefix.endswith("\ufffd") and text.startswith(prefix[:len(text)])
            end = max(done, min(len(prefix), len(text))) if clean else done
        pieces.append(text[done:end])
        done = end
    return pieces


def _token_text(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok])


def chat_logprobs(ids: list, lps: list, tokenizer) -> dict:
    """OpenAI chat ``logprobs``: one content entry per sampled token (no top alternatives)."""
    content = []
    for tok, lp in zip(ids, lps):
        s = _token_text(tokenizer, tok)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []})
    return {"content": content}


def completion_logprobs(ids: list, lps: list, tokenizer, offset: int = 0) -> dict:
    """Legacy completions ``logprobs``: tokens, token_logprobs and text offsets."""
    tokens = [_token_text(tokenizer, t) for t in ids]
    offsets, at = [], offset
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": None, "text_offset": offsets}


def usage(prompts: list, samples: list) -> dict:
    """Prompt tokens counted once per prompt (as OpenAI does for n > 1), completion tokens per choice."""
    p, c = sum(len(ids) for ids in prompts), sum(len(s.response_ids) for s in samples)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


# -- chat ---------------------------------------------------------------------------------------
def _message(sample: Sample, req: ParsedRequest) -> tuple[dict, str]:
    content, calls = parse_tool_calls(sample.response_text) if req.parse_tools else (sample.response_text, [])
    message = {"role": "assistant", "content": content if (content or not calls) else None}
    if calls:
        message["tool_calls"] = calls
    return message, "tool_calls" if calls else sample.finish_reason


def chat_response(rid: str, model: str, req: ParsedRequest, samples: list, tokenizer) -> dict:
    choices = []
    for i, s in enumerate(samples):
        message, reason = _message(s, req)
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": chat_logprobs(s.response_ids, s.response_logprobs, tokenizer) if req.logprobs else None,
                        "token_ids": list(s.response_ids), "weight_version": s.weight_version})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(req.prompts, samples), "prompt_token_ids": list(req.prompts[0])}


def chat_chunks(rid: str, model: str, req: ParsedRequest, samples: list, tokenizer) -> Iterator[dict]:
    """Chunks of a streamed chat completion, choice by choice: the role, then one content delta per
    token (with its token id and log-prob) or, for a choice with tool calls, one delta holding the
    calls and all its tokens; then the finish reason; then usage when ``include_usage``."""
    created = int(time.time())

    def chunk(i: int, delta: dict, reason=None, ids=(), lps=(), **extra) -> dict:
        choice = {"index": i, "delta": delta, "finish_reason": reason, "token_ids": list(ids),
                  "logprobs": chat_logprobs(list(ids), list(lps), tokenizer) if req.logprobs and ids else None}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice], **extra}

    yield chunk(0, {"role": "assistant", "content": ""}, prompt_token_ids=list(req.prompts[0]))
    for i, s in enumerate(samples):
        if i:
            yield chunk(i, {"role": "assistant", "content": ""})
        message, reason = _message(s, req)
        ids, lps = s.response_ids, s.response_logprobs
        if "tool_calls" in message:
            calls = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
            yield chunk(i, {"content": message["content"], "tool_calls": calls}, ids=ids, lps=lps)
        else:
            for k, piece in enumerate(text_pieces(ids, s.response_text, tokenizer)):
                yield chunk(i, {"content": piece}, ids=ids[k:k + 1], lps=lps[k:k + 1])
        yield {**chunk(i, {}, reason), "weight_version": s.weight_version}
    if req.include_usage:
        yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": usage(req.prompts, samples)}


# -- completions --------------------------------------------------------------------------------
def _prompt_of(req: ParsedRequest, i: int) -> list:
    return req.prompts[i // req.n]


def completion_response(rid: str, model: str, req: ParsedRequest, samples: list, tokenizer) -> dict:
    """Choices ordered prompt by prompt, ``n`` each (OpenAI's order for a batch of prompts)."""
    choices = [{"index": i, "text": s.response_text, "finish_reason": s.finish_reason,
                "logprobs": completion_logprobs(s.response_ids, s.response_logprobs, tokenizer) if req.logprobs else None,
                "token_ids": list(s.response_ids), "prompt_token_ids": list(_prompt_of(req, i)),
                "weight_version": s.weight_version} for i, s in enumerate(samples)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(req.prompts, samples)}


def completion_chunks(rid: str, model: str, req: ParsedRequest, samples: list, tokenizer) -> Iterator[dict]:
    created = int(time.time())

    def chunk(i: int, text: str, reason=None, ids=(), lps=(), offset=0, **extra) -> dict:
        lp = completion_logprobs(list(ids), list(lps), tokenizer, offset) if req.logprobs and ids else None
        choice = {"index": i, "text": text, "finish_reason": reason, "logprobs": lp, "token_ids": list(ids), **extra}
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

    for i, s in enumerate(samples):
        ids, lps, at = s.response_ids, s.response_logprobs, 0
        for k, piece in enumerate(text_pieces(ids, s.response_text, tokenizer)):
            first = {"prompt_token_ids": list(_prompt_of(req, i))} if k == 0 else {}
            yield chunk(i, piece, ids=ids[k:k + 1], lps=lps[k:k + 1], offset=at, **first)
            at += len(piece)
        yield chunk(i, "", s.finish_reason, weight_version=s.weight_version,
                    **({} if ids else {"prompt_token_ids": list(_prompt_of(req, i))}))
    if req.include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": usage(req.prompts, samples)}


def sse(chunks) -> Iterator[str]:
    """Server-sent events: ``data: <json>`` per chunk, then ``data: [DONE]`` (OpenAI streaming)."""
    for c in chunks:
        yield f"data: {json.dumps(c)}\n\n"
    yield "data: [DONE]\n\n"


BUILDERS = {"chat": (chat_response, chat_chunks), "completion": (completion_response, completion_chunks)}
