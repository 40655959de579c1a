"""The OpenAI-compatible endpoint (docs/openai_api.md).

(a) protocol: validation errors name the field; tool calls parsed into ``tool_calls``; SSE chunks
    whose deltas add up to the non-streamed body; stop sequences cut at the token that completes
    them, token ids and log-probs kept aligned;
(b) the same service over real engines: in this process behind uvicorn (hf and native engines),
    and as the Ray Serve application over a real ``RolloutEngineActor``, driven by the ``openai``
    package (n, logprobs, stop, streaming, bearer key);
(c) done-when: a running training job (``python -m jobs.train``, serve.enabled) whose SFT warm-up
    taught the policy a Hermes tool call; an external ``openai`` client completes a tool-calling
    conversation against the job's endpoint, then the job is stopped.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import ray

from miles_ray.openai_api.app import EngineBackend, OpenAIService, create_app
from miles_ray.openai_api.protocol import RequestError, ServeSettings, parse_chat, parse_completion
from miles_ray.openai_api.responses import chat_chunks, chat_response, finish, sse, text_pieces
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample
from tests.helpers.tool_sft import TOOLS, write_dataset

from helpers.paths import ROOT  # noqa: E402
MODEL = "miles-ray"
USER = [{"role": "user", "content": "What is 2+3?"}]


def _chat(**extra) -> dict:
    return {"model": MODEL, "messages": USER, **extra}


# -- (a) protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param, status", [
    ({"messages": USER}, "model", 400),
    (_chat(model="gpt-4o"), "model", 404),
    ({"model": MODEL, "messages": []}, "messages", 400),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", 400),
    (_chat(n=0), "n", 400), (_chat(n=17), "n", 400), (_chat(n="2"), "n", 400),
    (_chat(temperature=3), "temperature", 400), (_chat(top_p=0), "top_p", 400),
    (_chat(max_tokens=0), "max_tokens", 400), (_chat(max_completion_tokens=1.5), "max_completion_tokens", 400),
    (_chat(stop=["a", "b", "c", "d", "e"]), "stop", 400), (_chat(stop=[""]), "stop", 400),
    (_chat(logprobs="yes"), "logprobs", 400), (_chat(top_logprobs=3, logprobs=True), "top_logprobs", 400),
    (_chat(presence_penalty=0.5), "presence_penalty", 400), (_chat(logit_bias={"1": 5}), "logit_bias", 400),
    (_chat(tools=[{"type": "function"}]), "tools", 400), (_chat(tools={"a": 1}), "tools", 400),
    (_chat(tools=TOOLS, tool_choice="required"), "tool_choice", 400),
    (_chat(stream_options={"include_usage": True}), "stream_options", 400),
    (_chat(stop_token_ids=[10 ** 9]), "stop_token_ids", 400),
])
def test_chat_validation_errors_name_the_field(tokenizer, body, param, status):
    with pytest.raises(RequestError) as err:
        parse_chat(body, tokenizer, ServeSettings(model_name=MODEL))
    assert (err.value.param, err.value.status) == (param, status)
    error = err.value.body()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param.split("[")[0] in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "prompt"), ({"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ({"model": MODEL, "prompt": [10 ** 9]}, "prompt"), ({"model": MODEL, "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": MODEL, "prompt": ["a", "b", "c"], "n": 6}, "n"), ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
])
def test_completion_validation_errors_name_the_field(tokenizer, body, param):
    with pytest.raises(RequestError) as err:
        parse_completion(body, tokenizer, ServeSettings(model_name=MODEL))
    assert err.value.param == param


def test_chat_request_renders_template_with_tools_and_maps_sampling(tokenizer):
    req = parse_chat(_chat(tools=TOOLS, n=3, max_tokens=7, temperature=0, stop="\n\n", top_k=-1, logprobs=True),
                     tokenizer, ServeSettings(model_name=MODEL))
    text = tokenizer.decode(req.prompts[0])
    assert "<tools>" in text and '"calculator"' in text and text.endswith("<|im_start|>assistant\n")
    assert (req.n, req.parse_tools, req.logprobs) == (3, True, True)
    p = req.params
    assert (p.max_new_tokens, p.temperature, p.top_k, p.stop) == (7, 0.0, 0, ["\n\n"])
    assert parse_completion({"model": MODEL, "prompt": [5, 6, 7]}, tokenizer, ServeSettings(model_name=MODEL)).prompts == [[5, 6, 7]]


def _sample(tokenizer, text: str, reason: str = "stop", eos: bool = True) -> Sample:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    return Sample(0, 0, "", "", [1, 2, 3], response_ids=ids, response_logprobs=[-0.5 - i for i in range(len(ids))],
                  response_text=tokenizer.decode(ids, skip_special_tokens=True), finish_reason=reason, weight_version=4)


def test_tool_calls_parsed_and_sse_deltas_add_up(tokenizer):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
    req = parse_chat(_chat(tools=TOOLS, n=2, logprobs=True, stream=True, stream_options={"include_usage": True}),
                     tokenizer, ServeSettings(model_name=MODEL))
    samples = [_sample(tokenizer, call), _sample(tokenizer, "plain héllo 😀 text", "length", eos=False)]
    body = chat_response("chatcmpl-1", MODEL, req, samples, tokenizer)
    tool, plain = body["choices"]
    assert tool["finish_reason"] == "tool_calls" and tool["message"]["content"] is None
    fn = tool["message"]["tool_calls"][0]["function"]
    assert fn["name"] == "calculator" and json.loads(fn["arguments"]) == {"expression": "12*34"}
    assert plain["message"] == {"role": "assistant", "content": "plain héllo 😀 text"} and plain["finish_reason"] == "length"
    for c, s in zip(body["choices"], samples):  # exact ids, one log-prob entry per id
        assert c["token_ids"] == s.response_ids and c["weight_version"] == 4
        assert [e["logprob"] for e in c["logprobs"]["content"]] == s.response_logprobs
    assert body["prompt_token_ids"] == req.prompts[0]
    assert body["usage"] == {"prompt_tokens": len(req.prompts[0]), "completion_tokens": sum(len(s.response_ids) for s in samples),
                             "total_tokens": len(req.prompts[0]) + sum(len(s.response_ids) for s in samples)}

    events = list(sse(chat_chunks("chatcmpl-1", MODEL, req, samples, tokenizer)))
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events) and events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and chunks[0]["prompt_token_ids"] == req.prompts[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    for i, full in enumerate(body["choices"]):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == full["finish_reason"]
        assert sum((c["token_ids"] for c in mine), []) == full["token_ids"]
        content = "".join(c["delta"].get("content") or "" for c in mine)
        assert content == (full["message"]["content"] or "")
        calls = [t for c in mine for t in c["delta"].get("tool_calls") or []]
        assert [t["function"] for t in calls] == [t["function"] for t in full["message"].get("tool_calls", [])]


def test_stop_string_cuts_at_the_completing_token(tokenizer):
    s = _sample(tokenizer, "hello world what is 12", reason="length", eos=False)
    cut = finish(s, SamplingParams(stop=["wha"]), tokenizer)
    assert cut.response_text == "hello world " and cut.finish_reason == "stop"
    n = len(cut.response_ids)
    assert cut.response_ids == s.response_ids[:n] and cut.response_logprobs == s.response_logprobs[:n]
    assert "wha" in tokenizer.decode(cut.response_ids) and "wha" not in tokenizer.decode(cut.response_ids[:-1])
    by_id = finish(s, SamplingParams(stop_token_ids=[s.response_ids[2]]), tokenizer)
    assert by_id.response_ids == s.response_ids[:3] and by_id.finish_reason == "stop"
    assert finish(s, SamplingParams(stop=["zzz"]), tokenizer) is s  # nothing to cut: unchanged
    assert "".join(text_pieces(cut.response_ids, cut.response_text, tokenizer)) == cut.response_text


# -- (b) the service over real engines --------------------------------------------------------------
class _Uvicorn:
    """The FastAPI app of :func:`create_app` on a real socket, in a thread."""

    def __init__(self, app):
        import uvicorn

        from jobs.cluster import free_port

        self.port = free_port("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_in_process_app_over_a_real_engine(model_cache, tokenizer, backend):
    import httpx

    from miles_ray.config import load_config
    from miles_ray.rollout.in_process import InProcessEngine

    cfg = load_config(None, [f"model.tiny_cache_dir={model_cache}", f"rollout.backend={backend}"])
    engine = InProcessEngine.from_config(cfg, 0)
    service = OpenAIService(EngineBackend(engine, tokenizer), ServeSettings(model_name=MODEL, api_key="sk-test"))
    try:
        with _Uvicorn(create_app(service)) as url:
            assert httpx.get(f"{url}/models").status_code == 401
            client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
            assert [m.id for m in client.models.list()] == [MODEL]
            ids = tokenizer("What is 2+3? Answer:", add_special_tokens=False)["input_ids"]
            out = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=0, n=2)
            for c in out.choices:  # exact prompt ids in, exact sampled ids and their log-probs out
                assert c.model_extra["prompt_token_ids"] == ids and len(c.model_extra["token_ids"]) == len(c.logprobs.tokens)
                assert all(lp <= 0 for lp in c.logprobs.token_logprobs) and c.finish_reason in ("stop", "length")
            assert out.choices[0].text == out.choices[1].text  # greedy
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
            assert err.value.param == "temperature"
            bad = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"Authorization": "Bearer sk-test"})
            assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    finally:
        engine.close()


ENGINES = {"hf": ["rollout.backend=hf"], "native-http": ["rollout.backend=native", "rollout.serve_http=true"]}


@pytest.fixture(scope="module", params=list(ENGINES))
def serve_endpoint(request, local_ray, model_cache):
    """The Ray Serve application over one real engine actor (hf in the actor, or a native engine
    server the actor drives over HTTP), with a bearer key."""
    from actors import RolloutEngineActor
    from jobs.cluster import free_port, with_resolved_model
    from jobs.serve_openai import start_openai, stop_openai
    from miles_ray.config import load_config

    port = free_port("127.0.0.1", 0)
    cfg = with_resolved_model(load_config(None, [f"model.tiny_cache_dir={model_cache}", "serve.enabled=true",
                                                 f"serve.port={port}", "serve.api_key=sk-serve", *ENGINES[request.param]]))
    engine = RolloutEngineActor.options(num_cpus=0).remote(cfg.model_dump(), 0)
    url = start_openai(cfg, [engine])
    yield url
    stop_openai()
    ray.kill(engine)


@pytest.mark.ray
def test_serve_endpoint_with_the_openai_client(serve_endpoint, tokenizer):
    client = openai.OpenAI(base_url=serve_endpoint, api_key="sk-serve", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=serve_endpoint, api_key="wrong", max_retries=0).models.list()

    out = client.chat.completions.create(model=MODEL, messages=USER, n=2, logprobs=True, max_tokens=8)
    prompt = out.model_extra["prompt_token_ids"]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n") and out.usage.prompt_tokens == len(prompt)
    assert len(out.choices) == 2 and out.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in out.choices)
    for c in out.choices:
        ids = c.model_extra["token_ids"]
        assert 1 <= len(ids) <= 8 and len(c.logprobs.content) == len(ids) and all(t.logprob <= 0 for t in c.logprobs.content)
        assert c.message.content == tokenizer.decode(ids, skip_special_tokens=True)

    greedy = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**greedy).choices[0]
    text, ids = full.message.content, full.model_extra["token_ids"]
    assert len(text) >= 4, f"the greedy sample is too short to pick a stop string from: {text!r}"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(**greedy, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[:text.index(stop)]
    assert cut.model_extra["token_ids"] == ids[:len(cut.model_extra["token_ids"])]  # a prefix: the same samples

    stream = client.chat.completions.create(**greedy, stream=True, logprobs=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == len(ids)
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == text
    assert sum((c.choices[0].model_extra["token_ids"] for c in body), []) == ids
    assert body[-1].choices[0].finish_reason == full.finish_reason


# -- (c) done-when: a tool-calling conversation against a running job's endpoint ---------------------
def _kill_session(sid: int) -> None:
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
                procs.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    psutil.wait_procs(procs, timeout=30)


def _wait_for_policy(client, proc, log: Path, timeout_s: float = 600) -> None:
    """Until the endpoint answers with weight version >= 1 (the SFT-warmed policy, first sync)."""
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, f"the job exited:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no synced policy served after {timeout_s}s:\n{log.read_text()[-3000:]}"
        try:
            out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
            if out.choices[0].model_extra["weight_version"] >= 1:
                return
        except (openai.APIConnectionError, openai.APIStatusError):
            pass  # Serve not up yet (connection refused / 404 before the route exists)
        time.sleep(2)


@pytest.mark.ray
def _first_metrics_row(path, proc, timeout_s: float = 180.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and path.read_text().strip():
            return json.loads(path.read_text().splitlines()[0])
        time.sleep(1)
    raise AssertionError(f"no metrics row within {timeout_s:.0f}s (job exit code {proc.poll()})")


def test_tool_calling_conversation_against_a_running_job(tmp_path, model_cache, tokenizer):
    from jobs.cluster import free_port

    port = free_port("127.0.0.1", 0)
    data = write_dataset(tmp_path / "tools.jsonl", tokenizer)
    args = [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}", f"data.source={data}",
            "data.apply_chat_template=false", "data.max_prompt_tokens=1024", "train.sft_warmup_steps=40",
            "train.sft_batch_size=2", "total_steps=100000", "rollout.prompts_per_step=1", "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=4", "checkpoint.every=0", "checkpoint.export_hf=false", "reward.isolate=false",
            "logging.progress_bar=false", "logging.wandb=false", "cluster.dashboard=false", "run_name=openai-job",
            "serve.enabled=true", f"serve.port={port}", "reward.fn=llm_judge", "reward.service.judge_max_tokens=4",
            "reward.service.judge_allow_policy=true"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "job.log"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        _wait_for_policy(client, proc, log)
        messages = [{"role": "user", "content": "What is 12*34?"}]
        first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=100)
        turn = first.choices[0]
        assert turn.finish_reason == "tool_calls", turn
        call = turn.message.tool_calls[0]
        assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "12*34"}
        messages += [turn.message, {"role": "tool", "tool_call_id": call.id, "content": "408"}]
        final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=30)
        answer = final.choices[0]
        assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls and answer.message.content
        print(f"tool call {call.function.arguments} -> final answer {answer.message.content!r}")
        # meanwhile the job's own rewards came from llm_judge through this same endpoint (the tiny
        # policy rarely says yes/no: unparsed replies are counted, but no request may fail)
        row = _first_metrics_row(tmp_path / "run" / "metrics.jsonl", proc)
        judged = row["rollout/num_samples"] - row.get("rollout/reward_fail_judge_unparsed", 0)
        assert judged >= 0 and row.get("rollout/reward_errors", 0) == 0
        assert not any(k.startswith("rollout/reward_fail_service") for k in row), row
        proc.send_signal(signal.SIGINT)  # stop the job: its driver shuts the endpoint and the actors down
        proc.wait(timeout=120)
        assert "OpenAI-compatible endpoint: http://127.0.0.1:" in log.read_text()
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=5).models.list()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_session(proc.pid)

