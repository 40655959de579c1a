"""Native rollout engine: slot KV cache and continuous batching over a transformers model.

Every ``step()`` admits waiting requests into free slots (one batched prefill), then runs one
batched decode step for all running requests; finished requests leave at once and their slot is
reused. Supports per-request sampling parameters, stop strings / stop token ids, n samples per
prompt (prefill once, copy the prompt's cache), abort, pause/resume, in-place weight updates and
memory release (through :class:`EngineWeights`, shared with the HF engine by composition).

Invariant: running requests occupy slots ``0..len(running)-1`` in order.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from miles_ray.rollout.engine_weights import EngineWeights, load_for_serving
from miles_ray.rollout.native.model import NativeForward
from miles_ray.rollout.native.routes import RouteTracker
from miles_ray.rollout.native.sampling import distribution, sample
from miles_ray.rollout.native.speculative import Speculator, verify, verify_logprobs
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
    routes: list = field(default_factory=list)  # MoE: expert ids of each token fed (RouteTracker)


class NativeEngine:
    def __init__(self, model_spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models",
                 seed: int = 0, max_running: int = 64, draft: str | None = None, num_draft_tokens: int = 4,
                 exact_max_len: int = 0, exact_check: bool = True, quantization: str | None = None,
                 fp8_backend: str = "auto"):
        self.model_spec = model_spec
        self.tokenizer, self.model = load_for_serving(model_spec, dtype, tiny_cache_dir, quantization, fp8_backend)
        self.weights = EngineWeights(self.model)
        torch.manual_seed(seed)
        self.spec = None  # Speculator when a draft model is configured (speculative decoding)
        if draft:
            from miles_ray.models.draft import build_draft

            self.spec = Speculator(build_draft(draft, model_spec, dtype, tiny_cache_dir).to(self.model.device),
                                   num_draft_tokens)
        self.speculate = self.spec is not None
        self.exact_max_len = exact_max_len
        self.forward = (NativeForward(self.model) if not exact_max_len
                        else _exact(self.model, exact_max_len, exact_check, max_running))
        self.routes = RouteTracker(self.model, enabled=not exact_max_len)  # MoE: each token's experts, per request
        if self.routes.active and self.spec is not None:
            raise ValueError("speculative decoding is not supported for MoE models (routing traces of draft tokens "
                             "that are rejected would be wrong); set draft.enabled=false")
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
        if self.spec:
            self.spec.cache = None
        return True

    def release_memory(self) -> None:
        self.cache = None
        if self.spec:
            self.spec.cache = None
        self.weights.release()

    def resume_memory(self) -> None:
        self.weights.resume()

    def get_rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    # -- speculative decoding -------------------------------------------------------------------
    def set_speculation(self, enabled: bool) -> None:
        """Turn speculative decoding on or off between batches (the draft cache must see every prompt)."""
        if enabled and self.spec is None:
            raise ValueError("no draft model: set draft.enabled=true (draft.path) to speculate")
        if self.has_work():
            raise RuntimeError("set_speculation only between batches (requests are running)")
        self.speculate = bool(enabled)

    def load_draft(self, state: dict, version: int | None = None) -> None:
        self.spec.load_state_dict(state)
        self.draft_version = version

    def draft_weights(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.spec.model.state_dict().items()}

    def spec_stats(self) -> dict:
        """Acceptance counters since the last call (empty without a draft)."""
        return self.spec.stats.take() if self.spec else {}

    # -- stepping -------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Admit + one decode step. Returns the requests that finished in this step."""
        if self.paused or not self.has_work():
            return []
        self.weights.require_ready()
        finished = self._admit()
        if self.running and self.speculate:
            finished += self._spec_step()
        elif self.running:
            tokens = torch.tensor([r.output_ids[-1] for r in self.running], device=self.model.device)
            self.routes.begin()
            logits = self.forward.decode(tokens, self.cache)
            self.routes.decode(self.running)
            finished += self._append(list(range(len(self.running))), logits)
        return finished

    def _spec_step(self) -> list[Request]:
        """One speculative round for every running request (see :mod:`.speculative`)."""
        reqs, k, dev = self.running, self.spec.k, self.model.device
        B, cols = len(reqs), self._param_cols(reqs, dev)
        seqs = [r.prompt_ids + r.output_ids for r in reqs]
        drafts, q = self.spec.propose(seqs, cols, self.generator)
        before = self.cache.lengths[:B].clone()
        tokens = torch.cat([torch.tensor([s[-1] for s in seqs], device=dev)[:, None], drafts], 1)
        logits = self.forward.extend(tokens, torch.full((B,), k + 1, device=dev), self.cache)
        V = logits.shape[-1]
        p = distribution(logits.reshape(B * (k + 1), V), *(c.repeat_interleave(k + 1) for c in cols)).view(B, k + 1, V)
        n, nxt = verify(p, q, drafts, self.generator)
        self.cache.lengths[:B] = before + 1 + n
        self.spec.commit([len(s) for s in seqs], n)
        out = torch.cat([drafts, nxt[:, None]], 1)
        out.scatter_(1, n[:, None], nxt[:, None])  # the token after the accepted drafts
        lps = verify_logprobs(logits, cols[0], out)
        counts = (n + 1).tolist()
        toks = [row[:c] for row, c in zip(out.tolist(), counts)]
        emitted_lps = [row[:c] for row, c in zip(lps.tolist(), counts)]
        self.spec.stats.add(k, n, sum(counts))
        return self._record(list(range(B)), toks, emitted_lps)

    def _ensure_cache(self, slots: int, capacity: int) -> None:
        if self.cache is None:
            self.cache = self.forward.new_cache(max(slots, 8), self.forward.cache_capacity(capacity))
        elif slots > self.cache.slots or capacity > self.cache.capacity:
            self.cache = self.cache.grown(max(slots, 2 * self.cache.slots),
                                          self.forward.cache_capacity(capacity, self.cache.capacity))
        if self.spec:
            self.spec.ensure_cache(self.cache.slots, self.cache.capacity)

    def _admit(self) -> list[Request]:
        free = self.max_running - len(self.running)
        new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not new:
            return []
        need = max(len(r.prompt_ids) + r.params.max_new_tokens for r in new + self.running)
        self._ensure_cache(len(self.running) + len(new), need + 2 + (self.spec.k if self.spec else 0))
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
        self.routes.begin()
        logits = self.forward.prefill(ids.to(dev), lengths.to(dev), self.cache, slots.to(dev))
        self.routes.prefill(new, [unique[tuple(r.prompt_ids)] for r in new], P)
        if self.speculate:
            self.spec.prefill(ids.to(dev), lengths.to(dev), slots.to(dev))
        rows = []
        for j, r in enumerate(new):
            slot, key = base + j, tuple(r.prompt_ids)
            if slot != first_slot[key]:
                self.cache.copy_slot(first_slot[key], slot)
                if self.speculate:
                    self.spec.copy_slot(first_slot[key], slot)
            rows.append(unique[key])
        self.running.extend(new)
        return self._append(list(range(base, base + len(new))), logits[torch.tensor(rows, device=dev)])

    @staticmethod
    def _param_cols(reqs: list[Request], dev) -> tuple:
        """Per-row sampling parameters (temperature, top_k, top_p, min_p) as tensors."""
        col = lambda f, dt: torch.tensor([f(r.params) for r in reqs], dtype=dt, device=dev)  # noqa: E731
        return (col(lambda p: p.temperature, torch.float32), col(lambda p: p.top_k, torch.long),
                col(lambda p: p.top_p, torch.float32), col(lambda p: p.min_p, torch.float32))

    def _append(self, indices: list[int], logits: torch.Tensor) -> list[Request]:
        reqs = [self.running[i] for i in indices]
        cols = self._param_cols(reqs, logits.device)
        tokens, logprobs = sample(logits, *cols, self.generator)
        if self.exact_max_len:  # true on-policy: the log-probs exactly as the trainer computes them
            from miles_ray.models.exact import exact_logprobs

            logprobs = exact_logprobs(logits, torch.where(cols[0] > 0, cols[0], torch.ones_like(cols[0])), tokens)
        return self._record(indices, [[t] for t in tokens.tolist()], [[lp] for lp in logprobs.tolist()])

    def _record(self, indices: list[int], tokens: list[list[int]], logprobs: list[list[float]]) -> list[Request]:
        """Append each request's new tokens in order, stopping at the first that finishes it."""
        done = []
        for i, toks, lps in zip(indices, tokens, logprobs):
            r = self.running[i]
            for tok, lp in zip(toks, lps):
                r.output_ids.append(tok)
                r.logprobs.append(lp)
                r.weight_versions.append(self.weights.version)
                reason = self._finish_reason(r, tok)
                if reason:
                    r.finish_reason = reason
                    done.append(i)
                    break
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
                if self.speculate:
                    self.spec.copy_slot(last, i)
                self.running[i] = self.running[last]
            self.running.pop()

    # -- offline batch API (same as the HF engine) ----------------------------------------------
    def run_until_done(self) -> list[Request]:
        out = []
        while self.has_work():
            out.extend(self.step())
        return out

    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        self.weights.require_ready()
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
                      weight_version=r.weight_versions[0] if r.weight_versions else self.weights.version,
                      routed_experts=self.routes.trace(r))


def _exact(model, max_len: int, check: bool = True, max_running: int = 64):
    """The row-invariant forward of true on-policy mode, after its startup self-test (``check``:
    only benchmarks measuring where it fails turn it off) at this engine's decode batch size."""
    from miles_ray.models.exact import ExactForward, self_test

    forward = ExactForward(model, max_len)
    if check:
        self_test(forward, model.config.vocab_size, batch_sizes=(max_running,))
    return forward
