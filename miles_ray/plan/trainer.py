"""Per-GPU memory of a trainer rank (policy or critic), item by item, from the config and the
parameter inventory.

Exact (asserted against real tensors in tests/unit/plan/test_plan.py): parameters, gradients and
the AdamW state, for each ``train.precision`` and sharding:

- fp32: parameters, gradients, AdamW ``exp_avg`` / ``exp_avg_sq`` in fp32 (4 + 4 + 8 bytes each);
- bf16_mixed: the same (fp32 master parameters, fp32 gradients and optimizer state,
  :mod:`miles_ray.training.precision`); compute copies in bf16 are listed separately;
- bf16: everything bf16 (2 + 2 + 4);
- fp8_unified: the compute precision of ``auto`` (fp32 if model.dtype is float32, else
  bf16_mixed) plus fake-quantized weight copies;
- DDP (or one rank): full copies; FSDP2 over ``dp`` ranks: each divided by ``dp``; megatron: each
  divided by TP x PP (megatron trains fp32, plain AdamW over the local shard).
AdamW's ``step`` counters (one 0-dim fp32 tensor per parameter tensor, kept on the CPU) are not
counted.

Estimates (assumptions in :mod:`miles_ray.plan.activations`): activations, the log-prob chunk,
FSDP2's gathered layer, autocast and fake-quant copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from miles_ray.plan.activations import activation_bytes
from miles_ray.plan.params import Inventory
from miles_ray.plan.types import CUDA_CONTEXT, Item

PARAM_BYTES = {"fp32": 4, "bf16_mixed": 4, "bf16": 2}
COMPUTE_BYTES = {"fp32": 4, "bf16_mixed": 2, "bf16": 2}


def resolve_precision(precision: str, model_dtype: str) -> str:
    """The compute precision, as :func:`miles_ray.training.precision.resolve` (the plan sits below
    ``training``; a test asserts both agree)."""
    if precision in ("auto", "fp8_unified"):
        return "fp32" if model_dtype == "float32" else "bf16_mixed"
    return precision


@dataclass(frozen=True)
class Rank:
    """What one trainer rank holds: ``numel`` parameters (the whole model), stored in ``precision``,
    divided ``shard`` ways."""
    cfg: object  # miles_ray.config.Config
    inv: Inventory
    model: dict  # config.json
    numel: int
    precision: str
    shard: int
    critic: bool = False

    @property
    def param_bytes(self) -> int:
        return PARAM_BYTES[self.precision]

    @property
    def compute_bytes(self) -> int:
        return COMPUTE_BYTES[self.precision]

    @property
    def local(self) -> int:
        """Parameters this rank holds (FSDP2 pads each tensor to a multiple of dp: ignored)."""
        return -(-self.numel // self.shard)

    @property
    def strategy(self) -> str:
        c = self.cfg
        if c.train.backend == "megatron":
            return "megatron"
        return c.train.strategy if c.cluster.num_trainers > 1 else "single"


def policy_rank(cfg, inv: Inventory, model: dict) -> Rank:
    return Rank(cfg, inv, model, inv.numel, _precision(cfg), _shard(cfg))


def critic_rank(cfg, inv: Inventory, model: dict) -> Rank:
    """The value model: the policy's body (no LM head) and a ``hidden -> 1`` score head with bias."""
    numel = inv.numel - inv.head + model["hidden_size"] + 1
    return Rank(cfg, inv, model, numel, _precision(cfg), _shard(cfg), critic=True)


def _precision(cfg) -> str:
    if cfg.train.backend == "megatron":
        return "fp32"
    return resolve_precision(cfg.train.precision, cfg.model.dtype)


def _shard(cfg) -> int:
    c = cfg.cluster
    if cfg.train.backend == "megatron":
        return cfg.megatron.tensor_parallel * cfg.megatron.pipeline_parallel
    return c.num_trainers if cfg.train.strategy == "fsdp2" and c.num_trainers > 1 else 1


def parameter_bytes(rank: Rank) -> int:
    return rank.local * rank.param_bytes


def gradient_bytes(rank: Rank) -> int:
    return rank.local * rank.param_bytes


def optimizer_bytes(rank: Rank) -> int:
    """AdamW ``exp_avg`` + ``exp_avg_sq``, in the parameters' dtype."""
    return 2 * rank.local * rank.param_bytes


def _model_states(rank: Rank) -> list[Item]:
    knob = _sharding_knob(rank)
    return [Item("parameters", parameter_bytes(rank), knob),
            Item("gradients (kept between steps)", gradient_bytes(rank), knob),
            Item("optimizer state (AdamW)", optimizer_bytes(rank), knob, "train")]


def _sharding_knob(rank: Rank) -> str:
    c = rank.cfg
    if rank.strategy == "ddp":
        return "train.strategy=fsdp2 (divides it by cluster.num_trainers)"
    if rank.strategy == "megatron":
        return "raise megatron.tensor_parallel / megatron.pipeline_parallel"
    return f"more trainers: raise cluster.num_trainers (now {c.cluster.num_trainers}) with train.strategy=fsdp2"


