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

Also: Qwen3-MoE at EP=2 vs HF (``ep2_logprob_max_abs``) and R3 on recorded experts, megatron vs
the FSDP backend on the same traces (``r3_logprob_max_abs``).

Also: the bucketed export's peak memory on the gathering rank over one bucket
(``export_peak_over_bucket``) and the trainer's load peak over its stage (``megatron_load_rss_ratio``).

Last line: ``RESULT tp2_logprob_max_abs=<x> pp2_logprob_max_abs=<x> step_param_max_rel=<x>
ep2_logprob_max_abs=<x> r3_logprob_max_abs=<x> packed_logprob_max_abs=<x> bf16_step_rel=<x>
export_peak_over_bucket=<x> megatron_load_rss_ratio=<x>``.
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


def _step_worker(rank, world, port, cache, tp, pp, batch, out, spec, precision="fp32"):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.batching import shard_minibatches

    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer(spec, TrainConfig(**TRAIN), AlgorithmConfig(**ALGO), tiny_cache_dir=cache,
                                    parallel_cfg={"tensor_parallel": tp, "pipeline_parallel": pp,
                                                  "precision": precision})
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


def _par_worker(rank, world, port, cache, par, algo, batch, out):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer("tiny:qwen3_moe", TrainConfig(packing=False), AlgorithmConfig(**algo),
                                    tiny_cache_dir=cache, parallel_cfg=par)
    box = [None] * world
    torch.distributed.all_gather_object(box, trainer.compute_logprobs(batch[rank::world]))
    if rank == 0:
        torch.save(box, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def moe_logprobs(cache: str, par: dict, world: int, batch: list, algo: dict | None = None) -> list:
    """Megatron log-probs of tiny Qwen3-MoE at layout ``par`` over ``world`` ranks, in ``batch`` order."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "lp.pt")
        mp.spawn(_par_worker, args=(world, _port(), cache, par, algo or {}, batch, out), nprocs=world, join=True)
        box = torch.load(out, weights_only=True)
    ordered = [None] * len(batch)
    for rank, part in enumerate(box):
        for i, lp in zip(range(rank, len(ordered), world), part):
            ordered[i] = lp
    return ordered


def ep2_logprob_max_abs(cache: str) -> float:
    """Qwen3-MoE (8 experts, top-2) at EP=2 (2 ranks, 4 experts each, alltoall dispatcher) vs HF."""
    return max_abs(hf_logprobs(cache, samples(), "tiny:qwen3_moe"),
                   moe_logprobs(cache, {"expert_parallel": 2}, 2, samples()))


def traced_samples(seed: int = 1) -> list:
    """:func:`samples` with recorded experts (random top-2 sets, every token but the last)."""
    from miles_ray.models.moe import encode

    gen, batch = torch.Generator().manual_seed(seed), samples()
    for s in batch:
        n = len(s.prompt_ids) + len(s.response_ids) - 1
        s.routed_experts = encode(torch.rand(n, 2, 8, generator=gen).topk(2, dim=-1).indices)
    return batch


def r3_logprob_max_abs(cache: str) -> float:
    """R3 on the same traces: megatron (TP=2 with SP x EP=2, expert-TP 1) vs the FSDP backend."""
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer

    fsdp = PolicyTrainer("tiny:qwen3_moe", TrainConfig(packing=False), AlgorithmConfig(routing_replay="r3"),
                         tiny_cache_dir=cache).compute_logprobs(traced_samples())
    par = {"tensor_parallel": 2, "expert_parallel": 2, "expert_tensor_parallel": 1}
    return max_abs(fsdp, moe_logprobs(cache, par, 2, traced_samples(), {"routing_replay": "r3"}))


# -- scale (issue 26, part 1): packed THD rows, bf16_mixed with the distributed optimizer ----------
def _packed_worker(rank, world, port, cache, tp, pp, out):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    init_distributed(rank, world, "127.0.0.1", port)
    trainer = MegatronPolicyTrainer("tiny:qwen3", TrainConfig(packing=False), AlgorithmConfig(), tiny_cache_dir=cache,
                                    parallel_cfg={"tensor_parallel": tp, "pipeline_parallel": pp,
                                                  "sequence_parallel": tp > 1})
    mine = samples()[rank::world]
    padded = trainer.compute_logprobs(mine)
    trainer.cfg = trainer.cfg.model_copy(update={"packing": True, "max_tokens_per_micro_batch": 24})
    diff = max_abs(trainer.compute_logprobs(mine), padded)
    if rank == 0:
        torch.save(diff, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def packed_logprob_max_abs(cache: str) -> float:
    """Packed (THD, several samples per row) vs padded rows, fp32: TP=2 (+SP) and PP=2, the larger."""
    found = []
    for tp, pp in ((2, 1), (1, 2)):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "d.pt")
            mp.spawn(_packed_worker, args=(2, _port(), cache, tp, pp, out), nprocs=2, join=True)
            found.append(torch.load(out, weights_only=True))
        print(f"packed vs padded log-probs TP={tp} PP={pp}: max abs {found[-1]:.3g}", flush=True)
    return max(found)


def bf16_step_rel(cache: str, batch: list) -> float:
    """One GRPO step in bf16_mixed: megatron (TP=2, bf16 model, fp32 main shards) vs the FSDP
    backend's bf16_mixed (1 rank): max over tensors of max|a - b| / max|b|."""
    import copy

    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer

    fsdp = PolicyTrainer("tiny:qwen3", TrainConfig(**TRAIN, precision="bf16_mixed"), AlgorithmConfig(**ALGO),
                         tiny_cache_dir=cache)
    mine = copy.deepcopy(batch)
    fsdp.prepare(mine, old=False)
    fsdp_metrics = fsdp.train_step([mine])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "step.pt")
        mp.spawn(_step_worker, args=(2, _port(), cache, 2, 1, batch, out, "tiny:qwen3", "bf16_mixed"), nprocs=2,
                 join=True)
        mega = torch.load(out, weights_only=True)
    for k in ("loss", "entropy", "grad_norm"):
        print(f"bf16_mixed step {k}: fsdp {fsdp_metrics[k]:.6g} megatron(TP=2) {mega['metrics'][k]:.6g}")
    ref = {k: v.float() for k, v in fsdp.export_state().items()}
    return max_rel({k: v.float() for k, v in mega["state"].items()}, ref)


