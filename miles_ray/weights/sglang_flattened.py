"""SGLang's ``load_format="flattened_bucket"`` payload: encode (engine actor) and allow-list decode
(our strict server), no SGLang import needed. :class:`FlattenedFormat` (name ``sglang_flattened``)
is this format as a :class:`~miles_ray.weights.transport.PayloadFormat`.

Format, derived from SGLang's source (sgl-project/sglang):

- ``python/sglang/srt/weight_sync/tensor_bucket.py``: ``FlattenedTensorMetadata`` (a dataclass:
  name, shape: torch.Size, dtype, start_idx, end_idx, numel) and ``FlattenedTensorBucket
  .reconstruct_tensors``: ``flattened_tensor[start_idx:end_idx].view(dtype).reshape(shape)`` (older
  0.5.x: ``.reshape(shape)`` then ``.to(dtype)`` when the dtypes differ).
- ``python/sglang/srt/model_executor/model_runner.py`` ``update_weights_from_tensor``: with
  ``load_format == "flattened_bucket"`` the TP rank's deserialized object is the dict
  ``{"flattened_tensor": tensor, "metadata": [FlattenedTensorMetadata, ...]}`` handed to
  ``_update_weights_from_flattened_bucket``; ``tp_worker`` deserializes
  ``serialized_named_tensors[tp_rank]`` with ``MultiprocessingSerializer`` (``python/sglang/srt/utils``:
  ``base64(ForkingPickler.dumps(obj))`` with ``output_str=True``).
- Senders: THUDM/slime and radixark/miles ``update_weight_from_tensor`` (``_send_to_colocated_engine``)
  serialize that dict once per TP rank and post ``update_weights_from_tensor(serialized_named_tensors=[...],
  load_format="flattened_bucket")``.

We send our bucket's ``flat`` in its own dtype with element offsets (``start_idx = offset``): the
same tensors under both SGLang reconstructions (``view`` to the same dtype is a no-op, no ``.to``).
The metadata pickles under SGLang's class name, as a real dataclass instance does (NEWOBJ + state
dict), without importing SGLang.

:func:`forward_flattened` wraps a trainer's handle (``ForkingPickler.dumps(flat)``: a CUDA IPC
handle or a shared-memory file name) in that payload **without opening it**: the handle's pickle
is read by a recording unpickler (nothing is called) and re-emitted inside the dict, so the
engine server maps the trainer's buffer itself (handle forwarding; CUDA tensors received over IPC
cannot be shared again by the process that opened them). One forwarded handle = one decode.

Server side (:func:`deserialize_flattened_bucket`): :class:`FlatUnpickler` is the allow-list of
:mod:`miles_ray.weights.sglang_tensor` that also resolves SGLang's ``FlattenedTensorMetadata`` to a
data record (no constructor arguments, a type-checked field dict, copied into our own dataclass),
and every range is checked against the flattened tensor.
"""
from __future__ import annotations

import base64
import io
import math
import pickle
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing.reductions as reductions

from miles_ray.weights.buckets import Bucket
from miles_ray.weights.ipc import HandleBucket
from miles_ray.weights.registry import WEIGHT_FORMATS
from miles_ray.weights.sglang_tensor import (AllowListUnpickler, RefusedPayload, decode_ranks, load_payload,
                                             to_serving_device)
from miles_ray.weights.transport import PayloadFormat

SGLANG_META = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
FORMAT = "flattened_bucket"
META_FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")


@dataclass(frozen=True)
class FlatTensorMeta:
    """One tensor of a flattened bucket (our copy of SGLang's FlattenedTensorMetadata)."""
    name: str
    shape: tuple
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def metas_for(entries: list, dtype: torch.dtype) -> list[FlatTensorMeta]:
    """Metadata of a Bucket's ``entries`` [(name, shape, offset, numel)] over its ``flat``."""
    return [FlatTensorMeta(n, tuple(s), dtype, int(o), int(o) + int(k), int(k)) for n, s, o, k in entries]


