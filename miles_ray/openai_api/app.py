"""The OpenAI-compatible service over any :class:`Backend`, and a FastAPI app factory.

:class:`OpenAIService` answers ``POST /chat/completions``, ``POST /completions`` and
``GET /models`` (mounted under ``/v1``): authenticate, validate (:mod:`.protocol`), generate
through the backend, apply stop sequences, build the body or the SSE stream (:mod:`.responses`).
Ray Serve wraps the same service in :mod:`actors.openai_serve`; :func:`create_app` serves it from
any ASGI server (tests, one process).

Streaming sends its chunks after the whole generation finished (engines return complete samples):
the stream has OpenAI's shape, token by token, but no earlier first token.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from miles_ray.openai_api.protocol import PARSERS, RequestError, ServeSettings, error_body
from miles_ray.openai_api.responses import BUILDERS, finish, new_id, sse
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample

log = logging.getLogger("miles_ray.openai_api")


class EngineUnavailable(RuntimeError):
    """No engine can serve now (all dead, restarting, released or not refit yet): answered 503."""


class Backend(Protocol):
    tokenizer: Any

    async def generate(self, input_ids: list, params: SamplingParams, n: int) -> list[Sample]:
        """``n`` samples continuing exactly ``input_ids``; raises :class:`EngineUnavailable`."""


def _json(status: int, body: dict, headers: Optional[dict] = None):
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIService:
    def __init__(self, backend: Backend, settings: ServeSettings):
        self.backend, self.settings = backend, settings

    def authorized(self, headers) -> bool:
        """With an api key set, ``Authorization: Bearer <key>`` is required (constant-time compare)."""
        key = self.settings.api_key
        if not key:
            return True
        scheme, _, given = (headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())

    def unauthorized(self):
        return _json(401, error_body("Incorrect or missing API key: send 'Authorization: Bearer <serve.api_key>'",
                                     None, code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})

    async def chat(self, request):
        return await self.handle(request, "chat")

    async def completions(self, request):
        return await self.handle(request, "completion")

    def models(self, request) -> Any:
        if not self.authorized(request.headers):
            return self.unauthorized()
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "miles-ray"}]}

    async def handle(self, request, kind: str):
        """One request of ``kind`` (chat | completion) to a JSON body or an SSE stream."""
        if not self.authorized(request.headers):
            return self.unauthorized()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _json(400, error_body(f"the request body is not valid JSON: {err}"))
        try:
            return await self.respond(body, kind)
        except RequestError as err:
            return _json(err.status, err.body())
        except EngineUnavailable as err:
            return _json(503, error_body(str(err), kind="service_unavailable", code="engine_unavailable"))

    async def respond(self, body: Any, kind: str):
        tokenizer = self.backend.tokenizer
        req = PARSERS[kind](body, tokenizer, self.settings)
        groups = await asyncio.gather(*(self.backend.generate(ids, req.params, req.n) for ids in req.prompts))
        samples = [finish(s, req.params, tokenizer) for group in groups for s in group]
        full, chunks = BUILDERS[kind]
        rid, model = new_id(kind), self.settings.model_name
        if not req.stream:
            return _json(200, full(rid, model, req, samples, tokenizer))
        return StreamingResponse(sse(chunks(rid, model, req, samples, tokenizer)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def create_app(service: OpenAIService, prefix: str = "/v1"):
    """A FastAPI app answering the service's routes under ``prefix``."""
    app = FastAPI(title="miles-ray OpenAI-compatible endpoint")

    @app.post(f"{prefix}/chat/completions")
    async def chat(request: Request):
        return await service.chat(request)

    @app.post(f"{prefix}/completions")
    async def completions(request: Request):
        return await service.completions(request)

    @app.get(f"{prefix}/models")
    async def models(request: Request):
        return service.models(request)

    return app


# -- an engine object in this process (tests, one-process serving) ------------------------------
def engine_request(input_ids: list) -> dict:
    """The request dict engines take for exact prompt ids (no re-tokenisation)."""
    return {"input_ids": list(input_ids), "prompt": "", "label": "", "prompt_index": 0, "group_id": 0}


class EngineBackend:
    """A :class:`miles_ray.rollout.engines.RolloutEngine` object in this process; its blocking
    ``generate`` runs in a worker thread so the event loop keeps serving."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    async def generate(self, input_ids: list, params: SamplingParams, n: int) -> list[Sample]:
        from miles_ray.rollout.health import EngineNotReady

        try:
            return await asyncio.to_thread(self.engine.generate, [engine_request(input_ids)], n, params)
        except EngineNotReady as err:
            raise EngineUnavailable(f"the engine cannot serve now: {err}") from None
