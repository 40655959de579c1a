"""GPU-only paths (skipped without CUDA): CUDA IPC weight handoff between two processes (and
forwarded to an engine server over HTTP), and the trainer/engine log-prob match on a GPU."""
import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu


def _export(queue, done):
    from miles_ray.weights import ipc, to_buckets

    state = {"a": torch.arange(6, dtype=torch.float32, device="cuda").view(2, 3),
             "b": torch.ones(4, device="cuda")}
    buckets = to_buckets(state, version=3, bucket_bytes=16)
    queue.put(ipc.export_handles(buckets, "cuda"))
    done.wait()  # keep the buffers alive until the parent has copied them


def test_cuda_ipc_handles_between_processes():
    from miles_ray.weights.buckets import iter_tensors
    from miles_ray.weights.ipc import HandleReader

    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_export, args=(queue, done))
    proc.start()
    buckets = HandleReader().open(queue.get(timeout=120))
    got = {name: t.clone() for b in buckets for name, t in iter_tensors(b)}
    done.set()
    proc.join(60)
    assert torch.equal(got["a"].cpu(), torch.arange(6.0).view(2, 3)) and torch.equal(got["b"].cpu(), torch.ones(4))
    assert all(b.version == 3 for b in buckets)


def test_cuda_ipc_handle_forwarded_to_strict_server_over_http(tiny_dir, tmp_path):
    """cuda_ipc for engines over HTTP: this process plays the trainer (CUDA buckets, their IPC
    handles) and the engine actor (HandleReader; each handle is forwarded unopened inside SGLang's
    flattened_bucket payload); the strict server maps the trainer's CUDA memory and serves it."""
    import os
    import signal

    from tests.helpers.engine_checks import assert_serves, perturbed_trainer, tokenizer_of

    from miles_ray.rollout.http.engine import HttpEngine, free_port
    from miles_ray.rollout.http.launch import launch_server
    from miles_ray.weights import ipc, to_buckets

    proc, client = launch_server("native", tiny_dir, free_port(), "127.0.0.1", ["--strict-sglang", "--tp-size", "1"],
                                 log_path=str(tmp_path / "server.log"))
    try:
        engine = HttpEngine("native", client, tokenizer_of(tiny_dir), fmt="sglang_flattened", tp_size=1)
        trainer = perturbed_trainer(tiny_dir, 21)
        buckets = to_buckets({k: v.cuda() for k, v in trainer.get_weights().items()}, 6, bucket_bytes=20000)
        received = ipc.HandleReader().open(ipc.export_handles(buckets, "cuda"), keep=True)
        for b in received:
            engine.load_part(b)
        assert not any(b.opened for b in received)  # never opened by the forwarding process
        assert engine.finish_load(6) == 6
        assert_serves(engine, trainer, 6)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_engine_logprobs_match_trainer_on_gpu(model_cache):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.rollout.hf_engine import HFRolloutEngine
    from miles_ray.rollout import SamplingParams
    from miles_ray.training.fsdp import PolicyTrainer

    engine = HFRolloutEngine("tiny:qwen3", tiny_cache_dir=model_cache)
    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(), AlgorithmConfig(), tiny_cache_dir=model_cache)
    req = [{"prompt": "What is 2+3?", "label": "5", "prompt_index": 0, "group_id": 0}]
    samples = engine.generate(req, 4, SamplingParams(6))
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        assert lp == pytest.approx(s.response_logprobs, abs=1e-4)


def test_colocated_gpu_run_cuda_ipc_with_online_draft(tmp_path, model_cache):
    """A real Ray run on one GPU: trainer, engine and draft trainer share the bundle, weights move by
    CUDA IPC, the engine speculates with the online draft, log-probs still match the trainer."""
    import json

    import ray

    from jobs.train import run
    from miles_ray.config import load_config

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "total_steps=4",
                             "rollout.backend=native", "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4",
                             "rollout.max_new_tokens=16", "cluster.use_gpu=true", "cluster.colocate=true",
                             "cluster.local_num_gpus=1", "weight_sync.transport=cuda_ipc", "draft.enabled=true",
                             "train.sft_warmup_steps=10", "logging.progress_bar=false", "logging.wandb=false"])
    try:
        summary = run(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert summary["steps"] == 4 and all(r["train/mismatch_abs"] < 1e-3 for r in rows)
    assert all(r["rollout/spec_accept_len"] >= 1.0 and r["train/draft_loss"] > 0 for r in rows)
