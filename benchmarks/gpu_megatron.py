"""GPU check of the megatron backend on one GPU: TP=1, PP=1, an NCCL process group of one rank,
megatron's layer spec chosen by `layer_spec=auto` (Transformer Engine where it imports).

1. log-probs of the megatron GPTModel vs the HF model on CUDA (fp32, tiny Qwen3 and Qwen3-MoE);
2. one identical GRPO step, megatron vs the FSDP backend on CUDA: parameter max relative diff.

    python benchmarks/gpu_megatron.py [--cache runs/_models]

Last line: ``RESULT gpu=<name> spec=<te|local> logprob_max_abs=<x> moe_logprob_max_abs=<x> step_param_max_rel=<x>``.
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from megatron_parity import ALGO, TRAIN, fsdp_step, hf_logprobs, max_abs, max_rel, samples, step_samples  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megatron_trainer(cache: str, spec: str, train: dict):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    return MegatronPolicyTrainer(spec, TrainConfig(**train), AlgorithmConfig(**ALGO), tiny_cache_dir=cache,
                                 parallel_cfg={"tensor_parallel": 1, "pipeline_parallel": 1})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default="runs/_models")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()  # CPU: the same check over gloo (a smoke run of this script)
    if cuda:
        torch.cuda.set_device(0)
    from miles_ray.training.megatron.model import spec_name
    from miles_ray.training.collectives import init_distributed

    init_distributed(0, 1, "127.0.0.1", _port(), backend="nccl" if cuda else "gloo")
    used = spec_name("auto")
    out = {}
    for spec in ("tiny:qwen3", "tiny:qwen3_moe"):
        trainer = megatron_trainer(args.cache, spec, dict(packing=False))
        out[spec] = max_abs(hf_logprobs(args.cache, samples(), spec), trainer.compute_logprobs(samples()))
        print(f"{spec}: megatron (TP=1, CUDA) log-prob max abs diff vs HF on CUDA: {out[spec]:.3g}", flush=True)
        del trainer
    batch = step_samples(args.cache)
    fsdp = fsdp_step(args.cache, batch)
    trainer = megatron_trainer(args.cache, "tiny:qwen3", TRAIN)
    mine = copy.deepcopy(batch)
    trainer.prepare(mine, old=False)
    metrics = trainer.train_step([mine])
    rel = max_rel({k: v.float().cpu() for k, v in trainer.full_state_dict().items()},
                  {k: v.float().cpu() for k, v in fsdp["state"].items()})
    for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        print(f"step {k}: fsdp {fsdp['metrics'][k]:.6g} megatron {metrics[k]:.6g}")
    torch.distributed.destroy_process_group()
    name = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "none(cpu)"
    print(f"RESULT gpu={name} spec={used} "
          f"logprob_max_abs={out['tiny:qwen3']:.3g} moe_logprob_max_abs={out['tiny:qwen3_moe']:.3g} "
          f"step_param_max_rel={rel:.3g}")


if __name__ == "__main__":
    main()
