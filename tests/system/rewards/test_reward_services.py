"""Reward services on Ray Serve (real local Ray, real Serve HTTP proxy, real replicas): the
reward-model deployment batches requests and scales from 1 to 2 replicas under load, scores are
deterministic, RewardWorkers score through it; a service that is down gives the failure score
with a counted reason; the LLM judge asks an OpenAI-compatible endpoint."""
import concurrent.futures
import socket
import threading
import time

import httpx
import pytest
import ray

from actors import RewardWorker
from helpers.openai_standin import StandIn
from jobs.cluster import reward_options
from jobs.reward_services import start_reward_services, stop_reward_services
from miles_ray.config import load_config
from miles_ray.config_sections import ConfigError
from miles_ray.rewards import RewardRunner
from miles_ray.rewards.services import REWARD_MODEL_APP, check_template, judge_messages, judge_verdict
from miles_ray.sample import Sample

TEXTS = [("What is 1+2?", "3"), ("What is 12+30? Please reply with a single integer.", "The answer is 42"),
         ("hello", "world, this is a longer response than the others")]
KEY = "reward-key"  # the service requires it (as beyond loopback); workers get it from reward_options
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cfg(tmp_path, model_cache, *extra):
    return load_config(None, [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}",
                              "reward.fn=reward_model", "reward.model_path=tiny", f"serve.port={free_port()}",
                              "reward.failure_score=-1.0", "reward.concurrency=8",
                              "reward.service.min_replicas=1", "reward.service.max_replicas=2",
                              "reward.service.target_ongoing_requests=2", "reward.service.upscale_delay_s=0.5",
                              "reward.service.downscale_delay_s=120", "reward.service.metrics_interval_s=0.5",
                              "reward.service.look_back_period_s=2", "reward.service.max_batch_size=8",
                              "reward.service.batch_wait_timeout_s=0.05", "reward.service.max_ongoing_requests=16",
                              f"serve.api_key={KEY}", *extra])


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory, model_cache):
    """The reward-model service, and two RewardWorkers (one with a URL nothing listens on): they
    start while Serve starts (each process spends seconds importing torch)."""
    cfg = make_cfg(tmp_path_factory.mktemp("rsvc"), model_cache)
    r, options = cfg.reward, reward_options(cfg)
    dead_url = f"http://127.0.0.1:{free_port()}"
    workers = {"live": RewardWorker.remote(r.fn, r.timeout_s, r.failure_score, r.isolate, options),
               "down": RewardWorker.remote(r.fn, 5.0, -1.0, True, {**options, "serve_url": dead_url})}
    started = start_reward_services(cfg)
    yield cfg, started, workers
    for w in workers.values():
        ray.kill(w)
    stop_reward_services(started)
    from ray import serve

    serve.shutdown()


def replica_states() -> dict:
    from ray import serve

    app = serve.status().applications[REWARD_MODEL_APP]
    return {str(getattr(k, "value", k)): n for k, n in app.deployments["RewardModel"].replica_states.items()}


def test_reward_model_batches_scales_to_two_replicas_and_is_deterministic(served):
    cfg, started, _ = served
    assert replica_states() == {"RUNNING": 1}
    url, replies, seen, done = started["url"], [], [], threading.Event()
    t0 = time.time()
    stop_at = t0 + 90  # a new replica imports torch: seconds on a quiet machine, 20-40 s on a loaded one

    def client(i: int) -> None:
        with httpx.Client(timeout=30, trust_env=False, headers=AUTH) as http:
            while not done.is_set() and time.time() < stop_at:
                prompt, response = TEXTS[(i + len(replies)) % len(TEXTS)]
                reply = http.post(url, json={"prompt": prompt, "response": response})
                assert reply.status_code == 200, reply.text
                replies.append((prompt, response, reply.json()))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:  # 12 clients: far above 2 ongoing per replica
        futures = [pool.submit(client, i) for i in range(12)]
        while time.time() < stop_at and not any(f.done() for f in futures):
            seen.append(replica_states())
            if len(seen) > 1 and seen[-1] != seen[-2]:
                print(f"{time.time() - t0:.1f}s: {seen[-1]}")
            if seen[-1].get("RUNNING", 0) == 2 and len({r[2]["replica"] for r in replies[-50:]}) == 2:
                break
            time.sleep(0.25)
        done.set()
        for f in futures:
            f.result()
    assert replica_states() == {"RUNNING": 2}, seen[-5:]
    assert seen[0]["RUNNING"] == 1 and seen[-1] == {"RUNNING": 2}
    print(f"scaled 1 -> 2 replicas after {time.time() - t0:.1f}s of load; {len(replies)} requests, "
          f"batch sizes max {max(r[2]['batch_size'] for r in replies)}")
    sizes = [r[2]["batch_size"] for r in replies]
    assert max(sizes) > 1 and max(sizes) <= cfg.reward.service.max_batch_size, sizes
    assert len({r[2]["replica"] for r in replies}) == 2  # both replicas answered
    for text in TEXTS:
        scores = [r[2]["score"] for r in replies if r[:2] == text]
        assert len(scores) > 1 and max(scores) - min(scores) < 1e-5, (text, min(scores), max(scores))
    means = sorted(next(r[2]["score"] for r in replies if r[:2] == text) for text in TEXTS)
    assert min(b - a for a, b in zip(means, means[1:])) > 1e-4  # different texts, different scores
    assert httpx.post(url, json={"prompt": 1}, headers=AUTH, trust_env=False).status_code == 400
    assert httpx.post(url, json={"prompt": "a", "response": "b"}, trust_env=False).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(url, json={"prompt": "a", "response": "b"}, headers=wrong, trust_env=False).status_code == 401


