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
import contextlib
import os
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from miles_ray.rollout.health import READY, EngineNotReady
from miles_ray.rollout.http.bodies import Conflict, error as _error, read_json, read_object
from miles_ray.rollout.native.loop import EngineLoop
from miles_ray.weights.raw import BadWeights
from miles_ray.rollout.sglang.api import BadRequest, finish_reason, parse_generate
from miles_ray.rollout.http.server_sglang import SglangBehaviour, spans
from miles_ray.rollout.http.server_weights import add_weight_routes
from miles_ray.weights.sglang_tensor import RefusedPayload

CLIENT_ERRORS = (BadRequest, BadWeights, RefusedPayload, KeyError)


class ServerState:
    """What the handlers share: the engine, its loop, the mode, request ids in flight, the
    weight-update group. Invariant: a request id is in ``active`` exactly while its request runs."""

    def __init__(self, engine, strict: bool, tp_size: int = 1, load_delay_s: float = 0.0,
                 group_timeout_s: float = 120.0, sglang: SglangBehaviour | None = None):
        """``sglang``: the version behaviour of a strict server (:mod:`.server_sglang`)."""
        self.engine, self.loop, self.strict = engine, EngineLoop(engine), strict
        self.sg = sglang or SglangBehaviour(newest_sglang())
        self.tp_size, self.load_delay_s, self.group_timeout_s = tp_size, load_delay_s, group_timeout_s
        self.active: set[str] = set()
        self.groups: dict = {}  # group_name -> BroadcastChannel (update_weights_from_distributed)
        cfg = engine.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.context_len = int(getattr(cfg, "max_position_embeddings", 1 << 20))

    async def held(self, fn, *args):
        """Run ``fn`` with the engine held, in a worker thread (the event loop keeps serving)."""
        return await asyncio.to_thread(self.loop.call, fn, *args)

    def gate(self):
        """Strict: SGLang's pause gate and model-update reader lock around a generation."""
        return self.sg.request() if self.strict else contextlib.nullcontext()

    def abort_all(self, cause: str) -> list[str]:
        aborted = [r for r in list(self.active) if self.loop.abort(r)]
        self.sg.aborts[cause] += len(aborted)
        self.sg.save()
        return aborted

    def claim(self, rids: list[str], take: bool = True) -> None:
        clash = sorted(set(r for r in rids if r in self.active) | {r for r in rids if rids.count(r) > 1})
        if clash:
            raise Conflict(f"request id(s) {clash[:5]} already in use by a running request; rids must be unique")
        if take:
            self.active.update(rids)


def newest_sglang() -> str:
    from miles_ray.rollout.sglang.protocol import SUPPORTED

    return SUPPORTED[-1]


def sglang_routed_experts(trace: dict) -> str:
    """SGLang's ``meta_info["routed_experts"]``: base64 of int32 ``[seqlen-1, layers, topk]``
    (0.5.23 managers/detokenizer_manager.py ``_b64_encode_per_request``)."""
    import base64

    from miles_ray.models.moe import decode

    return base64.b64encode(decode(trace).to(dtype=__import__("torch").int32).numpy().tobytes()).decode()


