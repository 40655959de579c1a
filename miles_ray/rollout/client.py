"""HTTP client for an engine server or the router (SGLang-compatible API). Rollout code talks to
engines through this class, whichever backend serves them."""
from __future__ import annotations

import base64
import pickle
import time

import httpx

from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample


class EngineClient:
    def __init__(self, url: str, timeout_s: float | None = None):
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0))

    def _post(self, path: str, body: dict | None = None):
        r = self.http.post(f"{self.url}{path}", json=body or {})
        if r.status_code >= 400:
            raise RuntimeError(f"{path} -> HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    # -- generation -----------------------------------------------------------------------------
    def generate(self, input_ids=None, text=None, sampling_params: dict | None = None, return_logprob: bool = True,
                 rid: str | None = None):
        body = {"sampling_params": sampling_params or {}, "return_logprob": return_logprob}
        body.update({k: v for k, v in (("input_ids", input_ids), ("text", text), ("rid", rid)) if v is not None})
        return self._post("/generate", body)

    def generate_samples(self, requests: list[dict], n: int, params: SamplingParams, tokenizer) -> list[Sample]:
        """The engine interface of rollout code: n samples per request dict (prompt, label, ...)."""
        ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in requests]
        sp = {**params.to_dict(), "n": n}
        outs = self.generate(input_ids=ids, sampling_params=sp)
        samples = []
        for i, out in enumerate(outs):
            req, meta = requests[i // n], out["meta_info"]
            samples.append(Sample(
                prompt_index=req["prompt_index"], group_id=req["group_id"], prompt=req["prompt"], label=req["label"],
                prompt_ids=ids[i // n], response_ids=out["output_ids"],
                response_logprobs=[x[0] for x in meta["output_token_logprobs"]], response_text=out["text"],
                finish_reason=meta["finish_reason"]["type"], weight_version=meta["weight_version"],
                routed_experts=meta.get("routed_experts")))
        return samples

    # -- control --------------------------------------------------------------------------------
    def health(self) -> dict:
        r = self.http.get(f"{self.url}/health")
        return {"status": r.status_code, **r.json()}

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

    def abort(self, rid: str):
        return self._post("/abort_request", {"rid": rid})

    def flush_cache(self):
        return self._post("/flush_cache")

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

    def update_weights_from_tensor(self, buckets: list, version: int):
        data = base64.b64encode(pickle.dumps(buckets)).decode()
        return self._post("/update_weights_from_tensor", {"serialized_buckets": data, "weight_version": version})

    def update_weights_from_disk(self, model_path: str, version: int):
        return self._post("/update_weights_from_disk", {"model_path": model_path, "weight_version": version})
