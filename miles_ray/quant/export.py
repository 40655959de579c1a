"""INT4 W4A16 checkpoints in compressed-tensors' ``pack-quantized`` format, which vLLM and SGLang
load (their ``CompressedTensorsWNA16`` schemes).

Per quantized Linear (derived from compressed-tensors
``compressors/quantized_compressors/pack_quantized.py`` and ``quantization/lifecycle/initialize.py``):
``<name>.weight_packed`` int32 ``[out, in/8]`` (column 8j+i in bits 4i..4i+3 of word j, each value
stored as q + 8), ``<name>.weight_scale`` in the model's 16-bit dtype ``[out, in/128]``,
``<name>.weight_shape`` int64 ``[out, in]``; no zero point (symmetric). Everything else (embeddings,
norms, LM head, MoE routers) is written as is, and ``config.json`` gets the ``quantization_config``
below, whose ``ignore`` lists the Linear modules left unquantized (``lm_head`` and, on a MoE, each
router ``mlp.gate``: compressed-tensors targets every ``Linear`` not ignored).

MoE experts: transformers 5 trains them fused (``experts.gate_up_proj [E, 2I, H]``, ``down_proj
[E, H, I]``), while checkpoints (and vLLM / SGLang loaders) hold one Linear per expert and
projection. The export writes them per expert under the checkpoint's names
(``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``; Mixtral ``w1`` / ``w3`` / ``w2``), each
quantized as a Linear: the same numbers, since INT4 groups run along each row's input dim.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from miles_ray.quant import formats as fmt

PACK = 8  # int4 values per int32


EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # (gate, up, down) per-expert checkpoint names
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def quantization_config(ignore: list[str] | None = None) -> dict:
    """compressed-tensors' W4A16 preset (``quant_config.py`` / ``quant_args.py`` field names);
    ``ignore``: unquantized Linear modules besides ``lm_head``."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": fmt.GROUP,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "global_compression_ratio": None, "kv_cache_scheme": None, "ignore": ["lm_head", *(ignore or [])],
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


def per_expert(key: str, value: torch.Tensor, model_type: str = "") -> list[tuple[str, torch.Tensor]]:
    """A fused experts tensor as the checkpoint's per-expert Linear weights ``(name, [out, in])``."""
    base, _, kind = key.rpartition(".")
    gate, up, down = EXPERT_NAMES.get(model_type, DEFAULT_EXPERT_NAMES)
    out = []
    for e in range(value.shape[0]):
        if kind == "gate_up_proj":
            g, u = value[e].chunk(2, dim=0)
            out += [(f"{base}.{e}.{gate}", g), (f"{base}.{e}.{up}", u)]
        else:
            out.append((f"{base}.{e}.{down if kind == 'down_proj' else up}", value[e]))
    return out


def _pack_linear(out: dict, base: str, weight: torch.Tensor, dtype) -> None:
    q, scale = fmt.int4_quantize_weight(weight)
    out[f"{base}.weight_packed"] = pack_int32(q)
    out[f"{base}.weight_scale"] = scale.to(dtype)
    out[f"{base}.weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)


def w4a16_state(state: dict, names: list[str], dtype=torch.bfloat16, model_type: str = "") -> dict:
    """The compressed-tensors tensors of a full-precision state dict (``names``:
    :func:`miles_ray.quant.modules.quantizable`: linears, then fused experts tensors)."""
    from miles_ray.quant.modules import tensor_key

    out, wanted = {}, {tensor_key(n, state): n for n in names}
    for key, value in state.items():
        if key not in wanted:
            out[key] = value.to(dtype) if value.is_floating_point() else value
        elif key.endswith(".weight"):
            _pack_linear(out, wanted[key], value, dtype)
        else:
            for base, weight in per_expert(key, value, model_type):
                _pack_linear(out, base, weight, dtype)
    return out


def routers(state: dict, names: list[str]) -> list[str]:
    """The MoE routers (``<block>.gate``, a Linear in checkpoints) beside quantized experts."""
    blocks = {n.rpartition(".experts")[0] for n in names if ".experts." in n}
    return sorted(f"{b}.gate" for b in blocks if f"{b}.gate.weight" in state)


def save_w4a16(folder: str | Path, state: dict, names: list[str], config: dict, tokenizer=None) -> Path:
    """Write a loadable W4A16 checkpoint: ``model.safetensors`` + ``config.json`` (+ tokenizer)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_type = config.get("model_type", "")
    tensors = {k: v.contiguous() for k, v in w4a16_state(state, names, model_type=model_type).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    qcfg = quantization_config(routers(state, names))
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}, indent=2))
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
            q = unpack_int32(value)[:, :k]  # experts: one entry per expert Linear (checkpoint names)
            out[f"{base}.weight"] = fmt.int4_dequantize(q, tensors[f"{base}.weight_scale"], torch.float32)
        elif not key.endswith((".weight_scale", ".weight_shape")):
            out[key] = value
    return out
