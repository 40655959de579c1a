"""Megatron backend on CPU over real gloo groups (torch.multiprocessing spawn, like
test_distributed): TP=1 (DP=2), TP=2 and PP=2 against the HF model and the FSDP backend; the
HF <-> Megatron conversion round trip; distributed checkpoint save / resume; start-time layout
checks. (Ray: a run on the megatron backend with a trainer-rank death is in
test_megatron_ray.py.)"""
import copy

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from helpers.ranks import free_port, random_samples

TRAIN = dict(packing=False, micro_batch_size=2, grad_clip=1.0)
ALGO = dict(kl_coef=0.05, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)


@pytest.fixture(scope="module")
def reference(model_cache):
    """HF log-probs, and the FSDP backend's parameters after one GRPO step (1 rank)."""
    from miles_ray.training.fsdp import PolicyTrainer

    torch.set_num_threads(1)
    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(**TRAIN), AlgorithmConfig(**ALGO), tiny_cache_dir=model_cache)
    batch = random_samples()
    logprobs = trainer.compute_logprobs(batch)
    for s, lp in zip(batch, logprobs):  # old log-probs off the policy: ratios != 1, some clipped
        s.old_logprobs = [x + 0.15 * ((k % 3) - 1) for k, x in enumerate(lp)]
    initial = {k: v.clone() for k, v in trainer.export_state().items()}
    stepped = copy.deepcopy(batch)
    trainer.prepare(stepped, old=False)
    metrics = trainer.train_step([stepped])
    return {"logprobs": logprobs, "batch": batch, "initial": initial, "stepped": trainer.export_state(),
            "metrics": metrics}


def _worker(rank, world, port, cache, tp, pp, ref, out, ckpt, sp):
    from miles_ray.training.megatron import parallel
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer
    from miles_ray.training.collectives import init_distributed
    from miles_ray.training.batching import shard_minibatches
    from miles_ray.weights.buckets import iter_tensors

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    par = {"tensor_parallel": tp, "pipeline_parallel": pp, "sequence_parallel": sp}

    def build():
        return MegatronPolicyTrainer("tiny:qwen3", TrainConfig(**TRAIN), AlgorithmConfig(**ALGO), tiny_cache_dir=cache,
                                     parallel_cfg=par)

    trainer = build()
    found = {"roundtrip": trainer.full_state_dict(), "sp": trainer.mconfig.sequence_parallel,
             "norm": type(trainer.model.decoder.layers[0].input_layernorm).__name__}
    buckets = list(trainer.iter_export(trainer.engine_state(), 1, 16 << 10))  # weight sync: many small buckets
    found["buckets"] = [(b.index, b.count, dict(iter_tensors(b))) for b in buckets]
    parts = [None] * world
    torch.distributed.all_gather_object(parts, trainer.compute_logprobs(random_samples()[rank::world]))
    found["logprobs"] = parts
    mine = shard_minibatches([copy.deepcopy(ref["batch"])], world)[rank]
    trainer.prepare(mine[0], old=False)
    found["metrics"] = trainer.train_step(mine)
    found["stepped"] = trainer.full_state_dict()
    if ckpt:  # save, step again; a fresh trainer resumed from the folder takes the same second step
        trainer.save_checkpoint(ckpt)
        trainer.train_step(copy.deepcopy(mine))
        found["second"] = trainer.full_state_dict()
        resumed = build()
        resumed.load_checkpoint(ckpt)
        found["resumed_version"] = resumed.version
        resumed.train_step(copy.deepcopy(mine))
        found["resumed_second"] = resumed.full_state_dict()
        parallel.destroy()  # the same checkpoint at another layout: TP=1 x DP=2
        par = {"tensor_parallel": 1, "pipeline_parallel": 1}
        resharded = build()
        resharded.load_checkpoint(ckpt)
        found["resharded"] = resharded.full_state_dict()
    if rank == 0:
        torch.save(found, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _run(tmp_path, model_cache, reference, tp, pp, world, ckpt=False, sp=False):
    out = str(tmp_path / f"found_tp{tp}_pp{pp}.pt")
    folder = str(tmp_path / "ckpt") if ckpt else None
    mp.spawn(_worker, args=(world, free_port(), model_cache, tp, pp, reference, out, folder, sp), nprocs=world, join=True)
    return torch.load(out, weights_only=True)  # plain tensors, numbers, strings written by our own worker


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def _check(found, reference, world):
    # HF -> Megatron (sharded) -> HF: bit for bit
    assert found["roundtrip"].keys() == reference["initial"].keys()
    assert all(torch.equal(found["roundtrip"][k], v) for k, v in reference["initial"].items())
    # the bucketed export (packed one bucket at a time from the shards) carries the same tensors
    buckets = found["buckets"]
    assert len(buckets) > 3 and [b[0] for b in buckets] == list(range(buckets[0][1]))
    exported = {k: v for _, _, tensors in buckets for k, v in tensors.items()}
    assert exported.keys() == reference["initial"].keys()
    assert all(torch.equal(exported[k], v) for k, v in reference["initial"].items())
    # log-probs from the vocab-parallel logits equal HF's (fp32)
    got = [None] * len(reference["logprobs"])
    for rank, part in enumerate(found["logprobs"]):
        for i, lp in zip(range(rank, len(got), world), part):
            got[i] = lp
    diff = max(abs(x - y) for u, v in zip(got, reference["logprobs"]) for x, y in zip(u, v))
    assert diff <= 1e-5
    # one GRPO step (policy loss, KL, entropy, clipping, AdamW) equals the FSDP backend's
    for k in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert found["metrics"][k] == pytest.approx(reference["metrics"][k], rel=1e-4, abs=1e-6), k
    assert _max_rel(found["stepped"], reference["stepped"]) <= 1e-4


def test_tp2_sequence_parallel_logprobs_step_and_resume(tmp_path, model_cache, reference):
    """TP=2 with sequence parallelism (TP=2 without it: benchmarks/megatron_parity.py)."""
    found = _run(tmp_path, model_cache, reference, tp=2, pp=1, world=2, ckpt=True, sp=True)
    assert found["sp"] and found["norm"] == "SequenceParallelRMSNorm"
    _check(found, reference, 2)
    assert found["resumed_version"] == 1
    assert all(torch.equal(found["resumed_second"][k], v) for k, v in found["second"].items())
    assert all(torch.equal(found["resharded"][k], v) for k, v in found["stepped"].items())  # TP=2 -> TP=1


def test_pp2_logprobs_and_step(tmp_path, model_cache, reference):
    _check(_run(tmp_path, model_cache, reference, tp=1, pp=2, world=2), reference, 2)


def test_tp1_data_parallel_2(tmp_path, model_cache, reference):
    _check(_run(tmp_path, model_cache, reference, tp=1, pp=1, world=2), reference, 2)
