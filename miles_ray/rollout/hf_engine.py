"""First rollout engine: ``transformers.generate`` returning token ids and per-token log-probs.

Log-probs are those of the sampled tokens under softmax(logits / temperature), which is what the
trainer recomputes (top-p/top-k truncation is not part of the log-prob, as in slime and verl).
Weights and health live in :class:`EngineWeights` (shared with the native engine by composition).
"""
from __future__ import annotations

import torch

from miles_ray.rollout.engine_weights import EngineWeights, load_for_serving
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample


class HFRolloutEngine:
    def __init__(self, model_spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models",
                 seed: int = 0, max_batch_size: int = 256, quantization: str | None = None, fp8_backend: str = "auto"):
        self.model_spec = model_spec
        self.tokenizer, self.model = load_for_serving(model_spec, dtype, tiny_cache_dir, quantization, fp8_backend)
        self.weights = EngineWeights(self.model)
        self.max_batch_size = max_batch_size
        torch.manual_seed(seed)

    def release_memory(self) -> None:
        self.weights.release()

    def resume_memory(self) -> None:
        self.weights.resume()

    def get_rng_state(self) -> torch.Tensor:
        """transformers.generate samples from torch's global RNG."""
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        """``requests``: dicts with prompt, label, prompt_index, group_id. Returns n Samples each."""
        self.weights.require_ready()
        expanded = [r for r in requests for _ in range(n)]
        out = []
        for start in range(0, len(expanded), self.max_batch_size):
            out.extend(self._generate_batch(expanded[start:start + self.max_batch_size], params))
        return out

    def _generate_batch(self, reqs: list[dict], params: SamplingParams) -> list[Sample]:
        tok = self.tokenizer
        if any(r.get("input_ids") is not None for r in reqs):  # exact token ids (multi-turn), left-padded
            ids = [list(r["input_ids"]) if r.get("input_ids") is not None else
                   tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in reqs]
            enc = tok.pad({"input_ids": ids}, return_tensors="pt", padding=True)
        else:
            enc = tok([r["prompt"] for r in reqs], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      return_dict_in_generate=True, output_logits=True)
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        result = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = result.sequences[:, prompt_len:]
        temp = 1.0 if params.greedy else params.temperature
        logits = torch.stack(result.logits, dim=1).float() / temp
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        samples = []
        for i, req in enumerate(reqs):
            ids, lps, reason = self._cut(new_tokens[i].tolist(), logprobs[i].tolist())
            prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            samples.append(Sample(
                prompt_index=req["prompt_index"], group_id=req["group_id"], prompt=req["prompt"],
                label=req["label"], prompt_ids=prompt_ids, response_ids=ids, response_logprobs=lps,
                response_text=tok.decode(ids, skip_special_tokens=True), finish_reason=reason,
                weight_version=self.weights.version,
            ))
        return samples

    def _cut(self, ids: list, lps: list):
        """Keep tokens up to and including the first eos; the rest is padding."""
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            end = ids.index(eos) + 1
            return ids[:end], lps[:end], "stop"
        return ids, lps, "length"
