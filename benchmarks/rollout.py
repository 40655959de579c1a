"""Rollout throughput: the native engine vs ``transformers.generate`` at the same batch and lengths,
and native decode steps/s against the memory-bandwidth bound (weight bytes / measured copy
bandwidth: every decode step must read all weights once).

    .venv/bin/python benchmarks/rollout.py [--models smollm2,tiny] [--batch 32] [--new-tokens 64]

Last line: RESULT speedup_vs_hf_b32=<x> bw_fraction=<x> (SmolLM2-135M, or the first model given).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from miles_ray.rollout.native import NativeEngine  # noqa: E402
from miles_ray.rollout import SamplingParams  # noqa: E402


def copy_bandwidth(nbytes: int) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * nbytes / best  # a copy reads and writes every byte


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    qs = [f"What is {a}+{b}? Explain step by step." for a, b in zip(range(batch), range(7, 7 + batch))]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in qs]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def bench_hf(engine, prompts, new_tokens: int) -> float:
    tok = engine.tokenizer
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=None,
                  pad_token_id=tok.pad_token_id)
    engine.model.generate(**{k: v[:2] for k, v in enc.items()}, **dict(kwargs, max_new_tokens=4, min_new_tokens=4))
    t = _timed(lambda: engine.model.generate(**enc, **kwargs))
    return len(prompts) * new_tokens / t


def bench_native(engine, prompts, new_tokens: int) -> tuple[float, float]:
    params = SamplingParams(new_tokens, temperature=1.0, ignore_eos=True)
    engine.add_request(prompts[0], SamplingParams(4, ignore_eos=True))
    engine.run_until_done()
    for p in prompts:
        engine.add_request(p, params)
    t0 = time.perf_counter()
    engine.step()  # prefill (+ first decode)
    t1 = time.perf_counter()
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    return len(prompts) * new_tokens / (t2 - t0), steps / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    headline = None
    for name in args.models.split(","):
        spec = "tiny:qwen3" if name == "tiny" else name
        engine = NativeEngine(spec, tiny_cache_dir=tempfile.mkdtemp(), max_running=args.batch)
        prompts = prompts_for(engine.tokenizer, args.batch)
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        bw = copy_bandwidth(max(weight_bytes, 256 << 20))
        bound = bw / weight_bytes  # decode steps/s if each step only streamed the weights once
        hf = bench_hf(engine, prompts, args.new_tokens)
        native, steps_per_s = bench_native(engine, prompts, args.new_tokens)
        speedup, frac = native / hf, steps_per_s / bound
        print(f"{name}: batch {args.batch}, {args.new_tokens} new tokens | transformers.generate {hf:8.1f} tok/s | "
              f"native {native:8.1f} tok/s | speedup {speedup:.2f}x | decode {steps_per_s:.1f} steps/s vs "
              f"bandwidth bound {bound:.1f} steps/s ({weight_bytes / 2**20:.0f} MiB weights at {bw / 2**30:.1f} GiB/s)"
              f" = {frac:.2f}", flush=True)
        headline = headline or (speedup, frac)
    print(f"RESULT speedup_vs_hf_b{args.batch}={headline[0]:.2f} bw_fraction={headline[1]:.2f}")


if __name__ == "__main__":
    main()
