"""GPU-only paths (skipped without CUDA): CUDA IPC weight handoff between two processes, and the
trainer/engine log-prob match on a GPU."""
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


def test_engine_logprobs_match_trainer_on_gpu(model_cache):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.rollout import HFRolloutEngine, SamplingParams
    from miles_ray.training import PolicyTrainer

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
