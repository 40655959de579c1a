"""Weight endpoints of our engine server, in SGLang 0.5.x's request formats.

- ``/update_weights_from_tensor`` (io_struct.py UpdateWeightsFromTensorReqInput: serialized_named_tensors,
  load_format, flush_cache, abort_all_requests, weight_version). Strict mode: SGLang's payload, one
  ``serialized_named_tensors`` entry per TP rank, decoded by the allow-list unpickler
  (:mod:`miles_ray.weights.sglang_tensor`); ``load_format`` null (named tensors) or
  ``"flattened_bucket"`` (one flattened tensor + FlattenedTensorMetadata per rank, whose names,
  shapes, dtypes and ranges are checked against the model and the tensor). Lenient mode: our
  pickle-free ``load_format=miles_raw``
  (:mod:`miles_ray.weights.raw`) only; a pickled payload gets 400.
- ``/update_weight_version`` (UpdateWeightVersionReqInput: new_version, abort_all_requests): the
  loads posted before it become weight version ``new_version`` (checked complete).
- ``/init_weights_update_group`` (InitWeightsUpdateGroupReqInput: master_address, master_port,
  rank_offset, world_size, group_name, backend), ``/update_weights_from_distributed``
  (UpdateWeightsFromDistributedReqInput: names, dtypes, shapes, group_name, ...: one broadcast
  from rank 0 per tensor, model_runner ``update_weights_from_distributed``), and
  ``/destroy_weights_update_group``. On CPU the group is gloo whatever ``backend`` says.
- ``/update_weights_from_disk`` (UpdateWeightFromDiskReqInput: model_path, load_format, weight_version).

Weight-update answers are ``{"success", "message"}`` (http_server.py), 400 on failure. Every load
runs in a worker thread holding the engine (:meth:`ServerState.held`): ``/health`` keeps answering.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from miles_ray.rollout.http.bodies import read_object
from miles_ray.rollout.sglang.api import BadRequest
from miles_ray.weights import raw as raw_weights, sglang_flattened
from miles_ray.weights.broadcast import BroadcastChannel
from miles_ray.weights.registry import accepted_load_formats, format_for

TENSOR_FIELDS = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
                 "selector"}
LENIENT_TENSOR_FIELDS = {"buckets", "load_format", "flush_cache", "abort_all_requests", "weight_version", "selector"}
GROUP_FIELDS = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
DIST_FIELDS = {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version",
               "load_format", "selector"}
SELECTORS = ("target", "draft", "all")  # 0.5.23 io_struct.py:2017/2045 ``selector``


async def open_update(state, body: dict, fields: set) -> set:
    """What SGLang checks before a weight update, per version: ``selector`` only where it exists,
    the update inside a ``/begin_weight_update`` session on 0.5.23 (weight_updater.py:196/238),
    ``abort_all_requests`` aborts every request (counted). Returns the fields the version takes."""
    sg = state.sg
    if not state.strict:
        return fields
    if not sg.protocol.selector:
        fields = fields - {"selector"}
    elif body.get("selector", "all") not in SELECTORS:
        raise BadRequest(f"selector must be one of {list(SELECTORS)}")
    if sg.protocol.update_session and not sg.session:
        raise BadRequest("update_weights must run between begin_weight_update() and end_weight_update()")
    if body.get("abort_all_requests"):
        state.abort_all("weight_update")
    return fields


def check_fields(body: dict, allowed: set, what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown {what} field(s) {unknown}; accepted: {sorted(allowed)}")
    for flag in ("flush_cache", "abort_all_requests"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise BadRequest(f"{flag} must be a boolean")


def parse_version(v, strict: bool, key: str = "weight_version", sg=None, current: int = 0):
    """SGLang types versions ``Optional[str]``, any string (``"default"`` at start): strict mode
    (given ``sg``) takes any string (:meth:`SglangBehaviour.parse_label`); otherwise the string must
    hold an integer. Lenient mode also takes an int."""
    if v is None:
        return None
    if strict and sg is not None and isinstance(v, str) and v:
        return sg.parse_label(v, current)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    if not strict and type(v) is int:
        return v
    raise BadRequest(f"{key} must be a string holding an integer version, got {v!r}")


def updating(state):
    """Strict: SGLang's model-update writer lock (waits for in-flight requests; :mod:`.server_sglang`)."""
    return state.sg.update() if state.strict else contextlib.nullcontext()


def _int(body: dict, key: str, low: int, high: int) -> int:
    v = body.get(key)
    if type(v) is not int or not low <= v <= high:
        raise BadRequest(f"{key} must be an int in [{low}, {high}], got {v!r}")
    return v


