"""Policy trainer rank: recompute old (and reference) log-probs, policy loss from the registry with
optional KL-as-loss and entropy bonus, AdamW over micro-batches, an SFT loss, weight export.

Loss normalisation uses the token/sequence counts of the whole global mini-batch (summed over
ranks), so gradients depend neither on the micro-batch size nor on the number of ranks. Log-probs
come from :class:`CausalLMForTraining` (chunked LM head); losses see ``[samples, response]``
tensors (:meth:`TokenBatch.by_sample`), whichever layout (packed or padded) the forward used.
"""
from __future__ import annotations

import copy

import torch

from miles_ray.models import load_model, load_tokenizer
from miles_ray.models.loading import load_empty
from miles_ray.training import precision as prec
from miles_ray.training.base import padded_micro_batches
from miles_ray.training.collectives import all_max, all_sum
from miles_ray.training.fsdp.base import FSDPTrainerBase, place
from miles_ray.training.batching import loss_tokens, make_minibatches, pack, unpack
from miles_ray.training.fsdp.logprobs import CausalLMForTraining
from miles_ray.training.policy_loss import SUMMED_METRICS, PolicyLossMixin
from miles_ray.training.sft import SFTMixin
from miles_ray.training.fsdp.varlen import use_varlen_attention

class PolicyTrainer(PolicyLossMixin, SFTMixin, FSDPTrainerBase):
    def __init__(self, model_spec: str, train_cfg, algo_cfg, dtype: str = "float32",
                 tiny_cache_dir: str = "runs/_models", temperature: float = 1.0, seed: int = 0, off_policy=None,
                 schedule_steps: int = 0, exact_max_len: int = 0, engine_quant: str | None = None):
        torch.manual_seed(seed)
        self.algo, self.temperature = algo_cfg, temperature or 1.0
        self.off_policy = off_policy if off_policy is not None and off_policy.mode != "none" else None
        self.tokenizer = load_tokenizer(model_spec, tiny_cache_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        precision = prec.resolve(getattr(train_cfg, "precision", "fp32"), dtype)
        load = (load_empty if not prec.fake_quant(train_cfg) and not exact_max_len else _loaded)  # those read weights
        model, weights = load(model_spec, prec.load_dtype(precision), tiny_cache_dir)
        ref = None
        if algo_cfg.kl_coef > 0:  # the reference: the files again (sharded loading), else a copy before fake quant
            copied = (copy.deepcopy(model), None) if weights is None else None
            ref = copied or load(model_spec, prec.load_dtype(precision), tiny_cache_dir)
        self.engine_quant = engine_quant  # the engines serve quantized weights: sync sends them quantized
        if prec.fake_quant(train_cfg):  # fp8_unified / int4 QAT: train on the numbers the engines serve
            from miles_ray.quant.modules import fake_quantize_model

            fake_quantize_model(model, prec.fake_quant(train_cfg))
        self.replay = getattr(algo_cfg, "routing_replay", "none") == "r3"
        self.exact_max_len = exact_max_len
        if exact_max_len:  # true on-policy: the exact forward takes right-padded rows
            train_cfg = train_cfg.model_copy(update={"packing": False})
        self.exact_rows = getattr(train_cfg, "micro_batch_size", 1)  # rows per micro-batch: a self-test probe
        super().__init__(model, train_cfg, train_cfg.lr, getattr(train_cfg, "strategy", "ddp"), precision,
                         self._core(model, train_cfg.logprob_chunk_tokens), schedule_steps, weights)
        self.ref = self._reference(*ref) if ref is not None else None
        self.version = 0  # optimizer-step rounds done (train_step / sft_step)

    def _core(self, model: torch.nn.Module, chunk_tokens: int) -> torch.nn.Module:
        """The forward module: chunked log-probs, or the exact forward in true on-policy mode
        (after its startup self-test: the mode is refused where decode != full forward)."""
        if not self.exact_max_len:
            return CausalLMForTraining(model, chunk_tokens, self.replay)
        from miles_ray.models.exact import ExactLMForTraining, self_test

        core = ExactLMForTraining(model, self.exact_max_len)
        self_test(core.exact, model.config.vocab_size, batch_sizes=(self.exact_rows,))
        return core

    def _reference(self, ref: torch.nn.Module, weights=None) -> torch.nn.Module:
        """The frozen KL reference, laid out like the policy: sharded under FSDP2 (never a full
        copy per rank there; with sharded loading never a full read either), a replica under DDP
        (as the policy is)."""
        ref.eval().requires_grad_(False)
        use_varlen_attention(ref)
        core = self._core(ref, self.cfg.logprob_chunk_tokens)
        if weights is None:
            core.to(self.device)
        return place(core, ref, "fsdp2" if self.strategy == "fsdp2" else "none", self.precision, self.device, weights)

    # -- log-probs ------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, samples, core=None) -> list[list[float]]:
        """Per-sample response-token log-probs under ``core`` (the policy by default)."""
        core = core or self.model
        core.eval()
        found = {}
        for chunk, weight in padded_micro_batches(samples, self.cfg):
            batch = pack(chunk, self.pad_id, self.device, packed=self.cfg.packing)
            with self.autocast():
                logp, _ = core(batch, self.temperature, "none")
            if weight:
                found.update({id(s): lp for s, lp in zip(chunk, unpack(logp, batch))})
        return [found[id(s)] for s in samples]

    # -- RL step (train_step: PolicyLossMixin) ----------------------------------------------------
    def _loss(self, batch, n_tokens: float, n_seqs: float):
        logp_tok, ent_tok = self.model(batch, self.temperature, "loss" if self.algo.entropy_coef else "log")
        return self.policy_loss(batch, logp_tok, ent_tok, n_tokens, n_seqs)

    def minibatch_step(self, samples) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        routing, self.mismatch_max = self.core.routing, 0.0
        if routing is not None:
            routing.take_stats()  # count this mini-batch's training forwards only
        n_tokens, n_seqs = all_sum([loss_tokens(samples), float(len(samples))])
        micro = padded_micro_batches(samples, self.cfg)
        totals = self.backward_micro_batches(
            micro, lambda chunk: self._loss(pack(chunk, self.pad_id, self.device, packed=self.cfg.packing),
                                            n_tokens, n_seqs))
        keys = [k for k in SUMMED_METRICS if self.off_policy is not None or not k.startswith(("is_", "kl_behav"))]
        out = dict(zip(keys, all_sum([totals.get(k, 0.0) for k in keys])))
        for k in ("mismatch_abs", "mismatch_k3"):  # summed over tokens: per-token means
            out[k] /= max(n_tokens, 1.0)
        out["mismatch_max"] = all_max(float(self.mismatch_max))
        if routing is not None:
            out.update(_agreement(routing.take_stats()))
        out.update(self.optimizer_step())
        return out

    # -- weights --------------------------------------------------------------------------------
    def export_state(self) -> dict | None:
        """The full state dict for checkpoint exports, tied copies (``lm_head`` = embeddings) once
        however the ranks held them. Collective (FSDP2 gathers); None off rank 0."""
        state = self.full_state_dict()
        if state is not None and getattr(self.module.config, "tie_word_embeddings", False):
            for key in getattr(self.module, "all_tied_weights_keys", None) or {}:
                state.pop(key, None)
        return state

    def save_hf(self, folder: str) -> None:
        """The policy as an HF folder that ``transformers`` loads (rank 0 writes)."""
        state = self.export_state()
        if state is not None:
            self.module.save_pretrained(folder, state_dict=state)
            self.tokenizer.save_pretrained(folder)

    def save_w4a16(self, folder: str) -> None:
        """INT4 QAT: the policy as a compressed-tensors W4A16 checkpoint (vLLM / SGLang load it);
        its weights decode to exactly the fake-quantized values trained on (rank 0 writes)."""
        from miles_ray.quant.export import save_w4a16
        from miles_ray.quant.modules import quantizable

        state = self.export_state()
        if state is not None:
            save_w4a16(folder, state, quantizable(self.module), self.module.config.to_dict(), self.tokenizer)

    def engine_state(self, to_cpu: bool = True) -> dict | None:
        """The state dict engines load: quantized linears (+ scales) when they serve FP8 / INT4."""
        state = self.full_state_dict(to_cpu=to_cpu)
        if state is None or not self.engine_quant:
            return state
        from miles_ray.quant.modules import quantizable, quantize_state

        return quantize_state(state, quantizable(self.module), self.engine_quant)

    def get_weights(self) -> dict | None:
        """A CPU copy of the full state dict on rank 0; None on other ranks."""
        state = self.full_state_dict()
        return {k: v.clone() for k, v in state.items()} if state is not None else None


def _loaded(spec: str, dtype: str, tiny_cache_dir: str) -> tuple:
    """A full load (:func:`load_model`), shaped like :func:`load_empty`'s answer."""
    return load_model(spec, dtype, tiny_cache_dir), None


def train_on_samples(trainer: PolicyTrainer, samples: list, num_minibatches: int) -> dict:
    """Single-process convenience: prepare and train on a whole rollout batch."""
    trainer.prepare(samples)
    return trainer.train_step(make_minibatches(samples, num_minibatches))


def _agreement(stats: dict) -> dict:
    """Token x layer slots where the experts the trainer used (``routing_agreement``; 1 under R3)
    and its router's own top-k (``routing_agreement_own``) equal the engine's, over all ranks."""
    slots, used, own = all_sum([float(stats["slots"]), float(stats["used_agree"]), float(stats["own_agree"])])
    if not slots:
        return {}
    return {"routing_agreement": used / slots, "routing_agreement_own": own / slots}
