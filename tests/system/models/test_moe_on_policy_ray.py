"""MoE routing traces, routing replay (R3) and true on-policy mode."""
import json

import pytest

from miles_ray.config import load_config
from miles_ray.models.moe import decode
from miles_ray.rollout import SamplingParams

REQS = [{"prompt": f"What is {i}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i} for i in range(6)]


@pytest.mark.ray
@pytest.mark.parametrize("extra", [("algorithm.routing_replay=r3",),
                                   ("algorithm.true_on_policy=true", "data.max_prompt_tokens=56")])
def test_moe_run_end_to_end(local_ray, tmp_path, model_cache, extra):
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "model.path=tiny:qwen3_moe",
                             "rollout.backend=native", "total_steps=2", "rollout.prompts_per_step=4",
                             "rollout.n_samples_per_prompt=2", "train.num_minibatches=2", "logging.wandb=false",
                             "logging.progress_bar=false", f"run_name=moe{len(extra)}", *extra])
    assert run(cfg)["steps"] == 2
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    if "algorithm.routing_replay=r3" in extra:
        assert all(r["train/routing_agreement"] == 1.0 and 0 < r["train/routing_agreement_own"] <= 1 for r in rows)
    else:
        assert all(r["train/mismatch_max"] == 0.0 for r in rows)


def test_routing_traces_travel_over_http(model_cache, tmp_path):
    pytest.importorskip("uvicorn")  # the engine server's stack (absent on the lent GPU image)
    import os
    import signal
    import socket

    from miles_ray.models import resolve_model_path
    from miles_ray.rollout.http.launch import launch_server

    folder = resolve_model_path("tiny:qwen3_moe", model_cache)["path"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, client = launch_server("native", folder, port, log_path=str(tmp_path / "moe.log"))
    try:
        from miles_ray.models import load_tokenizer

        samples = client.generate_samples(REQS[:2], 2, SamplingParams(5), load_tokenizer(folder))
        for s in samples:
            assert list(decode(s.routed_experts).shape) == [len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
