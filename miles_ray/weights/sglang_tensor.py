"""SGLang's ``update_weights_from_tensor`` payload: encode (client) and allow-list decode (strict server).

Format (SGLang 0.5.x, ``python/sglang/srt/utils`` ``MultiprocessingSerializer.serialize(obj,
output_str=True)``): ``base64(ForkingPickler.dumps([(name, tensor), ...]))``; the request's
``serialized_named_tensors`` holds one such string per TP rank and TP rank ``r`` deserializes
entry ``r`` (``tp_worker`` ``update_weights_from_tensor``). ForkingPickler turns a CPU tensor into
a shared-memory file handle and a CUDA tensor into a CUDA IPC handle: the bytes of the weights
never travel in the request, only handles to the sender's buffers.

The format is pickle by SGLang's design, so a real SGLang server runs whatever such a body asks
for: use it on a trusted network only. Our strict server never calls ``pickle.loads``: it decodes
with :class:`AllowListUnpickler`, which admits only torch's tensor-rebuild functions (wrapped so
their arguments are checked: a torch shared-memory handle name, a torch manager socket, integer
sizes) and refuses every other global with :class:`RefusedPayload` (the server answers 400).

:class:`SGLangTensorFormat` (name ``sglang_tensor``) is this format as a
:class:`~miles_ray.weights.transport.PayloadFormat`; SGLang's ``load_format="flattened_bucket"``,
decoded with the same allow-list, is :mod:`miles_ray.weights.sglang_flattened`.

Invariant (tested): decoding a payload whose pickle names any other callable raises
:class:`RefusedPayload` before anything but the allow-listed rebuilds ran.
"""
from __future__ import annotations

import base64
import binascii
import io
import pickle
import re
import warnings
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing
import torch.multiprocessing.reductions as reductions

from miles_ray.weights.buckets import Bucket, iter_tensors
from miles_ray.weights.registry import WEIGHT_FORMATS
from miles_ray.weights.transport import PayloadFormat

torch.multiprocessing.set_sharing_strategy("file_system")  # CPU tensors travel as shm file names

_SHM_HANDLE = re.compile(rb"^/torch_[0-9]+_[0-9]+_[0-9]+$")
_SHM_MANAGER = re.compile(rb"^/[A-Za-z0-9_./\-]+/manager\.sock$")
MAX_STORAGE_BYTES = 1 << 40


class RefusedPayload(ValueError):
    """The payload is not a plain list of named tensors made of allow-listed rebuilds."""


def serialize_named_tensors(named: list, tp_size: int = 1) -> list[str]:
    """``serialized_named_tensors`` for ``named`` [(name, tensor)]: handles to the same buffers for
    each of ``tp_size`` ranks (every TP rank maps the sender's buffer and takes its own shard).
    Pickled once per rank: each pickling takes one reference on the shared memory that the rank's
    decode releases (one string decoded twice would release it twice and unlink it)."""
    named = list(named)
    out = []
    for _ in range(tp_size):
        buf = io.BytesIO()
        ForkingPickler(buf).dump(named)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


# -- allow-listed callables, each checking its arguments -------------------------------------------
class _Marker:
    def __init__(self, name: str):
        self.name = name


_TENSOR, _PARAMETER, _UNTYPED = _Marker("Tensor"), _Marker("Parameter"), _Marker("UntypedStorage")
# torch >= 2.6 reduce_tensor names type(tensor._typed_storage()) in CUDA rebuilds (found on an H100,
# torch 2.11): a marker too, never the class itself, so a payload cannot construct storages with it
_TYPED = _Marker("TypedStorage")


def _int(x, what: str, low: int = 0, high: int = MAX_STORAGE_BYTES) -> int:
    if type(x) is not int or not low <= x <= high:
        raise RefusedPayload(f"{what} must be an int in [{low}, {high}], got {x!r}")
    return x


def _size(dims) -> torch.Size:
    if not isinstance(dims, tuple):
        raise RefusedPayload(f"torch.Size needs a tuple, got {type(dims).__name__}")
    return torch.Size([_int(d, "tensor dimension") for d in dims])


def _rebuild_storage_filename(cls, manager, handle, size, dtype=None):
    if cls is not _UNTYPED or dtype is not None:
        raise RefusedPayload("shared-memory storages must be untyped (torch's own encoding)")
    if not (isinstance(manager, bytes) and _SHM_MANAGER.match(manager)):
        raise RefusedPayload(f"not a torch shared-memory manager socket: {manager!r}")
    if not (isinstance(handle, bytes) and _SHM_HANDLE.match(handle)):
        raise RefusedPayload(f"not a torch shared-memory handle: {handle!r}")
    try:
        return reductions.rebuild_storage_filename(torch.UntypedStorage, manager, handle, _int(size, "storage size"))
    except RuntimeError as err:
        raise RefusedPayload(f"cannot map shared memory {handle!r}: {err}") from None


def _rebuild_typed_storage(storage, dtype):
    if not isinstance(storage, torch.UntypedStorage) or not isinstance(dtype, torch.dtype):
        raise RefusedPayload("typed storage needs an untyped storage and a dtype")
    return reductions.rebuild_typed_storage(storage, dtype)


