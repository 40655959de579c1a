"""What multi-rank tests share: a free loopback port for a rendezvous, and random samples of the
shape the trainers take (the same seed gives the same samples in every rank)."""
from __future__ import annotations

import random
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_samples(n: int = 6, seed: int = 0, old_logprobs: bool = False) -> list:
    from miles_ray.sample import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 7), rng.randint(1, 8)
        resp = [rng.randint(3, 300) for _ in range(r)]
        extra = {"old_logprobs": [-1.0 + 0.1 * (k % 3) for k in range(r)]} if old_logprobs else {}
        out.append(Sample(i, i // 2, "p", "1", [rng.randint(3, 300) for _ in range(p)], response_ids=resp,
                          response_logprobs=[-1.0] * r, advantages=[rng.uniform(-2, 2)] * r, **extra))
    return out
