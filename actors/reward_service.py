"""The reward-model Ray Serve deployment: ``POST <route>`` ``{"prompt", "response"}`` ->
``{"score", "batch_size", "replica"}`` (``batch_size``: how many requests shared the forward
that scored this one; ``replica``: the replica's id. Both for tests and dashboards).

Requests are batched with ``@serve.batch`` (``reward.service.max_batch_size`` /
``batch_wait_timeout_s``) and the replica count autoscales between ``min_replicas`` and
``max_replicas`` on ongoing requests (``target_ongoing_requests``, upscale/downscale delays).
A forward runs in a thread, so the replica's event loop keeps accepting (and batching) requests.
With an ``api_key`` every request needs ``Authorization: Bearer <key>`` (401 otherwise).
"""
from __future__ import annotations

import asyncio
import hmac
import json

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.common import setup_worker_process
from miles_ray.rewards.reward_model import RewardModelScorer


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


@serve.deployment(name="RewardModel")
class RewardModelDeployment:
    def __init__(self, model_path: str, dtype: str = "float32", max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.01, api_key: str | None = None, max_text_chars: int = 32768,
                 threads: int = 1):
        setup_worker_process(0)
        import torch

        torch.set_num_threads(max(1, threads))
        self.scorer = RewardModelScorer(model_path, dtype)
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.api_key, self.max_text_chars = api_key, max_text_chars
        self.replica = serve.get_replica_context().replica_id.unique_id

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        scores = await asyncio.to_thread(self.scorer.score, pairs)
        return [(s, len(pairs)) for s in scores]

    def _refusal(self, request: Request) -> JSONResponse | None:
        if self.api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return _error(401, "missing or wrong bearer key (Authorization: Bearer <serve.api_key>)")
        if request.method != "POST":
            return _error(405, "POST {\"prompt\": str, \"response\": str}")
        if int(request.headers.get("content-length") or 0) > 6 * self.max_text_chars + 1024:
            return _error(413, f"request larger than reward.service.max_text_chars={self.max_text_chars} allows")
        return None

    async def __call__(self, request: Request) -> JSONResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            body = json.loads(await request.body())
            prompt, response = body["prompt"], body["response"]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise TypeError("prompt and response must be strings")
        except (ValueError, KeyError, TypeError) as err:
            return _error(400, f"body must be JSON {{\"prompt\": str, \"response\": str}}: {err}")
        if len(prompt) + len(response) > self.max_text_chars:
            return _error(413, f"prompt + response longer than reward.service.max_text_chars={self.max_text_chars}")
        score, batch_size = await self.score_batch((prompt, response))
        return JSONResponse({"score": score, "batch_size": batch_size, "replica": self.replica})


def autoscaling_config(service: dict) -> dict:
    """Serve's ``autoscaling_config`` from ``reward.service`` (ray.serve.config.AutoscalingConfig)."""
    keys = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
            "metrics_interval_s", "look_back_period_s")
    return {"initial_replicas": service["min_replicas"], **{k: service[k] for k in keys}}


def reward_model_app(model_path: str, service: dict, dtype: str = "float32", api_key: str | None = None):
    """The bound Serve application for ``serve.run`` (``service``: ``reward.service`` as a dict)."""
    return RewardModelDeployment.options(
        autoscaling_config=autoscaling_config(service),
        max_ongoing_requests=service["max_ongoing_requests"],
        ray_actor_options={"num_cpus": service["num_cpus"], "num_gpus": service["num_gpus"]},
    ).bind(model_path, dtype, service["max_batch_size"], service["batch_wait_timeout_s"], api_key,
           service["max_text_chars"], max(1, int(service["num_cpus"] + 0.5)))
