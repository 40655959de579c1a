"""EngineLoop: runs a NativeEngine in one background thread so that many callers (HTTP handlers,
threaded actor methods) can submit requests concurrently and share continuous batching.

Weight loads and other control calls go through :meth:`call`, which holds the engine between two
steps: in-flight requests simply wait (partial rollout: they resume under the new weights, and
each token records the weight version that produced it).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading

from miles_ray.rollout.health import READY
from miles_ray.rollout.types import SamplingParams


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.waiters: dict[str, cf.Future] = {}
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            self.wake.wait(0.05)
            self.wake.clear()
            while not self._stop:
                with self.lock:
                    if self.engine.paused or not self.engine.has_work() or self.engine.weights.state != READY:
                        break
                    try:
                        finished = self.engine.step()
                    except Exception as err:  # noqa: BLE001 - fail the waiters, keep the loop alive
                        self._fail_all(err)
                        break
                for req in finished:
                    self._resolve(req)

    def _fail_all(self, err: Exception) -> None:
        for rid in list(self.waiters):
            self.engine.abort(rid)
            fut = self.waiters.pop(rid)
            if not fut.done():
                fut.set_exception(err)

    def _resolve(self, req) -> None:
        fut = self.waiters.pop(req.rid, None)
        if fut is not None and not fut.done():
            fut.set_result(req)

    def submit_future(self, prompt_ids: list, params: SamplingParams, rid: str, meta=None) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self.lock:
            self.waiters[rid] = fut
            self.engine.add_request(prompt_ids, params, rid=rid, meta=meta)
        self.wake.set()
        return fut

    def submit_many(self, items: list[tuple]) -> list[cf.Future]:
        """Add ``(prompt_ids, params, rid, meta)`` items atomically (one admission batch: results
        do not depend on thread timing)."""
        futures = []
        with self.lock:
            for prompt_ids, params, rid, meta in items:
                fut: cf.Future = cf.Future()
                self.waiters[rid] = fut
                self.engine.add_request(prompt_ids, params, rid=rid, meta=meta)
                futures.append(fut)
        self.wake.set()
        return futures

    async def submit(self, prompt_ids: list, params: SamplingParams, rid: str, meta=None):
        return await asyncio.wrap_future(self.submit_future(prompt_ids, params, rid, meta))

    def call(self, fn, *args):
        """Run ``fn`` with the engine held (weight updates, memory, abort, pause)."""
        with self.lock:
            result = fn(*args)
        self.wake.set()
        return result

    def abort(self, rid: str) -> bool:
        req = self.call(self.engine.abort, rid)
        if req is not None:
            self._resolve(req)
        return req is not None

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
