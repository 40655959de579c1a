"""HTTP server for one native engine, speaking the subset of SGLang's native API that RL needs.

    python -m miles_ray.rollout.server --model-path tiny:qwen3 --port 30000 [--host 127.0.0.1]

Endpoints: POST /generate, GET /health, GET /health_generate, POST /abort_request,
POST /flush_cache, POST /update_weights_from_disk, POST /update_weights_from_tensor,
POST /init_weights_update_group, POST /update_weights_from_distributed,
POST /release_memory_occupation, POST /resume_memory_occupation, POST /pause_generation,
POST /continue_generation, GET /get_model_info, GET /get_server_info.

The engine runs in one background thread (:class:`EngineLoop`); handlers hand it work under a
lock and await futures. Weight-update bodies carry pickled buckets: bind to loopback or a
private network only, as with SGLang.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import pickle
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from miles_ray.rollout.health import READY
from miles_ray.rollout.native.loop import EngineLoop
from miles_ray.rollout.types import SamplingParams


def response_body(engine, req, return_logprob: bool) -> dict:
    meta = {"id": req.rid, "finish_reason": {"type": req.finish_reason}, "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids),
            "weight_version": req.weight_versions[0] if req.weight_versions else engine.weights.version,
            "weight_versions": req.weight_versions}
    trace = engine.routes.trace(req)
    if trace is not None:  # MoE: the experts each fed token was routed to (for routing replay)
        meta["routed_experts"] = trace
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(req.logprobs, req.output_ids)]
    text = engine.tokenizer.decode(req.output_ids, skip_special_tokens=True)
    for s in req.params.stop:
        if s in text:
            text = text[: text.index(s)]
    return {"text": text, "output_ids": req.output_ids, "meta_info": meta}


def create_app(engine):
    app = FastAPI(title="miles-ray native engine")
    loop = EngineLoop(engine)
    app.state.loop = loop

    def _prompts(body: dict) -> tuple[list, bool]:
        if body.get("input_ids") is not None:
            ids = body["input_ids"]
            batched = bool(ids) and isinstance(ids[0], list)
            return (ids if batched else [ids]), batched
        text = body.get("text")
        if text is None:
            raise HTTPException(400, "give 'text' or 'input_ids'")
        batched = isinstance(text, list)
        texts = text if batched else [text]
        return [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], batched

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        prompts, batched = _prompts(body)
        sp = dict(body.get("sampling_params") or {})
        n = int(sp.pop("n", 1))
        try:
            params = SamplingParams.from_dict(sp)
        except TypeError as err:
            raise HTTPException(400, f"bad sampling_params: {err}") from None
        if engine.weights.state != READY:
            raise HTTPException(503, f"engine is {engine.weights.state}")
        base = body.get("rid") or uuid.uuid4().hex
        rids = [base if len(prompts) * n == 1 else f"{base}-{i}" for i in range(len(prompts) * n)]
        jobs = [loop.submit(p, params, rids[i * n + k]) for i, p in enumerate(prompts) for k in range(n)]
        reqs = await asyncio.gather(*jobs)
        out = [response_body(engine, r, bool(body.get("return_logprob"))) for r in reqs]
        return out if (batched or n > 1) else out[0]

    @app.get("/health")
    async def health():
        h = engine.weights.health()
        return JSONResponse(h, status_code=200 if h["state"] == READY else 503)

    @app.get("/health_generate")
    async def health_generate():
        if engine.weights.state != READY:
            return JSONResponse(engine.weights.health(), status_code=503)
        await loop.submit([engine.tokenizer.eos_token_id], SamplingParams(1, temperature=0), f"health-{uuid.uuid4().hex}")
        return engine.weights.health()

    @app.post("/abort_request")
    async def abort_request(request: Request):
        return {"aborted": loop.abort((await request.json())["rid"])}

    @app.post("/flush_cache")
    async def flush_cache():
        return {"success": loop.call(engine.flush_cache)}

    @app.post("/pause_generation")
    async def pause():
        loop.call(engine.pause)
        return {"success": True}

    @app.post("/continue_generation")
    async def resume():
        loop.call(engine.resume)
        return {"success": True}

    @app.post("/release_memory_occupation")
    async def release():
        loop.call(engine.release_memory)
        return engine.weights.health()

    @app.post("/resume_memory_occupation")
    async def resume_memory():
        loop.call(engine.resume_memory)
        return engine.weights.health()

    @app.post("/update_weights_from_tensor")
    async def update_from_tensor(request: Request):
        body = await request.json()
        buckets = pickle.loads(base64.b64decode(body["serialized_buckets"]))
        version = loop.call(engine.weights.load_buckets, buckets, int(body["weight_version"]))
        return {"success": True, "weight_version": version}

    @app.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await request.json()
        version = loop.call(_load_from_disk, engine, body["model_path"], int(body.get("weight_version", 0)))
        return {"success": True, "weight_version": version}

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        from miles_ray.weights import BroadcastChannel

        b = await request.json()
        app.state.channel = await asyncio.to_thread(BroadcastChannel, int(b["rank"]), int(b["world_size"]),
                                                    b["master_address"], int(b["master_port"]), b.get("backend", "gloo"))
        return {"success": True}

    @app.post("/update_weights_from_distributed")
    async def update_from_distributed(request: Request):
        b = await request.json()
        metas = pickle.loads(base64.b64decode(b["serialized_metas"]))
        buckets = await asyncio.to_thread(app.state.channel.receive, metas)
        version = loop.call(engine.weights.load_buckets, buckets, int(b["weight_version"]))
        return {"success": True, "weight_version": version}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": engine.model_spec, "model_type": engine.model.config.model_type}

    @app.get("/get_server_info")
    async def server_info():
        return {**engine.weights.health(), "running": len(engine.running), "waiting": len(engine.waiting),
                "paused": engine.paused}

    return app


def _load_from_disk(engine, path: str, version: int) -> int:
    from miles_ray.models import load_model

    fresh = load_model(path)
    return engine.weights.update(fresh.state_dict(), version)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="miles-ray native engine server (SGLang-compatible subset)")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--tiny-cache-dir", default="runs/_models")
    args = ap.parse_args(argv)
    import uvicorn

    from miles_ray.rollout.native.engine import NativeEngine

    engine = NativeEngine(args.model_path, args.dtype, args.tiny_cache_dir, args.seed, args.max_running_requests)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
