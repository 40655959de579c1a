"""Sharded trainer checkpoints through ``torch.distributed.checkpoint`` (DCP), safe to load and
resumable at a different number of ranks.

- Model and optimizer state come from ``get_state_dict`` (FQN-keyed, flattened optimizer state):
  DDP ranks hold full tensors (DCP writes each once), FSDP2 ranks their shards. Loading plans reads
  against the *current* layout, so a checkpoint of 2 ranks loads into 1 or 2 (or FSDP2 <-> DDP).
- Safe: tensors are read by DCP as raw bytes and other values with ``torch.load(weights_only=True)``;
  DCP's ``.metadata`` file is a pickle, so it is read with an unpickler that admits only DCP's own
  metadata classes, torch dtypes and sizes (:class:`SafeReader`); anything else is refused.
- Each rank's RNG state is a separate ``rng_rank<r>.pt`` (tensors and ints: ``weights_only``);
  counters (policy version, optimizer steps for the LR schedule) are ``counters.json``.
"""
from __future__ import annotations

import json
import pickle
import random
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from miles_ray.training.collectives import is_initialized

_META = "torch.distributed.checkpoint.metadata"
ALLOWED = {(_META, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch._utils", "_get_layout"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, which DCP metadata never holds; "
                                    "refusing to load it")


def read_metadata_safely(path: str | Path):
    with open(path, "rb") as f:
        return _MetadataUnpickler(f).load()


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the metadata pickle read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata_safely(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_sharded(folder: str | Path, model: torch.nn.Module, optimizer, counters: dict, rank: int) -> None:
    """Collective: model + optimizer shards into ``folder``; RNG per rank; counters by rank 0."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    msd, osd = get_state_dict(model, optimizer, options=OPTIONS)
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder), no_dist=not is_initialized())
    torch.save({"torch": torch.get_rng_state(), "python": _python_rng()}, folder / f"rng_rank{rank}.pt")
    if rank == 0:
        (folder / "counters.json").write_text(json.dumps(counters))


def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer, rank: int) -> dict:
    """Collective: load a :func:`save_sharded` folder (any world size) into ``model`` and
    ``optimizer``; returns the counters."""
    folder = Path(folder)
    read_metadata_safely(folder / ".metadata")  # refuse a tampered file before DCP touches it
    msd, osd = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=SafeReader(str(folder)), no_dist=not is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=OPTIONS)
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # a rank the saving run did not have keeps its own seed
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_python_rng_back(rng["python"]))
    return json.loads((folder / "counters.json").read_text())


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_back(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
