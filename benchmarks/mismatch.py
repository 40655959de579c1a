"""Rollout/trainer log-prob mismatch: true on-policy, and routing replay (R3) on a tiny MoE.

    .venv/bin/python benchmarks/mismatch.py [--steps 20]

1. true_on_policy_max_abs: two real runs (local Ray, native engine, GRPO on addition, weight sync
   every step) in true on-policy mode, a dense tiny Qwen3 and a tiny Qwen3-MoE; the largest
   |rollout log-prob - trainer log-prob| over every token of every step (``mismatch_max``).
2. R3 (one process): a tiny Qwen3-MoE (8 layers, 8 experts, top-2) whose expert weights are scaled
   up x6 so that the MoE branch carries the signal as in a trained model (at random init the experts'
   output is ~100x smaller than a trained model's and routing would not matter); the engine samples
   in bf16, the trainer recomputes in fp32 (the induced mismatch). ``r3_mismatch_reduction`` = mean
   |delta log-prob| without R3 / with R3; ``r3_routing_agreement`` = slots whose experts used in
   training equal rollout's, with R3 (the router's own top-k agreement is printed beside it).
3. on_policy_slowdown: rollout wall time of the same batch in true on-policy mode / normal mode.

Last line: RESULT true_on_policy_max_abs=<x> r3_mismatch_reduction=<x> r3_routing_agreement=<x>
on_policy_slowdown=<x>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")


def true_on_policy_run(tmp: Path, spec: str, steps: int) -> float:
    from jobs.train import run
    from miles_ray.config import load_config

    name = spec.replace(":", "-")
    cfg = load_config(None, [
        f"output_dir={tmp / name}", f"run_name={name}", f"model.path={spec}", f"model.tiny_cache_dir={tmp / 'models'}",
        f"total_steps={steps}", "rollout.backend=native", "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=8", "data.max_prompt_tokens=56", "train.sft_warmup_steps=10", "train.lr=1e-3",
        "train.num_minibatches=2", "algorithm.true_on_policy=true", "logging.wandb=false", "logging.progress_bar=false",
        "checkpoint.export_hf=false"])
    run(cfg)
    rows = [json.loads(x) for x in open(tmp / name / "metrics.jsonl")]
    worst = max(r["train/mismatch_max"] for r in rows)
    print(f"true on-policy {spec}: {len(rows)} steps, max |rollout - trainer| = {worst!r}, "
          f"reward {rows[0]['rollout/reward_mean']:.3f} -> {rows[-1]['rollout/reward_mean']:.3f}", flush=True)
    return worst


def r3(cache: str) -> tuple[float, float]:
    import torch

    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.rollout.native import NativeEngine
    from miles_ray.rollout import SamplingParams
    from miles_ray.training.fsdp import PolicyTrainer

    spec = "tiny:qwen3_moe:128x8"
    engine = NativeEngine(spec, dtype="float32", tiny_cache_dir=cache, seed=0)
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if ".experts." in name:
                p.mul_(6.0)
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.model.to(torch.bfloat16)
    reqs = [{"prompt": f"What is {i % 10}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i}
            for i in range(16)]
    samples = engine.generate(reqs, 4, SamplingParams(16))
    out = {}
    for replay in ("none", "r3"):
        trainer = PolicyTrainer(spec, TrainConfig(), AlgorithmConfig(routing_replay=replay), tiny_cache_dir=cache)
        trainer.module.load_state_dict(weights)
        batch = [type(s)(**s.to_dict()) for s in samples]
        for s in batch:
            s.advantages = [0.0] * len(s.response_ids)
        out[replay] = trainer.train_step([batch])
        m = out[replay]
        print(f"R3={replay}: mismatch_abs {m['mismatch_abs']:.5f}, routing_agreement {m['routing_agreement']:.4f} "
              f"(router's own top-k: {m['routing_agreement_own']:.4f})", flush=True)
    return out["none"]["mismatch_abs"] / out["r3"]["mismatch_abs"], out["r3"]["routing_agreement"]


def slowdown(cache: str) -> float:
    from miles_ray.rollout.native import NativeEngine
    from miles_ray.rollout import SamplingParams

    reqs = [{"prompt": f"What is {i % 10}+{(7 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i}
            for i in range(16)]
    times = {}
    for mode, extra in (("normal", {}), ("true_on_policy", {"exact_max_len": 64})):
        engine = NativeEngine("tiny:qwen3", tiny_cache_dir=cache, seed=0, **extra)
        engine.generate(reqs[:2], 1, SamplingParams(4))  # warm up
        t0 = time.perf_counter()
        engine.generate(reqs, 4, SamplingParams(32, ignore_eos=True))
        times[mode] = time.perf_counter() - t0
        print(f"rollout {mode}: {times[mode]:.2f} s for 64 x 32 tokens", flush=True)
    return times["true_on_policy"] / times["normal"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mismatch-"))
    worst = max(true_on_policy_run(tmp, spec, args.steps) for spec in ("tiny:qwen3", "tiny:qwen3_moe"))
    import ray

    ray.shutdown()
    reduction, agreement = r3(str(tmp / "models"))
    slow = slowdown(str(tmp / "models"))
    print(f"RESULT true_on_policy_max_abs={worst!r} r3_mismatch_reduction={reduction:.2f} "
          f"r3_routing_agreement={agreement:.4f} on_policy_slowdown={slow:.2f}")


if __name__ == "__main__":
    main()
