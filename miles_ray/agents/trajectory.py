"""A conversation kept as the exact tokens the model saw and produced.

The prompt is rendered once (chat template, tools). After that nothing is re-tokenised: a model
turn appends the ids the engine sampled (``loss_mask`` 1, with their log-probs); environment
messages append the tokens of the template's text *between* the model's end-of-turn token and the
next generation prompt (``loss_mask`` 0, log-prob 0.0). The next turn is generated from
:meth:`Trajectory.ids`, so the trainer sees exactly what the engine saw.

Invariants: ``len(response_ids) == len(loss_mask) == len(logprobs) <= max_tokens``; a 1 in
``loss_mask`` marks a token the engine sampled (or a demonstration's model token).
"""
from __future__ import annotations

from miles_ray.openai_api.chat import parse_tool_calls, render_prompt


class TemplateError(ValueError):
    """The chat template does not render a conversation as an extension of its earlier turns."""


class Trajectory:
    def __init__(self, tokenizer, messages: list, tools: list | None = None, max_tokens: int = 512):
        self.tokenizer, self.tools, self.max_tokens = tokenizer, list(tools or []), max_tokens
        self.messages = list(messages)
        self.prompt_text = render_prompt(tokenizer, self.messages, self.tools)
        self.prompt_ids = self._encode(self.prompt_text)
        self.response_ids: list = []
        self.loss_mask: list = []
        self.logprobs: list = []
        self.turn_versions: list = []  # weight version of each model turn (partial rollout may change it)
        self.truncated = False

    def _encode(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def ids(self) -> list:
        return self.prompt_ids + self.response_ids

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.response_ids)

    def _append(self, ids: list, mask: int, logprobs: list | None = None) -> bool:
        room = self.remaining
        if len(ids) > room:
            ids, logprobs, self.truncated = ids[:room], (logprobs or [])[:room] or None, True
        self.response_ids += ids
        self.loss_mask += [mask] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        return not self.truncated

    def add_model_turn(self, ids: list, logprobs: list, text: str, version: int | None = None) -> tuple[str, list]:
        """The engine's turn (``text`` without special tokens); returns its (content, tool calls)."""
        if len(ids) != len(logprobs):
            raise ValueError(f"model turn has {len(ids)} tokens but {len(logprobs)} log-probs")
        self._append(list(ids), 1, list(logprobs))
        self.turn_versions.append(version)
        content, calls = parse_tool_calls(text)
        msg = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        self.messages.append(msg)
        return content, calls

    def add_env_messages(self, new: list) -> bool:
        """Tool results / feedback after a model turn, then the next generation prompt. False when
        the token budget ran out (the conversation must end; what fitted is kept)."""
        base = render_prompt(self.tokenizer, self.messages, self.tools, add_generation_prompt=False)
        full = render_prompt(self.tokenizer, self.messages + list(new), self.tools, add_generation_prompt=True)
        if not full.startswith(base):
            raise TemplateError("the chat template renders new messages by changing earlier ones; multi-turn "
                                "rollout needs an append-only template")
        eos = self.tokenizer.eos_token or ""
        cut = base.rfind(eos) if eos else -1
        tail = base[cut + len(eos):] if cut >= 0 else ""  # e.g. the newline after <|im_end|>
        self.messages += list(new)
        return self._append(self._encode(tail + full[len(base):]), 0)

    def add_demonstration_turn(self, message: dict) -> None:
        """An assistant message of a demonstration (SFT warm-up), tokenised as the template renders
        it, up to and including the end-of-turn token: what the model should have sampled."""
        before = render_prompt(self.tokenizer, self.messages, self.tools, add_generation_prompt=True)
        after = render_prompt(self.tokenizer, self.messages + [message], self.tools, add_generation_prompt=False)
        if not after.startswith(before):
            raise TemplateError("the chat template is not append-only (assistant turn)")
        text, eos = after[len(before):], self.tokenizer.eos_token or ""
        if eos and eos in text:
            text = text[:text.index(eos) + len(eos)]
        self._append(self._encode(text), 1)
        self.turn_versions.append(None)
        self.messages.append(message)

    def final_answer(self) -> str:
        """The content of the last assistant message: what the reward function grades."""
        for m in reversed(self.messages):
            if m.get("role") == "assistant":
                return m.get("content") or ""
        return ""
