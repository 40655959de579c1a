"""Per-GPU memory of a rollout engine, item by item.

- weights at ``rollout.precision``: bf16 = unquantized, in ``model.dtype``; fp8 = every decoder
  linear weight (attention, MLP, shared and routed experts)
  one byte plus an fp32 scale per 128 x 128 block; int4 = half a byte plus a 16-bit scale per 128
  input columns; embeddings, LM head, norms and routers stay in ``model.dtype`` (as SGLang / vLLM
  serve FP8 / W4A16 checkpoints);
- the KV cache for the requests an engine holds at once (one rollout batch split over the engines;
  async runs up to ``staleness + 1`` batches; the native engine at most its slot count) at the
  longest sample length, with the model's KV heads (GQA) or MLA's latent;
- SGLang (``rollout.backend=sglang``): weights and KV heads split over ``cluster.gpus_per_engine``
  (tensor parallel; an MLA latent is replicated), and the pool SGLang reserves up to
  ``mem_fraction_static`` of the GPU; in-process engines use one GPU;
- sampling logits (fp32, one row per running request), CUDA graphs and context (fixed).
"""
from __future__ import annotations

from typing import Callable

from miles_ray.plan.params import Inventory
from miles_ray.plan.trainer import sequence_tokens
from miles_ray.plan.types import CUDA_CONTEXT, GIB, NATIVE_MAX_RUNNING, SGLANG_CUDA_GRAPHS, SGLANG_FRACTION, Item

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCK = 128  # FP8 weight blocks 128 x 128, INT4 groups of 128 (miles_ray.quant.formats)


def _blocks(out: int, inp: int) -> int:
    return -(-out // BLOCK) * -(-inp // BLOCK)


def _fp8(groups) -> int:
    return sum(n * (o * i + 4 * _blocks(o, i)) for n, o, i in groups)


def _int4(groups) -> int:
    return sum(n * (o * i // 2 + 2 * o * -(-i // BLOCK)) for n, o, i in groups)


QUANTIZED = {"fp8": _fp8, "int4": _int4}
WEIGHT_KNOBS = {"bf16": "rollout.precision=fp8", "fp8": "rollout.precision=int4"}


def weight_bytes(inv: Inventory, precision: str, dtype: str, experts: bool = True) -> int:
    """The whole model as an engine serves it at ``precision`` (bf16 | fp8 | int4), routed experts
    included (``experts=False``: they stay in ``dtype``, for an engine that does not quantize them)."""
    b = DTYPE_BYTES[dtype]
    if precision == "bf16":
        return inv.numel * b
    groups = [g for layer in inv.layers for g in (*layer.matrices, *(layer.experts if experts else ()))]
    quantized = sum(n * o * i for n, o, i in groups)
    return QUANTIZED[precision](groups) + (inv.numel - quantized) * b


def kv_bytes_per_token(c: dict, dtype: str, tp: int = 1) -> int:
    """K and V of one token over all layers on one GPU (GQA heads split over ``tp``; MLA's
    compressed latent, replicated)."""
    b, layers = DTYPE_BYTES[dtype], c["num_hidden_layers"]
    if "kv_lora_rank" in c:
        return layers * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * b
    heads = c.get("num_key_value_heads", c["num_attention_heads"])
    d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * layers * -(-heads // tp) * d * b


def concurrency(cfg) -> int:
    """Requests one engine holds at once."""
    r = cfg.rollout
    batches = cfg.async_rl.staleness + 1 if cfg.async_rl.enabled else 1
    per_engine = -(-r.prompts_per_step * r.n_samples_per_prompt * batches // r.num_engines)
    return min(per_engine, NATIVE_MAX_RUNNING) if r.backend == "native" else per_engine


def tensor_parallel(cfg) -> int:
    return cfg.cluster.gpus_per_engine if cfg.rollout.backend == "sglang" else 1


def _weights(cfg, inv: Inventory, c: dict) -> list[Item]:
    r = cfg.rollout
    size = weight_bytes(inv, r.precision, cfg.model.dtype, r.backend == "sglang") // tensor_parallel(cfg)
    knob = WEIGHT_KNOBS.get(r.precision, "a smaller model")
    if r.backend == "sglang":  # rollout.precision quantizes in-actor engines only; SGLang splits over GPUs
        knob = "raise cluster.gpus_per_engine (SGLang tensor parallel; needs cluster.colocate=false)"
    return [Item(f"weights ({r.precision})", size, knob, "rollout")]


def _kv_cache(cfg, inv: Inventory, c: dict) -> list[Item]:
    n, length = concurrency(cfg), sequence_tokens(cfg)
    size = n * length * kv_bytes_per_token(c, cfg.model.dtype, tensor_parallel(cfg))
    knob = (f"fewer requests per engine: raise rollout.num_engines (now {cfg.rollout.num_engines}) "
            f"or lower rollout.max_new_tokens (now {cfg.rollout.max_new_tokens})")
    items = [Item(f"KV cache ({n} requests x {length} tokens)", size, knob, "rollout")]
    if cfg.rollout.backend == "sglang":
        fraction = cfg.rollout.mem_fraction_static or (0.5 if cfg.cluster.colocate else SGLANG_FRACTION)
        weights = weight_bytes(inv, cfg.rollout.precision, cfg.model.dtype) // tensor_parallel(cfg)
        extra = int(fraction * cfg.cluster.gpu_memory_gib * GIB) - weights - size
        if extra > 0:
            items.append(Item(f"KV pool reserve (SGLang fills mem_fraction_static={fraction:g})", extra,
                              "lower rollout.mem_fraction_static", "rollout"))
    return items


def _logits(cfg, inv: Inventory, c: dict) -> list[Item]:
    return [Item("sampling logits (fp32)", concurrency(cfg) * c["vocab_size"] * 4, "fewer requests per engine",
                 "rollout")]


def _fixed(cfg, inv: Inventory, c: dict) -> list[Item]:
    items = [Item("CUDA context + workspaces (fixed)", CUDA_CONTEXT, "(fixed assumption)")]
    if cfg.rollout.backend == "sglang":
        items.append(Item("CUDA graphs (fixed)", SGLANG_CUDA_GRAPHS, "fewer --cuda-graph-bs (rollout.sglang_args)"))
    return items


ENGINE_ITEMS: list[Callable] = [_weights, _kv_cache, _logits, _fixed]


def engine_items(cfg, inv: Inventory, c: dict) -> list[Item]:
    """Every item on one engine GPU, in a fixed order."""
    return [item for fn in ENGINE_ITEMS for item in fn(cfg, inv, c)]
