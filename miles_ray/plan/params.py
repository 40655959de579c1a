"""Parameter inventory of a causal LM from its ``config.json`` alone (a dict; no weights, no torch).

One small function per architecture family, registered under the ``model_type`` values it covers:
dense Llama / Qwen2 / Qwen3 / Mistral, MoE Qwen3-MoE / Mixtral, and DeepSeek-V3 (MLA attention,
shared experts, the first ``first_k_dense_replace`` layers dense).

Invariant (tests/unit/plan/test_plan.py): :func:`count_parameters` equals
``sum(p.numel() for p in model.parameters())`` of the transformers model built from the same
config. Buffers (DeepSeek-V3's ``e_score_correction_bias``) are not parameters and are not
counted; neither are DeepSeek-V3's multi-token-prediction layers (``num_nextn_predict_layers``):
transformers does not build them, and the published 671B counts the main model only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from miles_ray.errors import UserValueError
from miles_ray.utils.registry import Registry

ARCHITECTURES = Registry("architecture")


@dataclass(frozen=True)
class Layer:
    """One decoder layer: its linear weights as ``(count, out_features, in_features)`` groups (what
    FP8 / INT4 engines quantize): ``matrices`` (attention, dense MLP, shared experts) and ``experts``
    (routed experts); ``small`` is the numel of everything else (norms, biases, routers)."""
    matrices: tuple
    small: int
    experts: tuple = ()
    kind: str = "dense"  # dense | moe

    @property
    def routed(self) -> int:
        return sum(n * o * i for n, o, i in self.experts)

    @property
    def linear(self) -> int:
        return sum(n * o * i for n, o, i in self.matrices) + self.routed

    @property
    def numel(self) -> int:
        return self.linear + self.small


@dataclass(frozen=True)
class Inventory:
    """Every parameter of the model: embedding, decoder layers, final norm and (untied) LM head."""
    embed: int
    layers: tuple
    final_norm: int
    head: int  # 0 when tie_word_embeddings

    @property
    def numel(self) -> int:
        return self.embed + sum(layer.numel for layer in self.layers) + self.final_norm + self.head

    @property
    def linear(self) -> int:
        return sum(layer.linear for layer in self.layers)

    @property
    def outside_layers(self) -> int:
        """The FSDP2 root unit: embedding, final norm, LM head."""
        return self.embed + self.final_norm + self.head


def _head_dim(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _gqa_attention(c: dict, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> tuple[tuple, int]:
    h, d = c["hidden_size"], _head_dim(c)
    q, kv = c["num_attention_heads"] * d, c.get("num_key_value_heads", c["num_attention_heads"]) * d
    matrices = ((1, q, h), (2, kv, h), (1, h, q))
    small = (q + 2 * kv) * qkv_bias + h * o_bias + 2 * d * qk_norm + 2 * h  # + input/post-attention norms
    return matrices, small


def _mlp(hidden: int, inter: int, count: int = 1) -> tuple:
    return ((2 * count, inter, hidden), (count, hidden, inter))  # gate and up, down


def _inventory(c: dict, layers: list) -> Inventory:
    v, h = c["vocab_size"], c["hidden_size"]
    return Inventory(v * h, tuple(layers), h, 0 if c.get("tie_word_embeddings", False) else v * h)


@ARCHITECTURES.register("dense")
def dense(c: dict) -> Inventory:
    """Llama / Qwen2 / Qwen3 / Mistral: GQA attention (Qwen2: q/k/v biases; Qwen3: q/k norms;
    Llama: ``attention_bias``, ``mlp_bias``) and a SwiGLU MLP."""
    mt = c.get("model_type")
    bias = bool(c.get("attention_bias", False))
    matrices, small = _gqa_attention(c, qkv_bias=mt == "qwen2" or bias, o_bias=bias, qk_norm=mt == "qwen3")
    h, inter = c["hidden_size"], c["intermediate_size"]
    small += (2 * inter + h) * bool(c.get("mlp_bias", False))
    layer = Layer(matrices + _mlp(h, inter), small)
    return _inventory(c, [layer] * c["num_hidden_layers"])


def num_experts(c: dict) -> int:
    """Routed experts per MoE layer (the HF name differs by family and transformers version)."""
    return c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts") or 0


def _sparse_qwen3(c: dict, i: int) -> bool:
    step = c.get("decoder_sparse_step", 1)
    return i not in c.get("mlp_only_layers", []) and num_experts(c) > 0 and (i + 1) % step == 0


@ARCHITECTURES.register("moe")
def moe(c: dict) -> Inventory:
    """Qwen3-MoE (``num_experts``, ``moe_intermediate_size``, dense ``mlp_only_layers``) and Mixtral
    (``num_local_experts`` of ``intermediate_size``): GQA attention, a router of ``experts x hidden``."""
    h = c["hidden_size"]
    qwen = c.get("model_type") == "qwen3_moe"
    attn, small = _gqa_attention(c, qkv_bias=bool(c.get("attention_bias", False)),
                                 o_bias=bool(c.get("attention_bias", False)), qk_norm=qwen)
    experts = num_experts(c)
    inter = c["moe_intermediate_size"] if qwen else c["intermediate_size"]
    sparse = Layer(attn, small + experts * h, _mlp(h, inter, experts), "moe")
    layers = []
    for i in range(c["num_hidden_layers"]):
        layers.append(sparse if not qwen or _sparse_qwen3(c, i) else Layer(attn + _mlp(h, c["intermediate_size"]), small))
    return _inventory(c, layers)


def _mla_attention(c: dict) -> tuple[tuple, int]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q_rank, kv_rank, bias = c.get("q_lora_rank"), c["kv_lora_rank"], bool(c.get("attention_bias", False))
    kv_a = kv_rank + c["qk_rope_head_dim"]
    if q_rank:
        q = ((1, q_rank, h), (1, heads * qk, q_rank))
        small = q_rank * bias + q_rank  # q_a_proj bias, q_a_layernorm
    else:
        q, small = ((1, heads * qk, h),), 0
    matrices = q + ((1, kv_a, h), (1, heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), kv_rank),
                    (1, h, heads * c["v_head_dim"]))
    small += kv_a * bias + h * bias + kv_rank + 2 * h  # kv_a / o biases, kv_a_layernorm, layer norms
    return matrices, small


@ARCHITECTURES.register("deepseek_v3")
def deepseek_v3(c: dict) -> Inventory:
    """MLA attention (low-rank q and kv), dense MLP in the first ``first_k_dense_replace`` layers,
    then ``n_routed_experts`` experts plus ``n_shared_experts`` (one MLP of ``n_shared x moe_inter``)
    and a router. Layer ``num_hidden_layers`` and beyond (MTP) are not counted."""
    h, e, inter = c["hidden_size"], num_experts(c), c["moe_intermediate_size"]
    attn, small = _mla_attention(c)
    dense_layer = Layer(attn + _mlp(h, c["intermediate_size"]), small)
    shared = _mlp(h, inter * c.get("n_shared_experts", 0)) if c.get("n_shared_experts") else ()
    sparse = Layer(attn + shared, small + e * h, _mlp(h, inter, e), "moe")
    k = c.get("first_k_dense_replace", 0)
    freq = c.get("moe_layer_freq", 1)
    layers = [sparse if i >= k and i % freq == 0 else dense_layer for i in range(c["num_hidden_layers"])]
    return _inventory(c, layers)


MODEL_TYPES = {"llama": "dense", "qwen2": "dense", "qwen3": "dense", "mistral": "dense",
               "qwen3_moe": "moe", "mixtral": "moe", "deepseek_v3": "deepseek_v3"}


def inventory(config: dict) -> Inventory:
    """The parameter inventory of an HF ``config.json`` (as a dict)."""
    mt = config.get("model_type")
    if mt not in MODEL_TYPES:
        raise UserValueError(f"the memory plan does not know model_type={mt!r}; known: {sorted(MODEL_TYPES)} "
                             "(--force / skip the plan to run anyway)")
    return ARCHITECTURES.get_fn(MODEL_TYPES[mt])(config)


def count_parameters(config: dict) -> int:
    """Exact parameter count of the transformers model built from ``config`` (an HF config.json dict)."""
    return inventory(config).numel


def active_parameters(config: dict) -> int:
    """Parameters one token passes through: the routed experts count ``num_experts_per_tok`` of them."""
    inv = inventory(config)
    k = config.get("num_experts_per_tok", 0)
    experts = num_experts(config) or 1
    return inv.numel - sum(layer.routed - layer.routed * k // experts for layer in inv.layers)


def read_model_config(spec: str, cache_dir: str = "runs/_models") -> dict:
    """``config.json`` of ``model.path``: a folder holding it (weights need not be there), or any spec
    :func:`miles_ray.models.loading.resolve_model_path` takes (``tiny:<arch>`` is written once)."""
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        from miles_ray.models.loading import resolve_model_path

        folder = Path(resolve_model_path(spec, cache_dir)["path"])
    return json.loads((folder / "config.json").read_text())
