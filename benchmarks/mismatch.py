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
   training equal rollout's, with R3 (1.0 by construction: replay uses the recorded experts);
   ``r3_routing_agreement_own`` = slots where the trainer router's own top-k equals rollout's, the
   fidelity figure (it can fail: it falls as engine and trainer numerics drift apart).
3. on_policy_slowdown: rollout wall time of the same batch in true on-policy mode / normal mode.
4. on_policy_len / on_policy_mem_ratio: long sequences, engine and trainer in separate processes
   (tiny Qwen3): the native engine samples 2 responses of ``--long`` tokens (1024) in true on-policy
   mode, then the trainer's exact forward recomputes them with gradients (forward + backward, as in
   training): the largest |rollout - trainer| log-prob is folded into true_on_policy_max_abs. The
   same is run in normal mode (stock engine, stock trainer forward); on_policy_mem_ratio = peak
   memory growth of the process (peak RSS, reset after loading, over the RSS then), true on-policy / normal.

Last line: RESULT true_on_policy_max_abs=<x> r3_mismatch_reduction=<x> r3_routing_agreement=<x>
on_policy_slowdown=<x> on_policy_len=<n> on_policy_mem_ratio=<x> r3_routing_agreement_own=<x>
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


def r3(cache: str) -> tuple[float, float, float]:
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
    r3_run = out["r3"]
    return (out["none"]["mismatch_abs"] / r3_run["mismatch_abs"], r3_run["routing_agreement"],
            r3_run["routing_agreement_own"])


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


def _status_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of this process, in kB."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Reset the peak-RSS mark (Linux ``clear_refs``); returns the RSS now, in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def long_side(cache: str, mode: str, n: int) -> dict:
    """One process: 2 samples of ``n`` tokens, then the trainer's forward + backward over them."""
    import torch

    from miles_ray.models import load_model
    from miles_ray.rollout import SamplingParams
    from miles_ray.rollout.native import NativeEngine
    from miles_ray.training.batching import pack, unpack

    exact = mode == "true_on_policy"
    max_len = -(-(n + 24) // 64) * 64
    engine = NativeEngine("tiny:qwen3", tiny_cache_dir=cache, seed=5, exact_check=False,
                          **({"exact_max_len": max_len} if exact else {}))
    model = load_model("tiny:qwen3", "float32", cache)
    if exact:
        from miles_ray.models.exact import ExactLMForTraining
        core = ExactLMForTraining(model, max_len)
    else:
        from miles_ray.training.fsdp.logprobs import CausalLMForTraining
        core = CausalLMForTraining(model)
    reqs = [{"prompt": "What is 3+4?", "label": "", "prompt_index": i, "group_id": i} for i in range(2)]
    base = _reset_peak()
    t0 = time.perf_counter()
    samples = engine.generate(reqs, 1, SamplingParams(n, ignore_eos=True))
    t1 = time.perf_counter()
    batch = pack(samples, 0, torch.device("cpu"), packed=False)
    logp, _ = core(batch, 1.0)
    logp.sum().backward()
    got = unpack(logp, batch)
    worst = max(abs(a - b) for s, lp in zip(samples, got) for a, b in zip(s.response_logprobs, lp))
    peak = _status_kb("VmHWM") - base
    return {"mode": mode, "tokens": min(len(s.response_ids) for s in samples), "max_abs": worst,
            "peak_mb": peak / 1024, "rollout_s": t1 - t0, "train_s": time.perf_counter() - t1}


def long_run(cache: str, n: int) -> tuple[int, float, float]:
    """(response tokens, max |rollout - trainer| in true on-policy mode, memory ratio)."""
    import subprocess

    out = {}
    for mode in ("normal", "true_on_policy"):
        res = subprocess.run([sys.executable, __file__, "--long-side", mode, "--long", str(n), "--cache", cache],
                             capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"long sequences, {mode}: {out[mode]}", flush=True)
    top = out["true_on_policy"]
    return top["tokens"], top["max_abs"], top["peak_mb"] / max(out["normal"]["peak_mb"], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--long", type=int, default=1024, help="response tokens of the long-sequence comparison")
    ap.add_argument("--long-side", choices=["normal", "true_on_policy"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.long_side:
        print(json.dumps(long_side(args.cache, args.long_side, args.long)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="mismatch-"))
    worst = max(true_on_policy_run(tmp, spec, args.steps) for spec in ("tiny:qwen3", "tiny:qwen3_moe"))
    import ray

    ray.shutdown()
    reduction, agreement, own = r3(str(tmp / "models"))
    slow = slowdown(str(tmp / "models"))
    n, long_worst, mem = long_run(str(tmp / "models"), args.long)
    worst = max(worst, long_worst)
    print(f"RESULT true_on_policy_max_abs={worst!r} r3_mismatch_reduction={reduction:.2f} "
          f"r3_routing_agreement={agreement:.4f} on_policy_slowdown={slow:.2f} on_policy_len={n} "
          f"on_policy_mem_ratio={mem:.2f} r3_routing_agreement_own={own:.4f}")


if __name__ == "__main__":
    main()
