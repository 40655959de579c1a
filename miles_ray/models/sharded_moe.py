"""Where each parameter of a transformers model lives in its safetensors files: under its own
name, under another (a checkpoint renaming, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``), or
spread over per-expert tensors that transformers 5 fuses into one 3-D parameter (MoE experts).

The mapping is transformers' own (``transformers.conversion_mapping.get_model_conversion_mapping``,
applied key by key with ``transformers.core_model_loading.rename_source_key`` in
``dot_natural_key`` order, as ``convert_and_load_state_dict_in_model`` does for
``from_pretrained``). Of its ``WeightConverter`` s, the fused-expert ones are read here, e.g. for
``qwen2_moe``-style models (``qwen3_moe`` ...)::

    WeightConverter(["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                    "mlp.experts.gate_up_proj", [MergeModulelist(dim=0), Concatenate(dim=1)])
    WeightConverter("mlp.experts.*.down_proj.weight", "mlp.experts.down_proj", [MergeModulelist(dim=0)])

(Mixtral: ``.experts.*.w1.weight`` / ``w3`` -> ``gate_up_proj``, ``w2`` -> ``down_proj``):
``MergeModulelist(dim=0)`` stacks each source pattern's tensors (in the order collected) on a new
dim 0, ``Concatenate(dim=1)`` then joins the stacks in source-pattern order, no transpose. So
``gate_up_proj[e] = cat([gate_proj_e, up_proj_e], 0)`` (``[E, 2*I, H]``) and
``down_proj[e] = down_proj_e`` (``[E, H, I]``): row ``e`` of dim 0 is expert ``e`` alone, so a
rank keeping experts ``[start, start + local)`` reads only their tensors (:class:`Stacked`).
A converter with any other operation (chunks, transposes, quantized forms) is not read: the
parameter counts as missing and the caller falls back to a full load. A folder already holding
the fused tensors (under the parameters' names) is read by name, rows = experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stacked:
    """A fused expert parameter: expert ``e`` is ``cat([parts[0][e], parts[1][e], ...], dim 0)``
    (one part: the expert's tensor itself), ``parts[j][e]`` a key of the files."""

    parts: tuple[tuple[str, ...], ...]
    shape: tuple[int, ...]

    def read(self, files, start: int, out: torch.Tensor) -> None:
        """Fill ``out`` with experts ``[start, start + len(out))``: only their tensors are read."""
        for e in range(out.shape[0]):
            row = 0
            for keys in self.parts:
                n = files.shapes[keys[start + e]][0]
                files.read_rows(keys[start + e], 0, out[e, row:row + n])
                row += n


def _stacked(converter, found: dict[str, list[str]], shapes: dict) -> Stacked | None:
    """``converter``'s target as a :class:`Stacked`, or None if it is not a plain expert fusion
    (or the files lack a part, or the experts' shapes disagree)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = [(type(op), op.dim) for op in converter.operations]
    parts = [found.get(p) for p in converter.source_patterns]
    plain = [(MergeModulelist, 0)] if len(parts) == 1 else [(MergeModulelist, 0), (Concatenate, 1)]
    if ops != plain or converter.quantization_operation is not None or any(not p for p in parts):
        return None
    first = [shapes[p[0]] for p in parts]
    if (len({len(p) for p in parts}) != 1 or not all(first) or len({f[1:] for f in first}) != 1
            or any(shapes[k] != first[j] for j, p in enumerate(parts) for k in p)):
        return None
    rows = (sum(f[0] for f in first),) if len(parts) > 1 else first[0][:1]
    return Stacked(tuple(tuple(p) for p in parts), (len(parts[0]), *rows, *first[0][1:]))


def sources(model: torch.nn.Module, shapes: dict[str, tuple]) -> dict[str, str | Stacked]:
    """Parameter or persistent buffer name of ``model`` -> where the files (their keys and shapes:
    ``shapes``) hold it: a key (read as is) or a :class:`Stacked`. Names absent: not in the files,
    or only under a conversion not read here."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # another transformers: names only
        return {k: k for k in shapes}
    targets = model.state_dict(keep_vars=True)
    transforms = get_model_conversion_mapping(model) if isinstance(model, PreTrainedModel) else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, str | Stacked] = {}
    fused: dict[str, tuple] = {}
    for key in sorted(shapes, key=dot_natural_key):  # from_pretrained's order: experts 0, 1, ..., 10
        name, pattern = rename_source_key(key, renamings, converters, prefix, targets)
        if name not in targets and key in targets:
            name, pattern = rename_source_key(key, [], [], prefix, targets)
        if name not in targets:
            continue
        if pattern is None:
            out.setdefault(name, key)
        else:
            converter = next(c for c in converters if pattern in c.source_patterns)
            fused.setdefault(name, (converter, {}))[1].setdefault(pattern, []).append(key)
    for name, (converter, found) in fused.items():
        stacked = _stacked(converter, found, shapes)
        if stacked is not None and name not in out:
            out[name] = stacked
    return out


def source_shape(source: str | Stacked, shapes: dict) -> tuple:
    return source.shape if isinstance(source, Stacked) else shapes[source]


def read(files, source: str | Stacked, start: int, out: torch.Tensor) -> None:
    """Rows ``[start, start + len(out))`` of ``source`` into ``out``."""
    if isinstance(source, Stacked):
        source.read(files, start, out)
    else:
        files.read_rows(source, start, out)
