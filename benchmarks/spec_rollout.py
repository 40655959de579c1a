"""Speculative rollout over an RL run in which the policy drifts: no speculation vs a frozen draft
vs the online-trained draft, early and late in training.

    .venv/bin/python benchmarks/spec_rollout.py [--steps 30] [--target tiny:qwen3:256x6] [--draft layers:1]

One process, library objects only (no Ray, so it also runs on a GPU box without Ray): a policy
trainer, a native engine holding the target and a draft, and a :class:`DraftTrainer`.
1. SFT warm-up of the policy on verbose answers in three phrasings ("The sum of 3 and 4 is 7." ...).
2. The draft is distilled on the warmed-up policy's own rollouts; a copy of it is the frozen draft.
3. GRPO rewards the first phrasing and correct answers, so the policy drifts toward that phrasing
   and sharpens. After every step the online draft trains on that step's rollouts (hard labels).
4. Early (after step 1) and late (last step), the same eval prompts are generated three ways on the
   same policy weights: plain decoding, frozen draft, online draft; tokens/s and accepted length.
Last line: RESULT online_vs_nospec=<x> online_vs_frozen_late=<x> accept_len_online_late=<x>
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from miles_ray.algorithms import assign_advantages  # noqa: E402
from miles_ray.config import AlgorithmConfig, TrainConfig  # noqa: E402
from miles_ray.data import synthetic_rows, validate_rows  # noqa: E402
from miles_ray.rollout import SamplingParams  # noqa: E402
from miles_ray.rollout.native.engine import NativeEngine  # noqa: E402
from miles_ray.training.fsdp import PolicyTrainer  # noqa: E402
from miles_ray.training.fsdp.draft import DraftTrainer  # noqa: E402
from miles_ray.training.sft import sft_samples  # noqa: E402
from miles_ray.training.fsdp.trainer import train_on_samples  # noqa: E402

PHRASES = ("The sum of {a} and {b} is {c}.", "{a} plus {b} equals {c}.", "Adding {a} to {b} gives {c}.")


def operands(prompt: str) -> tuple[int, int]:
    a, b = re.search(r"(\d+)\+(\d+)", prompt).groups()
    return int(a), int(b)


def reward(sample) -> float:
    """0.5 for the first phrasing plus 0.5 for the right answer: the policy drifts toward one
    phrasing and sharpens (its entropy falls), so a draft fitted to the start fits less and less."""
    a, b = operands(sample.prompt)
    nums = re.findall(r"\d+", sample.response_text)
    correct = bool(nums) and int(nums[-1]) == a + b
    return 0.5 * sample.response_text.strip().startswith("The sum") + 0.5 * correct


def requests(items, step: int) -> list[dict]:
    return [{"prompt": it.prompt, "label": it.label, "prompt_index": it.index, "group_id": step * 1000 + j}
            for j, it in enumerate(items)]


def measure(engine, draft_state, eval_reqs, params, n) -> dict:
    """Tokens/s and accepted length of one generation of ``eval_reqs`` (draft_state None: plain)."""
    engine.set_speculation(draft_state is not None)
    if draft_state is not None:
        engine.load_draft(draft_state)
    engine.spec_stats()
    engine.generate(eval_reqs[:2], n, params)  # warm caches and allocator
    engine.spec_stats()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(eval_reqs, n, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(s.response_length for s in out)
    stats = engine.spec_stats() if draft_state is not None else {"spec_accept_len": 1.0, "spec_accept_rate": 0.0}
    return {"tok_s": tokens / dt, "accept_len": stats["spec_accept_len"], "accept_rate": stats["spec_accept_rate"]}


def compare(engine, frozen, online, eval_reqs, params, n, repeats: int, concurrency: int) -> dict:
    """Median over ``repeats`` interleaved rounds of each mode, at most ``concurrency`` sequences
    decoding at once (speculation pays where decoding is latency-bound, not compute-bound)."""
    runs = {"nospec": [], "frozen": [], "online": []}
    engine.max_running, running = concurrency, engine.max_running
    for _ in range(repeats):
        for name, state in (("nospec", None), ("frozen", frozen), ("online", online)):
            runs[name].append(measure(engine, state, eval_reqs, params, n))
    engine.max_running = running
    med = lambda xs, k: sorted(x[k] for x in xs)[len(xs) // 2]  # noqa: E731
    return {name: {k: med(xs, k) for k in xs[0]} for name, xs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="tiny:qwen3:256x8")
    ap.add_argument("--draft", default="layers:1")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--eval-n", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default="runs/_models")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)

    engine = NativeEngine(args.target, tiny_cache_dir=args.cache, draft=args.draft, num_draft_tokens=args.k, seed=0)
    tok = engine.tokenizer
    items, _ = validate_rows(synthetic_rows("arithmetic", 4000, 9, 0), tok)
    policy = PolicyTrainer(args.target, TrainConfig(lr=args.lr, micro_batch_size=64), AlgorithmConfig(),
                           tiny_cache_dir=args.cache)
    drafter = DraftTrainer(args.draft, args.target, TrainConfig(micro_batch_size=64), lr=3e-3, tiny_cache_dir=args.cache)
    params = SamplingParams(temperature=1.0, max_new_tokens=32)
    sync = lambda v: engine.weights.update(policy.get_weights(), v)  # noqa: E731

    t0 = time.time()
    phrase = lambda it: rng.choice(PHRASES).format(a=operands(it.prompt)[0], b=operands(it.prompt)[1], c=it.label)  # noqa: E731
    for i in range(args.sft_steps):
        m = policy.sft_step(sft_samples(rng.sample(items, 32), tok, phrase), lr=3e-3)
    print(f"SFT warm-up: {args.sft_steps} steps, loss {m['sft_loss']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    sync(1)
    engine.set_speculation(False)
    for i in range(args.distill_steps):
        d = drafter.train_on(engine.generate(requests(rng.sample(items, args.prompts), 0), args.n, params))
    print(f"draft distilled on the initial policy's rollouts: loss {d['draft_loss']:.3f}", flush=True)
    frozen = drafter.get_weights()
    eval_reqs = requests(items[-args.eval_prompts:], 10**6)

    report, version = {}, 1
    for step in range(args.steps):
        engine.set_speculation(True)
        engine.load_draft(drafter.get_weights())
        samples = engine.generate(requests(rng.sample(items[:-args.eval_prompts], args.prompts), step), args.n, params)
        for s in samples:
            s.reward = reward(s)
        assign_advantages(samples, policy.algo)
        train_on_samples(policy, samples, 1)
        d = drafter.train_on(samples)
        version += 1
        sync(version)
        r = sum(s.reward for s in samples) / len(samples)
        print(f"step {step}: reward {r:.3f} draft_loss {d['draft_loss']:.3f} "
              f"len {sum(s.response_length for s in samples) / len(samples):.1f}", flush=True)
        if step in (1, args.steps - 1):
            tag = "early" if step == 1 else "late"
            rng_state = engine.generator.get_state()  # measuring must not change the RL trajectory
            report[tag] = compare(engine, frozen, drafter.get_weights(), eval_reqs, params, args.eval_n, args.repeats,
                                  args.concurrency)
            engine.generator.set_state(rng_state)
            for name, v in report[tag].items():
                print(f"  {tag:5s} {name:7s} tokens/s {v['tok_s']:8.1f}  accept_len {v['accept_len']:.2f}  "
                      f"accept_rate {v['accept_rate']:.2f}", flush=True)
    late = report["late"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}; target {args.target}, draft {args.draft}, k={args.k}; wall {time.time() - t0:.0f}s")
    print(f"RESULT online_vs_nospec={late['online']['tok_s'] / late['nospec']['tok_s']:.2f} "
          f"online_vs_frozen_late={late['online']['tok_s'] / late['frozen']['tok_s']:.2f} "
          f"accept_len_online_late={late['online']['accept_len']:.2f}")


if __name__ == "__main__":
    main()
