"""The large-model training path, measured on this machine (one process per measurement).

    .venv/bin/python benchmarks/train_scale.py [--quick]

1. packed_vs_padded: training tokens/s (one RL train step: old log-probs, forward, backward,
   optimizer), packed rows of 4096 tokens over right-padded micro-batches of 8 samples (the
   previous default layout), on a long-tail mix: prompts of 16-48 tokens, responses lognormal
   with median 64 clipped to 1024 tokens. Real tokens only are counted.
2. logprob_mem_ratio: peak memory of chunked over naive log-prob + entropy (forward and backward),
   vocab 151,936, 4,096 tokens, hidden 896.
3. ckpt_act_mem_ratio: peak memory of a training forward + backward with activation checkpointing
   over without (tiny Qwen3 512 x 8, one packed row of 4,096 tokens).

Memory: each case runs in a fresh child process; after setup it resets the kernel's peak-RSS
mark (``/proc/self/clear_refs`` = 5) and reports VmHWM - VmRSS at that moment (the memory the
measured work added at its peak). Last line:
RESULT packed_vs_padded=<x> logprob_mem_ratio=<x> ckpt_act_mem_ratio=<x>
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _peak_delta_mb(base_kb: int) -> float:
    return (_status_kb("VmHWM") - base_kb) / 1024


def _long_tail(n: int, seed: int = 0) -> list:
    from miles_ray.sample import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.randint(16, 48)
        r = max(1, min(1024, int(rng.lognormvariate(math.log(64), 1.0))))
        out.append(Sample(i, i, "p", "1", [rng.randint(3, 250) for _ in range(p)],
                          response_ids=[rng.randint(3, 250) for _ in range(r)], response_logprobs=[-1.0] * r,
                          advantages=[rng.uniform(-1, 1)] * r))
    return out


def child_throughput(args) -> dict:
    import torch

    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    layout = dict(packing=True, max_tokens_per_micro_batch=4096) if args.mode == "packed" else \
        dict(packing=False, micro_batch_size=8)
    trainer = PolicyTrainer(args.model, TrainConfig(**layout), AlgorithmConfig(), tiny_cache_dir=args.cache)
    samples = _long_tail(args.samples)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    times = []
    for rep in range(args.repeats + 1):
        batch = [type(s)(**s.to_dict()) for s in samples]
        t0 = time.perf_counter()
        trainer.prepare(batch)
        trainer.train_step([batch])
        if rep:  # the first step warms up
            times.append(time.perf_counter() - t0)
    best = min(times)
    return {"tokens_per_s": real / best, "step_s": best, "real_tokens": real}


def child_logprob_mem(args) -> dict:
    import torch

    from miles_ray.training.fsdp.logprobs import head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(896, 151936, bias=False)
    hidden = torch.randn(4096, 896, requires_grad=True)
    targets = torch.randint(0, 151936, (4096,))
    base = _reset_peak()
    if args.mode == "naive":
        logits = head(hidden).float()
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, targets[:, None])[:, 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
    else:
        logp, ent = head_logprobs(hidden, head, targets, chunk_tokens=args.chunk, entropy="loss")
    (logp.sum() + 0.01 * ent.sum()).backward()
    return {"peak_mb": _peak_delta_mb(base)}


def child_ckpt_mem(args) -> dict:
    import torch

    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer
    from miles_ray.training.batching import pack

    cfg = TrainConfig(gradient_checkpointing=args.mode == "ckpt", max_tokens_per_micro_batch=4096)
    trainer = PolicyTrainer(args.model, cfg, AlgorithmConfig(), tiny_cache_dir=args.cache)
    samples, total = [], 0
    for s in _long_tail(400, seed=1):
        if total + len(s.prompt_ids) + len(s.response_ids) > 4096:
            break
        samples.append(s)
        total += len(s.prompt_ids) + len(s.response_ids)
    batch = pack(samples, packed=True)
    trainer.model.train()
    base = _reset_peak()
    logp, _ = trainer.model(batch, 1.0, "none")
    (logp.sum()).backward()
    return {"peak_mb": _peak_delta_mb(base), "tokens": total}


CHILDREN = {"throughput": child_throughput, "logprob_mem": child_logprob_mem, "ckpt_mem": child_ckpt_mem}


def run_child(case: str, mode: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--mode", mode, "--cache", args.cache,
           "--samples", str(args.samples), "--repeats", str(args.repeats)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{case}/{mode} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{case:12s} {mode:7s} {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--mode", default="")
    ap.add_argument("--cache", default=tempfile.mkdtemp(prefix="trainscale-"))
    ap.add_argument("--model", default="tiny:qwen3:256x4")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run, not the measurement)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.quick:
        args.samples, args.repeats = 16, 1
    padded = run_child("throughput", "padded", args, model=args.model)
    packed = run_child("throughput", "packed", args, model=args.model)
    naive = run_child("logprob_mem", "naive", args)
    chunked = run_child("logprob_mem", "chunked", args, chunk=args.chunk)
    plain = run_child("ckpt_mem", "plain", args, model="tiny:qwen3:512x8")
    ckpt = run_child("ckpt_mem", "ckpt", args, model="tiny:qwen3:512x8")
    print(f"RESULT packed_vs_padded={packed['tokens_per_s'] / padded['tokens_per_s']:.2f} "
          f"logprob_mem_ratio={chunked['peak_mb'] / naive['peak_mb']:.3f} "
          f"ckpt_act_mem_ratio={ckpt['peak_mb'] / plain['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
