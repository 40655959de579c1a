"""Our engine server in strict SGLang mode, over real HTTP, bound beyond loopback with a token:
SGLang's request rules and response shapes, its weight formats (update_weights_from_tensor per TP
rank, bucket by bucket; init_weights_update_group + update_weights_from_distributed over gloo),
and the closed HTTP surface (no pickle, token, size limit, /health during a slow load)."""
import base64
import concurrent.futures as cf
import json
import os
import pickle
import signal
import threading
import time

import httpx
import pytest
import torch

from miles_ray.rollout.sglang.client import EngineClient
from miles_ray.rollout.http.engine import HttpEngine, free_port
from miles_ray.rollout.http.guard import new_token
from miles_ray.rollout.http.launch import launch_server
from miles_ray.weights import to_buckets
from tests.helpers.engine_checks import HOST, assert_serves, perturbed_trainer, tokenizer_of


TP = 2


@pytest.fixture(scope="module")
def strict(tiny_dir, tmp_path_factory):
    token = new_token()
    log = tmp_path_factory.mktemp("strict") / "server.log"
    extra = ["--strict-sglang", "--tp-size", str(TP), "--weight-load-delay-s", "2", "--max-request-mb", "4",
             "--group-timeout-s", "5"]
    proc, client = launch_server("native", tiny_dir, free_port(HOST), HOST, extra, log_path=str(log), token=token)
    client.begin_weight_update()  # the newest SGLang loads weights only inside a session (left open here)
    yield {"client": client, "token": token, "tiny_dir": tiny_dir, "log": log}
    os.killpg(proc.pid, signal.SIGKILL)


class _WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_beyond_loopback_token_and_pickle_refused(strict, tmp_path):
    """A token-less request gets 401; a pickle whose __reduce__ would create a file gets 400 from
    the allow-list decoder and the file is never created; bodies over the limit get 413."""
    url, anon = strict["client"].url, httpx.Client(timeout=30)
    target = tmp_path / "created-by-pickle"
    evil = base64.b64encode(pickle.dumps([("model.norm.weight", _WritesFile(str(target)))])).decode()
    body = {"serialized_named_tensors": [evil] * TP}
    r = anon.get(f"{url}/health")
    assert r.status_code == 200 and r.content == b""  # /health is open, and empty like SGLang's
    for path in ("/generate", "/update_weights_from_tensor", "/init_weights_update_group", "/abort_request"):
        assert anon.post(f"{url}{path}", json=body).status_code == 401, path
    wrong = httpx.post(f"{url}/generate", json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.text
    r = strict["client"].http.post(f"{url}/update_weights_from_tensor", json=body)
    assert r.status_code == 400 and "refused global" in r.text and "open" in r.text
    assert not target.exists()
    huge = strict["client"].http.post(f"{url}/generate", content=b"x" * (5 << 20))
    assert huge.status_code == 413
    assert strict["client"].health()["status"] == 200


def test_strict_request_rules_and_response_shapes(strict):
    c = strict["client"]
    one = c.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3, "temperature": 0, "top_k": -1,
                                                           "ignore_eos": True})
    meta = one["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 3} and meta["weight_version"] == "default"
    assert [len(t) for t in meta["output_token_logprobs"]] == [3, 3, 3] and meta["output_token_logprobs"][0][2] is None
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 3}]  # 0.5.23's spans
    both = c.generate(input_ids=[[5, 6], [7, 8, 9]], sampling_params={"max_new_tokens": 2, "n": 2}, rid=["a", "b"])
    assert [o["meta_info"]["id"] for o in both] == ["a_0", "a_1", "b_0", "b_1"]  # prompt-major, n per prompt
    post = lambda body: c.http.post(f"{c.url}/generate", json=body)  # noqa: E731
    cases = [({"input_ids": [5], "sampling_params": {"top_k": 0}}, 400, "top_k must be -1"),
             ({"input_ids": [5], "sampling_params": {"frobnicate": 1}}, 400, "frobnicate"),
             ({"input_ids": [5], "sampling_params": {"top_p": 0}}, 400, "top_p"),
             ({"input_ids": [5], "sampling_params": {"max_new_tokens": 600}}, 400, "context length"),
             ({"input_ids": [5], "text": "x"}, 400, "exactly one"),
             ({"input_ids": [[5], [6]], "rid": ["only-one"]}, 400, "mismatch"),
             ({"input_ids": [5], "stream": True}, 400, "stream"),
             ({"input_ids": [5], "shiny": 1}, 400, "shiny")]
    for body, status, words in cases:
        r = post(body)
        assert r.status_code == status and words in r.text, (body, r.text)
    assert c.http.post(f"{c.url}/generate", content=b"{nope").status_code == 400
    # the engine is paused so the first "dup" is still in flight (not finished) when the second comes
    long = threading.Thread(target=lambda: post({"input_ids": [5], "rid": "dup", "sampling_params": {
        "max_new_tokens": 400, "ignore_eos": True}}))
    long.start()
    time.sleep(0.3)
    assert c.http.post(f"{c.url}/pause_generation", json={"mode": "in_place"}).status_code == 200
    r = post({"input_ids": [5], "rid": "dup"})
    assert r.status_code == 409 and "dup" in r.text  # the running request is untouched
    assert c.abort("dup") is True
    assert c.http.post(f"{c.url}/continue_generation", json={}).status_code == 200
    long.join(30)
    assert not long.is_alive()
    assert c.health()["status"] == 200