class _MetaOut:
    """Pickles as ``sglang...FlattenedTensorMetadata`` (NEWOBJ, then BUILD with the field dict)."""

    def __init__(self, m: FlatTensorMeta):
        self.__dict__.update(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype, start_idx=m.start_idx,
                             end_idx=m.end_idx, numel=m.numel)


class _Call:
    """A recorded rebuild call of a handle's pickle, re-emitted as the same call."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, tuple(_unwrap(a) for a in self.args)


class _Global:
    def __init__(self, obj):
        self.obj = obj

    def __call__(self, *args):
        return _Call(self.obj, args)  # recorded, never called


def _unwrap(x):
    if isinstance(x, tuple):
        return tuple(_unwrap(y) for y in x)
    return x.obj if isinstance(x, _Global) else x


_HANDLE_GLOBALS = {
    ("torch.multiprocessing.reductions", n): getattr(reductions, n)
    for n in ("rebuild_tensor", "rebuild_typed_storage", "rebuild_storage_filename", "rebuild_cuda_tensor")}
_HANDLE_GLOBALS.update({("torch", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
                        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
                        ("torch.storage", "TypedStorage"): torch.TypedStorage, ("torch", "Size"): torch.Size})


class _Recorder(pickle.Unpickler):
    """Reads a torch handle pickle into :class:`_Call` records; only torch's rebuilds are known."""

    def find_class(self, module: str, name: str):
        if (module, name) in _HANDLE_GLOBALS:
            return _Global(_HANDLE_GLOBALS[(module, name)])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return _Global(getattr(torch, name))
        raise pickle.UnpicklingError(f"not a torch tensor handle: refers to {module}.{name}")


class _SGLangPickler(pickle._Pickler):
    """ForkingPickler's reducers (tensors -> handles), and SGLang's metadata class by name."""

    def __init__(self, file):
        super().__init__(file, protocol=4)
        self.dispatch_table = ForkingPickler(io.BytesIO()).dispatch_table

    def save_global(self, obj, name=None):
        if obj is _MetaOut:  # protocol 4: STACK_GLOBAL of SGLang's module and class name
            self.save(SGLANG_META[0])
            self.save(SGLANG_META[1])
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dumps(flat, metas: list[FlatTensorMeta]) -> str:
    buf = io.BytesIO()
    _SGLangPickler(buf).dump({"flattened_tensor": flat, "metadata": [_MetaOut(m) for m in metas]})
    return base64.b64encode(buf.getvalue()).decode()


def encode_flattened(flat: torch.Tensor, metas: list[FlatTensorMeta], tp_size: int = 1) -> list[str]:
    """``serialized_named_tensors`` for one bucket: one entry per TP rank, pickled once per rank
    (each pickling takes the reference on the shared buffer that the rank's decode releases)."""
    return [_dumps(flat, metas) for _ in range(tp_size)]


def forward_flattened(handle: bytes, metas: list[FlatTensorMeta]) -> str:
    """One rank's entry around the trainer's own handle to ``flat`` (never opened here)."""
    record = _Recorder(io.BytesIO(handle)).load()
    if not isinstance(record, _Call):
        raise ValueError("the handle is not a pickled tensor")
    return _dumps(record, metas)


# -- server side: allow-list decode ----------------------------------------------------------------
class _MetaRecord:
    """What SGLang's ``FlattenedTensorMetadata`` global resolves to here: a data record. It is built
    only the way a dataclass instance unpickles (NEWOBJ without arguments, then BUILD with the
    field dict, each field type-checked) and then read into our own :class:`FlatTensorMeta`."""

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise RefusedPayload("FlattenedTensorMetadata is a data record: it takes no constructor arguments")
        return object.__new__(cls)

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) != set(META_FIELDS):
            raise RefusedPayload(f"FlattenedTensorMetadata state must be a dict of exactly {list(META_FIELDS)}")
        ok = (isinstance(state["name"], str) and isinstance(state["shape"], torch.Size)
              and isinstance(state["dtype"], torch.dtype)
              and all(type(state[k]) is int for k in ("start_idx", "end_idx", "numel")))
        if not ok:
            raise RefusedPayload("FlattenedTensorMetadata fields: name str, shape torch.Size, dtype torch.dtype, "
                                 "start_idx / end_idx / numel int")
        self.meta = FlatTensorMeta(state["name"], tuple(state["shape"]), state["dtype"], state["start_idx"],
                                   state["end_idx"], state["numel"])


