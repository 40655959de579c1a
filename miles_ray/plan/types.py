"""The plan's unit: an :class:`Item` of GPU memory, and the fixed assumptions every plan states."""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
CUDA_CONTEXT = GIB  # per GPU process: CUDA context, cuBLAS / NCCL workspaces, allocator slack (assumed)
SGLANG_CUDA_GRAPHS = GIB  # an SGLang engine's captured CUDA graphs (assumed; native / hf engines capture none)
SGLANG_FRACTION = 0.85  # SGLang's --mem-fraction-static when neither we nor the user set one (assumed)
NATIVE_MAX_RUNNING = 64  # the native engine's running requests (slots of its KV cache), NativeEngine's default

ASSUMPTIONS = (
    f"CUDA context + workspaces: {CUDA_CONTEXT / GIB:g} GiB per GPU process",
    f"SGLang CUDA graphs: {SGLANG_CUDA_GRAPHS / GIB:g} GiB per engine (native / hf engines: none)",
    f"SGLang mem_fraction_static when unset: 0.5 colocated (ours), {SGLANG_FRACTION} otherwise",
    f"native engine: at most {NATIVE_MAX_RUNNING} requests in its KV cache at once",
    "KV cache in the model dtype; MLA models keep the compressed latent (kv_lora_rank + rope dim) per layer",
    "activations: estimate from layer shapes (see docs/scale.md), not yet checked against a GPU measurement",
)


@dataclass(frozen=True)
class Item:
    """``bytes`` of GPU memory named ``name``; ``knob`` is the setting that shrinks it; ``phase``
    says when a colocated GPU holds it: ``both``, ``train`` (engines released) or ``rollout``
    (trainer optimizer offloaded)."""
    name: str
    bytes: int
    knob: str
    phase: str = "both"

    @property
    def gib(self) -> float:
        return self.bytes / GIB