def scale_results(cache: str, batch: list) -> str:
    """This part's RESULT keys (``packed_logprob_max_abs``, ``bf16_step_rel``)."""
    packed, bf16 = packed_logprob_max_abs(cache), bf16_step_rel(cache, batch)
    print(f"one GRPO step in bf16_mixed, TP=2 vs FSDP: parameter max relative diff {bf16:.3g}", flush=True)
    return f"packed_logprob_max_abs={packed:.3g} bf16_step_rel={bf16:.3g}"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _exact_rss() -> None:
    """glibc: large blocks always from mmap (a fixed threshold, M_MMAP_THRESHOLD = -3), so a freed
    buffer leaves the RSS and a new one shows in it, instead of pages kept and reused unseen."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)


def _reset_peak() -> int:
    """Reset this process's peak RSS (VmHWM, Linux ``clear_refs`` 5) after returning freed heap
    pages (``malloc_trim``); returns the current RSS in bytes."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") << 10


def _export_worker(rank, world, port, cache, spec, bucket_bytes, out):
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.megatron import parallel
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    _exact_rss()
    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    parallel.initialize(2, 1)  # megatron imported and its groups made before the baseline
    base = _reset_peak()
    trainer = MegatronPolicyTrainer(spec, TrainConfig(packing=False), AlgorithmConfig(kl_coef=0.0), tiny_cache_dir=cache,
                                    parallel_cfg={"tensor_parallel": 2})
    shard = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    load = ((_status_kb("VmHWM") << 10) - base) / shard
    state = trainer.engine_state()
    base = _reset_peak()  # the first export (a second one reuses pages the allocator kept: it reads ~0)
    for bucket in trainer.iter_export(state, 1, bucket_bytes):
        del bucket  # a streaming transport ships and drops each bucket
    peak = ((_status_kb("VmHWM") << 10) - base) / bucket_bytes
    if rank == 0:
        torch.save({"export": peak, "load": load, "shard": shard}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def export_memory(cache: str, spec: str = "tiny:qwen3:768x2", bucket_bytes: int = 8 << 20) -> dict:
    """Rank 0 of TP=2: peak RSS growth of a bucketed export over one bucket's bytes
    (``export_peak_over_bucket``), and of the trainer's construction (sharded loading, the
    megatron stage and its fp32 main weights) over the stage's parameter bytes
    (``megatron_load_rss_ratio``)."""
    from miles_ray.models.loading import resolve_model_path

    resolve_model_path(spec, cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "mem.pt")
        mp.spawn(_export_worker, args=(2, _port(), cache, spec, bucket_bytes, out), nprocs=2, join=True)
        return torch.load(out, weights_only=True)


def export_results(cache: str) -> str:
    """This part's RESULT keys (``export_peak_over_bucket``, ``megatron_load_rss_ratio``)."""
    mem = export_memory(cache)
    print(f"export: peak RSS over one bucket {mem['export']:.3g}; load: peak RSS over the stage's "
          f"{mem['shard'] / 2**20:.1f} MiB {mem['load']:.3g}", flush=True)
    return f"export_peak_over_bucket={mem['export']:.3g} megatron_load_rss_ratio={mem['load']:.3g}"


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
    ep2 = ep2_logprob_max_abs(args.cache)
    print(f"Qwen3-MoE EP=2 log-prob max abs diff vs HF: {ep2:.3g}", flush=True)
    r3 = r3_logprob_max_abs(args.cache)
    print(f"Qwen3-MoE R3, megatron (TP=2 x EP=2) vs FSDP on the same traces: log-prob max abs diff {r3:.3g}")
    print(f"RESULT tp2_logprob_max_abs={tp2:.3g} pp2_logprob_max_abs={pp2:.3g} step_param_max_rel={rel:.3g} "
          f"ep2_logprob_max_abs={ep2:.3g} r3_logprob_max_abs={r3:.3g} {scale_results(args.cache, batch)} "
          f"{export_results(args.cache)}")


if __name__ == "__main__":
    main()