class FlatUnpickler(AllowListUnpickler):
    """The allow-list, plus SGLang's metadata class as a :class:`_MetaRecord`."""

    def find_class(self, module: str, name: str):
        if (module, name) == SGLANG_META:
            return _MetaRecord
        return super().find_class(module, name)


def _view(flat: torch.Tensor, m: FlatTensorMeta) -> torch.Tensor:
    """``flat[start:end].view(dtype).reshape(shape)`` (tensor_bucket.py reconstruct_tensors), after
    checking the range lies in ``flat`` and holds exactly the shape's bytes."""
    item, flat_item = m.dtype.itemsize, flat.element_size()
    if not (0 <= m.start_idx <= m.end_idx <= flat.numel() and m.numel == m.end_idx - m.start_idx):
        raise RefusedPayload(f"'{m.name}': range [{m.start_idx}, {m.end_idx}) (numel {m.numel}) is not inside the "
                             f"flattened tensor of {flat.numel()} elements")
    if m.numel * flat_item != math.prod(m.shape) * item or (m.start_idx * flat_item) % item:
        raise RefusedPayload(f"'{m.name}': {m.numel} {flat.dtype} elements at {m.start_idx} do not hold an aligned "
                             f"{m.dtype} tensor of shape {list(m.shape)}")
    return flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)


def deserialize_flattened_bucket(text) -> list[tuple[str, torch.Tensor]]:
    """One rank's ``flattened_bucket`` entry -> [(name, view of the flattened tensor)]."""
    d = load_payload(text, FlatUnpickler)
    if not (isinstance(d, dict) and set(d) == {"flattened_tensor", "metadata"}):
        raise RefusedPayload("flattened_bucket payload must be {'flattened_tensor': tensor, 'metadata': [...]}")
    flat, metas = d["flattened_tensor"], d["metadata"]
    if not (isinstance(flat, torch.Tensor) and flat.dim() == 1 and flat.is_contiguous()):
        raise RefusedPayload("flattened_tensor must be a contiguous 1-D tensor")
    if not (isinstance(metas, list) and metas and all(isinstance(m, _MetaRecord) and hasattr(m, "meta")
                                                      for m in metas)):
        raise RefusedPayload("metadata must be a non-empty list of FlattenedTensorMetadata records")
    names = [m.meta.name for m in metas]
    if len(set(names)) != len(names):
        raise RefusedPayload("metadata names a tensor twice")
    return [(m.meta.name, _view(flat, m.meta)) for m in metas]


def flattened_body(serialized: list[str], version: int | None = None) -> dict:
    """An ``/update_weights_from_tensor`` body with ``load_format="flattened_bucket"`` (one entry per TP rank)."""
    body = {"serialized_named_tensors": serialized, "load_format": FORMAT, "flush_cache": False}
    if version is not None:
        body["weight_version"] = str(version)
    return body


@WEIGHT_FORMATS.register("sglang_flattened")
class FlattenedFormat(PayloadFormat):
    """One flattened tensor + metadata per TP rank. A bucket still holding an unopened handle (shm /
    cuda_ipc, :class:`~miles_ray.weights.ipc.HandleBucket`) with one TP rank is forwarded: the server
    maps the trainer's buffer itself, the engine actor never does."""

    load_format, sglang_api = FORMAT, True

    @classmethod
    def body(cls, bucket: Bucket, tp_size: int) -> dict:
        metas = metas_for(bucket.entries, bucket.dtype)
        handle = bucket.take_handle() if tp_size == 1 and isinstance(bucket, HandleBucket) else None
        if handle is not None:
            return flattened_body([forward_flattened(handle, metas)])
        to_serving_device(bucket)
        return flattened_body(encode_flattened(bucket.flat, metas, tp_size))

    @classmethod
    def decode(cls, body: dict, tp_size: int) -> list:
        return decode_ranks(body, tp_size, deserialize_flattened_bucket)
