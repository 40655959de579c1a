"""SGLang's ``load_format="flattened_bucket"`` payload, sender side (no SGLang import needed).

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
"""
from __future__ import annotations

import base64
import io
import pickle
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing.reductions as reductions

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
