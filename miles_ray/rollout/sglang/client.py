"""HTTP client for an engine server or the router (SGLang-compatible API). Rollout code talks to
engines through this class, whichever backend serves them.

It speaks the SGLang version of its :class:`miles_ray.rollout.sglang.protocol.Protocol` as SGLang
answers it: ``/health`` and ``/abort_request`` answer empty bodies, weight versions are strings
(``"default"`` at launch: version 0, :func:`as_version`), top-k "disabled" is sent as -1 (SGLang
refuses 0), the version is read from ``/get_weight_version`` or ``/get_model_info``, routed experts
come back as base64 int32 ``[seqlen-1, layers, topk]`` (:func:`routed_trace`), the first token's
version comes from ``meta_info["weight_versions"]`` spans where the version reports them (else from
each segment's ``weight_version``: on versions whose pause aborts, partial rollout re-submits an
aborted request's prefix and keeps the spans itself). The bearer token of a server beyond loopback
is sent with every call (given, or registered for the URL in :mod:`miles_ray.rollout.http.guard`).
"""
from __future__ import annotations

import time

import httpx

from miles_ray.rollout.http.guard import auth_headers, token_for
from miles_ray.rollout.sglang.protocol import KNOWN, SUPPORTED, Protocol
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample


def sglang_sampling(params: SamplingParams) -> dict:
    """Our sampling params in SGLang's terms (sampling_params.py: top_k=-1 disables, 0 is refused)."""
    d = params.to_dict()
    d["top_k"] = d["top_k"] if d["top_k"] > 0 else -1
    return d


def as_version(v) -> int:
    """SGLang's ``weight_version`` is any string (``ServerArgs.weight_version = "default"``,
    ``--weight-version``); ours are integers and we only ever post integer strings, so any other
    string names the weights the server was launched with: version 0 (:mod:`miles_ray.versioning`)."""
    if isinstance(v, int):
        return v
    text = str(v).strip()
    return int(text) if text.lstrip("-").isdigit() else 0


def routed_trace(value, tokens: int, topk: int | None) -> dict | None:
    """SGLang's ``meta_info["routed_experts"]`` (base64 of int32 ``[seqlen-1, layers, topk]``,
    0.5.23 detokenizer_manager.py ``_b64_encode_per_request``) as our trace
    (:func:`miles_ray.models.moe.encode`); our lenient server's trace dict passes through."""
    if value is None or isinstance(value, dict):
        return value
    import base64

    import numpy as np
    import torch

    from miles_ray.models.moe import encode

    flat = np.frombuffer(base64.b64decode(value), dtype=np.int32)
    if not topk or tokens <= 0 or flat.size % (tokens * topk):
        raise ValueError(f"routed_experts of {flat.size} ids is not [{tokens}, layers, {topk}]")
    return encode(torch.from_numpy(flat.reshape(tokens, -1, topk).astype(np.int64)))


def first_version(meta: dict) -> int:
    spans = meta.get("weight_versions")
    if spans and isinstance(spans[0], dict):
        return as_version(spans[0]["version"])
    return as_version(meta["weight_version"])


def version_spans(meta: dict, offset: int = 0) -> list[dict]:
    """The spans of one output (SGLang's, else one span of its ``weight_version``), shifted by ``offset``."""
    n = len(meta.get("output_token_logprobs") or []) or meta.get("completion_tokens", 0)
    spans = meta.get("weight_versions")
    if not (spans and isinstance(spans[0], dict)):
        spans = [{"version": meta["weight_version"], "start": 0, "end": n}]
    return [{"version": as_version(s["version"]), "start": s["start"] + offset, "end": s["end"] + offset}
            for s in spans]


class ServerExited(RuntimeError):
    """The server process exited before it was healthy (``code``: its exit status)."""

    def __init__(self, code: int):
        super().__init__(f"engine server exited with code {code} before it was healthy")
        self.code = code


