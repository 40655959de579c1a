"""The OpenAI-compatible endpoint as a Ray Serve deployment in front of a run's engines.

Thin: the replica holds the run's :class:`actors.RolloutEngineActor` handles (passed at bind
time) and the tokenizer, and answers with :class:`miles_ray.openai_api.app.OpenAIService`.
Requests go round-robin over the engines; an engine that is dead, restarting, released or not
refit yet is skipped (the next one is tried; none left: 503). Plain engine generation is called
(``RolloutEngineActor.generate`` with exact ``input_ids``), never a custom rollout function.
"""
import itertools  # no `from __future__ import annotations`: FastAPI reads `request: Request` at runtime

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from miles_ray.openai_api.app import EngineUnavailable, OpenAIService, engine_request
from miles_ray.openai_api.protocol import ServeSettings
from miles_ray.rollout.health import EngineNotReady

app = FastAPI(title="miles-ray OpenAI-compatible endpoint")
UNAVAILABLE = (RayActorError, getattr(ray.exceptions, "ActorUnavailableError", RayActorError))


class EngineActors:
    """Backend over engine actor handles, round-robin; skips engines that cannot serve."""

    def __init__(self, engines: list, tokenizer):
        if not engines:
            raise ValueError("the OpenAI endpoint needs at least one engine")
        self.engines, self.tokenizer, self.turn = list(engines), tokenizer, itertools.count()

    async def generate(self, input_ids: list, params, n: int) -> list:
        why = []
        for _ in range(len(self.engines)):
            rank = next(self.turn) % len(self.engines)
            try:
                return await self.engines[rank].generate.remote([engine_request(input_ids)], n, params)
            except UNAVAILABLE as err:
                why.append(f"engine {rank}: {type(err).__name__}")
            except RayTaskError as err:
                if not isinstance(err, EngineNotReady):  # RayTaskError(EngineNotReady) is both
                    raise
                why.append(f"engine {rank}: not ready ({str(err).splitlines()[-1][:200]})")
        raise EngineUnavailable("no engine can serve now (" + "; ".join(why) + "); retry shortly")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(app)
class OpenAIServer:
    """Routes under the application's route prefix (``/v1``)."""

    def __init__(self, engines: list, model_path: str, tiny_cache_dir: str, settings: dict):
        from miles_ray.models import load_tokenizer

        tokenizer = load_tokenizer(model_path, tiny_cache_dir)
        self.service = OpenAIService(EngineActors(engines, tokenizer), ServeSettings(**settings))

    @app.post("/chat/completions")
    async def chat(self, request: Request):
        return await self.service.chat(request)

    @app.post("/completions")
    async def completions(self, request: Request):
        return await self.service.completions(request)

    @app.get("/models")
    async def models(self, request: Request):
        return self.service.models(request)
