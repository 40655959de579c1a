"""Sharded loading for the megatron backend: a lazy, read-only view of an HF folder's safetensors
files that :func:`~miles_ray.training.megatron.convert.to_megatron` takes as its HF state dict.

Each value is a :class:`LazyTensor` (a region of one file tensor) or, for a fused MoE expert
parameter that the files hold per expert (:class:`~miles_ray.models.sharded_moe.Stacked`), a
:class:`LazyExperts`. ``chunk`` (any dim) and integer indexing on dim 0 narrow the region without
reading; anything else (``clone``, ``reshape``, ``torch.cat`` ...) reads exactly the region through
``safe_open(...).get_slice`` and goes on with a real tensor in the load dtype. So a rank reads its
own TP / PP / EP slices only: the layers of its stage, its rows / columns of split tensors, its
experts (and of them its expert-TP part), never the whole model.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors import safe_open

from miles_ray.models.sharded_moe import Stacked


def _read_all(value):
    if isinstance(value, (LazyTensor, LazyCat)):
        return value.read()
    if isinstance(value, (list, tuple)):
        return type(value)(_read_all(v) for v in value)
    if isinstance(value, dict):
        return {k: _read_all(v) for k, v in value.items()}
    return value


class _Lazy:
    """Shared behaviour: torch functions and other methods read the region first."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_read_all(args), **_read_all(kwargs or {}))

    def __getattr__(self, name):  # clone, reshape, to, view, ...: on the real tensor
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.read(), name)

    def dim(self) -> int:
        return len(self.shape)


class LazyTensor(_Lazy):
    """Region ``region`` (one slice per file dim) of tensor ``key`` of ``files``; the first
    ``lead`` dims were indexed away (size 1, dropped from :attr:`shape`)."""

    def __init__(self, files, key: str, dtype: torch.dtype, region: tuple | None = None, lead: int = 0):
        self.files, self.key, self.dtype, self.lead = files, key, dtype, lead
        self.region = region or tuple(slice(0, n) for n in files.shapes[key])
        self.shape = torch.Size(s.stop - s.start for s in self.region[lead:])

    def narrow(self, dim: int, start: int, stop: int) -> "LazyTensor":
        region = list(self.region)
        s = region[self.lead + dim]
        region[self.lead + dim] = slice(s.start + start, s.start + stop)
        return LazyTensor(self.files, self.key, self.dtype, tuple(region), self.lead)

    def chunk(self, chunks: int, dim: int = 0) -> list:
        size = self.shape[dim]
        step = -(-size // chunks)
        return [self.narrow(dim, a, min(a + step, size)) for a in range(0, size, step)]

    def __getitem__(self, index: int) -> "LazyTensor":
        if not isinstance(index, int):
            return self.read()[index]
        index = index + self.shape[0] if index < 0 else index
        one = self.narrow(0, index, index + 1)
        return LazyTensor(self.files, self.key, self.dtype, one.region, self.lead + 1)

    def read(self) -> torch.Tensor:
        with safe_open(self.files.files[self.key], framework="pt") as f:
            t = f.get_slice(self.key)[self.region]
        self.files.read_bytes += t.numel() * t.element_size()
        return t.reshape(self.shape).to(self.dtype)


class LazyCat(_Lazy):
    """Lazy tensors concatenated on dim 0 (one expert of ``gate_up_proj``: its gate and up)."""

    def __init__(self, parts: list):
        self.parts = parts
        rows = sum(p.shape[0] for p in parts)
        self.shape = torch.Size((rows, *parts[0].shape[1:]))

    def chunk(self, chunks: int, dim: int = 0) -> list:
        if dim != 0:
            return [LazyCat(list(col)) for col in zip(*(p.chunk(chunks, dim) for p in self.parts))]
        step = -(-self.shape[0] // chunks)
        return [self._rows(a, min(a + step, self.shape[0])) for a in range(0, self.shape[0], step)]

    def _rows(self, start: int, stop: int):
        pieces, at = [], 0
        for p in self.parts:
            lo, hi = max(start, at), min(stop, at + p.shape[0])
            if lo < hi:
                pieces.append(p.narrow(0, lo - at, hi - at))
            at += p.shape[0]
        return pieces[0] if len(pieces) == 1 else LazyCat(pieces)

    def read(self) -> torch.Tensor:
        return torch.cat([p.read() for p in self.parts])


class LazyExperts:
    """A fused expert parameter ``[E, ...]`` held per expert in the files: ``[e]`` is expert e."""

    def __init__(self, files, stacked: Stacked, dtype: torch.dtype):
        self.files, self.stacked, self.dtype = files, stacked, dtype
        self.shape = torch.Size(stacked.shape)

    def __getitem__(self, e: int):
        parts = [LazyTensor(self.files, keys[e], self.dtype) for keys in self.stacked.parts]
        return parts[0] if len(parts) == 1 else LazyCat(parts)


class LazyHF(Mapping):
    """HF parameter name -> lazy tensor, from ``files`` (a
    :class:`~miles_ray.models.sharded.SafetensorsFolder`) and ``sources`` (name -> file key or
    :class:`Stacked`, :func:`miles_ray.models.sharded_moe.sources`); values read in ``dtype``."""

    def __init__(self, files, sources: dict, dtype: torch.dtype = torch.float32):
        self.files, self.sources, self.dtype = files, sources, dtype

    def __getitem__(self, name: str):
        source = self.sources[name]
        if isinstance(source, Stacked):
            return LazyExperts(self.files, source, self.dtype)
        return LazyTensor(self.files, source, self.dtype)

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def hf_source(model_spec: str, tiny_cache_dir: str) -> tuple:
    """(HF config, the HF state to load from, the files or None): a :class:`LazyHF` over the
    safetensors files when they can be read so (:func:`miles_ray.models.loading.load_empty`),
    otherwise the full model's state dict (GGUF, other key conversions)."""
    from miles_ray.models.loading import load_empty
    from miles_ray.models.sharded_moe import sources

    model, files = load_empty(model_spec, "float32", tiny_cache_dir)
    if files is None:
        return model.config, model.state_dict(), None
    params = set(dict(model.named_parameters(remove_duplicate=False)))
    where = {k: v for k, v in sources(model, files.shapes).items() if k in params}
    return model.config, LazyHF(files, where), files
