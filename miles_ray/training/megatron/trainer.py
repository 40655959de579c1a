"""Policy trainer rank on megatron-core (``train.backend: megatron``): the same interface as
:class:`miles_ray.training.PolicyTrainer` (the FSDP backend) to the actor and driver.

- Model: this rank's TP x PP stage of a ``GPTModel`` built from the HF config
  (:mod:`miles_ray.training.megatron.model`), loaded from the HF weights (:mod:`~miles_ray.training.megatron.convert`).
- Data: the driver scatters samples over all ranks; the ranks of one model-parallel group train on
  the union of their parts (:func:`~miles_ray.training.megatron.parallel.gather_model_parallel`), and
  :meth:`compute_logprobs` returns each rank its own part. Loss normalisation uses the global
  token / sequence counts, as on the FSDP backend, so gradients do not depend on the layout.
- Loss: :class:`~miles_ray.training.policy_loss.PolicyLossMixin` (the registry functions, one copy)
  on log-probs from the vocab-parallel logits, through megatron's pipeline schedules.
- Precision (:mod:`~miles_ray.training.megatron.options`): fp32 or bf16_mixed (bf16 model);
  either way the distributed optimizer (:mod:`~miles_ray.training.megatron.optimizer`): fp32 main
  parameters and gradients, AdamW state sharded over DP; reductions and clipping in
  :mod:`~miles_ray.training.megatron.grads`.
- Rows: packed (``train.packing``, THD with ``PackedSeqParams``: :mod:`~miles_ray.training.megatron.packed`)
  or right-padded; log-probs through the output layer in chunks of ``train.logprob_chunk_tokens``
  (:mod:`~miles_ray.training.megatron.logprobs`); ``train.gradient_checkpointing``: megatron's
  activation recompute (``megatron.recompute``).
"""
from __future__ import annotations

import logging

import torch

from miles_ray.algorithms import LOSS_AGGREGATIONS
from miles_ray.algorithms.losses import sft_token_loss
from miles_ray.training.megatron import grads, moe, options, parallel, weights
from miles_ray.training.megatron.hf_files import hf_source
from miles_ray.training.megatron.logprobs import head_logprobs
from miles_ray.training.megatron.optimizer import build as build_optimizer
from miles_ray.training.megatron.model import build_gpt_model, layer_spec, transformer_config
from miles_ray.training.megatron.packed import use_varlen_attention
from miles_ray.training.megatron.schedule import run_micro_batches
from miles_ray.models import load_tokenizer
from miles_ray.training.base import TorchTrainerBase, padded_micro_batches
from miles_ray.training.collectives import all_max, all_sum, device, world
from miles_ray.training.batching import loss_tokens, pack, unpack
from miles_ray.training.policy_loss import SUMMED_METRICS, PolicyLossMixin

log = logging.getLogger("miles_ray.training.megatron")


def _parallel(cfg) -> dict:
    if cfg is None:
        cfg = {}
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    return {"tensor_parallel": get("tensor_parallel", 1), "pipeline_parallel": get("pipeline_parallel", 1),
            "sequence_parallel": bool(get("sequence_parallel", False)), "layer_spec": get("layer_spec", "auto"),
            "precision": get("precision", "auto"), "recompute": get("recompute", "full"),
            "expert_parallel": get("expert_parallel", 1), "expert_tensor_parallel": get("expert_tensor_parallel", 0) or None}


