"""The weights an in-process engine serves, with its health state; shared by composition.

Both engines (``hf`` and ``native``) hold one :class:`EngineWeights` around their model. It owns
the state machine of :mod:`miles_ray.rollout.health`:

    READY --load_part--> STALE --finish_load(v)--> READY (serves v)
    READY/STALE --release--> RELEASED --resume--> STALE

Invariant: ``state == READY`` iff the last load was complete and memory is held; ``version`` is
the version of that load (0 until the first sync, see :mod:`miles_ray.versioning`).
"""
from __future__ import annotations

import torch

from miles_ray.models import load_model, load_tokenizer
from miles_ray.rollout.health import READY, RELEASED, STALE, EngineNotReady
from miles_ray.weights import check_complete, to_buckets
from miles_ray.weights.buckets import iter_tensors, load_named


def load_for_serving(model_spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models",
                     quantization: str | None = None, fp8_backend: str = "auto"):
    """(tokenizer, model) for an engine: eval mode, on the GPU when there is one; with
    ``quantization`` (fp8, int4) its decoder linears serve quantized weights."""
    tokenizer = load_tokenizer(model_spec, tiny_cache_dir)
    model = load_model(model_spec, dtype, tiny_cache_dir)
    if torch.cuda.is_available():
        model.cuda()
    if quantization:
        from miles_ray.quant.modules import quantize_engine_model

        quantize_engine_model(model, quantization, fp8_backend)
    return tokenizer, model


class EngineWeights:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.version = 0
        self.state = READY  # serves its initial weights (version 0) until the first sync
        self._shapes: dict | None = None
        self._loading: dict | None = None

    def require_ready(self) -> None:
        if self.state != READY:
            raise EngineNotReady(f"engine is {self.state} (weight version {self.version}); it serves only after a "
                                 "complete weight load")

    def load_buckets(self, buckets: list, version: int) -> int:
        """Load a complete weight version in place; READY afterwards."""
        for b in buckets:
            self.load_part(b)
        return self.finish_load(version)

    def load_part(self, bucket) -> None:
        """Load one bucket (streamed sync); the engine does not serve until :meth:`finish_load`."""
        self.load_tensors(list(iter_tensors(bucket)))

    def load_tensors(self, named: list) -> None:
        """Load ``(name, tensor)`` pairs (SGLang's named-tensor formats); STALE until :meth:`finish_load`."""
        if self.state == RELEASED:
            raise EngineNotReady("engine memory is released; resume_memory() before loading weights")
        if self._loading is None:
            self._loading = {"params": dict(self.model.state_dict(keep_vars=True)), "names": set()}
            self.state = STALE
        load_named(self.model, named, self._loading["params"])
        self._loading["names"].update(name for name, _ in named)

    def relabel(self, version: int) -> int:
        """Serve the current weights as ``version`` (SGLang's /update_weight_version without a
        pending load); a pending load is finished (checked complete) instead."""
        if self._loading is not None:
            return self.finish_load(version)
        self.require_ready()
        self.version = version
        return version

    def shapes(self) -> dict:
        return {n: (tuple(p.shape), p.dtype) for n, p in self.model.state_dict().items()}

    def finish_load(self, version: int) -> int:
        """Check that every weight arrived, then serve ``version``."""
        names = self._loading["names"] if self._loading else set()
        self._loading = None
        check_complete(self.model, names)
        for module in self.model.modules():  # quantized linears dequantize the new weights on next use
            refresh = getattr(module, "refresh_quantized", None)
            if refresh is not None:
                refresh()
        self.version, self.state = version, READY
        return version

    def update(self, state_dict: dict, version: int) -> int:
        return self.load_buckets(to_buckets(state_dict, version), version)

    def release(self) -> None:
        """Free the parameters (colocation: the trainer uses the device meanwhile)."""
        self._shapes = {id(p): (p.shape, p.dtype) for p in self.model.parameters()}
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.state = RELEASED

    def resume(self) -> None:
        """Re-allocate the parameters; they hold garbage until the next complete load (STALE)."""
        if self.state != RELEASED:
            return
        for p in self.model.parameters():
            shape, dtype = self._shapes[id(p)]
            p.data = torch.empty(shape, dtype=dtype, device=p.device)
        self.state = STALE

    def mark_restarted(self) -> None:
        """A restarted engine serves only after a weight refit (NeMo-RL style)."""
        self.state = STALE

    def health(self) -> dict:
        return {"state": self.state, "weight_version": self.version}
