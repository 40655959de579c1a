"""R3 under FSDP2 on 2 ranks (gloo): each rank replays the traces of its samples; the replayed
log-probs equal the 1-rank ones, and the trainer used the recorded experts everywhere."""
import os
import random
import socket

import torch
import torch.multiprocessing as mp

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.models.moe import encode
from miles_ray.sample import Sample
from miles_ray.training.batching import shard_minibatches
from miles_ray.training.collectives import init_distributed
from miles_ray.training.fsdp import PolicyTrainer


def _samples(n=8, seed=0):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(3, 7), rng.randint(2, 6)
        s = Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)],
                   response_ids=[rng.randint(3, 300) for _ in range(r)], response_logprobs=[-1.0] * r,
                   advantages=[rng.uniform(-1, 1)] * r)
        s.routed_experts = encode(torch.rand(p + r - 1, 2, 8, generator=gen).topk(2, dim=-1).indices, 8)
        out.append(s)
    return out


def _trainer(model_cache, strategy):
    return PolicyTrainer("tiny:qwen3_moe", TrainConfig(strategy=strategy, micro_batch_size=2),
                         AlgorithmConfig(routing_replay="r3"), tiny_cache_dir=model_cache)


def _worker(rank, world, port, model_cache, out_dir):
    init_distributed(rank, world, "127.0.0.1", port)
    trainer = _trainer(model_cache, "fsdp2")
    mine = shard_minibatches([_samples()], world)[rank][0]
    logps = trainer.compute_logprobs(mine)
    trainer.optimizer.step = lambda: None
    metrics = trainer.train_step([mine])
    torch.save({"ids": [s.prompt_index for s in mine], "logps": logps, "metrics": metrics},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_r3_on_two_fsdp2_ranks_equals_one_rank(model_cache, tmp_path):
    one = _trainer(model_cache, "fsdp2")  # also writes the tiny model before the ranks start
    samples = _samples()
    want = one.compute_logprobs(samples)
    for s in samples:
        s.routed_experts = None
    free = one.compute_logprobs(samples)
    mp.spawn(_worker, args=(2, _free_port(), model_cache, str(tmp_path)), nprocs=2, join=True)
    got = {}
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        got.update(zip(out["ids"], out["logps"]))
        assert out["metrics"]["routing_agreement"] == 1.0 and out["metrics"]["routing_agreement_own"] < 0.6
    assert sorted(got) == list(range(len(samples)))
    for i, lp in enumerate(want):
        assert torch.allclose(torch.tensor(got[i]), torch.tensor(lp), atol=1e-5), i
    assert any(not torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3) for a, b in zip(want, free))
