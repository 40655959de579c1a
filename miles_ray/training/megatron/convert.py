"""HF <-> Megatron weight conversion (Llama / Qwen2 / Qwen3), both directions, per TP rank.

Layouts (megatron-core local and TE specs share the parameter names used here):
- ``linear_qkv`` fuses Q, K, V *per query group*: for each KV group g, its ``heads/groups`` query
  heads, then its K head, then its V head. TP rank r holds groups ``[r*G/tp, (r+1)*G/tp)``, i.e.
  the r-th contiguous chunk of the fused tensor. The bias (Qwen2) follows the same layout.
- ``linear_fc1`` fuses the gated MLP *per TP rank*: rank r holds ``[gate_r; up_r]`` (the r-th
  chunks of gate and up), so the TP-concatenated tensor is not ``[gate; up]``.
- Row-parallel ``linear_proj`` / ``linear_fc2`` split the input dim (1); embedding and output
  layer split the vocab (dim 0); norms are replicated.
- Tied embeddings: ``lm_head.weight`` is not exported (HF ties it); under PP > 1 the last stage's
  ``output_layer.weight`` is loaded from ``embed_tokens``.

Invariant (tested): HF -> Megatron (any TP, PP) -> HF reproduces every tensor bit for bit; the
functions only slice, view and concatenate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from miles_ray.training.megatron.model import arch_flags, head_dim

# megatron suffix inside a layer -> (HF suffix inside ``model.layers.<i>.``, TP split dim or None)
LAYER_PLAIN = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", None),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", None),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", 1),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", None),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", 1),
    # the TE spec fuses the norms into the following linear layer
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", None),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight", None),
    "mlp.router.weight": ("mlp.gate.weight", None),  # Qwen3-MoE
}
# Qwen3-MoE experts (EP=1, megatron's SequentialMLP): HF fuses all experts of a layer in one tensor
# ([E, 2I, H] gate then up; [E, H, I]); megatron holds one fc1 / fc2 per expert
EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
HF_EXPERTS = {"1": "mlp.experts.gate_up_proj", "2": "mlp.experts.down_proj"}
TOP_PLAIN = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
    "decoder.final_layernorm.weight": ("model.norm.weight", None),
    "output_layer.weight": ("lm_head.weight", 0),
}
LAYER_PREFIX = "decoder.layers."


def _groups(hf_config) -> tuple[int, int, int]:
    """(KV groups, query heads per group, head dim)."""
    groups = hf_config.num_key_value_heads
    return groups, hf_config.num_attention_heads // groups, head_dim(hf_config)


def _qkv_to_megatron(q, k, v, hf_config, tp_rank: int, tp: int) -> torch.Tensor:
    g, per, d = _groups(hf_config)
    rest, g = q.shape[1:], g // tp  # rank r: query groups [r g/tp, (r+1) g/tp), i.e. its rows of q, k, v
    q, k, v = (t.chunk(tp, dim=0)[tp_rank] for t in (q, k, v))  # (lazy views read only these rows)
    fused = torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return fused.reshape(-1, *rest).clone()


def _qkv_to_hf(shards: list, hf_config) -> tuple:
    g, per, d = _groups(hf_config)
    rest = shards[0].shape[1:]
    fused = torch.cat(shards, dim=0).reshape(g, (per + 2) * d, *rest)
    q, k, v = fused.split([per * d, d, d], dim=1)
    return tuple(t.reshape(-1, *rest).clone() for t in (q, k, v))


def _layer_to_megatron(hf: dict, pre: str, key: str, hf_config, tp_rank: int, tp: int,
                       experts: "Experts") -> torch.Tensor:
    if key.startswith("self_attention.linear_qkv.") and not key.endswith("layer_norm_weight"):
        kind = key.rsplit(".", 1)[1]  # weight | bias
        q, k, v = (hf[f"{pre}self_attn.{x}_proj.{kind}"] for x in "qkv")
        return _qkv_to_megatron(q, k, v, hf_config, tp_rank, tp)
    if key == "mlp.linear_fc1.weight":
        gate, up = hf[f"{pre}mlp.gate_proj.weight"], hf[f"{pre}mlp.up_proj.weight"]
        return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]]).clone()
    expert = EXPERT.match(key)
    if expert:  # expert-parallel: local expert i is global expert offset + i; split over expert TP
        t = hf[pre + HF_EXPERTS[expert[2]]][experts.offset + int(expert[1])]
        rank, size = (tp_rank, tp) if experts.tp is None else (experts.tp_rank, experts.tp)
        if expert[2] == "2":
            return t.chunk(size, dim=1)[rank].clone()
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]]).clone()
    name, dim = LAYER_PLAIN[key]
    return _split(hf[pre + name], dim, tp_rank, tp)


def _split(t: torch.Tensor, dim, tp_rank: int, tp: int) -> torch.Tensor:
    return t.clone() if dim is None else t.chunk(tp, dim=dim)[tp_rank].clone()


@dataclass(frozen=True)
class Experts:
    """Where this rank's experts sit: its first global expert (``ep_rank x experts / ep``) and its
    expert-TP rank / size (None: the dense TP rank / size, megatron's default)."""
    offset: int = 0
    tp_rank: int | None = None
    tp: int | None = None


def to_megatron(hf: dict, names: list, hf_config, tp_rank: int, tp: int, layer_offset: int,
                experts: Experts = Experts()) -> dict:
    """The tensors of megatron parameters ``names`` (one stage, one TP rank, one EP rank) from the
    HF state dict ``hf`` (any mapping: only the tensors needed are read); layer ``i`` of the
    stage is HF layer ``layer_offset + i``."""
    out = {}
    for key in names:
        if key.startswith(LAYER_PREFIX):
            local, sub = key[len(LAYER_PREFIX):].split(".", 1)
            pre = f"model.layers.{layer_offset + int(local)}."
            out[key] = _layer_to_megatron(hf, pre, sub, hf_config, tp_rank, tp, experts)
        elif key == "output_layer.weight" and "lm_head.weight" not in hf:  # tied: a copy on the last stage
            out[key] = _split(hf["model.embed_tokens.weight"], 0, tp_rank, tp)
        else:
            name, dim = TOP_PLAIN[key]
            out[key] = _split(hf[name], dim, tp_rank, tp)
    return out


def to_hf(key: str, shards: list, hf_config, layer_offset: int, expert_offset: int = 0) -> dict:
    """HF tensors of one megatron parameter given its shards on every TP rank (in TP-rank order;
    a single-element list for replicated parameters); an expert's shards are those of its expert-TP
    ranks, and its local index ``i`` is global expert ``expert_offset + i``."""
    if not key.startswith(LAYER_PREFIX):
        name, dim = TOP_PLAIN[key]
        return {name: shards[0].clone() if dim is None else torch.cat(shards, dim=dim)}
    local, sub = key[len(LAYER_PREFIX):].split(".", 1)
    pre = f"model.layers.{layer_offset + int(local)}."
    if sub.startswith("self_attention.linear_qkv.") and not sub.endswith("layer_norm_weight"):
        kind = sub.rsplit(".", 1)[1]
        return dict(zip((f"{pre}self_attn.{x}_proj.{kind}" for x in "qkv"), _qkv_to_hf(shards, hf_config)))
    if sub == "mlp.linear_fc1.weight":
        halves = [s.chunk(2) for s in shards]
        return {f"{pre}mlp.gate_proj.weight": torch.cat([h[0] for h in halves]),
                f"{pre}mlp.up_proj.weight": torch.cat([h[1] for h in halves])}
    expert = EXPERT.match(sub)
    if expert:  # one expert's slice of the fused HF tensor: "<name>@<expert>", see fuse_experts
        halves = [s.chunk(2) for s in shards]
        full = (torch.cat([h[0] for h in halves] + [h[1] for h in halves]) if expert[2] == "1"
                else torch.cat(shards, dim=1))
        return {f"{pre}{HF_EXPERTS[expert[2]]}@{expert_offset + int(expert[1])}": full}
    name, dim = LAYER_PLAIN[sub]
    return {pre + name: shards[0].clone() if dim is None else torch.cat(shards, dim=dim)}


def shard_to_hf(key: str, shard: torch.Tensor, hf_config, layer_offset: int, tp_rank: int, tp: int,
                expert_offset: int = 0) -> list:
    """Where TP rank ``tp_rank``'s shard of megatron parameter ``key`` lies in the HF tensors:
    ``[(HF name, index, tensor)]``, ``index`` a tuple of slices into that HF tensor (an expert's:
    into its ``<name>@<e>`` slice; ``tp_rank`` / ``tp``: the expert-TP ones). A replicated
    parameter comes from TP rank 0 only. The union over the TP ranks is :func:`to_hf`'s answer."""
    dim = tp_dim(key)
    if dim is None:
        return [(n, (), t) for n, t in to_hf(key, [shard], hf_config, layer_offset, expert_offset).items()] \
            if tp_rank == 0 else []
    if not key.startswith(LAYER_PREFIX):
        return [(TOP_PLAIN[key][0], _part(dim, tp_rank, shard.shape[dim]), shard)]
    local, sub = key[len(LAYER_PREFIX):].split(".", 1)
    pre = f"model.layers.{layer_offset + int(local)}."
    if sub.startswith("self_attention.linear_qkv."):
        g, per, d = _groups(hf_config)
        rest = shard.shape[1:]
        parts = shard.reshape(g // tp, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
        kind = sub.rsplit(".", 1)[1]
        return [(f"{pre}self_attn.{x}_proj.{kind}", _part(0, tp_rank, t.shape[0] * t.shape[1]), t.reshape(-1, *rest))
                for x, t in zip("qkv", parts)]
    expert = EXPERT.match(sub)
    if sub == "mlp.linear_fc1.weight" or (expert and expert[2] == "1"):
        gate, up = shard.chunk(2)
        n = gate.shape[0]
        if not expert:
            return [(f"{pre}mlp.gate_proj.weight", _part(0, tp_rank, n), gate),
                    (f"{pre}mlp.up_proj.weight", _part(0, tp_rank, n), up)]
        name = f"{pre}{HF_EXPERTS['1']}@{expert_offset + int(expert[1])}"
        return [(name, _part(0, tp_rank, n), gate), (name, (slice(n * (tp + tp_rank), n * (tp + tp_rank + 1)),), up)]
    if expert:
        return [(f"{pre}{HF_EXPERTS['2']}@{expert_offset + int(expert[1])}", _part(1, tp_rank, shard.shape[1]), shard)]
    return [(pre + LAYER_PLAIN[sub][0], _part(dim, tp_rank, shard.shape[dim]), shard)]


def _part(dim: int, rank: int, n: int) -> tuple:
    """Index of rank ``rank``'s ``n`` rows (dim 0) or columns (dim 1)."""
    return (slice(None),) * dim + (slice(rank * n, (rank + 1) * n),)


def fuse_experts(items, hf_config):
    """Pass ``(hf_name, tensor)`` pairs through, stacking the per-expert slices ``<name>@<e>`` of a
    layer into HF's fused tensor once all ``num_experts`` have arrived."""
    waiting: dict = {}
    for name, tensor in items:
        if "@" not in name:
            yield name, tensor
            continue
        base, e = name.rsplit("@", 1)
        got = waiting.setdefault(base, {})
        got[int(e)] = tensor
        if len(got) == hf_config.num_experts:
            yield base, torch.stack([got[i] for i in range(hf_config.num_experts)])
            del waiting[base]


def stage_names(hf_config, layers: int, first: bool, last: bool, ep: int = 1) -> list:
    """Megatron (local spec) parameter names of a stage with ``layers`` decoder layers (``ep``:
    expert-parallel size; each rank holds ``experts / ep`` local experts)."""
    qk_norm, bias = arch_flags(hf_config)
    experts = (getattr(hf_config, "num_experts", 0) or 0) // ep
    mlp = ["mlp.router.weight", *(f"mlp.experts.local_experts.{e}.linear_fc{k}.weight" for e in range(experts)
                                  for k in (1, 2))] if experts else ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                 "pre_mlp_layernorm.weight", *mlp]
    per_layer += ["self_attention.linear_qkv.bias"] * bias
    per_layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"] * qk_norm
    names = ["embedding.word_embeddings.weight"] * first
    names += [f"{LAYER_PREFIX}{i}.{k}" for i in range(layers) for k in per_layer]
    untied_or_split = not hf_config.tie_word_embeddings or not first
    return names + ["decoder.final_layernorm.weight"] * last + ["output_layer.weight"] * (last and untied_or_split)


def tp_dim(key: str) -> int | None:
    """The dim along which megatron parameter ``key`` is split over TP ranks (None: replicated).
    Taken from this table, not from megatron's ``tensor_model_parallel`` attributes: those are
    only set when megatron initialises the weights itself (``perform_initialization``)."""
    if key.startswith(LAYER_PREFIX):
        sub = key[len(LAYER_PREFIX):].split(".", 1)[1]
        if sub.startswith(("self_attention.linear_qkv.", "mlp.linear_fc1.")) and "layer_norm" not in sub:
            return 0
        if EXPERT.match(sub):
            return 0 if EXPERT.match(sub)[2] == "1" else 1
        return LAYER_PLAIN[sub][1]
    return TOP_PLAIN[key][1]


def is_expert(key: str) -> bool:
    """Whether megatron parameter ``key`` belongs to one expert (split over EP, expert TP)."""
    return EXPERT.search(key) is not None


def exported(key: str, hf_config) -> bool:
    """Whether this stage's parameter ``key`` goes into the HF export (a tied output layer
    does not: it is the embedding)."""
    return not (key == "output_layer.weight" and hf_config.tie_word_embeddings)
