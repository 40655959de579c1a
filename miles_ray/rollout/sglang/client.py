"""HTTP client for an engine server or the router (SGLang-compatible API). Rollout code talks to
engines through this class, whichever backend serves them.

It speaks SGLang 0.5.x as SGLang answers it: ``/health`` may have an empty body, weight versions
come back as strings (parsed to int here), top-k "disabled" is sent as -1 (SGLang refuses 0). The
bearer token of a server beyond loopback is sent with every call (given, or registered for the
URL in :mod:`miles_ray.rollout.http.guard`).
"""
from __future__ import annotations

import time

import httpx

from miles_ray.rollout.http.guard import auth_headers, token_for
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample


def sglang_sampling(params: SamplingParams) -> dict:
    """Our sampling params in SGLang's terms (sampling_params.py: top_k=-1 disables, 0 is refused)."""
    d = params.to_dict()
    d["top_k"] = d["top_k"] if d["top_k"] > 0 else -1
    return d


def as_version(v) -> int:
    """SGLang's ``weight_version`` is a string; ours are integers."""
    return int(v)


class EngineClient:
    def __init__(self, url: str, timeout_s: float | None = None, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = token or token_for(self.url)
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), headers=auth_headers(self.token))

    def _post(self, path: str, body: dict | None = None):
        r = self.http.post(f"{self.url}{path}", json=body or {})
        if r.status_code >= 400:
            raise RuntimeError(f"{path} -> HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    # -- generation -----------------------------------------------------------------------------
    def generate(self, input_ids=None, text=None, sampling_params: dict | None = None, return_logprob: bool = True,
                 rid: str | list | None = None):
        body = {"sampling_params": sampling_params or {}, "return_logprob": return_logprob}
        body.update({k: v for k, v in (("input_ids", input_ids), ("text", text), ("rid", rid)) if v is not None})
        return self._post("/generate", body)

    def generate_samples(self, requests: list[dict], n: int, params: SamplingParams, tokenizer) -> list[Sample]:
        """The engine interface of rollout code: n samples per request dict (prompt, label, ...)."""
        ids = [list(r["input_ids"]) if r.get("input_ids") is not None else
               tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in requests]
        rids = [r["rid"] for r in requests] if n == 1 and all(r.get("rid") for r in requests) else None
        outs = self.generate(input_ids=ids, sampling_params={**sglang_sampling(params), "n": n}, rid=rids)
        samples = []
        for i, out in enumerate(outs):
            req, meta = requests[i // n], out["meta_info"]
            samples.append(Sample(
                prompt_index=req["prompt_index"], group_id=req["group_id"], prompt=req["prompt"], label=req["label"],
                prompt_ids=ids[i // n], response_ids=out["output_ids"],
                response_logprobs=[x[0] for x in meta["output_token_logprobs"]], response_text=out["text"],
                finish_reason=meta["finish_reason"]["type"], weight_version=as_version(meta["weight_version"]),
                routed_experts=meta.get("routed_experts")))
        return samples

    # -- control --------------------------------------------------------------------------------
    def health(self) -> dict:
        """``{"status": code, ...body}``; SGLang's body is empty."""
        r = self.http.get(f"{self.url}/health")
        try:
            body = r.json() if r.content else {}
        except ValueError:
            body = {}
        return {"status": r.status_code, **(body if isinstance(body, dict) else {})}

    def wait_healthy(self, timeout_s: float = 120.0, process=None) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"engine server exited with code {process.returncode} before it was healthy")
            try:
                if self.health()["status"] == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.url} not healthy after {timeout_s:.0f}s")

    def weight_version(self) -> int:
        return as_version(self.http.get(f"{self.url}/get_weight_version").json()["weight_version"])

    def abort(self, rid: str):
        return self._post("/abort_request", {"rid": rid})

    def flush_cache(self):
        r = self.http.post(f"{self.url}/flush_cache")
        return r.status_code == 200

    def pause(self):
        return self._post("/pause_generation")

    def resume(self):
        return self._post("/continue_generation")

    def release_memory(self):
        return self._post("/release_memory_occupation")

    def resume_memory(self):
        return self._post("/resume_memory_occupation")

    def server_info(self) -> dict:
        return self.http.get(f"{self.url}/get_server_info").json()

    # -- weights (payload formats: miles_ray.weights.raw, sglang_tensor, sglang_flattened) ----------
    def post_weights(self, body: dict):
        """An ``/update_weights_from_tensor`` body built by a payload format
        (:class:`miles_ray.weights.transport.PayloadFormat`)."""
        return self._post("/update_weights_from_tensor", body)

    def update_weights_raw(self, buckets: list, version: int | None = None):
        """Our pickle-free format (lenient server)."""
        from miles_ray.weights.raw import request_body

        return self.post_weights(request_body(buckets, version))

    def update_weights_from_tensor(self, named: list, tp_size: int = 1, version: int | None = None):
        """SGLang's format: handles to ``named`` tensors, one entry per TP rank."""
        from miles_ray.weights.sglang_tensor import tensor_body

        return self.post_weights(tensor_body(named, tp_size, version))

    def update_weights_flattened(self, serialized: list[str], version: int | None = None):
        """SGLang's ``load_format="flattened_bucket"``: ``serialized`` holds one entry per TP rank
        (:mod:`miles_ray.weights.sglang_flattened`: a flattened tensor and its FlattenedTensorMetadata)."""
        from miles_ray.weights.sglang_flattened import flattened_body

        return self.post_weights(flattened_body(serialized, version))

    def update_weight_version(self, version: int) -> int:
        return as_version(self._post("/update_weight_version", {"new_version": str(version)})["new_version"])

    def init_weights_update_group(self, addr: str, port: int, rank_offset: int, world_size: int,
                                  backend: str = "nccl", group_name: str = "weight_update_group"):
        return self._post("/init_weights_update_group", {
            "master_address": addr, "master_port": port, "rank_offset": rank_offset, "world_size": world_size,
            "group_name": group_name, "backend": backend})

    def update_weights_from_distributed(self, names: list, dtypes: list, shapes: list, version: int | None = None,
                                        group_name: str = "weight_update_group"):
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name, "flush_cache": False}
        if version is not None:
            body["weight_version"] = str(version)
        return self._post("/update_weights_from_distributed", body)

    def update_weights_from_disk(self, model_path: str, version: int):
        return self._post("/update_weights_from_disk", {"model_path": model_path, "weight_version": str(version)})
