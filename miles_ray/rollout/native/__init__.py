"""The native engine: slot KV cache, continuous batching, speculative decoding (no HTTP here)."""
from miles_ray.rollout.native.engine import NativeEngine  # noqa: F401
