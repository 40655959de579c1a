"""Rollout engines behind one interface.

Layout (what a reader looks for):
- here: the interface (:mod:`.engines`), sampling parameters (:mod:`.types`), engine health
  states (:mod:`.health`), the engine side of weight loading (:mod:`.engine_weights`), in-process
  engines (:mod:`.in_process`, :mod:`.hf_engine`), the factory (:mod:`.backends`), dumps;
- :mod:`.native`: our engine (slot KV cache, continuous batching, speculative decoding);
- :mod:`.http`: our engine server, its guards and bodies, the router, the HTTP engine client and
  the server launcher;
- :mod:`.sglang`: SGLang's API (strict request rules, cited), the client that speaks it, launch flags.
Weight payload formats (SGLang tensor, flattened bucket, raw) are transports: :mod:`miles_ray.weights`.
"""
from miles_ray.rollout.types import SamplingParams  # noqa: F401
