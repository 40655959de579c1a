"""FP8 and INT4 rollout, unified FP8 training and INT4 QAT, on this machine.

    .venv/bin/python benchmarks/low_precision.py [--steps 100]

1. fp8_unified_mismatch_ratio: one batch (32 prompts x 4 samples, tiny Qwen3) sampled by an engine
   serving FP8 weights (128x128 blocks, 1x128 activation groups); mean |rollout - trainer| log-prob
   when the trainer recomputes with ``train.precision=fp8_unified`` / with full precision.
2. fp8_sync_bytes_ratio, int4_sync_bytes_ratio: bytes of the quantized linear weights as they
   travel in a weight sync (quantized bytes + scales) / the same weights in bf16, on a model of
   Qwen2.5-0.5B's shape (random init). The whole payload's ratio (embeddings and norms stay in the
   model dtype) is printed beside it.
3. moe_fp8_expert_coverage: an engine serving tiny Qwen3-MoE (8 experts x 2 layers) in FP8: the
   fraction of its expert parameters (transformers 5's fused ``experts.gate_up_proj`` /
   ``down_proj``) served as FP8 bytes (goal 1.0; nn.Linear-only quantization left them at 0).
4. int4_qat_reward_gain: the default demo (``examples/grpo_arith_tiny.yaml``, local Ray) with
   ``train.qat=int4 rollout.precision=int4``: reward over the last 5 steps - the first 5.

Last line: RESULT fp8_unified_mismatch_ratio=<x> fp8_sync_bytes_ratio=<x> int4_sync_bytes_ratio=<x>
int4_qat_reward_gain=<x> moe_fp8_expert_coverage=<x>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")


def mismatch(cache: str) -> float:
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.rollout.native import NativeEngine
    from miles_ray.rollout import SamplingParams
    from miles_ray.training.fsdp import PolicyTrainer
    from miles_ray.weights import to_buckets

    engine = NativeEngine("tiny:qwen3", tiny_cache_dir=cache, seed=0, quantization="fp8")
    reqs = [{"prompt": f"What is {i % 10}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i}
            for i in range(32)]
    means = {}
    for name, train in (("full precision", {}), ("fp8_unified", {"precision": "fp8_unified"})):
        trainer = PolicyTrainer("tiny:qwen3", TrainConfig(**train), AlgorithmConfig(), tiny_cache_dir=cache,
                                engine_quant="fp8")
        engine.weights.load_buckets(to_buckets(trainer.engine_state(), 1), 1)
        samples = engine.generate(reqs, 4, SamplingParams(12))
        got = trainer.compute_logprobs(samples)
        diffs = [abs(a - b) for s, lp in zip(samples, got) for a, b in zip(s.response_logprobs, lp)]
        means[name] = sum(diffs) / len(diffs)
        print(f"FP8 rollout, trainer {name}: mean |rollout - trainer| = {means[name]:.6f} over {len(diffs)} tokens",
              flush=True)
    return means["fp8_unified"] / means["full precision"]


def sync_bytes() -> tuple[float, float]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from miles_ray.quant.modules import quantizable, quantize_state

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        shapes = Qwen2ForCausalLM(cfg)
    names = quantizable(shapes)
    state = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.state_dict().items()
             if k != "lm_head.weight"}  # tied: sent once
    linears = {f"{n}.weight" for n in names}
    bf16_linear = sum(state[k].numel() * 2 for k in linears)
    bf16_all = sum(v.numel() * 2 for v in state.values())
    ratios = []
    for scheme in ("fp8", "int4"):
        q = quantize_state(state, names, scheme)
        sent_linear = sum(q[k].numel() * q[k].element_size() + q[k + "_scale"].numel() * q[k + "_scale"].element_size()
                          for k in linears)
        sent_all = sent_linear + sum(v.numel() * 2 for k, v in q.items() if k not in linears and not k.endswith("_scale"))
        print(f"{scheme}: linear weights {sent_linear / 2**20:.0f} MiB vs {bf16_linear / 2**20:.0f} MiB bf16 "
              f"({sent_linear / bf16_linear:.3f}); whole payload {sent_all / 2**20:.0f} vs {bf16_all / 2**20:.0f} MiB "
              f"({sent_all / bf16_all:.3f}, embeddings and norms in bf16)", flush=True)
        ratios.append(sent_linear / bf16_linear)
    return ratios[0], ratios[1]


def moe_expert_coverage(cache: str) -> float:
    import torch

    from miles_ray.rollout.native import NativeEngine

    engine = NativeEngine("tiny:qwen3_moe", tiny_cache_dir=cache, seed=0, quantization="fp8")
    experts = {k: v for k, v in engine.model.state_dict().items() if ".experts." in k and not k.endswith("_scale")}
    fp8 = sum(v.numel() for v in experts.values() if v.dtype == torch.float8_e4m3fn)
    total = sum(v.numel() for v in experts.values())
    print(f"FP8 MoE engine: {fp8} of {total} expert parameters served as FP8", flush=True)
    return fp8 / max(total, 1)


def qat_demo(tmp: Path, steps: int) -> float:
    from jobs.train import run
    from miles_ray.config import load_config

    cfg = load_config(ROOT / "examples" / "grpo_arith_tiny.yaml", [
        f"output_dir={tmp / 'int4'}", "run_name=int4-qat", f"total_steps={steps}", "train.qat=int4",
        "rollout.precision=int4", "logging.wandb=false", "logging.progress_bar=false",
        f"model.tiny_cache_dir={tmp / 'models'}"])
    summary = run(cfg)
    rows = [json.loads(x) for x in open(tmp / "int4" / "metrics.jsonl")]
    print(f"INT4 QAT + INT4 rollout demo: reward {summary['reward_first5']:.3f} -> {summary['reward_last5']:.3f}, "
          f"mean |rollout - trainer| {sum(r['train/mismatch_abs'] for r in rows) / len(rows):.2e}", flush=True)
    return summary["reward_gain"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lowprec-"))
    ratio = mismatch(str(tmp / "models"))
    fp8_bytes, int4_bytes = sync_bytes()
    coverage = moe_expert_coverage(str(tmp / "models"))
    gain = qat_demo(tmp, args.steps)
    import ray

    ray.shutdown()
    print(f"RESULT fp8_unified_mismatch_ratio={ratio:.3f} fp8_sync_bytes_ratio={fp8_bytes:.3f} "
          f"int4_sync_bytes_ratio={int4_bytes:.3f} int4_qat_reward_gain={gain:.3f} "
          f"moe_fp8_expert_coverage={coverage:.3f}")


if __name__ == "__main__":
    main()