def _ddp_buckets(rank: Rank) -> list[Item]:
    """DDP's flat gradient buckets (``gradient_as_bucket_view`` off): another copy of the gradients."""
    if rank.strategy != "ddp":
        return []
    return [Item("DDP gradient buckets", gradient_bytes(rank), "train.strategy=fsdp2")]


def _autocast_copies(rank: Rank) -> list[Item]:
    """bf16_mixed outside FSDP2: autocast's cached bf16 copy of every weight, held through backward."""
    if rank.precision != "bf16_mixed" or rank.strategy not in ("ddp", "single"):
        return []
    knob = "train.strategy=fsdp2 (casts one layer at a time)"
    return [Item("bf16 weight copies (autocast)", rank.numel * 2, knob, "train")]


def _fsdp_gathered(rank: Rank) -> list[Item]:
    """FSDP2: the largest unit (a decoder layer, or the root: embedding + LM head) gathered in the
    compute dtype, twice (current and prefetched), plus its unsharded fp32 gradient before the
    reduce-scatter."""
    if rank.strategy != "fsdp2":
        return []
    unit = max(max(layer.numel for layer in rank.inv.layers), rank.inv.outside_layers)
    size = unit * (2 * rank.compute_bytes + 4)
    return [Item("FSDP2 gathered layer (x2) + its gradient", size,
                 "train.backend=megatron with megatron.tensor_parallel (splits every layer)", "train")]


def _fake_quant_copies(rank: Rank) -> list[Item]:
    """fp8_unified / int4 QAT: each linear's quantize-dequantized weight, saved for backward
    (one layer at a time with gradient checkpointing)."""
    t = rank.cfg.train
    if rank.critic or (t.precision != "fp8_unified" and t.qat == "none"):
        return []
    linear = max(layer.linear for layer in rank.inv.layers) if t.gradient_checkpointing else rank.inv.linear
    knob = "train.gradient_checkpointing=true" if not t.gradient_checkpointing else "(one layer; fixed)"
    return [Item("fake-quantized weight copies", -(-linear // rank.shard) * rank.compute_bytes, knob, "train")]


def _activations(rank: Rank) -> list[Item]:
    t = rank.cfg.train
    tokens = micro_batch_tokens(rank.cfg)
    size = activation_bytes(rank.model, rank.inv, tokens, rank.compute_bytes, t.gradient_checkpointing)
    if rank.strategy == "megatron":
        size //= rank.cfg.megatron.tensor_parallel * rank.cfg.megatron.pipeline_parallel
    knob = ("train.gradient_checkpointing=true" if not t.gradient_checkpointing
            else f"lower train.max_tokens_per_micro_batch (now {tokens} tokens per micro-batch)")
    return [Item(f"activations (estimate, {tokens} tokens)", size, knob, "train")]


def _logprob_chunk(rank: Rank) -> list[Item]:
    if rank.critic:
        return []
    n = rank.cfg.train.logprob_chunk_tokens
    return [Item("log-prob chunk (tokens x vocab x 4)", n * rank.model["vocab_size"] * 4,
                 f"lower train.logprob_chunk_tokens (now {n})", "train")]


def _reference(rank: Rank) -> list[Item]:
    """The frozen KL reference (algorithm.kl_coef > 0): a copy of the parameters, laid out like the policy."""
    if rank.critic or rank.cfg.algorithm.kl_coef <= 0:
        return []
    knob = "train.strategy=fsdp2 (shards it)" if rank.strategy == "ddp" else "algorithm.kl_coef=0 (no reference)"
    return [Item("reference model (kl_coef > 0)", parameter_bytes(rank), knob)]


def _context(rank: Rank) -> list[Item]:
    return [Item("CUDA context + workspaces (fixed)", CUDA_CONTEXT, "(fixed assumption)")]


TRAINER_ITEMS: list[Callable[[Rank], list[Item]]] = [
    _model_states, _ddp_buckets, _autocast_copies, _fsdp_gathered, _fake_quant_copies, _activations,
    _logprob_chunk, _reference, _context]


def trainer_items(rank: Rank) -> list[Item]:
    """Every item on one trainer rank's GPU, in a fixed order."""
    return [item for fn in TRAINER_ITEMS for item in fn(rank)]


def sequence_tokens(cfg) -> int:
    """Longest sample: the prompt plus the response (a conversation's token budget with rollout.fn=multi_turn)."""
    response = cfg.agent.max_tokens if cfg.rollout.fn == "multi_turn" else cfg.rollout.max_new_tokens
    return cfg.data.max_prompt_tokens + response


def micro_batch_tokens(cfg) -> int:
    """Tokens of one micro-batch: the token budget, or micro_batch_size full-length samples."""
    return cfg.train.token_budget or cfg.train.micro_batch_size * sequence_tokens(cfg)