def response_body(state: ServerState, req, logprob: bool, routed: bool) -> dict:
    """SGLang's ``meta_info["weight_version"]`` is the version when the request finished (0.5.5
    tokenizer_manager.py:1434 server_args.weight_version; 0.5.23 the last span,
    utils/weight_versions.py:106); newer versions add the spans (lenient mode: always)."""
    engine, sg = state.engine, state.sg
    version = req.weight_versions[-1] if req.weight_versions else engine.weights.version
    full = text = engine.tokenizer.decode(req.output_ids, skip_special_tokens=True)
    for s in req.params.stop:  # SamplingParams.no_stop_trim=False: output ends before the stop string
        if s in text:
            text = text[: text.index(s)]
    meta = {"id": req.rid, "finish_reason": finish_reason(req, full), "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids), "cached_tokens": 0, "weight_version": sg.label(version)}
    if not state.strict or sg.protocol.weight_version_spans:
        meta["weight_versions"] = spans(req.weight_versions, sg.label)  # partial rollout: versions of the tokens
    trace = engine.routes.trace(req)
    if trace is not None and not state.strict:  # MoE: experts each token was routed to (our trace format)
        meta["routed_experts"] = trace
    elif trace is not None and routed and sg.return_routed_experts:
        meta["routed_experts"] = sglang_routed_experts(trace)
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
                             state.strict, state.sg.protocol.routed_experts)
        n, prompts = req["n"], req["prompts"]
        rids = req["rids"] or [uuid.uuid4().hex for _ in range(len(prompts) * n)]
        state.claim(rids, take=False)  # a clash is refused at once, even while paused
        async with state.gate():
            if engine.weights.state != READY:
                return _error(503, f"engine is {engine.weights.state}")
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
        if state.strict:  # the generation probe waits behind a pause or a weight update (.server_sglang)
            ready = await state.sg.probe() and engine.weights.state == READY
            return Response(status_code=200 if ready else 503)
        ready = engine.weights.state == READY
        return JSONResponse(engine.weights.health(), status_code=200 if ready else 503)

    app.get("/health")(health)
    app.get("/health_generate")(health)

    if not state.strict or state.sg.protocol.weight_version_route:  # gone in newer releases (issue 25 item 7)
        @app.get("/get_weight_version")
        async def weight_version():  # http_server.py get_weight_version: a string
            return {"weight_version": state.sg.label(engine.weights.version)}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": engine.model_spec, "is_generation": True,
                "weight_version": state.sg.label(engine.weights.version), "model_type": engine.model.config.model_type}

    @app.get("/get_server_info")
    async def server_info():
        return {**engine.weights.health(), "running": len(engine.running), "waiting": len(engine.waiting),
                "paused": engine.paused, "tp_size": state.tp_size, "strict_sglang": state.strict,
                "weight_version": state.sg.label(engine.weights.version), "stand_in": state.sg.stats(),
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def add_control(app: FastAPI, state: ServerState) -> None:
    engine, loop = state.engine, state.loop

    @app.post("/abort_request")
    async def abort_request(request: Request):  # io_struct.py AbortReq: rid, abort_all
        body = await read_object(request)
        if body.get("abort_all"):
            out = {"aborted": state.abort_all("abort_request")}
        else:
            rid = body.get("rid")
            if not isinstance(rid, str) or not rid:
                raise BadRequest("abort_request needs 'rid' (a non-empty string) or 'abort_all': true")
            out = {"aborted": loop.abort(rid)}
            state.sg.aborts["abort_request"] += int(out["aborted"])
        if state.strict:  # http_server.py abort_request: Response(status_code=200), an empty body
            return Response(status_code=200)
        return out

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        ok = await state.held(flush)
        state.sg.cache_flushes += int(ok)
        state.sg.save()
        if state.strict:  # http_server.py flush_cache: plain text, 200 or 400
            return Response("Cache flushed.\n", status_code=200 if ok else 400)
        return {"success": ok}

    def flush() -> bool:
        """Scheduler.flush_cache (0.5.23 scheduler.py:5518): fails while requests run, except those a
        ``retract`` pause moved back to the waiting queue (``ignore_waiting``; the stand-in keeps
        their KV: its cache of finished requests is dropped once idle)."""
        if state.sg.paused == "retract":
            return engine.flush_cache() or True
        return engine.flush_cache()

    @app.post("/pause_generation")
    async def pause(request: Request):
        """0.5.5: no body, aborts everything (tokenizer_manager.py:1157-1160); newer: ``mode``
        abort (default: aborts, waits for in-flight requests to end), retract or in_place
        (tokenizer_manager.py:2267). Answers ``{message, status}`` (http_server.py:1069 / :1833)."""
        body = await read_object(request)
        modes = state.sg.protocol.pause_modes if state.strict else ("in_place", "retract", "abort")
        mode = body.get("mode", "abort" if state.strict else "in_place") if modes else "abort"
        if modes and mode not in modes:
            raise BadRequest(f"pause_generation mode must be one of {list(modes)}, got {mode!r}")
        if not modes and body:
            raise BadRequest(f"SGLang {state.sg.version}'s /pause_generation reads no body")
        await state.sg.pause(mode)
        if mode == "abort":
            state.abort_all("pause")
            while state.active:  # 0.5.23 pause_generation: until no request holds the model-update lock
                await asyncio.sleep(0.01)
        else:
            await state.held(engine.pause)
        state.sg.save()
        return {"message": "Generation paused successfully.", "status": 200}

    @app.post("/continue_generation")
    async def resume(request: Request):
        await read_object(request)
        await state.held(engine.resume)
        await state.sg.resume()
        state.sg.save()
        return {"message": "Generation continued successfully.", "status": 200}

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
               group_timeout_s: float = 120.0, sglang_version: str | None = None,
               return_routed_experts: bool = False, stats_path: str | None = None) -> FastAPI:
    """``sglang_version``: the SGLang whose behaviour a strict server takes (default: newest supported)."""
    app = FastAPI(title="miles-ray native engine", openapi_url=None)
    state = ServerState(engine, strict, tp_size, load_delay_s, group_timeout_s,
                        SglangBehaviour(sglang_version or newest_sglang(), return_routed_experts, stats_path))
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
    ap.add_argument("--sglang-version", default=None, help="the SGLang version a strict server behaves as "
                    "(default: the newest supported; miles_ray.rollout.sglang.protocol)")
    ap.add_argument("--enable-return-routed-experts", action="store_true", help="SGLang's flag (newer releases): "
                    "answer return_routed_experts requests")
    ap.add_argument("--stats-path", default=None, help="strict: write the stand-in's counters (aborts by cause, "
                    "cache flushes, version updates) to this JSON file after every change")
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
    app = create_app(engine, args.strict_sglang, args.tp_size, args.weight_load_delay_s, args.group_timeout_s,
                     args.sglang_version, args.enable_return_routed_experts, args.stats_path)
    try:
        uvicorn.run(Guard(app, token, int(args.max_request_mb * (1 << 20))), host=args.host, port=args.port,
                    log_level="warning")
    except SystemExit as err:  # uvicorn's startup failure (3: the port was taken): exit now, engine threads too
        os._exit(err.code if isinstance(err.code, int) else 1)


if __name__ == "__main__":
    main()
