"""First rollout engine: ``transformers.generate`` returning token ids and per-token log-probs.

Log-probs are those of the sampled tokens under softmax(logits / temperature), which is what the
trainer recomputes (top-p/top-k truncation is not part of the log-prob, as in slime and verl).
"""
from __future__ import annotations

import torch

from miles_ray.models import load_model, load_tokenizer
from miles_ray.rollout.health import READY, RELEASED, STALE, EngineNotReady
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample
from miles_ray.weights import check_complete, load_bucket, to_buckets


class HFRolloutEngine:
    def __init__(self, model_spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models",
                 seed: int = 0, max_batch_size: int = 256):
        self.model_spec = model_spec
        self.tokenizer = load_tokenizer(model_spec, tiny_cache_dir)
        self.model = load_model(model_spec, dtype, tiny_cache_dir)
        if torch.cuda.is_available():
            self.model.cuda()
        self.weight_version = 0
        self.state = READY  # serves its initial weights (version 0) until the first sync
        self._shapes = None
        self._loading = None
        self.max_batch_size = max_batch_size
        self.generator_seed = seed
        torch.manual_seed(seed)

    # -- weights and memory ------------------------------------------------------------------
    def load_buckets(self, buckets: list, version: int) -> int:
        """Load a complete weight version in place; the engine is READY afterwards."""
        for b in buckets:
            self.load_part(b)
        return self.finish_load(version)

    def load_part(self, bucket) -> None:
        """Load one bucket (streamed sync). The engine stops serving until :meth:`finish_load`."""
        if self.state == RELEASED:
            raise EngineNotReady("engine memory is released; resume_memory() before loading weights")
        if self._loading is None:
            self._loading = {"params": dict(self.model.state_dict(keep_vars=True)), "names": set()}
            self.state = STALE
        load_bucket(self.model, bucket, self._loading["params"])
        self._loading["names"].update(e[0] for e in bucket.entries)

    def finish_load(self, version: int) -> int:
        """Check that every weight arrived, then serve ``version``."""
        names = self._loading["names"] if self._loading else set()
        self._loading = None
        check_complete(self.model, names)
        self.weight_version, self.state = version, READY
        return version

    def update_weights(self, state_dict: dict, version: int) -> int:
        return self.load_buckets(to_buckets(state_dict, version), version)

    def release_memory(self) -> None:
        """Free the weights (colocation: the trainer uses the device meanwhile)."""
        self._shapes = {id(p): (p.shape, p.dtype) for p in self.model.parameters()}
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.state = RELEASED

    def resume_memory(self) -> None:
        """Re-allocate the weights; they hold garbage until the next weight load (STALE)."""
        if self.state != RELEASED:
            return
        for p in self.model.parameters():
            shape, dtype = self._shapes[id(p)]
            p.data = torch.empty(shape, dtype=dtype, device=p.device)
        self.state = STALE

    def health(self) -> dict:
        return {"state": self.state, "weight_version": self.weight_version}

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        """``requests``: dicts with prompt, label, prompt_index, group_id. Returns n Samples each."""
        if self.state != READY:
            raise EngineNotReady(f"engine is {self.state} (weight version {self.weight_version}); it serves "
                                 "only after a complete weight load")
        expanded = [r for r in requests for _ in range(n)]
        out = []
        for start in range(0, len(expanded), self.max_batch_size):
            out.extend(self._generate_batch(expanded[start:start + self.max_batch_size], params))
        return out

    def _generate_batch(self, reqs: list[dict], params: SamplingParams) -> list[Sample]:
        tok = self.tokenizer
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
                weight_version=self.weight_version,
            ))
        return samples

    def _cut(self, ids: list, lps: list):
        """Keep tokens up to and including the first eos; the rest is padding."""
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            end = ids.index(eos) + 1
            return ids[:end], lps[:end], "stop"
        return ids, lps, "length"
