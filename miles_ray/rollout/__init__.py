"""Rollout engines: ``hf`` (transformers.generate) and ``native`` (slot KV cache, continuous batching)."""
from miles_ray.rollout.hf_engine import HFRolloutEngine  # noqa: F401
from miles_ray.rollout.native.engine import NativeEngine  # noqa: F401
from miles_ray.rollout.types import SamplingParams  # noqa: F401

ENGINES = {"hf": HFRolloutEngine, "native": NativeEngine}


def make_engine(backend: str, **kwargs):
    if backend not in ENGINES:
        raise ValueError(f"rollout.backend='{backend}' is unknown; choose one of {sorted(ENGINES)}")
    return ENGINES[backend](**kwargs)
