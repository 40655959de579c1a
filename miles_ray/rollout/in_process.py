"""InProcessEngine: an ``hf`` or ``native`` engine running in the caller's process.

Native engines step in an :class:`EngineLoop` thread (many concurrent ``generate`` calls share
continuous batching; control calls run between two decode steps). The hf engine has no loop: a
lock serialises whole ``generate`` batches and control calls.
"""
from __future__ import annotations

import threading
import uuid
from concurrent.futures import as_completed

from miles_ray.config import Config
from miles_ray.rollout.hf_engine import HFRolloutEngine
from miles_ray.rollout.native.engine import NativeEngine
from miles_ray.rollout.native.loop import EngineLoop
from miles_ray.rollout.types import SamplingParams, engine_seed
from miles_ray.sample import Sample

ENGINES = {"hf": HFRolloutEngine, "native": NativeEngine}


def request_ids(req: dict, tokenizer) -> list:
    """A request's prompt token ids: ``input_ids`` as given (a multi-turn conversation's exact
    tokens; no re-tokenisation), else its ``prompt`` text tokenised."""
    if req.get("input_ids") is not None:
        return list(req["input_ids"])
    return tokenizer(req["prompt"], add_special_tokens=False)["input_ids"]


def make_engine(backend: str, **kwargs):
    """The bare engine object of ``backend`` (hf or native)."""
    if backend not in ENGINES:
        raise ValueError(f"rollout.backend='{backend}' is unknown in-process; choose one of {sorted(ENGINES)}")
    return ENGINES[backend](**kwargs)


class InProcessEngine:
    def __init__(self, engine, looped: bool):
        self.engine = engine
        self.loop = EngineLoop(engine) if looped else None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config, rank: int, restarted: bool = False) -> "InProcessEngine":
        r, d, m = cfg.rollout, cfg.draft, cfg.model
        spec = {"draft": d.path, "num_draft_tokens": d.num_tokens} if d.enabled else {}
        if cfg.exact_max_len:  # true on-policy: the engine runs the exact forward
            spec["exact_max_len"] = cfg.exact_max_len
        if r.precision != "bf16":  # serve quantized weights (FP8 / INT4)
            spec.update(quantization=r.precision, fp8_backend=r.fp8_backend)
        engine = make_engine(r.backend, model_spec=m.path, dtype=m.dtype, tiny_cache_dir=m.tiny_cache_dir,
                             seed=engine_seed(cfg.seed, rank), **spec)
        if restarted:
            engine.weights.mark_restarted()
        return cls(engine, looped=r.backend == "native")

    def _held(self, fn, *args):
        """Run a control call between two decode steps (or under the hf engine's lock)."""
        if self.loop is not None:
            return self.loop.call(fn, *args)
        with self._lock:
            return fn(*args)

    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        if self.loop is None:
            with self._lock:
                return self.engine.generate(requests, n, params)
        return [self.engine.to_sample(f.result()) for f in self.loop.submit_many(self._items(requests, n, params))]

    def _items(self, requests: list[dict], n: int, params: SamplingParams) -> list[tuple]:
        """Loop items ``(prompt ids, params, rid, request)``, ``n`` per request in request order."""
        items = []
        for req in requests:
            ids = request_ids(req, self.engine.tokenizer)
            rids = [req["rid"]] if n == 1 and req.get("rid") else [uuid.uuid4().hex for _ in range(n)]
            items += [(ids, params, rid, req) for rid in rids]
        return items

    def generate_stream(self, requests: list[dict], n: int, params: SamplingParams):
        """Every request admitted at once (sampling as in :meth:`generate`), each request's samples
        yielded when all ``n`` are done; the hf engine yields its one batch."""
        if self.loop is None:
            samples = self.generate(requests, n, params)
            yield from (samples[i * n:(i + 1) * n] for i in range(len(requests)))
            return
        futures = self.loop.submit_many(self._items(requests, n, params))
        by_request = [futures[i * n:(i + 1) * n] for i in range(len(requests))]
        pending = {id(f): i for i, fs in enumerate(by_request) for f in fs}
        left = [n] * len(requests)
        for fut in as_completed(futures):
            i = pending[id(fut)]
            left[i] -= 1
            if left[i] == 0:
                yield [self.engine.to_sample(f.result()) for f in by_request[i]]

    def abort(self, rid: str) -> bool:
        return self.loop.abort(rid) if self.loop is not None else False  # hf: a batch cannot be cut short

    def pause(self) -> None:
        if self.loop is not None:  # hf: generate holds the lock for a whole batch already
            self._held(self.engine.pause)

    def resume(self) -> None:
        if self.loop is not None:
            self._held(self.engine.resume)

    def load_part(self, bucket) -> None:
        self._held(self.engine.weights.load_part, bucket)

    def finish_load(self, version: int) -> int:
        return self._held(self.engine.weights.finish_load, version)

    def load_buckets(self, buckets: list, version: int) -> int:
        return self._held(self.engine.weights.load_buckets, buckets, version)

    def release_memory(self) -> None:
        self._held(self.engine.release_memory)

    def resume_memory(self) -> None:
        self._held(self.engine.resume_memory)

    def health(self) -> dict:
        return self.engine.weights.health()

    def rng_state(self):
        return self._held(self.engine.get_rng_state)

    def set_rng_state(self, state) -> None:
        if state is not None:
            self._held(self.engine.set_rng_state, state)

    def load_draft(self, weights: dict, version: int) -> int:
        self._held(self.engine.load_draft, weights, version)
        return version

    def spec_stats(self) -> dict:
        return self._held(self.engine.spec_stats) if self.loop is not None else {}

    def url(self) -> None:
        return None

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()
