"""Supervised samples from (prompt, target) pairs, for SFT warm-start and the draft trainer."""
from __future__ import annotations

from miles_ray.sample import Sample


def sft_samples(items, tokenizer, target_fn=lambda item: item.label) -> list[Sample]:
    """Samples whose response is ``target_fn(item)`` followed by eos."""
    out = []
    for item in items:
        prompt_ids = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(str(target_fn(item)), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Sample(prompt_index=item.index, group_id=item.index, prompt=item.prompt, label=item.label,
                          prompt_ids=prompt_ids, response_ids=target_ids))
    return out
