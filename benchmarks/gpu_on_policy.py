"""True on-policy on a GPU: does the row-invariant forward stay bit-identical between KV-cache
decode and the trainer's full forward on CUDA (cuBLAS batched GEMV, CUDA softmax)?

    python benchmarks/gpu_on_policy.py

For tiny Qwen3 and tiny Qwen3-MoE, fp32 and bf16: the startup self-test's verdict, then the
largest |engine log-prob - trainer log-prob| over 64 sampled sequences (the engine's exact decode
vs the trainer's exact full forward, whatever the self-test said: an honest number), and the
stock native engine's mismatch for comparison. Nothing here needs Ray.
Last line: RESULT true_on_policy_max_abs=<worst over the four cases> stock_max_abs=<x>
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def case(spec: str, dtype: str, cache: str) -> dict:
    import torch

    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.errors import UserError
    from miles_ray.rollout.native import NativeEngine
    from miles_ray.rollout import SamplingParams
    from miles_ray.training.fsdp import PolicyTrainer

    verdict = "passed"
    try:
        engine = NativeEngine(spec, dtype=dtype, tiny_cache_dir=cache, seed=0, exact_max_len=64)
    except UserError as err:  # refused: measure anyway, without the guard
        verdict = str(err)[:220]
        engine = NativeEngine(spec, dtype=dtype, tiny_cache_dir=cache, seed=0, exact_max_len=64, exact_check=False)
    precision = "bf16" if dtype == "bfloat16" else "fp32"
    try:
        trainer = PolicyTrainer(spec, TrainConfig(precision=precision), AlgorithmConfig(true_on_policy=True),
                                dtype=dtype, tiny_cache_dir=cache, exact_max_len=64)
    except UserError:
        trainer = None
    reqs = [{"prompt": f"What is {i % 10}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i}
            for i in range(16)]
    samples = engine.generate(reqs, 4, SamplingParams(24, temperature=1.0))
    if trainer is None:  # the trainer's own self-test refused: compute with the exact forward directly
        from miles_ray.models.exact import ExactLMForTraining
        from miles_ray.training.batching import pack

        core = ExactLMForTraining(engine.model, 64)
        got = []
        with torch.no_grad():
            for s in samples:
                b = pack([s], device=engine.model.device)
                logp, _ = core(b, 1.0)
                got.append(b.by_sample(logp)[0, :len(s.response_ids)].tolist())
    else:
        trainer.module.load_state_dict(engine.model.state_dict())
        got = trainer.compute_logprobs(samples)
    worst = max(abs(a - b) for s, lp in zip(samples, got) for a, b in zip(s.response_logprobs, lp))
    stock = NativeEngine(spec, dtype=dtype, tiny_cache_dir=cache, seed=0)  # same tiny weights, stock forward
    stock_samples = stock.generate(reqs, 4, SamplingParams(24, temperature=1.0))
    ref = PolicyTrainer(spec, TrainConfig(precision=precision), AlgorithmConfig(), dtype=dtype, tiny_cache_dir=cache)
    stock_worst = max(abs(a - b) for s, lp in zip(stock_samples, ref.compute_logprobs(stock_samples))
                      for a, b in zip(s.response_logprobs, lp))
    out = {"model": spec, "dtype": dtype, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "self_test": verdict, "true_on_policy_max_abs": worst, "stock_max_abs": stock_worst,
           "tokens": sum(len(s.response_ids) for s in samples)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    cache = tempfile.mkdtemp(prefix="top-")
    results = [case(spec, dtype, cache) for spec in ("tiny:qwen3", "tiny:qwen3_moe") for dtype in ("float32", "bfloat16")]
    print(f"RESULT true_on_policy_max_abs={max(r['true_on_policy_max_abs'] for r in results)!r} "
          f"stock_max_abs={max(r['stock_max_abs'] for r in results):.3g}")


if __name__ == "__main__":
    main()
