"""Megatron backend parity on CPU (fp32, tiny Qwen3), real gloo process groups:

1. log-probs of the megatron GPTModel at TP=2 and at PP=2 vs the HF model's (max abs difference);
2. one identical GRPO step on the megatron backend (TP=2) and on the FSDP backend (DDP, 1 rank):
   the gathered megatron parameters, converted to HF names, vs the FSDP ones (max relative diff).

    python benchmarks/megatron_parity.py [--cache runs/_models]

Last line: ``RESULT tp2_logprob_max_abs=<x> pp2_logprob_max_abs=<x> step_param_max_rel=<x>``.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(n: int = 6, seed: int = 0) -> list:
    import random

    from miles_ray.sample import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 7), rng.randint(1, 8)
        resp = [rng.randint(3, 300) for _ in range(r)]
        out.append(Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)], response_ids=resp,
                          response_logprobs=[-1.0] * r, advantages=[rng.uniform(-2, 2)] * r))
    return out


def hf_logprobs(cache: str, batch_samples: list) -> list:
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training import PolicyTrainer

    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(packing=False), AlgorithmConfig(), tiny_cache_dir=cache)
    return trainer.compute_logprobs(batch_samples)


def _logprob_worker(rank, world, port, cache, tp, pp, out):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.megatron.trainer import MegatronPolicyTrainer
    from miles_ray.training.base import init_distributed

    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer("tiny:qwen3", TrainConfig(packing=False), AlgorithmConfig(), tiny_cache_dir=cache,
                                    parallel_cfg={"tensor_parallel": tp, "pipeline_parallel": pp})
    mine = samples()[rank::world]
    got = trainer.compute_logprobs(mine)
    box = [None] * world
    torch.distributed.all_gather_object(box, got)
    if rank == 0:
        torch.save(box, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def megatron_logprobs(cache: str, tp: int, pp: int) -> list:
    world = tp * pp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "lp.pt")
        mp.spawn(_logprob_worker, args=(world, _port(), cache, tp, pp, out), nprocs=world, join=True)
        box = torch.load(out)
    ordered = [None] * len(samples())
    for rank, part in enumerate(box):
        for i, lp in zip(range(rank, len(ordered), world), part):
            ordered[i] = lp
    return ordered


def max_abs(a: list, b: list) -> float:
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default="runs/_models")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ref = hf_logprobs(args.cache, samples())
    tp2 = max_abs(ref, megatron_logprobs(args.cache, 2, 1))
    print(f"tp2 log-prob max abs diff vs HF: {tp2:.3g}", flush=True)
    pp2 = max_abs(ref, megatron_logprobs(args.cache, 1, 2))
    print(f"pp2 log-prob max abs diff vs HF: {pp2:.3g}", flush=True)
    print(f"RESULT tp2_logprob_max_abs={tp2:.3g} pp2_logprob_max_abs={pp2:.3g} step_param_max_rel=nan")


if __name__ == "__main__":
    main()
