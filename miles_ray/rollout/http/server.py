"""HTTP server for one native engine, speaking the subset of SGLang's native API that RL needs.

    python -m miles_ray.rollout.http.server --model-path tiny:qwen3 --port 30000 [--host 127.0.0.1] [--strict-sglang]

Endpoints: POST /generate, GET /health, GET /health_generate, POST /abort_request,
POST /flush_cache, POST /pause_generation, POST /continue_generation,
POST /release_memory_occupation, POST /resume_memory_occupation, GET /get_model_info,
GET /get_server_info, GET /get_weight_version and the weight endpoints of
:mod:`miles_ray.rollout.http.server_weights`.

Two modes. ``--strict-sglang`` accepts exactly what SGLang 0.5.x accepts and answers with its
shapes (rules and citations: :mod:`miles_ray.rollout.sglang.api`); the default (lenient) mode adds
our extensions (health state and integer versions in /health, per-token weight versions).
Both: bodies are validated (400 naming the problem; 409 for a request id already running), no
request ever reaches ``pickle`` (:mod:`miles_ray.weights.sglang_tensor`), weight loads run off the
event loop (``/health`` answers during a load), and :class:`miles_ray.rollout.http.guard.Guard`
checks the bearer token (when one is set) and the body size.

The engine runs in one background thread (:class:`EngineLoop`); handlers hand it work under a
lock (in a worker thread) and await futures.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from miles_ray.rollout.health import READY, EngineNotReady
from miles_ray.rollout.http.bodies import Conflict, error as _error, read_json, read_object
from miles_ray.rollout.native.loop import EngineLoop
from miles_ray.weights.raw import BadWeights
from miles_ray.rollout.sglang.api import BadRequest, finish_reason, parse_generate
from miles_ray.rollout.http.server_weights import add_weight_routes
from miles_ray.weights.sglang_tensor import RefusedPayload

CLIENT_ERRORS = (BadRequest, BadWeights, RefusedPayload, KeyError)


class ServerState:
    """What the handlers share: the engine, its loop, the mode, request ids in flight, the
    weight-update group. Invariant: a request id is in ``active`` exactly while its request runs."""

    def __init__(self, engine, strict: bool, tp_size: int = 1, load_delay_s: float = 0.0,
                 group_timeout_s: float = 120.0):
        self.engine, self.loop, self.strict = engine, EngineLoop(engine), strict
        self.tp_size, self.load_delay_s, self.group_timeout_s = tp_size, load_delay_s, group_timeout_s
        self.active: set[str] = set()
        self.groups: dict = {}  # group_name -> BroadcastChannel (update_weights_from_distributed)
        cfg = engine.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.context_len = int(getattr(cfg, "max_position_embeddings", 1 << 20))

    async def held(self, fn, *args):
        """Run ``fn`` with the engine held, in a worker thread (the event loop keeps serving)."""
        return await asyncio.to_thread(self.loop.call, fn, *args)

    def claim(self, rids: list[str]) -> None:
        clash = sorted(set(r for r in rids if r in self.active) | {r for r in rids if rids.count(r) > 1})
        if clash:
            raise Conflict(f"request id(s) {clash[:5]} already in use by a running request; rids must be unique")
        self.active.update(rids)


def response_body(state: ServerState, req, logprob: bool, routed: bool) -> dict:
    engine = state.engine
    version = req.weight_versions[0] if req.weight_versions else engine.weights.version
    full = text = engine.tokenizer.decode(req.output_ids, skip_special_tokens=True)
    for s in req.params.stop:  # SamplingParams.no_stop_trim=False: output ends before the stop string
        if s in text:
            text = text[: text.index(s)]
    meta = {"id": req.rid, "finish_reason": finish_reason(req, full), "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids), "cached_tokens": 0, "weight_version": str(version)}
    if not state.strict:
        meta["weight_versions"] = req.weight_versions  # partial rollout: the version of each token
    trace = engine.routes.trace(req)
    if trace is not None and (routed or not state.strict):  # MoE: experts each token was routed to
        meta["routed_experts"] = trace
    if logprob:  # tokenizer_manager convert_logprob_style: [logprob, token_id, text or None]
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(req.logprobs, req.output_ids)]
    return {"text": text, "output_ids": req.output_ids, "meta_info": meta}


def add_error_handlers(app: FastAPI) -> None:
    for exc in CLIENT_ERRORS:
        app.add_exception_handler(exc, lambda _r, e: _error(400, str(e.args[0]) if e.args else repr(e)))
    app.add_exception_handler(Conflict, lambda _r, e: _error(409, str(e)))
    app.add_exception_handler(EngineNotReady, lambda _r, e: _error(503, str(e)))


def add_generate(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        req = parse_generate(await read_json(request), engine.tokenizer, state.vocab_size, state.context_len,
                             state.strict)
        if engine.weights.state != READY:
            return _error(503, f"engine is {engine.weights.state}")
        n, prompts = req["n"], req["prompts"]
        rids = req["rids"] or [uuid.uuid4().hex for _ in range(len(prompts) * n)]
        state.claim(rids)
        try:
            jobs = [state.loop.submit(p, req["params"], rids[i * n + k]) for i, p in enumerate(prompts)
                    for k in range(n)]
            done = await asyncio.gather(*jobs)
        finally:
            state.active.difference_update(rids)
        out = [response_body(state, r, req["logprob"], req["routed"]) for r in done]
        return out if (req["batched"] or n > 1) else out[0]


def add_health(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    async def health():
        """http_server.py health_generate: SGLang answers 200 / 503 with an empty body."""
        ready = engine.weights.state == READY
        if state.strict:
            return Response(status_code=200 if ready else 503)
        return JSONResponse(engine.weights.health(), status_code=200 if ready else 503)

    app.get("/health")(health)
    app.get("/health_generate")(health)

    @app.get("/get_weight_version")
    async def weight_version():  # http_server.py get_weight_version: a string
        return {"weight_version": str(engine.weights.version)}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": engine.model_spec, "is_generation": True,
                "weight_version": str(engine.weights.version), "model_type": engine.model.config.model_type}

    @app.get("/get_server_info")
    async def server_info():
        return {**engine.weights.health(), "running": len(engine.running), "waiting": len(engine.waiting),
                "paused": engine.paused, "tp_size": state.tp_size, "strict_sglang": state.strict,
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def add_control(app: FastAPI, state: ServerState) -> None:
    engine, loop = state.engine, state.loop

    @app.post("/abort_request")
    async def abort_request(request: Request):  # io_struct.py AbortReq: rid, abort_all
        body = await read_object(request)
        if body.get("abort_all"):
            return {"aborted": [r for r in list(state.active) if loop.abort(r)]}
        rid = body.get("rid")
        if not isinstance(rid, str) or not rid:
            raise BadRequest("abort_request needs 'rid' (a non-empty string) or 'abort_all': true")
        return {"aborted": loop.abort(rid)}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        ok = await state.held(engine.flush_cache)
        if state.strict:  # http_server.py flush_cache: plain text, 200 or 400
            return Response("Cache flushed.\n", status_code=200 if ok else 400)
        return {"success": ok}

    @app.post("/pause_generation")
    async def pause(request: Request):
        mode = (await read_object(request)).get("mode", "in_place")
        if mode != "in_place":
            raise BadRequest(f"pause_generation mode '{mode}' is not implemented by the stand-in (in_place only)")
        await state.held(engine.pause)
        return {"success": True, "message": "Generation paused successfully."}

    @app.post("/continue_generation")
    async def resume(request: Request):
        await read_object(request)
        await state.held(engine.resume)
        return {"success": True, "message": "Generation continued successfully."}

    @app.post("/release_memory_occupation")
    async def release(request: Request):
        await read_object(request)
        await state.held(engine.release_memory)
        return engine.weights.health()

    @app.post("/resume_memory_occupation")
    async def resume_memory(request: Request):
        await read_object(request)
        await state.held(engine.resume_memory)
        return engine.weights.health()


def create_app(engine, strict: bool = False, tp_size: int = 1, load_delay_s: float = 0.0,
               group_timeout_s: float = 120.0) -> FastAPI:
    app = FastAPI(title="miles-ray native engine", openapi_url=None)
    state = ServerState(engine, strict, tp_size, load_delay_s, group_timeout_s)
    app.state.server = state
    app.state.loop = state.loop
    add_error_handlers(app)
    for add in (add_generate, add_health, add_control, add_weight_routes):
        add(app, state)
    return app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="miles-ray native engine server (SGLang-compatible subset)")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--tiny-cache-dir", default="runs/_models")
    ap.add_argument("--strict-sglang", action="store_true", help="accept and answer exactly as SGLang 0.5.x")
    ap.add_argument("--tp-size", type=int, default=1, help="SGLang's tensor parallel size (the stand-in runs "
                    "one process; it takes one serialized_named_tensors entry per rank)")
    ap.add_argument("--mem-fraction-static", type=float, default=None, help="accepted for SGLang parity (unused)")
    ap.add_argument("--max-request-mb", type=float, default=2048.0, help="largest request body accepted (413 above)")
    ap.add_argument("--weight-load-delay-s", type=float, default=0.0, help="fault injection: slow loads from disk")
    ap.add_argument("--group-timeout-s", type=float, default=120.0, help="weight update group rendezvous limit")
    args = ap.parse_args(argv)
    import uvicorn

    from miles_ray.rollout.http.guard import Guard, take_env_token
    from miles_ray.rollout.native.engine import NativeEngine

    token = take_env_token()
    engine = NativeEngine(args.model_path, args.dtype, args.tiny_cache_dir, args.seed, args.max_running_requests)
    app = create_app(engine, args.strict_sglang, args.tp_size, args.weight_load_delay_s, args.group_timeout_s)
    uvicorn.run(Guard(app, token, int(args.max_request_mb * (1 << 20))), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
