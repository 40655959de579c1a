"""Our SGLang client and launcher against SGLang's own contract, read from its wheels
(:mod:`miles_ray.rollout.sglang.contract`; the wheels come from scripts/fetch_sglang_wheels.sh).

The bodies are the ones our client really posts: each client action runs against an
``httpx.MockTransport`` that records what it sends (no server, no network), speaking the protocol
of the version under test (:func:`miles_ray.rollout.sglang.protocol.protocol_for`). Issue 25's
items (numbering of docs/sglang.md), all fixed: 1 ``/abort_request`` answers 200 with an empty
body; 2 ``/update_weight_version`` aborts every request unless ``abort_all_requests=false``; 3 the
first weight version is the string "default"; 4 ``--disable-draft-model-update`` is no flag of
SGLang; 5 ``/pause_generation`` defaults to mode "abort"; 6 routed experts come back as base64 of
int32 [seqlen-1, layers, topk]; 7 ``GET /get_weight_version`` is gone in newer releases; 8 (found
here) 0.5.23 runs updates only between ``/begin_weight_update`` and ``/end_weight_update``.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from miles_ray.config import load_config
from miles_ray.rollout.http.engine import HttpEngine, server_args
from miles_ray.rollout.http.launch import server_command
from miles_ray.rollout.sglang import contract as sc
from miles_ray.rollout.sglang.backend import speculative_args
from miles_ray.rollout.sglang.client import EngineClient
from miles_ray.rollout.sglang.protocol import protocol_for
from miles_ray.rollout.types import SamplingParams

OLDEST = "0.5.5"
VERSIONS = sorted({OLDEST, *sc.wheels()}, key=sc.version_key)
ALL = lambda v: True  # noqa: E731
NEWER = lambda v: v != OLDEST  # noqa: E731


def versions(**breaks) -> list:
    """Every version, with ``xfail(strict)`` where one of ``breaks`` (reason=predicate) applies."""
    out = []
    for v in VERSIONS:
        marks = [pytest.mark.xfail(strict=True, reason=r) for r, applies in breaks.items() if applies(v)]
        out.append(pytest.param(v, marks=marks, id=v))
    return out


@pytest.fixture
def contract(version) -> sc.Contract:
    try:
        return sc.load(version)
    except FileNotFoundError:
        pytest.skip(f"SGLang {version} wheel not in {sc.wheel_dir()}: run {sc.FETCH_SCRIPT}")


# -- a client whose HTTP calls are recorded ---------------------------------------------------
def _ok(request: httpx.Request, body) -> httpx.Response:
    if request.url.path == "/generate":
        n = len(body["input_ids"]) * body["sampling_params"].get("n", 1)
        return httpx.Response(200, json=[generate_output("1") for _ in range(n)])
    answer = {"success": True, "message": "ok", "weight_version": "1", "aborted": True}
    return httpx.Response(200, json={**answer, **({"new_version": body["new_version"]} if body and "new_version" in body
                                                  else {})})


def generate_output(version, **meta) -> dict:
    return {"text": "x", "output_ids": [5], "meta_info": {"weight_version": version, "finish_reason": {"type": "length"},
                                                          "output_token_logprobs": [[-0.1, 5, None]], **meta}}


def recording_client(reply=_ok, version: str | None = None) -> tuple[EngineClient, list]:
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        calls.append((request.method, request.url.path, body))
        return reply(request, body)

    client = EngineClient("http://sglang.test", protocol=protocol_for(version) if version else None)
    client.http = httpx.Client(transport=httpx.MockTransport(handle))
    return client, calls


REQUEST = {"prompt_index": 0, "group_id": 0, "prompt": "1+1=", "label": "2", "input_ids": [1, 2, 3], "rid": "r0"}


def _engine(client, partial: bool = False) -> HttpEngine:
    return HttpEngine("sglang", client, tokenizer=None, fmt="sglang_tensor", partial=partial)


def _update(c):
    """The whole update protocol of HttpEngine: pause, a load, finish_load, resume."""
    e = _engine(c, partial=True)
    e.pause()
    c.update_weights_from_tensor([("w", torch.zeros(2))])
    e.finish_load(3)
    e.resume()


# Every call our client and HttpEngine make, by name (the raw format is our lenient server's
# own, miles_ray/weights/raw.py: no SGLang request has ``buckets``, so it is not listed).
ACTIONS = {
    "generate": lambda c: c.generate_samples([REQUEST], 1, SamplingParams(top_k=0, stop=["\n"]), None),
    "health": lambda c: c.health(),
    "weight_version": lambda c: c.weight_version(),
    "server_info": lambda c: c.server_info(),
    "abort": lambda c: _engine(c).abort("r0"),
    "flush_cache": lambda c: c.flush_cache(),
    "pause": lambda c: _engine(c).pause(),
    "resume": lambda c: _engine(c).resume(),
    "release_memory": lambda c: _engine(c).release_memory(),
    "resume_memory": lambda c: _engine(c).resume_memory(),
    "update_weight_version": lambda c: _engine(c).finish_load(3),
    "update_weights_from_tensor": lambda c: c.update_weights_from_tensor([("w", torch.zeros(2))], version=3),
    "update_weights_flattened": lambda c: c.update_weights_flattened(["ZmxhdA=="], version=3),
    "init_weights_update_group": lambda c: _engine(c).open_broadcast("10.0.0.1", 29500, 1, 2, "nccl"),
    "update_weights_from_distributed": lambda c: c.update_weights_from_distributed(["w"], ["bfloat16"], [[2, 3]], 3),
    "receive_broadcast": lambda c: _engine(c).receive_broadcast([{"dtype": torch.bfloat16, "entries": [("w", (2, 3))]}]),
    "update_weights_from_disk": lambda c: c.update_weights_from_disk("/ckpt/step3", 3),
    "update_protocol": _update,
}


def record(action: str, version: str | None = None) -> list:
    client, calls = recording_client(version=version)
    ACTIONS[action](client)
    assert calls, f"{action} made no HTTP call"
    return calls


ROUTE_BREAKS: dict = {}  # (action, reason) -> versions: none left (item 7 fixed: /get_model_info there)


def route_cases() -> list:
    out = []
    for action in ACTIONS:
        for v in VERSIONS:
            marks = [pytest.mark.xfail(strict=True, reason=r) for (a, r), applies in ROUTE_BREAKS.items()
                     if a == action and applies(v)]
            out.append(pytest.param(v, action, marks=marks, id=f"{v}-{action}"))
    return out


@pytest.mark.parametrize("version,action", route_cases())
def test_client_calls_only_routes_and_fields_sglang_has(contract, action):
    """Each call: the route exists for that method, and the JSON body only uses fields of the
    request class the route parses (all of its required fields present). A route without a
    body class ignores any body, so the body must be empty there."""
    for method, path, body in record(action, contract.version):
        route = contract.route(path, method)
        assert route is not None, f"SGLang {contract.version} has no {method} {path}"
        if route.body is None:
            assert not body, f"{path} reads no body in {contract.version}; {sorted(body)} would be ignored"
            continue
        cls = contract.request(route.body)
        assert contract.unknown_fields(route.body, body or {}) == [], f"{path}: not fields of {route.body}"
        missing = [f.name for f in cls.fields.values() if f.required and f.name not in (body or {})]
        assert missing == [], f"{path}: required fields of {route.body} missing"


@pytest.mark.parametrize("version", versions())
def test_sampling_params_are_sglangs(contract):
    (_, _, body), = record("generate")
    params = contract.request("SamplingParams")
    assert sorted(set(body["sampling_params"]) - set(params.fields)) == []
    assert body["sampling_params"]["top_k"] == -1  # "disabled" in sampling_params.py; 0 is refused


# -- launch flags ------------------------------------------------------------------------------
def sglang_config(**extra):
    overrides = ["rollout.backend=sglang", "cluster.colocate=true", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, overrides)


@pytest.mark.parametrize("version", versions())
def test_launcher_flags_exist(contract):
    """server_command("sglang", ...) + engine.server_args + the --api-key HttpEngine.launch adds."""
    argv = server_command("sglang", "/models/m", 30000, "127.0.0.1", [*server_args(sglang_config(), 0), "--api-key",
                                                                        "t"])
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert contract.missing_flags(argv) == []
    dtype = contract.flags["--dtype"]
    assert dtype.choices is None or argv[argv.index("--dtype") + 1] in dtype.choices


@pytest.mark.parametrize("version", versions())
def test_speculative_flags_exist(contract, tmp_path: Path):
    (tmp_path / "draft-init").mkdir()
    (tmp_path / "draft-init" / "config.json").write_text("{}")  # an existing draft folder: nothing is built
    cfg = sglang_config(**{"draft.enabled": "true", "draft.online": "false"})
    argv = speculative_args(cfg.draft, cfg.model.path, str(tmp_path))
    algo = contract.flags["--speculative-algorithm"]
    assert algo.choices is None or "STANDALONE" in algo.choices
    assert contract.missing_flags(argv) == []


# -- behaviour where SGLang answers or defaults differently from what the client expects -------
@pytest.mark.parametrize("version", versions())
def test_abort_survives_sglangs_empty_reply(contract):
    route = contract.route("/abort_request")
    assert [r.kind for r in route.replies][0] == "empty"  # Response(status_code=200)
    client, _ = recording_client(lambda request, body: httpx.Response(200, content=b""))
    assert isinstance(_engine(client).abort("r0"), bool)


@pytest.mark.parametrize("version", versions())
def test_update_weight_version_keeps_running_requests(contract):
    (_, _, body), = record("update_weight_version")
    defaults = {n: f.default for n, f in contract.request("UpdateWeightVersionReqInput").fields.items()
                if not f.required}
    assert {**defaults, **body}["abort_all_requests"] is False


@pytest.mark.parametrize("version", versions())
def test_client_reads_the_first_weight_version(contract):
    """"default" (and any non-integer string: the launch weights) is version 0 (miles_ray.versioning)."""
    first = sc.strict_defaults(contract)["weight_version"]
    assert first == "default"
    client, _ = recording_client(lambda request, body: httpx.Response(200, json=[generate_output(first)]))
    sample, = client.generate_samples([REQUEST], 1, SamplingParams(), None)
    assert sample.weight_version == 0 and sample.metadata["weight_versions"] == [{"version": 0, "start": 0, "end": 1}]


@pytest.mark.parametrize("version", versions())
def test_pause_without_a_mode_aborts_everything(contract):
    """SGLang 0.5.5: /pause_generation takes no body and TokenizerManager.pause_generation calls
    abort_request(abort_all=True) (tokenizer_manager.py line 1160 of the 0.5.5 wheel), so there
    pausing always aborts the running requests."""
    if "mode" in contract.requests.get("PauseGenerationReqInput", sc.RequestClass("", "", 0, {})).fields:
        pytest.skip(f"SGLang {contract.version} has PauseGenerationReqInput.mode")
    assert contract.notes["pause_aborts_all"][0] == sc.TOKENIZER_MANAGER
    assert sc.strict_defaults(contract)["pause_mode"] == "abort"


@pytest.mark.parametrize("version", versions())
def test_client_pauses_in_the_mode_partial_rollout_needs(contract):
    """Newer: ``retract`` for partial rollout (in_place would make /flush_cache fail while requests
    run), ``abort`` otherwise, stated explicitly; 0.5.5: no body (it aborts; the client re-submits)."""
    pause = contract.requests.get("PauseGenerationReqInput")
    modes = None
    if pause is not None and "mode" in pause.fields:  # the Literal of the field, as written in io_struct.py
        import zipfile

        with zipfile.ZipFile(sc.wheels()[contract.version]) as z:
            modes = z.read(pause.file).decode().splitlines()[pause.fields["mode"].line - 1]
    calls = {}
    for partial in (True, False):
        client, recorded = recording_client(version=contract.version)
        _engine(client, partial).pause()
        calls[partial] = recorded
    if modes is None:
        assert [c[:2] for c in calls[True]] == [("POST", "/pause_generation")] and not calls[True][0][2]
        return
    assert calls[True][0][2] == {"mode": "retract"} and calls[False][0][2] == {"mode": "abort"}
    assert "retract" in modes and "abort" in modes
    assert sc.strict_defaults(contract)["pause_reply_keys"] == ["message", "status"]


@pytest.mark.parametrize("version", versions())
def test_update_protocol_per_version(contract):
    """pause, (begin session), update with flush_cache=false, (end session), flush, version, continue."""
    paths = [p for _, p, _ in record("update_protocol", contract.version)]
    session = contract.route("/begin_weight_update") is not None
    want = ["/pause_generation", *(["/begin_weight_update"] if session else []), "/update_weights_from_tensor",
            *(["/end_weight_update"] if session else []), "/flush_cache", "/update_weight_version",
            "/continue_generation"]
    assert paths == want
    for method, path, body in record("update_protocol", contract.version):
        route = contract.route(path, method)
        assert route is not None and (route.body is None or contract.unknown_fields(route.body, body or {}) == [])


@pytest.mark.parametrize("version", versions())
def test_client_decodes_routed_experts(contract):
    """Needs ``--enable-return-routed-experts`` and ``return_routed_experts`` in the request; the
    detokenizer sends ``pybase64.b64encode(tensor.numpy().tobytes())`` per request
    (0.5.23 managers/detokenizer_manager.py ``_b64_encode_per_request``, tokenizer_manager.py
    ``meta_info["routed_experts"]``)."""
    if "return_routed_experts" not in contract.request("GenerateReqInput").fields:
        pytest.skip(f"SGLang {contract.version} cannot return routed experts")
    assert "--enable-return-routed-experts" in contract.flags
    ids = np.arange(3 * 2 * 2, dtype=np.int32).reshape(3, 2, 2) % 7  # prompt 3 + output 1 - 1 tokens
    trace = base64.b64encode(ids.tobytes()).decode()
    client, calls = recording_client(lambda request, body: httpx.Response(200, json=[generate_output("1", routed_experts=trace)]),
                                     contract.version)
    client.routed_topk = 2
    sample, = client.generate_samples([REQUEST], 1, SamplingParams(), None)
    from miles_ray.models.moe import decode

    assert calls[0][2]["return_routed_experts"] is True
    assert decode(sample.routed_experts).tolist() == ids.tolist()


# -- the contract reader itself ----------------------------------------------------------------
@pytest.mark.parametrize("version", versions())
def test_contract_reads_what_the_brief_names(contract):
    """Spot checks of the parse against SGLang's source, read by hand: io_struct.py request
    classes, http_server.py routes and replies, server_args.py flags and ServerArgs defaults."""
    assert contract.request("GenerateReqInput").fields["input_ids"].default is None
    assert contract.request("UpdateWeightVersionReqInput").fields["new_version"].required
    assert contract.route("/generate", "PUT").body == "GenerateReqInput"
    assert contract.route("/flush_cache", "GET") is not None
    assert {"success", "message", "new_version"} <= set(contract.route("/update_weight_version").replies[0].keys)
    assert contract.flags["--tp-size"].dest in ("tp_size", "tensor_parallel_size")
    assert contract.server_default("weight_version") == "default"
    assert sc.read_wheel(sc.wheels()[contract.version]) == sc.parse_wheel(sc.wheels()[contract.version])  # JSON cache


def test_missing_wheels_name_the_fetch_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_sglang_wheels.sh"):
        sc.load("0.0.1", tmp_path)
