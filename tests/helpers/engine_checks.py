"""Shared by the engine-server and weight-format tests (HTTP, SGLang strict mode, GPU): a host beyond
loopback, a trainer with weights the engines do not have yet, and the check that an engine serves
exactly a trainer's weights at a version."""
from __future__ import annotations

import socket

import pytest
import torch


def non_loopback() -> str:
    """This machine's outgoing address (a server bound there needs the bearer token), else loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            ip = s.getsockname()[0]
        with socket.socket() as s:
            s.bind((ip, 0))
        return ip if not ip.startswith("127.") else "127.0.0.1"
    except OSError:
        return "127.0.0.1"


HOST = non_loopback()


def perturbed_trainer(tiny_dir, seed):
    """An FSDP policy trainer (one rank) whose weights moved away from the model on disk."""
    from miles_ray.config import AlgorithmConfig, TrainConfig
    from miles_ray.training.fsdp import PolicyTrainer

    trainer = PolicyTrainer(tiny_dir, TrainConfig(), AlgorithmConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer


def assert_serves(engine, trainer, version):
    """The engine's samples carry ``version`` and the trainer's log-probs of them (1e-4)."""
    from miles_ray.rollout import SamplingParams

    reqs = [{"prompt": "What is 1+2?", "label": "3", "prompt_index": 0, "group_id": 0}]
    samples = engine.generate(reqs, 2, SamplingParams(5, top_k=0))  # top_k 0 is sent as SGLang's -1
    assert all(s.weight_version == version for s in samples)
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        assert lp == pytest.approx(s.response_logprobs, abs=1e-4)


def tokenizer_of(tiny_dir):
    from miles_ray.models import load_tokenizer

    return load_tokenizer(tiny_dir)
