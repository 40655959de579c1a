"""Rollout engines behind one interface (:mod:`.engines`): in-process ``hf`` (transformers.generate)
and ``native`` (slot KV cache, continuous batching), or an engine server over HTTP (native, sglang)."""
from miles_ray.rollout.hf_engine import HFRolloutEngine  # noqa: F401
from miles_ray.rollout.native.engine import NativeEngine  # noqa: F401
from miles_ray.rollout.types import SamplingParams  # noqa: F401
