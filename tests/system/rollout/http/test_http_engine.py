"""Engine servers and the router over real HTTP on 127.0.0.1 (subprocesses, the native backend
through the same launch code that starts SGLang on GPUs)."""
import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from miles_ray.rollout.sglang.client import EngineClient
from miles_ray.rollout.http.launch import launch_server, server_command


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(model_cache, tiny_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    servers = {}
    for i in range(2):
        port = _port()
        proc, client = launch_server("native", tiny_dir, port, extra=["--seed", str(i)], log_path=str(logs / f"e{i}.log"))
        servers[port] = proc
    rport = _port()
    urls = [f"http://127.0.0.1:{p}" for p in servers]
    router = subprocess.Popen([sys.executable, "-m", "miles_ray.rollout.http.router", "--worker-urls", *urls, "--port",
                               str(rport), "--health-interval", "0.5"], start_new_session=True)
    rclient = EngineClient(f"http://127.0.0.1:{rport}")
    rclient.wait_healthy(60, router)
    state = {"servers": servers, "router": router, "client": rclient, "urls": urls, "tiny_dir": tiny_dir, "logs": logs}
    yield state
    for proc in [router, *state["servers"].values()]:
        os.killpg(proc.pid, signal.SIGKILL)


def test_sglang_and_native_share_the_launch_path():
    assert server_command("sglang", "/m", 30000)[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert server_command("native", "/m", 1)[-4:] == ["--host", "127.0.0.1", "--port", "1"]
    with pytest.raises(ValueError):
        server_command("vllm", "/m", 1)


def test_greedy_over_http_matches_transformers(cluster, tokenizer):
    from miles_ray.models import load_model

    model = load_model(cluster["tiny_dir"])
    direct = EngineClient(cluster["urls"][0])
    ids = tokenizer("What is 3+4?", add_special_tokens=False)["input_ids"]
    out = direct.generate(input_ids=ids, sampling_params={"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    ref = model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out["output_ids"] == ref[0, len(ids):].tolist()
    assert len(out["meta_info"]["output_token_logprobs"]) == 6 and out["meta_info"]["finish_reason"]["type"] == "length"


def test_concurrent_requests_balance_and_n_and_stop(cluster):
    client = cluster["client"]
    body = {"max_new_tokens": 8, "temperature": 1.0}
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: EngineClient(client.url).generate(text=f"What is {i}+1?", sampling_params=body),
                             range(16)))
    assert all(1 <= len(o["output_ids"]) <= 8 for o in outs)
    served = [w["served"] for w in client.http.get(f"{client.url}/list_workers").json().values()]
    assert all(s > 0 for s in served)  # both engines took traffic
    many = client.generate(text="What is 2+2?", sampling_params={**body, "n": 4})
    assert isinstance(many, list) and len(many) == 4
    batch = client.generate(input_ids=[[5, 6, 7], [8, 9]], sampling_params={"max_new_tokens": 3, "temperature": 0,
                                                                          "ignore_eos": True, "stop": ["\n"]})
    assert len(batch) == 2 and all(len(b["output_ids"]) <= 3 for b in batch)


def test_abort_a_long_request(cluster):
    direct = EngineClient(cluster["urls"][1])
    result = {}
    t = threading.Thread(target=lambda: result.update(out=direct.generate(
        input_ids=[5, 6, 7], rid="long-1", sampling_params={"max_new_tokens": 100000, "ignore_eos": True})))
    t.start()
    time.sleep(1.0)
    assert EngineClient(cluster["urls"][1]).abort("long-1") is True
    t.join(30)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(result["out"]["output_ids"]) < 100000


def test_weight_update_then_logprobs_match_trainer(cluster, model_cache):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer
    from miles_ray.weights import to_buckets

    trainer = PolicyTrainer(cluster["tiny_dir"], TrainConfig(), AlgorithmConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    direct = EngineClient(cluster["urls"][0])
    for bucket in to_buckets(trainer.get_weights(), 9, bucket_bytes=20000):  # bucket by bucket, no pickle
        direct.update_weights_raw([bucket])
    assert direct.health()["state"] == "stale"  # partial load: not served until the version is set
    assert direct.update_weight_version(9) == 9
    from miles_ray.rollout import SamplingParams

    reqs = [{"prompt": "What is 1+2?", "label": "3", "prompt_index": 0, "group_id": 0}]
    samples = direct.generate_samples(reqs, 3, SamplingParams(6), trainer.tokenizer)
    assert all(s.weight_version == 9 for s in samples)
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        assert lp == pytest.approx(s.response_logprobs, abs=1e-4)


def test_engine_restart_while_router_keeps_serving(cluster):
    client = cluster["client"]
    port, proc = list(cluster["servers"].items())[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    outs = [client.generate(text="What is 5+5?", sampling_params={"max_new_tokens": 4}) for _ in range(6)]
    assert all(o["output_ids"] for o in outs)  # served by the surviving engine
    workers = client.http.get(f"{client.url}/list_workers").json()
    assert workers[f"http://127.0.0.1:{port}"]["healthy"] is False
    new_proc, _ = launch_server("native", cluster["tiny_dir"], port, log_path=str(cluster["logs"] / "restart.log"))
    cluster["servers"][port] = new_proc
    deadline = time.time() + 30
    while time.time() < deadline and not client.http.get(f"{client.url}/list_workers").json()[
            f"http://127.0.0.1:{port}"]["healthy"]:
        time.sleep(0.3)
    before = client.http.get(f"{client.url}/list_workers").json()[f"http://127.0.0.1:{port}"]["served"]
    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: EngineClient(client.url).generate(text="hi", sampling_params={"max_new_tokens": 8}),
                      range(8)))
    after = client.http.get(f"{client.url}/list_workers").json()[f"http://127.0.0.1:{port}"]["served"]
    assert after > before  # the restarted engine serves again


def test_release_resume_memory_and_health(cluster):
    direct = EngineClient(cluster["urls"][1])
    assert direct.release_memory()["state"] == "released"
    assert direct.health()["status"] == 503
    assert direct.resume_memory()["state"] == "stale"
    with pytest.raises(RuntimeError, match="503"):
        direct.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 2})
    from miles_ray.models import load_model
    from miles_ray.weights import to_buckets

    sd = load_model(cluster["tiny_dir"]).state_dict()
    direct.update_weights_raw(to_buckets(sd, 11), 11)
    assert direct.health() == {"status": 200, "state": "ready", "weight_version": 11}


def test_lenient_server_never_unpickles(cluster, tmp_path):
    """Our own format carries no pickle: SGLang's pickled payload is refused with a 400 naming why."""
    from miles_ray.weights.sglang_tensor import serialize_named_tensors

    direct = EngineClient(cluster["urls"][1])
    body = {"serialized_named_tensors": serialize_named_tensors([("x", torch.zeros(2))])}
    r = direct.http.post(f"{direct.url}/update_weights_from_tensor", json=body)
    assert r.status_code == 400 and "never unpickles" in r.text


def test_stop_string_over_http(cluster):
    direct = EngineClient(cluster["urls"][0])
    sp = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    full = direct.generate(input_ids=[5, 6, 7, 8], sampling_params=sp)
    stop = full["text"][2:4]
    assert stop
    cut = direct.generate(input_ids=[5, 6, 7, 8], sampling_params={**sp, "stop": stop})
    assert cut["meta_info"]["finish_reason"]["type"] == "stop"
    assert stop not in cut["text"] and full["text"].startswith(cut["text"])
    assert len(cut["output_ids"]) < len(full["output_ids"])
