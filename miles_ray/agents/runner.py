"""Custom rollout functions (``rollout.fn``) run by the engine actors.

:class:`AgentEngine` wraps a :class:`~miles_ray.rollout.engines.RolloutEngine`: ``generate(requests,
n, params)`` runs the function once per (request, sample) in a thread pool, each with a
:class:`RolloutContext` whose client talks to the wrapped engine (continuous batching across
conversations). Everything else (weights, health, pause, memory) is the wrapped engine's, so the
drivers, failover, partial rollout and the ledger work unchanged.

A function that raises, returns something that is not a well-formed Sample, or runs past
``agent.timeout_s`` yields a Sample with ``error`` set (naming the function): it gets the reward
failure score and is counted (``rollout/rollout_fn_errors``); the run goes on. The time limit is
checked by the client before every turn (no turn starts past it) and when the function returns (a
thread cannot be interrupted: a function stuck outside the client holds its thread until
``rollout.request_timeout_s`` restarts the engine).
Invariant: ``generate`` returns exactly ``n`` Samples per request, in request order.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

from miles_ray.agents.client import TurnClient
from miles_ray.errors import UserValueError
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample
from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract

ROLLOUT_FUNCTIONS = Registry("rollout function", "rollout.fn", Contract(
    "fn(ctx: RolloutContext)", "a miles_ray.sample.Sample (check_sample)", args=("ctx",)))


@dataclass
class AgentLimits:
    max_turns: int = 4
    max_tokens: int = 512
    timeout_s: float = 120.0
    env: str | None = None


@dataclass
class RolloutContext:
    """What a rollout function gets: ``client`` (token turns and ``client.chat.completions.create``),
    the ``tokenizer``, the ``request`` (prompt, label, messages, prompt_index, group_id), the run's
    sampling ``params`` and ``limits``; :meth:`new_env` makes the configured environment."""
    client: TurnClient
    tokenizer: object
    request: dict
    params: SamplingParams
    limits: AgentLimits
    info: dict = field(default_factory=dict)

    def new_env(self):
        from miles_ray.agents.env import make_env

        if not self.limits.env:
            raise UserValueError("this rollout function needs an environment: set agent.env (e.g. calculator)")
        return make_env(self.limits.env)

    def sample(self, prompt_text: str, prompt_ids: list, **fields) -> Sample:
        """A Sample of this request (group, labels filled in)."""
        r = self.request
        return Sample(prompt_index=r.get("prompt_index", 0), group_id=r.get("group_id", 0), prompt=prompt_text,
                      label=r.get("label", ""), prompt_ids=list(prompt_ids), **fields)


def register_rollout_fn(name: str):
    return ROLLOUT_FUNCTIONS.register(name)


def resolve_rollout_fn(spec: str) -> Callable:
    """A registered name or ``pkg.module:function`` taking one :class:`RolloutContext` (checked)."""
    return ROLLOUT_FUNCTIONS.get_fn(spec)


def check_sample(out, ctx: RolloutContext) -> Sample:
    """A rollout function's result, or ValueError saying what is malformed."""
    if not isinstance(out, Sample):
        raise ValueError(f"returned {type(out).__name__}, not a miles_ray.sample.Sample")
    n = len(out.response_ids)
    if not out.prompt_ids or not all(isinstance(t, int) for t in out.prompt_ids + out.response_ids):
        raise ValueError("prompt_ids must be a non-empty list of ints and response_ids a list of ints")
    if len(out.response_logprobs) != n:
        raise ValueError(f"{len(out.response_logprobs)} response_logprobs for {n} response tokens")
    if out.loss_mask is not None and (len(out.loss_mask) != n or any(m not in (0, 1) for m in out.loss_mask)):
        raise ValueError(f"loss_mask must hold {n} entries, each 0 or 1")
    if n > ctx.limits.max_tokens:
        raise ValueError(f"{n} response tokens exceed agent.max_tokens={ctx.limits.max_tokens}")
    out.group_id, out.prompt_index = ctx.request.get("group_id", 0), ctx.request.get("prompt_index", 0)
    return out


class AgentEngine:
    """A RolloutEngine whose ``generate`` runs ``fn`` per sample; the rest is the inner engine's."""

    def __init__(self, inner, fn_spec: str, tokenizer, limits: AgentLimits, concurrency: int = 64):
        self.inner, self.spec, self.tokenizer, self.limits = inner, fn_spec, tokenizer, limits
        self.fn = resolve_rollout_fn(fn_spec)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="agent")
        self.clients: dict = {}  # conversation id -> TurnClient (abort)

    def __getattr__(self, name):  # weights, health, pause, memory, rng: the inner engine's
        return getattr(self.inner, name)

    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        jobs = [(req, k) for req in requests for k in range(n)]
        return list(self.pool.map(lambda job: self._one(job[0], job[1], params), jobs))

    def generate_stream(self, requests: list[dict], n: int, params: SamplingParams):
        """Each request's ``n`` conversations, yielded as soon as all of them are done."""
        futures = [[self.pool.submit(self._one, req, k, params) for k in range(n)] for req in requests]
        index = {id(f): i for i, fs in enumerate(futures) for f in fs}
        left = [n] * len(requests)
        for fut in as_completed([f for fs in futures for f in fs]):
            i = index[id(fut)]
            left[i] -= 1
            if left[i] == 0:
                yield [f.result() for f in futures[i]]

    def _one(self, req: dict, k: int, params: SamplingParams) -> Sample:
        cid = f"{req.get('group_id', 0)}-{k}"
        client = TurnClient(self.inner, self.tokenizer, params, time.time() + self.limits.timeout_s)
        ctx = RolloutContext(client, self.tokenizer, req, params, self.limits)
        self.clients[cid] = client
        t0 = time.time()
        try:
            out = self.fn(ctx)
            if time.time() - t0 > self.limits.timeout_s:
                raise TimeoutError(f"ran {time.time() - t0:.1f}s, past agent.timeout_s={self.limits.timeout_s:g}")
            out = check_sample(out, ctx)
            if out.routed_experts is None:  # MoE: the experts of every turn, aligned with the tokens (R3)
                out.routed_experts = client.routing_trace(out.prompt_ids + out.response_ids)
        except Exception as err:  # noqa: BLE001 - a user function's failure is scored, never a crash
            out = self._failed(ctx, f"rollout.fn '{self.spec}': {type(err).__name__}: {err}")
        finally:
            self.clients.pop(cid, None)
        out.metadata.setdefault("turns", client.turns)
        return out

    def _failed(self, ctx: RolloutContext, why: str) -> Sample:
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(ctx.request.get("prompt") or " ", add_special_tokens=False)["input_ids"] or [eos]
        return ctx.sample(ctx.request.get("prompt", ""), ids, response_ids=[eos], response_logprobs=[0.0],
                          loss_mask=[0], finish_reason="abort", error=why[:500])

    def abort(self, rid: str) -> bool:
        """``rid``: a conversation id (``<group_id>-<k>``) or an engine request id."""
        client = self.clients.get(rid)
        if client is not None:
            client.abort()
            return True
        return self.inner.abort(rid)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.inner.close()