class MegatronPolicyTrainer(PolicyLossMixin, TorchTrainerBase):
    """Inherits the backend-neutral parts of :class:`TorchTrainerBase` (learning-rate setting,
    optimizer offload, bucketed export, counters) but not its ``__init__`` (no DDP/FSDP here)."""

    def __init__(self, model_spec: str, train_cfg, algo_cfg, dtype: str = "float32",
                 tiny_cache_dir: str = "runs/_models", temperature: float = 1.0, seed: int = 0, off_policy=None,
                 schedule_steps: int = 0, parallel_cfg=None):
        from miles_ray.training.megatron.validate import validate_layout

        torch.manual_seed(seed)
        self.algo, self.temperature = algo_cfg, temperature or 1.0
        self.off_policy = off_policy if off_policy is not None and off_policy.mode != "none" else None
        self.tokenizer = load_tokenizer(model_spec, tiny_cache_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.cfg = train_cfg
        par = _parallel(parallel_cfg)
        self.precision = options.resolve_precision(par["precision"], getattr(train_cfg, "precision", "auto"), dtype)
        self.strategy = "megatron"
        self.rank, self.world_size = world()
        self.device = device()
        hf_config, hf_state, self.hf_files = hf_source(model_spec, tiny_cache_dir)  # sharded: lazy file view
        self.hf_config = hf_config
        ep, etp = par["expert_parallel"], par["expert_tensor_parallel"]  # expert parallelism (MoE)
        validate_layout(hf_config, par["tensor_parallel"], par["pipeline_parallel"], self.world_size, ep, etp)
        parallel.initialize(par["tensor_parallel"], par["pipeline_parallel"], seed, ep, etp)
        self.where = parallel.layout()
        moe = bool(getattr(hf_config, "num_experts", None))  # megatron trains MoE under TP only with SP
        self.sequence_parallel = (par["sequence_parallel"] or moe) and par["tensor_parallel"] > 1
        self.mconfig = transformer_config(hf_config, par["tensor_parallel"], par["pipeline_parallel"],
                                          self.sequence_parallel, dtype=options.model_dtype(self.precision), ep=ep, etp=etp)
        self.mconfig = options.with_recompute(self.mconfig, train_cfg.gradient_checkpointing, par["recompute"])
        self.spec, self.spec_name = layer_spec(par["layer_spec"], hf_config, self.sequence_parallel)
        use_varlen_attention(self.spec)  # THD (packed rows) on the local spec
        log.info("megatron backend: %s layer spec, TP=%d PP=%d DP=%d SP=%s", self.spec_name, self.where["tp"],
                 self.where["pp"], self.where["dp"], self.sequence_parallel)
        self.model, initial = self._stage(hf_state)
        self.module = self.core = self.model
        self.ref = self._stage(hf_state)[0].eval().requires_grad_(False) if algo_cfg.kl_coef > 0 else None
        del hf_state
        self._export_plan = None  # export.HFStream, built on the first export (collective)
        self.routing, self.ref_routing = self._routing(self.model), self._routing(self.ref)  # MoE: R3 / agreement
        self.optimizer = build_optimizer(self.model, train_cfg.lr, train_cfg.weight_decay, initial)
        del initial
        self.base_lr, self.schedule_steps, self.opt_steps = train_cfg.lr, schedule_steps, 0
        self.offloaded, self.version, self.mismatch_max = False, 0, 0.0

    def _stage(self, hf_state):
        model = build_gpt_model(self.hf_config, self.mconfig, self.spec, self.where["first"], self.where["last"])
        model.to(options.model_dtype(self.precision))  # all of it, norms too (megatron's Float16Module: .bfloat16())
        return model, weights.load_hf(model, hf_state, self.hf_config)

    def _routing(self, model):
        """R3 replay (``algorithm.routing_replay=r3``) and routing agreement on ``model``'s routers
        (:class:`~miles_ray.training.megatron.moe.RouterReplay`); None for a dense model."""
        if model is None:
            return None
        replay = moe.RouterReplay(model, weights.layer_offset(model), getattr(self.algo, "routing_replay", "none") == "r3",
                                  self.sequence_parallel)
        return replay if replay.is_moe else None

    # -- forward --------------------------------------------------------------------------------
    def _batches(self, samples: list) -> tuple[list, list]:
        micro = padded_micro_batches(samples, self.cfg)
        multiple = self.where["tp"] if self.sequence_parallel else 1  # SP shards the sequence over TP
        return [pack(c, self.pad_id, self.device, packed=self.cfg.packing, length_multiple=multiple)
                for c, _ in micro], micro

    def _token_logprobs(self, batch, hidden, entropy: str = "none", core=None):
        """(log-probs, entropy or None) ``[R, L]``, 0 off ``batch.mask``, from the last stage's hidden
        states; ``entropy``: ``"loss"`` / ``"log"`` / ``"none"`` (:func:`head_logprobs`)."""
        return head_logprobs(core or self.model, hidden, batch, self.temperature, self.cfg.logprob_chunk_tokens,
                             entropy, self.sequence_parallel)

    @torch.no_grad()
    def compute_logprobs(self, samples, core=None) -> list[list[float]]:
        """Per-sample response log-probs of this rank's ``samples`` (collective over the world)."""
        core = core or self.model
        core.eval()
        group, mine = parallel.gather_model_parallel(samples)
        batches, micro = self._batches(group)
        batches = moe.ReplayBatches(batches, self.ref_routing if core is self.ref else self.routing)

        def loss_fn(batch, hidden):
            logp, _ = self._token_logprobs(batch, hidden, core=core)
            return hidden.sum() * 0.0, {"logp": unpack(logp, batch)}

        out = run_micro_batches(core, batches, loss_fn, forward_only=True) if batches else []
        found = _by_position(group, micro, [o["logp"] for o in out]) if out else None
        return parallel.broadcast_from_last_stage(found)[mine]

    # -- RL step (train_step: PolicyLossMixin) ----------------------------------------------------
    def minibatch_step(self, samples) -> dict:
        """One optimizer step on this rank's part of a global mini-batch."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.mismatch_max = 0.0
        n_tokens, n_seqs = all_sum([loss_tokens(samples), float(len(samples))])
        group, _ = parallel.gather_model_parallel(samples)
        batches, micro = self._batches(group)
        weight = {id(b): w for b, (_, w) in zip(batches, micro)}
        entropy = "loss" if self.algo.entropy_coef else "log"
        if self.routing is not None:  # count this mini-batch's training forwards only
            self.routing.take_stats()
        batches = moe.ReplayBatches(batches, self.routing)

        def loss_fn(batch, hidden):
            logp, ent = self._token_logprobs(batch, hidden, entropy)
            loss, metrics = self.policy_loss(batch, logp, ent, n_tokens, n_seqs)
            w = weight[id(batch)]
            return loss * w, {k: v * w for k, v in metrics.items()}

        out = run_micro_batches(self.model, batches, loss_fn, forward_only=False)
        routed = moe.agreement(self.routing.take_stats()) if self.routing is not None else {}
        return self._reduce_metrics(out, n_tokens) | routed | self.optimizer_step()

    def sft_step(self, samples, lr: float | None = None) -> dict:
        """As :meth:`miles_ray.training.sft.SFTMixin.sft_step`: token-mean NLL of the responses."""
        self.set_lr(lr if lr is not None else self.base_lr)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens, n_seqs = all_sum([loss_tokens(samples), float(len(samples))])
        group, _ = parallel.gather_model_parallel(samples)
        batches, micro = self._batches(group)
        weight = {id(b): w for b, (_, w) in zip(batches, micro)}

        def loss_fn(batch, hidden):
            logp, _ = self._token_logprobs(batch, hidden)
            nll = sft_token_loss(batch.by_sample(logp))
            loss = LOSS_AGGREGATIONS["token_mean"](nll, batch.sample_mask, n_tokens, n_seqs) * weight[id(batch)]
            return loss, {"sft_loss": loss.item()}

        out = run_micro_batches(self.model, batches, loss_fn, forward_only=False)
        metrics = {**self._sum_metrics(out, ["sft_loss"]), **self.optimizer_step(scheduled=False)}
        self.set_lr(self.base_lr)
        self.version += 1
        return metrics

    def _sum_metrics(self, per_micro: list, keys: list) -> dict:
        """Sum over micro-batches, then over DP ranks (one reporter per model-parallel group)."""
        reporter = self.where["last"] and self.where["tp_rank"] == 0
        local = [sum(m.get(k, 0.0) for m in per_micro) if reporter else 0.0 for k in keys]
        return dict(zip(keys, all_sum(local)))

    def _reduce_metrics(self, per_micro: list, n_tokens: float) -> dict:
        keys = [k for k in SUMMED_METRICS if self.off_policy is not None or not k.startswith(("is_", "kl_behav"))]
        out = self._sum_metrics(per_micro, keys)
        for k in ("mismatch_abs", "mismatch_k3"):
            out[k] /= max(n_tokens, 1.0)
        out["mismatch_max"] = all_max(float(self.mismatch_max))
        return out

    def clip_gradients(self) -> torch.Tensor:
        """Reduce the gradients over DP (and SP), then clip (:mod:`miles_ray.training.megatron.grads`); the
        base class's :meth:`optimizer_step` does the rest (AdamW at the scheduled learning rate)."""
        grads.finalize(self.model, self.optimizer, self.sequence_parallel)
        return grads.clip(self.optimizer, self.cfg.grad_clip)

    # -- checkpoints: megatron distributed checkpointing --------------------------------------------
    def save_checkpoint(self, folder: str) -> None:
        """Collective (:mod:`miles_ray.training.megatron.checkpoint`)."""
        from miles_ray.training.megatron import checkpoint

        checkpoint.save(folder, self.model, self.optimizer, self.counters())

    def load_checkpoint(self, folder: str) -> None:
        from miles_ray.training.megatron import checkpoint

        counters = checkpoint.load(folder, self.model, self.optimizer)
        self.version, self.opt_steps = counters["version"], counters["opt_steps"]

    # -- weights --------------------------------------------------------------------------------
    def full_state_dict(self, to_cpu: bool = True) -> dict | None:
        """The HF-named full state dict on rank 0 (None elsewhere); collective."""
        from miles_ray.training.megatron.export import gather_hf_state

        return gather_hf_state(self._stream())

    def engine_state(self, to_cpu: bool = True):
        """What engines load: an :class:`~miles_ray.training.megatron.export.HFStream` on every rank (its
        buckets are gathered and converted as :meth:`iter_export` packs them)."""
        return self._stream().placed(to_cpu)

    def _stream(self):
        """The export plan (:class:`~miles_ray.training.megatron.export.HFStream`), exchanged once
        (collective: every rank calls this at the same point, the first export)."""
        from miles_ray.training.megatron.export import HFStream

        if self._export_plan is None:
            self._export_plan = HFStream(self.model, self.hf_config)
        return self._export_plan

    def iter_export(self, state, version: int, bucket_bytes: int):
        """Buckets on rank 0, one at a time (collective; tensor collectives only, see
        :mod:`~miles_ray.training.megatron.export`); a transport whose payloads refer to the
        buffers (shm / cuda_ipc handles) keeps them alive itself (:mod:`miles_ray.weights.ipc`)."""
        from miles_ray.training.megatron.export import iter_buckets

        yield from iter_buckets(state, version, bucket_bytes, state.to_cpu)

    def export_state(self) -> dict | None:
        return self.full_state_dict()

    def get_weights(self) -> dict | None:
        return self.full_state_dict()

    def save_hf(self, folder: str) -> None:
        """The policy as an HF folder (gathered to rank 0, which writes)."""
        state = self.full_state_dict()
        if state is not None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                hf = AutoModelForCausalLM.from_config(self.hf_config)
            hf.load_state_dict(state, strict=False, assign=True)
            hf.tie_weights()
            hf.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)


def _by_position(group: list, micro: list, per_micro: list) -> list:
    """Per-sample results in ``group`` order from per-micro-batch lists (padding micro-batches
    dropped; whatever order the micro-batch planner chose)."""
    where = {id(s): i for i, s in enumerate(group)}
    out = [None] * len(group)
    for (chunk, weight), results in zip(micro, per_micro):
        for s, r in zip(chunk if weight else [], results):
            out[where[id(s)]] = r
    return out
