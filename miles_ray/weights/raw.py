"""Our server's own weight format: raw tensor bytes with JSON metadata (no pickle anywhere).

A request body ``{"load_format": "miles_raw", "buckets": [{"dtype": "bfloat16", "entries":
[[name, shape, offset, numel], ...], "data": base64(raw little-endian bytes)}, ...]}`` carries
whole buckets (:class:`miles_ray.weights.buckets.Bucket`). Decoding checks every field (dtype from
an allow-list, offsets and shapes inside the data) and raises :class:`BadWeights` (HTTP 400).

Invariant (tested): ``decode_buckets(encode_buckets(b))`` reproduces the buckets' tensors bit for bit.

:class:`RawFormat` is this format as a :class:`~miles_ray.weights.transport.PayloadFormat` (name ``raw``:
what HTTP engines send to our lenient server).
"""
from __future__ import annotations

import base64
import binascii

import torch

from miles_ray.weights.buckets import Bucket, iter_tensors
from miles_ray.weights.registry import WEIGHT_FORMATS
from miles_ray.weights.transport import PayloadFormat

DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int8", "uint8",
                                                 "int32", "int64", "float8_e4m3fn")}
FORMAT = "miles_raw"


class BadWeights(ValueError):
    pass


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_buckets(buckets: list[Bucket]) -> list[dict]:
    out = []
    for b in buckets:
        raw = b.flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        out.append({"dtype": dtype_name(b.dtype), "entries": [[n, list(s), o, k] for n, s, o, k in b.entries],
                    "data": base64.b64encode(raw).decode()})
    return out


def _entries(raw_entries, numel: int) -> list:
    if not isinstance(raw_entries, list) or not raw_entries:
        raise BadWeights("bucket 'entries' must be a non-empty list of [name, shape, offset, numel]")
    entries = []
    for e in raw_entries:
        ok = isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[1], list)
        ints = ok and all(type(x) is int and x >= 0 for x in [*e[1], e[2], e[3]])
        if not ints:
            raise BadWeights(f"bad bucket entry {str(e)[:80]}: want [name, [dims], offset, numel] with ints >= 0")
        name, shape, offset, n = e
        if torch.Size(shape).numel() != n or offset + n > numel:
            raise BadWeights(f"entry '{name}': shape {shape} / numel {n} / offset {offset} do not fit the data")
        entries.append((name, tuple(shape), offset, n))
    return entries


def decode_bucket(d, index: int = 0, count: int = 1, version: int = 0) -> Bucket:
    if not isinstance(d, dict) or d.get("dtype") not in DTYPES or not isinstance(d.get("data"), str):
        raise BadWeights(f"bucket must be {{dtype in {sorted(DTYPES)}, entries, data: base64}}")
    dtype = DTYPES[d["dtype"]]
    try:
        raw = base64.b64decode(d["data"], validate=True)
    except (binascii.Error, ValueError):
        raise BadWeights("bucket 'data' is not valid base64") from None
    size = torch.empty((), dtype=dtype).element_size()
    if len(raw) % size:
        raise BadWeights(f"bucket data has {len(raw)} bytes, not a multiple of {d['dtype']}'s {size}")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
    return Bucket(version, index, count, dtype, flat, _entries(d.get("entries"), flat.numel()))


def decode_buckets(items) -> list[Bucket]:
    if not isinstance(items, list) or not items:
        raise BadWeights("'buckets' must be a non-empty list")
    return [decode_bucket(d, i, len(items)) for i, d in enumerate(items)]


def request_body(buckets: list[Bucket], version: int | None = None) -> dict:
    """An ``/update_weights_from_tensor`` body carrying ``buckets`` (and, given, the version they make)."""
    body = {"load_format": FORMAT, "buckets": encode_buckets(buckets)}
    if version is not None:
        body["weight_version"] = str(version)
    return body


@WEIGHT_FORMATS.register("raw")
class RawFormat(PayloadFormat):
    load_format, sglang_api = FORMAT, False

    @classmethod
    def body(cls, bucket: Bucket, tp_size: int) -> dict:
        return request_body([bucket])  # every TP rank of our server reads the same bytes

    @classmethod
    def decode(cls, body: dict, tp_size: int) -> list:
        return [nt for b in decode_buckets(body.get("buckets")) for nt in iter_tensors(b)]