def test_weight_formats_tensor_per_tp_rank_and_distributed(strict):
    """SGLang's two update paths against the strict server: named-tensor handles (one entry per TP
    rank, one request per bucket) and a gloo group the server joins as rank 1."""
    from miles_ray.weights import BroadcastChannel

    c = strict["client"]
    engine = HttpEngine("native", c, tokenizer_of(strict["tiny_dir"]), fmt="sglang_tensor", tp_size=TP)
    trainer = perturbed_trainer(strict["tiny_dir"], 1)
    buckets = to_buckets(trainer.get_weights(), 7, bucket_bytes=20000)
    assert len(buckets) > 3
    assert engine.load_buckets(buckets, 7) == 7 and c.weight_version() == 7
    assert_serves(engine, trainer, 7)

    trainer = perturbed_trainer(strict["tiny_dir"], 2)
    buckets = to_buckets(trainer.get_weights(), 8, bucket_bytes=20000)
    port = free_port()
    with cf.ThreadPoolExecutor(2) as pool:
        root = pool.submit(BroadcastChannel, 0, 2, "127.0.0.1", port, "gloo", 30)
        assert engine.open_broadcast("127.0.0.1", port, 1, 2, "nccl")  # CPU server: gloo
        channel = root.result(30)
        send = pool.submit(channel.send_tensors, buckets)
        engine.receive_broadcast([b.meta() for b in buckets])
        send.result(30)
    assert engine.finish_load(8) == 8 and c.weight_version() == 8
    assert_serves(engine, trainer, 8)


def test_health_waits_behind_a_slow_load(strict):
    """SGLang's /health runs a generation probe (http_server.py health_generate) that waits behind
    the model-update writer lock: during a 2 s load it answers 200 once the load is done (the
    router's health timeout tolerates it, miles_ray/rollout/http/router.py); the server's event
    loop stays free meanwhile (get_server_info answers at once)."""
    c = strict["client"]
    with cf.ThreadPoolExecutor(1) as pool:
        t0 = time.time()
        load = pool.submit(c.update_weights_from_disk, strict["tiny_dir"], 9)
        time.sleep(0.5)
        t = time.time()
        assert c.server_info()["stand_in"]["sglang_version"] and time.time() - t < 1.0
        assert c.health()["status"] == 200 and time.time() - t0 >= 2  # answered after the 2 s load
        assert load.result(30)["success"]


