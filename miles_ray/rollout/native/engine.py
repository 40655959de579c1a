"""Native rollout engine: slot KV cache and continuous batching over a transformers model.

Every ``step()`` admits waiting requests into free slots (one batched prefill), then runs one
batched decode step for all running requests; finished requests leave at once and their slot is
reused. Supports per-request sampling parameters, stop strings / stop token ids, n samples per
prompt (prefill once, copy the prompt's cache), abort, pause/resume, in-place weight updates
(inherited from the HF engine, whose model and weights it shares) and memory release.

Invariant: running requests occupy slots ``0..len(running)-1`` in order.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from miles_ray.rollout.hf_engine import HFRolloutEngine
from miles_ray.rollout.health import READY, EngineNotReady
from miles_ray.rollout.native.model import NativeForward
from miles_ray.rollout.native.sampling import sample
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample


@dataclass
class Request:
    rid: str
    prompt_ids: list
    params: SamplingParams
    meta: dict = field(default_factory=dict)
    output_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort
    text: str = ""
    weight_versions: list = field(default_factory=list)  # version that produced each token


class NativeEngine(HFRolloutEngine):
    def __init__(self, model_spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models",
                 seed: int = 0, max_running: int = 64, **_):
        super().__init__(model_spec, dtype, tiny_cache_dir, seed)
        self.forward = NativeForward(self.model)
        self.max_running = max_running
        self.cache = None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.paused = False
        self.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        self._ids = itertools.count()
        self.stop_ids = {self.tokenizer.eos_token_id}

    # -- request management ---------------------------------------------------------------------
    def add_request(self, prompt_ids: list, params: SamplingParams, rid: str | None = None, meta=None) -> str:
        rid = rid or f"req-{next(self._ids)}"
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.waiting.append(Request(rid, list(prompt_ids), params, dict(meta or {})))
        return rid

    def abort(self, rid: str) -> Request | None:
        """Remove a waiting or running request; returns it with finish_reason 'abort'."""
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                req.finish_reason = "abort"
                return req
        for i, req in enumerate(self.running):
            if req.rid == rid:
                self._leave([i])
                req.finish_reason = "abort"
                return req
        return None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def flush_cache(self) -> bool:
        if self.has_work():
            return False
        self.cache = None
        return True

    def release_memory(self) -> None:
        self.cache = None
        super().release_memory()

    # -- stepping -------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Admit + one decode step. Returns the requests that finished in this step."""
        if self.paused or not self.has_work():
            return []
        if self.state != READY:
            raise EngineNotReady(f"engine is {self.state}; it serves only after a complete weight load")
        finished = self._admit()
        if self.running:
            tokens = torch.tensor([r.output_ids[-1] for r in self.running], device=self.model.device)
            logits = self.forward.decode(tokens, self.cache)
            finished += self._append(list(range(len(self.running))), logits)
        return finished

    def _ensure_cache(self, slots: int, capacity: int) -> None:
        if self.cache is None:
            self.cache = self.forward.new_cache(max(slots, 8), max(capacity, 128))
        elif slots > self.cache.slots or capacity > self.cache.capacity:
            self.cache = self.cache.grown(max(slots, 2 * self.cache.slots), max(capacity, 2 * self.cache.capacity))

    def _admit(self) -> list[Request]:
        free = self.max_running - len(self.running)
        new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not new:
            return []
        need = max(len(r.prompt_ids) + r.params.max_new_tokens for r in new + self.running)
        self._ensure_cache(len(self.running) + len(new), need + 1)
        # one prefill per distinct prompt; samples of the same prompt copy its cache
        unique: dict[tuple, int] = {}
        for r in new:
            unique.setdefault(tuple(r.prompt_ids), len(unique))
        base = len(self.running)
        first_slot = {key: base + new.index(next(r for r in new if tuple(r.prompt_ids) == key)) for key in unique}
        prompts = list(unique)
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in prompts])
        slots = torch.tensor([first_slot[p] for p in prompts])
        dev = self.model.device
        logits = self.forward.prefill(ids.to(dev), lengths.to(dev), self.cache, slots.to(dev))
        rows = []
        for j, r in enumerate(new):
            slot, key = base + j, tuple(r.prompt_ids)
            if slot != first_slot[key]:
                self.cache.copy_slot(first_slot[key], slot)
            rows.append(unique[key])
        self.running.extend(new)
        return self._append(list(range(base, base + len(new))), logits[torch.tensor(rows, device=dev)])

    def _append(self, indices: list[int], logits: torch.Tensor) -> list[Request]:
        reqs = [self.running[i] for i in indices]
        dev = logits.device
        col = lambda f, dt: torch.tensor([f(r.params) for r in reqs], dtype=dt, device=dev)  # noqa: E731
        tokens, logprobs = sample(logits, col(lambda p: p.temperature, torch.float32), col(lambda p: p.top_k, torch.long),
                                  col(lambda p: p.top_p, torch.float32), col(lambda p: p.min_p, torch.float32),
                                  self.generator)
        done = []
        for i, r, tok, lp in zip(indices, reqs, tokens.tolist(), logprobs.tolist()):
            r.output_ids.append(tok)
            r.logprobs.append(lp)
            r.weight_versions.append(self.weight_version)
            reason = self._finish_reason(r, tok)
            if reason:
                r.finish_reason = reason
                done.append(i)
        finished = [self.running[i] for i in done]
        self._leave(done)
        return finished

    def _finish_reason(self, r: Request, tok: int) -> str | None:
        if (tok in self.stop_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
            return "stop"
        if r.params.stop:
            r.text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
            if any(s in r.text for s in r.params.stop):
                return "stop"
        if len(r.output_ids) >= r.params.max_new_tokens:
            return "length"
        return None

    def _leave(self, indices: list[int]) -> None:
        """Remove running requests, keeping slots compact: the last running slot fills each hole."""
        for i in sorted(indices, reverse=True):
            last = len(self.running) - 1
            if i != last:
                self.cache.copy_slot(last, i)
                self.running[i] = self.running[last]
            self.running.pop()

    # -- offline batch API (same as the HF engine) ----------------------------------------------
    def run_until_done(self) -> list[Request]:
        out = []
        while self.has_work():
            out.extend(self.step())
        return out

    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        if self.state != READY:
            raise EngineNotReady(f"engine is {self.state} (weight version {self.weight_version}); it serves "
                                 "only after a complete weight load")
        order = []
        for req in requests:
            prompt_ids = self.tokenizer(req["prompt"], add_special_tokens=False)["input_ids"]
            for _ in range(n):
                order.append(self.add_request(prompt_ids, params, meta=req))
        done = {r.rid: r for r in self.run_until_done()}
        return [self.to_sample(done[rid]) for rid in order]

    def to_sample(self, r: Request) -> Sample:
        m = r.meta
        text = r.text or self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        for s in r.params.stop:
            if s in text:
                text = text[: text.index(s)]
        return Sample(prompt_index=m.get("prompt_index", 0), group_id=m.get("group_id", 0), prompt=m.get("prompt", ""),
                      label=m.get("label", ""), prompt_ids=r.prompt_ids, response_ids=r.output_ids,
                      response_logprobs=r.logprobs, response_text=text, finish_reason=r.finish_reason,
                      weight_version=r.weight_versions[0] if r.weight_versions else self.weight_version)
