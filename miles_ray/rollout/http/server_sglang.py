"""How the strict stand-in behaves as SGLang ``--sglang-version`` does around weight updates.

Defaults come from :func:`miles_ray.rollout.sglang.contract.strict_defaults` of the version's wheel
(:data:`FALLBACK_DEFAULTS`, equal to both supported wheels' and checked by a unit test, when the
wheel is not cached); features from :func:`miles_ray.rollout.sglang.protocol.protocol_for`.

The lock (SGLang's ``TokenizerManager.model_update_lock``, an ``RWLock``: 0.5.5
tokenizer_manager.py:330, 0.5.23 :771; writer-preferring, 0.5.23 utils/aio_rwlock.py:47): a
``/generate`` first waits while generation is paused (``is_pause_cond``, 0.5.5
tokenizer_manager.py:430, 0.5.23 :939), then holds the reader lock until it finishes; a weight
update takes the writer lock, so it waits for every in-flight request (0.5.5
tokenizer_communicator_mixin.py:407/454) - except on 0.5.23 when generation is paused: the update
then runs at once (tokenizer_manager.py:2303-2308). ``/health`` runs a generation probe
(http_server.py:405 0.5.5, :721 0.5.23; ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION`` defaults to
true in 0.5.23 environ.py:344) that waits behind the same gate, for at most
``HEALTH_CHECK_TIMEOUT`` = 20 s (http_server.py:132 / :218), then answers 503.

Counters (``/get_server_info`` ``"stand_in"``): aborts by cause (``pause``, ``update_weight_version``,
``weight_update``, ``abort_request``) and cache flushes, so tests can assert that no in-flight
request was aborted by a weight update unless the mode says so.
"""
from __future__ import annotations

import asyncio
import contextlib

FALLBACK_DEFAULTS = {"weight_version": "default", "update_weight_version_abort_all_requests": True,
                     "pause_mode": "abort", "abort_request_reply": "empty", "pause_reply_keys": ["message", "status"]}
HEALTH_CHECK_TIMEOUT_S = 20.0
ABORT_CAUSES = ("pause", "update_weight_version", "weight_update", "abort_request")


def defaults_for(version: str) -> dict:
    from miles_ray.rollout.sglang import contract

    try:
        return contract.strict_defaults(contract.load(version))
    except FileNotFoundError:
        return dict(FALLBACK_DEFAULTS)


class RWLock:
    """A writer-preferring asyncio reader/writer lock (SGLang's aio_rwlock.RWLock semantics)."""

    def __init__(self):
        self.cond = asyncio.Condition()
        self.readers, self.writer, self.waiting_writers = 0, False, 0

    @contextlib.asynccontextmanager
    async def reader(self):
        async with self.cond:
            await self.cond.wait_for(lambda: not self.writer and self.waiting_writers == 0)
            self.readers += 1
        try:
            yield
        finally:
            async with self.cond:
                self.readers -= 1
                self.cond.notify_all()

    @contextlib.asynccontextmanager
    async def writer_lock(self):
        async with self.cond:
            self.waiting_writers += 1
            try:
                await self.cond.wait_for(lambda: not self.writer and self.readers == 0)
            finally:
                self.waiting_writers -= 1
            self.writer = True
        try:
            yield
        finally:
            async with self.cond:
                self.writer = False
                self.cond.notify_all()


class SglangBehaviour:
    """Per-version state of a strict server: pause, the model-update lock, version labels, counters."""

    def __init__(self, version: str, return_routed_experts: bool = False, stats_path: str | None = None):
        """``stats_path``: :meth:`stats` is written there (JSON) after every counted event."""
        from miles_ray.rollout.sglang.protocol import protocol_for

        self.version, self.protocol, self.defaults = version, protocol_for(version), defaults_for(version)
        self.return_routed_experts = return_routed_experts and self.protocol.routed_experts
        self.lock: RWLock | None = None  # made on the server's event loop
        self.pause_cond: asyncio.Condition | None = None
        self.paused: str | None = None  # the pause mode while paused
        self.session = False  # /begin_weight_update ... /end_weight_update (0.5.23)
        self.labels = {0: str(self.defaults["weight_version"])}  # internal int version -> SGLang's string
        self.aborts = dict.fromkeys(ABORT_CAUSES, 0)
        self.cache_flushes = 0
        self.version_updates = 0  # /update_weight_version calls
        self.stats_path = stats_path

    def _ensure(self) -> None:
        if self.lock is None:
            self.lock, self.pause_cond = RWLock(), asyncio.Condition()

    def label(self, version: int) -> str:
        return self.labels.get(version, str(version))

    def parse_label(self, text: str, current: int) -> int:
        """SGLang versions are any string: an integer string is that version, another string names
        the current weights."""
        v = int(text) if text.strip().lstrip("-").isdigit() else current
        self.labels[v] = text
        return v

    @contextlib.asynccontextmanager
    async def request(self):
        """A generation: waits while paused, then holds the reader lock."""
        self._ensure()
        async with self.pause_cond:
            await self.pause_cond.wait_for(lambda: self.paused is None)
        async with self.lock.reader():
            yield

    @contextlib.asynccontextmanager
    async def update(self):
        """A weight update: the writer lock, skipped on 0.5.23 while paused."""
        self._ensure()
        if self.paused is not None and self.protocol.update_session:
            yield
            return
        async with self.lock.writer_lock():
            yield

    async def probe(self) -> bool:
        """The /health generation probe: True once a generation could start."""
        try:
            async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_S):
                async with self.request():
                    return True
        except TimeoutError:
            return False

    async def pause(self, mode: str) -> None:
        self._ensure()
        async with self.pause_cond:
            self.paused = mode

    async def resume(self) -> None:
        self._ensure()
        async with self.pause_cond:
            self.paused = None
            self.pause_cond.notify_all()

    def stats(self) -> dict:
        return {"sglang_version": self.version, "aborts": dict(self.aborts), "cache_flushes": self.cache_flushes,
                "version_updates": self.version_updates, "paused": self.paused, "session": self.session}

    def save(self) -> None:
        if self.stats_path:
            import json
            import os

            os.makedirs(os.path.dirname(os.path.abspath(self.stats_path)), exist_ok=True)
            tmp = f"{self.stats_path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f)
            os.replace(tmp, self.stats_path)


def spans(versions: list, label) -> list[dict]:
    """Per-token versions -> SGLang's ``meta_info["weight_versions"]`` spans ``{version, start, end}``
    (0.5.23 utils/weight_versions.py:62 ``compute_weight_version_spans``, :90
    ``add_weight_versions_to_meta_info``)."""
    out: list[dict] = []
    for i, v in enumerate(versions):
        if out and out[-1]["version"] == label(v):
            out[-1]["end"] = i + 1
        else:
            out.append({"version": label(v), "start": i, "end": i + 1})
    return out
