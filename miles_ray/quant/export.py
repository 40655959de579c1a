"""INT4 W4A16 checkpoints in compressed-tensors' ``pack-quantized`` format, which vLLM and SGLang
load (their ``CompressedTensorsWNA16`` schemes).

Per quantized Linear (derived from compressed-tensors
``compressors/quantized_compressors/pack_quantized.py`` and ``quantization/lifecycle/initialize.py``):
``<name>.weight_packed`` int32 ``[out, in/8]`` (column 8j+i in bits 4i..4i+3 of word j, each value
stored as q + 8), ``<name>.weight_scale`` in the model's 16-bit dtype ``[out, in/128]``,
``<name>.weight_shape`` int64 ``[out, in]``; no zero point (symmetric). Everything else (embeddings,
norms, LM head) is written as is, and ``config.json`` gets the ``quantization_config`` below.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from miles_ray.quant import formats as fmt

PACK = 8  # int4 values per int32


def quantization_config() -> dict:
    """compressed-tensors' W4A16 preset (``quant_config.py`` / ``quant_args.py`` field names)."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": fmt.GROUP,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "global_compression_ratio": None, "kv_cache_scheme": None, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "output_activations": None, "weights": weights}}}


def pack_int32(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], ``[N, K]`` (K a multiple of 8) -> int32 ``[N, K/8]``."""
    u = (q.to(torch.int64) + 8).view(q.shape[0], -1, PACK)
    shifts = torch.arange(PACK, dtype=torch.int64) * 4
    return (u << shifts).sum(-1).to(torch.int32)  # wraps to the signed 32-bit pattern


def unpack_int32(packed: torch.Tensor) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(PACK, dtype=torch.int64) * 4
    return (((words[..., None] >> shifts) & 0xF) - 8).reshape(packed.shape[0], -1).to(torch.int8)


def w4a16_state(state: dict, names: list[str], dtype=torch.bfloat16) -> dict:
    """The compressed-tensors tensors of a full-precision state dict (``names``: quantized linears)."""
    out, wanted = {}, {f"{n}.weight": n for n in names}
    for key, value in state.items():
        if key not in wanted:
            out[key] = value.to(dtype) if value.is_floating_point() else value
            continue
        q, scale = fmt.int4_quantize_weight(value)
        base = wanted[key]
        out[f"{base}.weight_packed"] = pack_int32(q)
        out[f"{base}.weight_scale"] = scale.to(dtype)
        out[f"{base}.weight_shape"] = torch.tensor(list(value.shape), dtype=torch.int64)
    return out


def save_w4a16(folder: str | Path, state: dict, names: list[str], config: dict, tokenizer=None) -> Path:
    """Write a loadable W4A16 checkpoint: ``model.safetensors`` + ``config.json`` (+ tokenizer)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in w4a16_state(state, names).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config()}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_w4a16(folder: str | Path) -> dict:
    """Decode a checkpoint written by :func:`save_w4a16` back to dense weights (q * scale)."""
    from safetensors.torch import load_file

    tensors, out = load_file(str(Path(folder) / "model.safetensors")), {}
    for key, value in tensors.items():
        if key.endswith(".weight_packed"):
            base = key[: -len(".weight_packed")]
            n, k = tensors[f"{base}.weight_shape"].tolist()
            q = unpack_int32(value)[:, :k]
            out[f"{base}.weight"] = fmt.int4_dequantize(q, tensors[f"{base}.weight_scale"], torch.float32)
        elif not key.endswith((".weight_scale", ".weight_shape")):
            out[key] = value
    return out