def _rebuild_tensor(cls, storage, metadata):
    if cls not in (_TENSOR, _PARAMETER) or not isinstance(storage, torch.TypedStorage):
        raise RefusedPayload("tensor rebuild needs torch.Tensor and a typed storage")
    if not (isinstance(metadata, tuple) and len(metadata) == 4):
        raise RefusedPayload("tensor metadata must be (offset, size, stride, requires_grad)")
    offset, size, stride, _ = metadata
    _int(offset, "storage offset")
    if not isinstance(size, torch.Size) or not isinstance(stride, tuple) or len(stride) != len(size):
        raise RefusedPayload("tensor size/stride malformed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what ForkingPickler sends
        numel, dtype, untyped = storage.size(), storage.dtype, storage.untyped()
    last = offset + sum((s - 1) * _int(st, "stride") for s, st in zip(size, stride) if s > 0)
    if all(s > 0 for s in size) and last >= numel:
        raise RefusedPayload(f"tensor view reaches element {last} of a storage of {numel}")
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


def _cuda_index(device) -> int:
    """SGLang's patched rebuild sends the device as its UUID string (patch_torch.py)."""
    if type(device) is int:
        return device
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == str(device):
            return i
    raise RefusedPayload(f"CUDA device {device!r} is not on this server")


def _rebuild_cuda_tensor(cls, size, stride, offset, storage_cls, dtype, device, *rest):
    """torch.multiprocessing.reductions.rebuild_cuda_tensor: a view of the sender's CUDA memory,
    opened by its IPC handle (zero copy)."""
    if not torch.cuda.is_available():
        raise RefusedPayload("the payload holds CUDA IPC handles but this server has no CUDA device")
    ok = (cls in (_TENSOR, _PARAMETER) and storage_cls in (_UNTYPED, _TYPED) and isinstance(dtype, torch.dtype)
          and isinstance(size, torch.Size) and isinstance(stride, tuple) and type(offset) is int
          and all(isinstance(x, (int, bytes, bool)) for x in rest))
    if not ok:
        raise RefusedPayload("malformed CUDA tensor rebuild arguments")
    return reductions.rebuild_cuda_tensor(torch.Tensor, size, stride, offset, torch.UntypedStorage, dtype,
                                          _cuda_index(device), *rest)


_ALLOWED = {
    ("torch.multiprocessing.reductions", "rebuild_tensor"): _rebuild_tensor,
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"): _rebuild_typed_storage,
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"): _rebuild_storage_filename,
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): _rebuild_cuda_tensor,
    # SGLang's monkey_patch_torch_reductions (python/sglang/srt/patch_torch.py) renames the CUDA rebuild
    ("sglang.srt.patch_torch", "_rebuild_cuda_tensor_modified"): _rebuild_cuda_tensor,
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"): _rebuild_cuda_tensor,
    ("torch", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    ("torch.storage", "TypedStorage"): _TYPED,
    ("torch", "Size"): _size,
}


class AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedPayload(f"refused global {module}.{name}: only torch tensor rebuilds are allowed")

    def persistent_load(self, pid):
        raise RefusedPayload("persistent ids are not allowed")


def load_payload(text, unpickler=AllowListUnpickler):
    """base64 -> object through ``unpickler``; RefusedPayload for anything malformed."""
    if not isinstance(text, str):
        raise RefusedPayload(f"serialized_named_tensors entries must be base64 strings, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RefusedPayload("serialized_named_tensors entry is not valid base64") from None
    try:
        return unpickler(io.BytesIO(data)).load()
    except RefusedPayload:
        raise
    except Exception as err:  # noqa: BLE001 - any malformed pickle is the client's error
        raise RefusedPayload(f"malformed tensor payload: {type(err).__name__}: {err}") from None


def deserialize_named_tensors(text) -> list[tuple[str, torch.Tensor]]:
    """One rank's entry of ``serialized_named_tensors`` -> [(name, tensor)]; RefusedPayload if
    it is not base64 of an allow-listed pickle of a list of (str, tensor) pairs."""
    named = load_payload(text)
    ok = isinstance(named, list) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                         and isinstance(x[1], torch.Tensor) for x in named)
    if not ok:
        raise RefusedPayload("payload must be a list of (name, tensor) pairs")
    return named


def tensor_body(named: list, tp_size: int = 1, version: int | None = None) -> dict:
    """An ``/update_weights_from_tensor`` body: handles to ``named`` tensors, one entry per TP rank."""
    body = {"serialized_named_tensors": serialize_named_tensors(named, tp_size), "load_format": None,
            "flush_cache": False}
    if version is not None:
        body["weight_version"] = str(version)
    return body


def decode_ranks(body: dict, tp_size: int, decode) -> list:
    """The server's side of ``serialized_named_tensors``: each of ``tp_size`` ranks decodes its entry
    (``decode``); every rank must name the same tensors (our server holds one copy)."""
    entries = body.get("serialized_named_tensors")
    if not isinstance(entries, list) or len(entries) < tp_size:
        raise RefusedPayload(f"serialized_named_tensors must be a list with one entry per TP rank ({tp_size})")
    ranks = [decode(e) for e in entries[:tp_size]]
    if any([n for n, _ in r] != [n for n, _ in ranks[0]] for r in ranks):
        raise RefusedPayload("serialized_named_tensors entries name different tensors")
    return ranks[0]


def to_serving_device(bucket: Bucket) -> None:
    """On a GPU machine, move ``bucket`` there first: SGLang maps CUDA IPC handles (one bucket at a time)."""
    if torch.cuda.is_available() and not bucket.flat.is_cuda:
        bucket.flat = bucket.flat.cuda()


@WEIGHT_FORMATS.register("sglang_tensor")
class SGLangTensorFormat(PayloadFormat):
    """SGLang's named tensors (``load_format`` null)."""

    load_format, sglang_api = None, True

    @classmethod
    def body(cls, bucket: Bucket, tp_size: int) -> dict:
        to_serving_device(bucket)
        return tensor_body(list(iter_tensors(bucket)), tp_size)

    @classmethod
    def decode(cls, body: dict, tp_size: int) -> list:
        return decode_ranks(body, tp_size, deserialize_named_tensors)