# -- property-based fuzzing of every endpoint ------------------------------------------------------
def _fuzz_strategies():
    from hypothesis import strategies as st

    from miles_ray.rollout.sglang.api import GENERATE_FIELDS, SAMPLING_FIELDS

    scalar = (st.none() | st.booleans() | st.integers(-(2 ** 66), 2 ** 66) | st.integers(-3, 8)
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    anything = st.recursive(scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.text(max_size=8), kids, max_size=3), max_leaves=8)
    ids = st.lists(st.integers(-2, 200), min_size=0, max_size=5)
    sampling = st.fixed_dictionaries({}, optional={
        **{k: anything for k in SAMPLING_FIELDS}, "max_new_tokens": st.integers(-2, 6) | anything,
        "top_k": st.integers(-2, 3), "temperature": st.floats(-1, 3) | st.none(), "n": st.integers(-1, 3)})
    generate = st.fixed_dictionaries({}, optional={
        **{k: anything for k in GENERATE_FIELDS}, "input_ids": ids | st.lists(ids, max_size=3) | anything,
        "text": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3), "sampling_params": sampling,
        "rid": st.text(max_size=6) | st.lists(st.text(max_size=4), max_size=3)})

    def fields(*names, **special):
        return st.fixed_dictionaries({}, optional={**{n: anything for n in names}, **special})

    b64 = st.builds(lambda b: base64.b64encode(b).decode(), st.binary(max_size=64))
    bodies = {
        "/generate": generate,
        "/abort_request": fields("rid", "abort_all"),
        "/flush_cache": fields(), "/continue_generation": fields(), "/pause_generation": fields("mode"),
        "/release_memory_occupation": fields("tags"), "/resume_memory_occupation": fields("tags"),
        "/update_weights_from_tensor": fields("flush_cache", "weight_version", "buckets",
                                              serialized_named_tensors=st.lists(b64 | anything, max_size=3),
                                              load_format=st.sampled_from([None, "flattened_bucket"]) | anything),
        "/update_weight_version": fields("new_version", "abort_all_requests", new_version=st.integers(0, 9).map(str)),
        "/init_weights_update_group": fields("master_address", "master_port", "rank_offset", "world_size",
                                             "group_name", "backend"),
        "/destroy_weights_update_group": fields("group_name"),
        "/update_weights_from_distributed": fields("names", "dtypes", "shapes", "group_name", "weight_version"),
        "/update_weights_from_disk": fields("model_path", "load_format", "weight_version"),
        "/begin_weight_update": fields("selector"), "/end_weight_update": fields(),
    }
    raw = st.binary(max_size=64) | st.just(b"[]") | st.just(b"null") | st.just(b'"x"')
    posts = st.sampled_from(sorted(bodies)).flatmap(
        lambda p: st.tuples(st.just("POST"), st.just(p), bodies[p].map(lambda b: ("json", b)) | raw.map(
            lambda b: ("raw", b))))
    gets = st.tuples(st.just("GET"), st.sampled_from(["/health", "/health_generate", "/get_model_info",
                                                      "/get_server_info"]), st.just(("json", None)))
    return posts | gets


def _restore(c, state_dict) -> None:
    """Back to serving after an example that paused, released or half-loaded the engine."""
    c.resume()
    c.http.post(f"{c.url}/begin_weight_update", json={})  # the session stays open (400 when it already is)
    if c.health()["status"] != 200:
        c.resume_memory()
        c.update_weights_from_tensor(list(state_dict.items()), TP)
        c.update_weight_version(0)


def test_fuzz_every_endpoint(strict):
    """Random and near-valid bodies on every endpoint: never a 5xx, never a hang (20 s), a 4xx
    says what is wrong, and the server serves afterwards."""
    from hypothesis import HealthCheck, given, settings

    from miles_ray.models import load_model

    c, count, statuses = strict["client"], [0], {}
    state_dict = load_model(strict["tiny_dir"]).state_dict()
    fuzz = httpx.Client(timeout=20, headers={"Authorization": f"Bearer {strict['token']}"})

    @settings(max_examples=800, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_fuzz_strategies())
    def run(case):
        method, path, (kind, body) = case
        count[0] += 1
        data = json.dumps(body).encode() if kind == "json" else body  # NaN / Infinity included
        kwargs = {"content": data, "headers": {"content-type": "application/json"}} if method == "POST" else {}
        r = fuzz.request(method, f"{c.url}{path}", **kwargs)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
        if 400 <= r.status_code < 500:
            assert r.json()["error"]["message"], (path, r.text)
        _restore(c, state_dict)

    t0 = time.time()
    run()
    print(f"\nFUZZ cases={count[0]} statuses={dict(sorted(statuses.items()))} seconds={time.time() - t0:.1f}")
    out = c.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 2})
    assert len(out["output_ids"]) <= 2 and c.health()["status"] == 200


def test_shm_export_adopts_parameters_one_copy(tiny_dir):
    """shm: after the first export the trainer's parameters live in the shared buckets; the next
    export copies nothing (the buckets are the parameters) and still carries the new weights."""
    from miles_ray.weights.buckets import iter_tensors

    trainer = perturbed_trainer(tiny_dir, 3)
    first = list(trainer.iter_export(trainer.engine_state(), 1, 20000))
    for b in first:
        b.flat.share_memory_()
    assert trainer.adopt_export_buffers() > 0
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.mul_(1.5)  # a training step writes straight into the shared buckets
    second = list(trainer.iter_export(trainer.engine_state(), 2, 20000))
    assert [b.flat.data_ptr() for b in second] == [b.flat.data_ptr() for b in first]
    live = trainer.engine_state()
    for b in second:
        for name, t in iter_tensors(b):
            assert torch.equal(t, live[name]), name