class EngineClient:
    def __init__(self, url: str, timeout_s: float | None = None, token: str | None = None,
                 protocol: Protocol | None = None):
        """``protocol``: the SGLang version spoken (default: the newest supported)."""
        self.url = url.rstrip("/")
        self.token = token or token_for(self.url)
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), headers=auth_headers(self.token))
        self.protocol = protocol or KNOWN[SUPPORTED[-1]]
        self.routed_topk: int | None = None  # set: ask for routed experts (MoE, R3), decoded with this top-k
        self.selector: str | None = None  # "target": weight updates leave a separate draft as launched
        self.cancelled: set[str] = set()  # rids aborted on purpose (not re-submitted)

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
        if self.routed_topk and self.protocol.routed_experts:
            body["return_routed_experts"] = True
        return self._post("/generate", body)

    def generate_samples(self, requests: list[dict], n: int, params: SamplingParams, tokenizer) -> list[Sample]:
        """The engine interface of rollout code: n samples per request dict (prompt, label, ...)."""
        ids = [list(r["input_ids"]) if r.get("input_ids") is not None else
               tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in requests]
        rids = [r["rid"] for r in requests] if n == 1 and all(r.get("rid") for r in requests) else None
        outs = self.generate(input_ids=ids, sampling_params={**sglang_sampling(params), "n": n}, rid=rids)
        samples = []
        for i, out in enumerate(outs):
            req = requests[i // n]
            rid = rids[i] if rids else None
            out, spans = self._finish(ids[i // n], out, params, rid, tokenizer)
            meta = out["meta_info"]
            samples.append(Sample(
                prompt_index=req["prompt_index"], group_id=req["group_id"], prompt=req["prompt"], label=req["label"],
                prompt_ids=ids[i // n], response_ids=out["output_ids"],
                response_logprobs=[x[0] for x in meta["output_token_logprobs"]], response_text=out["text"],
                finish_reason=meta["finish_reason"]["type"], weight_version=min(s["version"] for s in spans) if spans
                else first_version(meta), metadata={"weight_versions": spans, "update_aborts": out["update_aborts"]},
                routed_experts=routed_trace(meta.get("routed_experts"),
                                            len(ids[i // n]) + len(out["output_ids"]) - 1, self.routed_topk)))
        return samples

    def _finish(self, prompt: list, out: dict, params: SamplingParams, rid, tokenizer) -> tuple[dict, list]:
        """Where pausing aborts every request (SGLang 0.5.5, :mod:`miles_ray.rollout.sglang.protocol`),
        an output aborted by a pause (not by us) is continued: its prefix is re-submitted (it waits
        for ``/continue_generation`` on the server) and the segments are joined; the spans record
        each segment's version (each segment ran under one version: updates hold the model-update
        writer lock)."""
        spans, aborts = version_spans(out["meta_info"]), 0
        while (self.protocol.pause_aborts and out["meta_info"]["finish_reason"]["type"] == "abort"
               and rid not in self.cancelled and len(out["output_ids"]) < params.max_new_tokens):
            done, aborts = len(out["output_ids"]), aborts + 1
            rest = {**sglang_sampling(params), "max_new_tokens": params.max_new_tokens - done, "n": 1}
            more = self.generate(input_ids=prompt + out["output_ids"], sampling_params=rest, rid=rid)
            more = more[0] if isinstance(more, list) else more
            spans += version_spans(more["meta_info"], done)
            ids = out["output_ids"] + more["output_ids"]
            meta = {**more["meta_info"], "output_token_logprobs": out["meta_info"]["output_token_logprobs"] +
                    more["meta_info"]["output_token_logprobs"], "completion_tokens": len(ids)}
            text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else out["text"] + more["text"]
            out = {"text": text, "output_ids": ids, "meta_info": meta}
        self.cancelled.discard(rid)
        out["update_aborts"] = aborts  # re-submissions: each followed an abort by a pause
        return out, [s for s in spans if s["end"] > s["start"]] or spans[:1]

    # -- control --------------------------------------------------------------------------------
    def health(self, timeout_s: float | None = None) -> dict:
        """``{"status": code, ...body}``; SGLang's body is empty. ``timeout_s``: per request (default:
        the client's)."""
        extra = {"timeout": timeout_s} if timeout_s is not None else {}
        r = self.http.get(f"{self.url}/health", **extra)
        try:
            body = r.json() if r.content else {}
        except ValueError:
            body = {}
        return {"status": r.status_code, **(body if isinstance(body, dict) else {})}

    def wait_healthy(self, timeout_s: float = 120.0, process=None) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if process is not None and process.poll() is not None:
                raise ServerExited(process.returncode)
            try:
                if self.health(timeout_s=30.0)["status"] == 200:  # bounded: whatever answers the port
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.url} not healthy after {timeout_s:.0f}s")

    def weight_version(self) -> int:
        """``/get_weight_version`` where the version has it, else ``/get_model_info`` (issue 25 item 7)."""
        path = "/get_weight_version" if self.protocol.weight_version_route else "/get_model_info"
        return as_version(self.http.get(f"{self.url}{path}").json()["weight_version"])

    def abort(self, rid: str) -> bool:
        """SGLang answers 200 with an empty body (http_server.py abort_request): True = accepted."""
        self.cancelled.add(rid)
        r = self.http.post(f"{self.url}/abort_request", json={"rid": rid})
        if r.status_code >= 400:
            raise RuntimeError(f"/abort_request -> HTTP {r.status_code}: {r.text[:500]}")
        return True

    def flush_cache(self) -> bool:
        r = self.http.post(f"{self.url}/flush_cache")
        return r.status_code == 200

    def pause(self, mode: str | None = None):
        """``mode`` where the version has one (:meth:`Protocol.pause_mode`); None sends no body."""
        return self._post("/pause_generation", {"mode": mode} if mode else None)

    def resume(self):
        return self._post("/continue_generation")

    def begin_weight_update(self):
        """0.5.23: updates run inside a session (:mod:`miles_ray.rollout.sglang.protocol`)."""
        return self._post("/begin_weight_update", {"selector": self.selector} if self.selector else None)

    def end_weight_update(self):
        return self._post("/end_weight_update")

    def _update_fields(self, body: dict) -> dict:
        """``flush_cache=false`` (the protocol flushes once, after the update) and the ``selector``
        where the version has one."""
        body = {**body, "flush_cache": False}
        if self.selector and self.protocol.selector:
            body["selector"] = self.selector
        return body

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
        return self._post("/update_weights_from_tensor", self._update_fields(body))

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
        """``abort_all_requests=false``: it defaults to true (issue 25 item 2)."""
        body = {"new_version": str(version), "abort_all_requests": False}
        return as_version(self._post("/update_weight_version", body)["new_version"])

    def init_weights_update_group(self, addr: str, port: int, rank_offset: int, world_size: int,
                                  backend: str = "nccl", group_name: str = "weight_update_group"):
        return self._post("/init_weights_update_group", {
            "master_address": addr, "master_port": port, "rank_offset": rank_offset, "world_size": world_size,
            "group_name": group_name, "backend": backend})

    def update_weights_from_distributed(self, names: list, dtypes: list, shapes: list, version: int | None = None,
                                        group_name: str = "weight_update_group"):
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        if version is not None:
            body["weight_version"] = str(version)
        return self._post("/update_weights_from_distributed", self._update_fields(body))

    def update_weights_from_disk(self, model_path: str, version: int):
        return self._post("/update_weights_from_disk", {"model_path": model_path, "weight_version": str(version)})