def _named_from_tensor_body(body: dict, strict: bool, tp_size: int, fields: set = TENSOR_FIELDS) -> list:
    """Decode through the payload format the body names (:mod:`miles_ray.weights.registry`): in strict
    mode SGLang's (model_runner.py update_weights_from_tensor: load_format None -> [(name, tensor)]
    per rank, "flattened_bucket" -> {"flattened_tensor", "metadata"}), else our pickle-free one."""
    if strict:
        check_fields(body, fields, "update_weights_from_tensor")
    elif "serialized_named_tensors" in body:
        raise BadRequest("this server never unpickles: send load_format='miles_raw' with 'buckets' (SGLang's "
                         "pickled format is accepted only with --strict-sglang, by an allow-list decoder)")
    else:
        check_fields(body, LENIENT_TENSOR_FIELDS, "update_weights_from_tensor")
    fmt = body.get("load_format")
    found = format_for(fmt, strict) if fmt is None or isinstance(fmt, str) else None
    if found is None:
        accepted = " or ".join("null" if f is None else repr(f) for f in accepted_load_formats(strict))
        raise BadRequest(f"load_format {fmt!r} is not implemented by the {'stand-in' if strict else 'server'} "
                         f"(load_format must be {accepted})")
    return found.decode(body, tp_size)


def _check_shapes(state, named: list, dtypes: list | None = None) -> None:
    """Every name served, with the served shape (and, given ``dtypes``, the served dtype)."""
    shapes = state.engine.weights.shapes()
    for i, (name, shape) in enumerate(named):
        if name not in shapes:
            raise BadRequest(f"weight '{name}' does not exist in the served model")
        if tuple(shape) != shapes[name][0]:
            raise BadRequest(f"weight '{name}': shape {list(shape)} != served {list(shapes[name][0])}")
        if dtypes is not None and dtypes[i] != shapes[name][1]:
            raise BadRequest(f"weight '{name}': dtype {dtypes[i]} != served {shapes[name][1]}")


def _ok(message: str, version=None) -> dict:
    out = {"success": True, "message": message}
    if version is not None:
        out["weight_version"] = str(version)
    return out


