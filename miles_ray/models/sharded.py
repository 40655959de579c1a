"""Sharded loading: a model built with its parameters on the meta device, then materialised
tensor by tensor from its safetensors files, each process reading only the rows it keeps.

Invariants (tested bit for bit against ``from_pretrained``, 2 ranks, DDP and FSDP2):
- :func:`params_on_meta` puts *parameters* on meta and leaves *buffers* real: non-persistent
  buffers (rotary ``inv_freq``) keep the values the model's constructor computed, in its dtype;
- a parameter that is a ``DTensor`` sharded on dim 0 (FSDP2's ``Shard(0)`` over a 1-D mesh) gets
  rows ``[start, start + local rows)`` of the file's tensor, ``start = rank * ceil(rows / size)``
  (``torch.chunk``'s split); a plain parameter gets the whole tensor;
- tied parameters (``lm_head.weight`` is ``embed_tokens.weight``) stay one parameter, read once
  under whichever of their names the files hold;
- file keys map to parameters as in ``from_pretrained`` (transformers' conversion mapping:
  :mod:`miles_ray.models.sharded_moe`): renamed keys are read under their file name, and a fused
  MoE expert parameter (``experts.gate_up_proj [E, 2*I, H]``, ``experts.down_proj [E, H, I]``)
  from the per-expert tensors, ``gate_up_proj[e] = cat(gate_e, up_e)``; dim 0 is the expert, so
  an FSDP2 rank reads only the experts of its shard. Files already holding the fused tensors are
  read by name. Any other conversion (chunked/transposed/quantized) counts as missing: the
  caller loads in full;
- rows are read in blocks of at most :data:`BLOCK_BYTES`, the file opened per block, so a process
  holds at most one block of file pages (safetensors maps the file) and one converted block
  beside what it keeps: its peak memory is about the bytes of its shard.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from miles_ray.models.sharded_moe import read, source_shape, sources

BLOCK_BYTES = 32 << 20
INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def params_on_meta():
    """Parameters registered inside the block are created on the meta device (buffers are not).
    Not thread-safe: it swaps ``torch.nn.Module.register_parameter`` for the block's duration."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


@contextlib.contextmanager
def _swap_params():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


class SafetensorsFolder:
    """The tensors of an HF folder's safetensors files (one file or an index), read by rows."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.files = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                self.files = {k: self.folder / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors or {INDEX}")
        self.shapes, self.read_bytes = {}, 0  # read_bytes: what this process has read (file dtype)
        for path in sorted(set(self.files.values())):
            with safe_open(path, framework="pt") as f:
                self.shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})

    @staticmethod
    def present(folder: str | Path) -> bool:
        return (Path(folder) / INDEX).is_file() or (Path(folder) / "model.safetensors").is_file()

    def read_rows(self, name: str, start: int, out: torch.Tensor) -> None:
        """Copy rows ``[start, start + len(out))`` of tensor ``name`` into ``out`` (dtype converted)."""
        if out.dim() == 0:
            with safe_open(self.files[name], framework="pt") as f:
                self._take(out, f.get_tensor(name))
            return
        row_bytes = max(out[:1].numel() * max(out.element_size(), 4), 1)
        step = max(1, BLOCK_BYTES // row_bytes)
        for a in range(0, out.shape[0], step):
            b = min(a + step, out.shape[0])
            with safe_open(self.files[name], framework="pt") as f:  # closed per block: its pages unmapped
                self._take(out[a:b], f.get_slice(name)[start + a:start + b])

    def _take(self, out: torch.Tensor, read: torch.Tensor) -> None:
        out.copy_(read)
        self.read_bytes += read.numel() * read.element_size()


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this process keeps of ``param``, its first row in the full tensor)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.data, 0
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"sharded loading takes Shard(0) over a 1-D mesh, not {param.placements}")
    local, rows = param.to_local(), param.shape[0]
    start = min(param.device_mesh.get_local_rank() * -(-rows // param.device_mesh.size()), rows)
    assert local.shape[0] == min(-(-rows // param.device_mesh.size()), rows - start), (local.shape, rows, start)
    return local, start


def tied_groups(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Each distinct parameter of ``model`` with all its names (tied copies share one)."""
    groups: dict[int, tuple] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(name)
    return list(groups.values())


def missing_names(model: torch.nn.Module, files: SafetensorsFolder, init: dict) -> list[str]:
    """What :func:`materialize` could not fill: parameters (under none of their names, or with
    another shape) and persistent buffers absent from ``files``, less those ``init`` covers."""
    out, where = [], sources(model, files.shapes)
    for p, names in tied_groups(model):
        found = [n for n in names if n in where]
        if not (found and source_shape(where[found[0]], files.shapes) == tuple(p.shape)) \
                and not any(n in init for n in names):
            out.append(names[0])
    persistent = set(model.state_dict(keep_vars=True))
    out += [n for n, _ in model.named_buffers() if n in persistent and n not in where]
    return out


@torch.no_grad()
def materialize(root: torch.nn.Module, model: torch.nn.Module, files: SafetensorsFolder, device,
                init: dict | None = None) -> None:
    """Allocate ``root``'s meta parameters on ``device`` (a DTensor: its local shard only) and fill
    ``model``'s (a submodule of ``root``, or ``root``) from ``files``: parameter ``name`` missing
    from the files is set by ``init[name](tensor)``. Buffers keep their values; persistent ones the
    files hold are read. ``root`` is the FSDP2 root when sharded (its ``to_empty`` re-registers
    the shards)."""
    init = init or {}
    kept = {name: b.detach().to(device, copy=True) for name, b in root.named_buffers()}
    with _swap_params():  # tied parameters stay one object (to_empty would otherwise untie them)
        root.to_empty(device=device)  # buffers too: put back below
    for name, b in root.named_buffers():
        b.copy_(kept[name])
    where = sources(model, files.shapes)
    for p, names in tied_groups(model):
        local, start = local_rows(p)
        found = next((n for n in names if n in where), None)
        if found is not None:
            read(files, where[found], start, local)
        else:
            init[next(n for n in names if n in init)](local)
    for name, b in model.named_buffers():
        if name in where:
            read(files, where[name], 0, b)
