"""Data parallelism over a real gloo group: the same global batch gives the same loss and
gradients on 1 rank and on 2 (DDP and FSDP2), with micro-batching and dynamic batching."""
import os
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.sample import Sample
from miles_ray.training.fsdp import PolicyTrainer
from miles_ray.training.collectives import init_distributed
from miles_ray.training.batching import make_minibatches, shard_minibatches


def _samples(n=10, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 6), rng.randint(0 if i == 3 else 1, 7)  # sample 3 may be fully masked
        resp = [rng.randint(3, 300) for _ in range(r)]
        out.append(Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)], response_ids=resp,
                          response_logprobs=[-1.0] * r, advantages=[rng.uniform(-2, 2)] * r))
    return out


def _trainer(model_cache, strategy, agg, max_tokens):
    train = TrainConfig(micro_batch_size=2, max_tokens_per_micro_batch=max_tokens, strategy=strategy, grad_clip=1e9)
    algo = AlgorithmConfig(kl_coef=0.1, loss_agg=agg, eps_low=0.1, eps_high=0.1, entropy_coef=0.01)
    return PolicyTrainer("tiny:qwen3", train, algo, tiny_cache_dir=model_cache)


def _run(trainer, minibatches):
    trainer.optimizer.step = lambda: None  # keep weights fixed: compare gradients
    for mb in minibatches:
        trainer.prepare(mb)
        for s in mb:  # perturb old log-probs so the ratio (and clipping) is not trivially 1
            s.old_logprobs = [x + 0.15 * ((k % 3) - 1) for k, x in enumerate(s.old_logprobs)]
    metrics = trainer.train_step(minibatches)
    grads = []
    for p in trainer.model.parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads.append(g.detach().clone())
    return metrics, grads


def _dp_check(rank, world, model_cache, strategy, agg, out_path):
    trainer = _trainer(model_cache, strategy, agg, max_tokens=24 if rank == 0 else 0)
    shards = shard_minibatches([_samples()], world)
    metrics, grads = _run(trainer, shards[rank])
    if rank == 0:
        torch.save({"metrics": metrics, "grads": grads}, out_path)


def _worker(rank, world, port, model_cache, strategy, agg, folder, out_dir):
    """Every 2-rank check of one strategy in one gloo group (one spawn, not three): the DP=2
    gradients of a step, then one SFT step saved as a sharded checkpoint, then that checkpoint
    loaded by a fresh trainer. Rank 0 writes what each produced under ``out_dir``."""
    init_distributed(rank, world, "127.0.0.1", port)
    _dp_check(rank, world, model_cache, strategy, agg, os.path.join(out_dir, "rank0.pt"))
    torch.distributed.barrier()
    _ckpt_worker(rank, world, port, model_cache, strategy, folder, "save", os.path.join(out_dir, "saved.pt"))
    _ckpt_worker(rank, world, port, model_cache, strategy, folder, "load", os.path.join(out_dir, "two.pt"))
    torch.distributed.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT once)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[("ddp", "token_mean"), ("fsdp2", "seq_mean_token_sum")], ids=["ddp", "fsdp2"])
def two_ranks(request, model_cache, tiny_dir, tmp_path_factory):
    """One 2-rank spawn per strategy, shared by the tests below: (strategy, agg, its outputs folder)."""
    strategy, agg = request.param
    out = tmp_path_factory.mktemp(f"two_ranks_{strategy}")
    mp.spawn(_worker, args=(2, _free_port(), model_cache, strategy, agg, str(out / "ck"), str(out)), nprocs=2,
             join=True)
    return strategy, agg, out


def test_dp1_equals_dp2(model_cache, two_ranks):
    strategy, agg, out = two_ranks
    ref_metrics, ref_grads = _run(_trainer(model_cache, strategy, agg, 0), make_minibatches(_samples(), 1))
    got = torch.load(out / "rank0.pt", weights_only=True)
    for key in ("loss", "pg_loss", "kl", "entropy", "clipfrac"):
        assert got["metrics"][key] == pytest.approx(ref_metrics[key], abs=1e-5), key
    assert ref_metrics["clipfrac"] > 0  # the clipped branch is exercised
    for a, b in zip(ref_grads, got["grads"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_shard_minibatches_keeps_every_sample_once():
    samples = _samples(11)
    mbs = make_minibatches(samples, 3)
    assert [len(m) for m in mbs] == [4, 4, 3]
    shards = shard_minibatches(mbs, 2)
    for k in range(3):
        assert shards[0][k] + shards[1][k] == mbs[k]
    assert shard_minibatches([samples[:1]], 2) == [[samples[:1]], [[]]]


def _ckpt_worker(rank, world, port, model_cache, strategy, folder, mode, out_path):
    """mode save: train one SFT step and write a sharded checkpoint (+ rank 0's full weights);
    mode load: load it (any world size) and write rank 0's full weights and optimizer moments.
    With world > 1 it runs inside :func:`_worker`'s group."""
    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(strategy=strategy, micro_batch_size=4), AlgorithmConfig(),
                            tiny_cache_dir=model_cache, seed=11 if mode == "load" else 0)
    if mode == "save":
        trainer.sft_step(_samples()[rank::world], 1e-2)
        trainer.save_checkpoint(folder)
    else:
        trainer.load_checkpoint(folder)
    state = trainer.full_state_dict()
    moments = {}
    for name, value in trainer.optimizer.state_dict()["state"].items():
        v = value["exp_avg"]
        moments[name] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    if rank == 0:
        torch.save({"weights": state, "version": trainer.version, "moments": moments}, out_path)
    if world > 1:
        torch.distributed.barrier()


def test_checkpoint_of_two_ranks_resumes_on_one_and_two(model_cache, tmp_path, two_ranks):
    """Saved by 2 ranks (in :func:`_worker`), loaded on 1 rank here and on 2 ranks there."""
    strategy, _, out = two_ranks
    saved = torch.load(out / "saved.pt", weights_only=True)
    _ckpt_worker(0, 1, 0, model_cache, strategy, str(out / "ck"), "load", str(tmp_path / "one.pt"))
    for path in (tmp_path / "one.pt", out / "two.pt"):
        got = torch.load(path, weights_only=True)
        assert got["version"] == saved["version"] == 1
        assert all(torch.equal(saved["weights"][k], got["weights"][k]) for k in saved["weights"]), path.name
        assert sorted(got["moments"]) == sorted(saved["moments"])
        assert all(torch.equal(saved["moments"][k], got["moments"][k]) for k in saved["moments"]), path.name
