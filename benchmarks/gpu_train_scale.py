"""GPU check of the large-model training path (one GPU, no Ray): a random-init model of
Qwen2.5-0.5B's shape (vocab 151,936, 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4,864,
tied embeddings), ``bf16_mixed``, packing, activation checkpointing, 4k-token micro-batches.

    python benchmarks/gpu_train_scale.py [--steps 3] [--tokens 32768]

Per configuration: training tokens/s (one RL train step: forward, backward, optimizer, real
tokens only), the old-log-prob pass separately, model FLOPs utilisation (6 N T for the decoder,
6 d V per scored token for the LM head, 6 d L sum(n^2) for causal attention; recomputation by
checkpointing not counted) against the GPU's dense bf16 peak, and peak allocated memory.
Last line: RESULT gpu=<name> tokens_per_s=<x> mfu=<x> peak_mem_gib=<x> (the main configuration)
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def write_model(folder: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from miles_ray.models.tiny import train_tokenizer

    tok = train_tokenizer()
    config = Qwen2Config(**SHAPE, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def samples(total_tokens: int, seed: int = 0) -> list:
    from miles_ray.sample import Sample

    rng, out, n = random.Random(seed), [], 0
    while n < total_tokens:
        p = rng.randint(32, 256)
        r = max(1, min(2048, int(rng.lognormvariate(math.log(256), 1.0))))
        out.append(Sample(len(out), len(out), "p", "1", [rng.randint(3, 500) for _ in range(p)],
                          response_ids=[rng.randint(3, 500) for _ in range(r)], response_logprobs=[-1.0] * r,
                          advantages=[rng.uniform(-1, 1)] * r))
        n += p + r
    return out


def flops(batch: list, n_params_decoder: int) -> float:
    d, L, V = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["vocab_size"]
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
    scored = sum(len(s.response_ids) for s in batch)
    attn = 6 * d * L * sum((len(s.prompt_ids) + len(s.response_ids)) ** 2 for s in batch)  # causal: half of 12
    return 6 * n_params_decoder * tokens + 6 * d * V * scored + attn


def measure(folder: Path, name: str, steps: int, total: int, profile: bool = False, **train) -> dict:
    import torch

    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer

    cfg = TrainConfig(**{"precision": "bf16_mixed", "packing": True, "max_tokens_per_micro_batch": 4096, "lr": 1e-6,
                         **train})
    trainer = PolicyTrainer(str(folder), cfg, AlgorithmConfig(), tiny_cache_dir=str(folder.parent))
    assert next(trainer.module.parameters()).dtype == torch.float32  # fp32 master weights
    n_dec = sum(p.numel() for n, p in trainer.module.named_parameters() if "embed_tokens" not in n)
    data = samples(total)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in data)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_s, prep_s = [], []
    for step in range(steps + 1):
        batch = [type(s)(**s.to_dict()) for s in data]
        t0 = time.perf_counter()
        trainer.prepare(batch)
        sync()
        t1 = time.perf_counter()
        metrics = trainer.train_step([batch])
        sync()
        t2 = time.perf_counter()
        if step:  # step 0 warms up
            prep_s.append(t1 - t0)
            train_s.append(t2 - t1)
    if profile and cuda:  # where one more step's GPU time goes
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            trainer.train_step([[type(s)(**s.to_dict()) for s in data]])
            sync()
        print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    gpu = torch.cuda.get_device_name() if cuda else "cpu-smoke"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), 989e12)
    best = min(train_s)
    out = {"config": name, "gpu": gpu, "real_tokens": real, "train_step_s": best, "tokens_per_s": real / best,
           "old_logprob_pass_s": min(prep_s), "mfu": flops(data, n_dec) / best / peak,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, "grad_norm": metrics["grad_norm"],
           "samples": len(data)}
    print(json.dumps(out), flush=True)
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny shape on CPU: checks the code path only")
    ap.add_argument("--profile", action="store_true", help="print the top GPU ops of one more step")
    ap.add_argument("--padded", action="store_true", help="also the right-padded layout (8 samples per micro-batch)")
    args = ap.parse_args()
    if args.cpu_smoke:
        SHAPE.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
        args.steps, args.tokens = 1, 3000
    folder = write_model(Path(tempfile.mkdtemp(prefix="qwen05-")) / "model")
    main_cfg = measure(folder, "bf16_mixed+packing+checkpointing", args.steps, args.tokens, profile=args.profile,
                       gradient_checkpointing=True)
    measure(folder, "bf16_mixed+packing", args.steps, args.tokens, gradient_checkpointing=False)
    if args.padded:
        measure(folder, "bf16_mixed+padded(8/micro)+checkpointing", 1, args.tokens // 2, gradient_checkpointing=True,
                packing=False, micro_batch_size=8, max_tokens_per_micro_batch=0)
    print(f"RESULT gpu={main_cfg['gpu'].replace(' ', '_')} tokens_per_s={main_cfg['tokens_per_s']:.0f} "
          f"mfu={main_cfg['mfu']:.3f} peak_mem_gib={main_cfg['peak_mem_gib']:.1f}")


if __name__ == "__main__":
    main()