def add_weight_routes(app: FastAPI, state) -> None:
    weights = state.engine.weights

    def load(named: list, version, delay_s: float = 0.0) -> int | None:
        time.sleep(delay_s)  # fault injection (tests): a slow load holds the engine
        weights.load_tensors(named)
        return weights.finish_load(version) if version is not None else None

    def version_of(body: dict, key: str = "weight_version"):
        return parse_version(body.get(key), state.strict, key, state.sg, weights.version)

    def answer(message: str, served) -> dict:
        return _ok(message, None if served is None else state.sg.label(served))

    @app.post("/update_weights_from_tensor")
    async def from_tensor(request: Request):
        body = await read_object(request)
        fields = await open_update(state, body, TENSOR_FIELDS)
        named = await asyncio.to_thread(_named_from_tensor_body, body, state.strict, state.tp_size, fields)
        version = version_of(body)
        flattened = state.strict and body.get("load_format") == sglang_flattened.FORMAT  # metadata names dtypes: checked
        _check_shapes(state, [(n, t.shape) for n, t in named], [t.dtype for _, t in named] if flattened else None)
        async with updating(state):
            served = await state.held(load, named, version)
        return answer(f"Succeeded to update {len(named)} tensors.", served)

    @app.post("/update_weight_version")
    async def update_version(request: Request):
        """``abort_all_requests`` defaults to True (io_struct.py UpdateWeightVersionReqInput;
        http_server.py:872 0.5.5 / :1529 0.5.23 then aborts every request)."""
        body = await read_object(request)
        check_fields(body, {"new_version", "abort_all_requests"}, "update_weight_version")
        version = version_of(body, "new_version")
        if version is None:
            raise BadRequest("new_version is required")
        default = state.sg.defaults["update_weight_version_abort_all_requests"] if state.strict else False
        if body.get("abort_all_requests", default):
            state.abort_all("update_weight_version")
        served = await state.held(weights.relabel, version)
        state.sg.version_updates += 1
        state.sg.save()
        return {**answer(f"Weight version updated to {body['new_version']}", served), "new_version": body["new_version"]}

    @app.post("/begin_weight_update")
    async def begin(request: Request):  # 0.5.23 http_server.py:1458, weight_updater.py:309
        body = await read_object(request)
        if state.strict and not state.sg.protocol.update_session:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        check_fields(body, {"selector"}, "begin_weight_update")
        if state.sg.session:
            raise BadRequest("a weight-update session is already open; call end_weight_update() first")
        state.sg.session = True
        return _ok("Success")

    @app.post("/end_weight_update")
    async def end(request: Request):  # 0.5.23 http_server.py:1473, weight_updater.py:323
        await read_object(request)
        if state.strict and not state.sg.protocol.update_session:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if not state.sg.session:
            raise BadRequest("no weight-update session is open; call begin_weight_update() first")
        state.sg.session = False
        return _ok("Success")

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        b = await read_object(request)
        check_fields(b, GROUP_FIELDS, "init_weights_update_group")
        world = _int(b, "world_size", 2, 1 << 16)
        rank = _int(b, "rank_offset", 1, world - 1)  # the stand-in joins as one rank, whatever its TP size
        port = _int(b, "master_port", 1, 65535)
        name, addr = b.get("group_name", "weight_update_group"), b.get("master_address")
        if not isinstance(name, str) or not isinstance(addr, str) or not addr or b.get("backend", "nccl") not in (
                "nccl", "gloo"):
            raise BadRequest("master_address and group_name must be strings, backend 'nccl' or 'gloo'")
        backend = "nccl" if torch.cuda.is_available() and b.get("backend", "nccl") == "nccl" else "gloo"
        try:
            old = state.groups.pop(name, None)
            if old is not None:
                old.close()
            state.groups[name] = await asyncio.to_thread(BroadcastChannel, rank, world, addr, port, backend,
                                                         state.group_timeout_s, name)
        except Exception as err:  # noqa: BLE001 - SGLang answers success=false, 400
            raise BadRequest(f"Failed to init process group {name!r}: {type(err).__name__}: {err}") from None
        return _ok(f"Succeeded to init group {name!r} as rank {rank} of {world} ({backend}).")

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        name = (await read_object(request)).get("group_name", "weight_update_group")
        channel = state.groups.pop(name, None) if isinstance(name, str) else None
        if channel is None:
            raise BadRequest(f"no weight update group {name!r}")
        channel.close()
        return _ok(f"Destroyed group {name!r}.")

    @app.post("/update_weights_from_distributed")
    async def from_distributed(request: Request):
        b = await read_object(request)
        check_fields(b, await open_update(state, b, DIST_FIELDS), "update_weights_from_distributed")
        names, dtypes, shapes = b.get("names"), b.get("dtypes"), b.get("shapes")
        ok = (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
              and len(names) == len(dtypes) == len(shapes) and all(isinstance(n, str) for n in names)
              and all(d in raw_weights.DTYPES for d in dtypes)
              and all(isinstance(s, list) and all(type(x) is int and x >= 0 for x in s) for s in shapes))
        if not ok:
            raise BadRequest(f"names, dtypes (one of {sorted(raw_weights.DTYPES)}) and shapes must be lists of "
                             "equal length")
        if b.get("load_format") is not None:
            raise BadRequest("load_format is not implemented by the stand-in (null only)")
        channel = state.groups.get(b.get("group_name", "weight_update_group"))
        if channel is None:
            raise BadRequest(f"no weight update group {b.get('group_name', 'weight_update_group')!r}; "
                             "call /init_weights_update_group first")
        _check_shapes(state, list(zip(names, shapes)))
        version = version_of(b)

        def receive() -> int | None:
            return load(channel.receive_named(names, [raw_weights.DTYPES[d] for d in dtypes], shapes), version)

        async with updating(state):
            served = await state.held(receive)
        return answer(f"Succeeded to update {len(names)} tensors from the group.", served)

    @app.post("/update_weights_from_disk")
    async def from_disk(request: Request):
        from miles_ray.models import load_model

        b = await read_object(request)
        check_fields(b, {"model_path", "load_format", "abort_all_requests", "weight_version"},
                     "update_weights_from_disk")
        if state.strict and b.get("abort_all_requests"):
            state.abort_all("weight_update")
        if not isinstance(b.get("model_path"), str) or not b["model_path"]:
            raise BadRequest("model_path must be a non-empty string")
        version = version_of(b)
        try:
            fresh = await asyncio.to_thread(load_model, b["model_path"])
        except Exception as err:  # noqa: BLE001 - SGLang: success=false, 400
            raise BadRequest(f"cannot load {b['model_path']!r}: {type(err).__name__}: {err}") from None
        named = list(fresh.state_dict().items())
        _check_shapes(state, [(n, t.shape) for n, t in named])
        async with updating(state):
            served = await state.held(load, named, version if version is not None else weights.version,
                                      state.load_delay_s)
        return {**answer(f"Succeeded to update model weights from {b['model_path']}.", served), "num_paused_requests": 0}