def _samples(pairs, labels=None) -> list:
    labels = labels or [""] * len(pairs)
    return [Sample(i, 0, p, lbl, [], response_text=r) for i, ((p, r), lbl) in enumerate(zip(pairs, labels))]


def test_reward_worker_scores_through_the_service(served):
    cfg, started, workers = served
    direct = {t: httpx.post(started["url"], json={"prompt": t[0], "response": t[1]}, headers=AUTH,
                            trust_env=False).json()["score"] for t in TEXTS}
    samples, stats = ray.get(workers["live"].score.remote(_samples(TEXTS * 4)))
    assert stats["reasons"] == {} and stats["scored"] == 12
    for s in samples:
        assert abs(s.reward - direct[(s.prompt, s.response_text)]) < 1e-5


def test_service_down_gives_failure_score_with_reason_and_worker_survives(served):
    samples, stats = ray.get(served[2]["down"].score.remote(_samples(TEXTS)))  # nothing listens on its URL
    assert [s.reward for s in samples] == [-1.0] * 3
    assert stats["reasons"] == {"service_error": 3} and stats["errors"] == 0
    assert ray.get(served[2]["down"].ready.remote())


def test_llm_judge_against_a_stand_in_openai_endpoint(served):
    # Stand-in, not the run's real OpenAI app: that app ("openai" at "/v1" on the same Serve proxy)
    # is built by another change; the lead tests llm_judge against it after merge. The judge runs
    # here through RewardRunner, the code a RewardWorker runs (the worker path is tested above).
    cfg = served[0]
    standin = StandIn(api_key="judge-key")
    try:
        options = {**reward_options(cfg), "fn": "llm_judge", "serve_url": standin.url, "serve_api_key": "judge-key",
                   "model_name": "policy", "concurrency": 4}
        options["service"] = {**(options.get("service") or {}), "judge_allow_policy": True}  # the stand-in plays the policy
        runner = RewardRunner("llm_judge", 5.0, -1.0, True, options)
        pairs = [("What is 1+2?", "3", "3"), ("What is 2+2?", "5", "4"), ("What is 3+3?", "?", "6")] * 4
        scores, stats = runner.score(pairs)
        assert scores == [1.0, 0.0, -1.0] * 4
        assert dict(stats.reasons) == {"judge_unparsed": 4}
        assert 1 < standin.max_in_flight <= 4  # asynchronous, bounded by reward.concurrency
        shapes = {(q["model"], tuple(m["role"] for m in q["messages"]), q["max_tokens"]) for q in standin.requests}
        assert shapes == {("policy", ("system", "user"), 8)}
        asked = sorted({q["messages"][-1]["content"] for q in standin.requests})  # requests arrive in any order
        template = cfg.reward.judge_template
        assert asked == sorted(judge_messages(template, p, r, lbl)[-1]["content"] for p, r, lbl in pairs[:3])
        wrong_key = RewardRunner("llm_judge", 5.0, -1.0, True, {**options, "serve_api_key": "nope"})
        scores, stats = wrong_key.score(pairs[:2])
        assert scores == [-1.0, -1.0] and dict(stats.reasons) == {"service_error": 2}  # HTTP 401
    finally:
        standin.close()


def test_judge_parsing_and_config_checks(tmp_path, model_cache):
    assert judge_verdict("Yes, it is correct.", -1.0).score == 1.0
    assert judge_verdict("  NO.", -1.0).score == 0.0
    assert judge_verdict("The answer is yes", -1.0).reason == "judge_unparsed"
    assert judge_verdict(None, -1.0).reason == "judge_unparsed"
    with pytest.raises(ValueError, match="judge_template"):
        check_template("Q: {question}")
    from jobs.reward_services import check_reward_services

    with pytest.raises(ConfigError, match="serve.enabled"):
        check_reward_services(make_cfg(tmp_path, model_cache, "reward.fn=llm_judge"))
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        check_reward_services(make_cfg(tmp_path, model_cache, "reward.service.max_ongoing_requests=4"))
    with pytest.raises(ConfigError, match="serve.api_key"):
        check_reward_services(make_cfg(tmp_path, model_cache, "serve.host=0.0.0.0", "serve.api_key=null"))
