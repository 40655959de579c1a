"""A megatron-core ``GPTModel`` built from a transformers config (Llama, Qwen2, Qwen3).

What is mapped (``ARCHS`` holds the per-family differences, a registry, not an if-chain):
- sizes: hidden, FFN, layers, attention heads, KV heads (``num_query_groups``), head dim
  (``kv_channels``; Qwen3's explicit ``head_dim``), vocab, max positions;
- RMSNorm with the HF epsilon, SwiGLU (``gated_linear_unit`` + SiLU), no linear biases except
  Qwen2's (and Llama's ``attention_bias``) Q/K/V bias, Qwen3's per-head Q/K RMSNorm (qk-norm);
- RoPE with the HF theta (``rope_parameters['rope_theta']`` or the older ``rope_theta``),
  non-interleaved (``rotate_half``), as HF;
- tied or untied input/output embeddings.

Dropout is 0 (RL trainers run without it); the numerics equal HF's in fp32 to ~1e-6 (tested).
The layer spec is Transformer Engine's when ``transformer_engine`` imports (``layer_spec: auto``)
and megatron-core's local spec otherwise; :func:`layer_spec` says which it chose.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from miles_ray.errors import UserValueError

# model_type -> (qk_layernorm, qkv_bias): qkv_bias None = the config's ``attention_bias``
ARCHS = {"qwen3": (True, False), "qwen2": (False, True), "llama": (False, None), "qwen3_moe": (True, False)}


def arch_flags(hf_config) -> tuple[bool, bool]:
    if hf_config.model_type not in ARCHS:
        raise UserValueError(f"train.backend=megatron supports model types {sorted(ARCHS)}, not "
                             f"'{hf_config.model_type}'; use train.backend=fsdp for this model")
    qk_norm, bias = ARCHS[hf_config.model_type]
    return qk_norm, bool(getattr(hf_config, "attention_bias", False)) if bias is None else bias


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def transformer_config(hf_config, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                       dtype: torch.dtype = torch.float32, ep: int = 1, etp: int | None = None):
    """The ``TransformerConfig`` of ``hf_config`` for a TP x PP (x EP for the experts) layout."""
    from megatron.core.transformer import TransformerConfig

    qk_norm, _ = arch_flags(hf_config)
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads, kv_channels=head_dim(hf_config),
        layernorm_epsilon=hf_config.rms_norm_eps, normalization="RMSNorm", qk_layernorm=qk_norm,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch_flags(hf_config)[1],
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=not cuda, perform_initialization=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, batch_p2p_comm=False,
        deallocate_pipeline_outputs=False, calculate_per_token_loss=True,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall", **moe_fields(hf_config, ep, etp))


def moe_fields(hf_config, ep: int = 1, etp: int | None = None) -> dict:
    """Qwen3-MoE: every layer sparse, softmax router over the top-k logits (= HF's softmax over all
    experts renormalised over the top-k when ``norm_topk_prob``), no auxiliary loss (the RL loss
    is the FSDP backend's), experts split over ``ep`` expert-parallel ranks (each expert over
    ``etp`` expert-TP ranks), megatron's ``alltoall`` token dispatcher (on CPU behind shim 7 of
    :mod:`~miles_ray.training.megatron.shims`; gloo has ``all_to_all_single``, uneven splits
    included). alltoall, unlike allgather, takes variable sequence lengths
    (``transformer_config.py``: allgather raises on ``variable_seq_lengths``), so MoE runs at PP > 1
    through the same shape-exchanging p2p as dense models."""
    if not getattr(hf_config, "num_experts", None):
        return {}
    return dict(num_moe_experts=hf_config.num_experts, moe_router_topk=hf_config.num_experts_per_tok,
                moe_ffn_hidden_size=hf_config.moe_intermediate_size, moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0, moe_router_pre_softmax=not hf_config.norm_topk_prob,
                moe_router_score_function="softmax", expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def spec_name(choice: str) -> str:
    """``te`` or ``local`` for ``megatron.layer_spec``: ``te`` needs transformer_engine; ``auto``
    takes it where it is installed (no megatron import: the driver calls this too)."""
    te = importlib.util.find_spec("transformer_engine") is not None
    if choice == "te" and not te:
        raise UserValueError("megatron.layer_spec=te but transformer_engine does not import here; "
                             "use megatron.layer_spec=auto or local")
    return "te" if te and choice in ("te", "auto") else "local"


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` for megatron's local spec under sequence parallelism (its
    ``WrappedTorchNorm`` refuses SP; TE's norms support it). The same math on each sequence shard;
    the weight is marked ``sequence_parallel`` so :mod:`miles_ray.training.megatron.grads` sums its
    gradient over TP."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(choice: str, hf_config, sequence_parallel: bool = False) -> tuple[object, str]:
    """(spec, name) of the decoder layer (see :func:`spec_name`)."""
    qk_norm, _ = arch_flags(hf_config)
    if spec_name(choice) == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        experts = getattr(hf_config, "num_experts", None) or None
        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, qk_layernorm=qk_norm), "te"
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    experts = getattr(hf_config, "num_experts", None) or None
    spec = get_gpt_layer_local_spec(num_experts=experts, qk_layernorm=qk_norm, normalization="RMSNorm")
    if sequence_parallel:
        sub = spec.submodules
        sub.input_layernorm = sub.pre_mlp_layernorm = SequenceParallelRMSNorm
        if qk_norm:
            sub.self_attention.submodules.q_layernorm = SequenceParallelRMSNorm
            sub.self_attention.submodules.k_layernorm = SequenceParallelRMSNorm
    return spec, "local"


def _block(config, spec):
    """A local layer spec under SP as a block whose final norm is SP-capable too."""
    if not config.sequence_parallel or getattr(spec.submodules, "input_layernorm", None) is not SequenceParallelRMSNorm:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)


def build_gpt_model(hf_config, config, spec, pre_process: bool = True, post_process: bool = True):
    """This pipeline stage's ``GPTModel`` (``pre_process``: it holds the embedding;
    ``post_process``: the final norm and output layer)."""
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(config, _block(config, spec), vocab_size=hf_config.vocab_size,
                     max_sequence_length=hf_config.max_position_embeddings, pre_process=pre_process,
                     post_process=post_process, parallel_output=True,
                     share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
                     position_embedding_type="rope", rotary_base=rope_theta(hf_config))
    return model.to("cuda" if torch.cuda.is_available() else "cpu")
