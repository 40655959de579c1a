"""Megatron backend parity on CPU (fp32, tiny Qwen3), real gloo process groups:

1. log-probs of the megatron GPTModel at TP=2 and at PP=2 vs the HF model's (max abs difference);
2. one identical GRPO step (default train.lr, AdamW, clipping active, KL and entropy terms on) on
   the megatron backend (TP=2) and on the FSDP backend (1 rank): the gathered megatron parameters,
   converted to HF names, vs the FSDP ones: max over tensors of max|a - b| / max|b|. Also printed:
   the relative L2 difference of the two updates (AdamW's first step is ~lr * sign(grad), so
   elements whose gradient is at fp32 noise level (~1e-10) may move differently; it is reported,
   not hidden).

    python benchmarks/megatron_parity.py [--cache runs/_models]

Also printed (not in RESULT): tiny Qwen3-MoE log-probs and one GRPO step at TP=2 vs HF / FSDP.

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


def hf_logprobs(cache: str, batch_samples: list, spec: str = "tiny:qwen3") -> list:
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer

    trainer = PolicyTrainer(spec, TrainConfig(packing=False), AlgorithmConfig(), tiny_cache_dir=cache)
    return trainer.compute_logprobs(batch_samples)


def _logprob_worker(rank, world, port, cache, tp, pp, out, spec):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer
    from miles_ray.training.collectives import init_distributed

    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer(spec, TrainConfig(packing=False), AlgorithmConfig(), tiny_cache_dir=cache,
                                    parallel_cfg={"tensor_parallel": tp, "pipeline_parallel": pp})
    mine = samples()[rank::world]
    got = trainer.compute_logprobs(mine)
    box = [None] * world
    torch.distributed.all_gather_object(box, got)
    if rank == 0:
        torch.save(box, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def megatron_logprobs(cache: str, tp: int, pp: int, spec: str = "tiny:qwen3") -> list:
    world = tp * pp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "lp.pt")
        mp.spawn(_logprob_worker, args=(world, _port(), cache, tp, pp, out, spec), nprocs=world, join=True)
        box = torch.load(out, weights_only=True)
    ordered = [None] * len(samples())
    for rank, part in enumerate(box):
        for i, lp in zip(range(rank, len(ordered), world), part):
            ordered[i] = lp
    return ordered


TRAIN = dict(packing=False, micro_batch_size=2, grad_clip=1.0)  # train.lr: the default (1e-5)
ALGO = dict(kl_coef=0.05, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)


def step_samples(cache: str, spec: str = "tiny:qwen3") -> list:
    """Samples with old log-probs perturbed off the current policy (ratios != 1, some clipped)."""
    batch = samples()
    for s, lp in zip(batch, hf_logprobs(cache, batch, spec)):
        s.old_logprobs = [x + 0.15 * ((k % 3) - 1) for k, x in enumerate(lp)]
    return batch


def fsdp_step(cache: str, batch: list, spec: str = "tiny:qwen3") -> dict:
    import copy

    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer

    trainer = PolicyTrainer(spec, TrainConfig(**TRAIN), AlgorithmConfig(**ALGO), tiny_cache_dir=cache)
    mine = copy.deepcopy(batch)
    trainer.prepare(mine, old=False)
    metrics = trainer.train_step([mine])
    return {"state": trainer.export_state(), "metrics": metrics}


def _step_worker(rank, world, port, cache, tp, pp, batch, out, spec):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.batching import shard_minibatches

    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer(spec, TrainConfig(**TRAIN), AlgorithmConfig(**ALGO), tiny_cache_dir=cache,
                                    parallel_cfg={"tensor_parallel": tp, "pipeline_parallel": pp})
    mine = shard_minibatches([batch], world)[rank]
    trainer.prepare(mine[0], old=False)
    metrics = trainer.train_step(mine)
    state = trainer.full_state_dict()
    if rank == 0:
        torch.save({"state": state, "metrics": metrics}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def megatron_step(cache: str, batch: list, tp: int, pp: int, spec: str = "tiny:qwen3") -> dict:
    world = tp * pp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "step.pt")
        mp.spawn(_step_worker, args=(world, _port(), cache, tp, pp, batch, out, spec), nprocs=world, join=True)
        return torch.load(out, weights_only=True)


def max_rel(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|b| (the same HF names on both sides)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def update_rel(cache: str, mega: dict, fsdp: dict) -> float:
    """||update_megatron - update_fsdp|| / ||update_fsdp|| over all parameters (L2)."""
    from miles_ray.models import load_model

    init = load_model("tiny:qwen3", "float32", cache).state_dict()
    num = sum(float(((mega["state"][k] - fsdp["state"][k]) ** 2).sum()) for k in fsdp["state"])
    den = sum(float(((fsdp["state"][k] - init[k]) ** 2).sum()) for k in fsdp["state"])
    return (num / den) ** 0.5


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
    batch = step_samples(args.cache)
    fsdp = fsdp_step(args.cache, batch)
    mega = megatron_step(args.cache, batch, 2, 1)
    for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        print(f"step {k}: fsdp {fsdp['metrics'][k]:.6g} megatron(TP=2) {mega['metrics'][k]:.6g}")
    rel = max_rel(mega["state"], fsdp["state"])
    print(f"one GRPO step, TP=2 vs FSDP: update relative L2 diff {update_rel(args.cache, mega, fsdp):.3g}")
    print(f"one GRPO step, TP=2 vs FSDP: parameter max relative diff {rel:.3g}", flush=True)
    moe = max_abs(hf_logprobs(args.cache, samples(), "tiny:qwen3_moe"),
                  megatron_logprobs(args.cache, 2, 1, "tiny:qwen3_moe"))
    print(f"Qwen3-MoE (8 experts, top-2) TP=2 log-prob max abs diff vs HF: {moe:.3g}", flush=True)
    moe_batch = step_samples(args.cache, "tiny:qwen3_moe")
    moe_rel = max_rel(megatron_step(args.cache, moe_batch, 2, 1, "tiny:qwen3_moe")["state"],
                      fsdp_step(args.cache, moe_batch, "tiny:qwen3_moe")["state"])
    print(f"Qwen3-MoE one GRPO step, TP=2 (+SP) vs FSDP: parameter max relative diff {moe_rel:.3g}", flush=True)
    print(f"RESULT tp2_logprob_max_abs={tp2:.3g} pp2_logprob_max_abs={pp2:.3g} step_param_max_rel={rel:.3g}")


if __name__ == "__main__":
    main()
