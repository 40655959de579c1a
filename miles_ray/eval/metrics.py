"""Evaluation metrics of one dataset, from the rewards of its samples.

A sample passes when its reward >= the set's ``pass_threshold``. For a prompt with ``n`` sampled
answers of which ``c`` pass, the unbiased estimator of pass@k (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", eq. 1) is ``1 - C(n - c, k) / C(n, k)``: the probability
that k answers drawn without replacement from the n include a passing one. A set's pass@k is the
mean over its prompts; pass@1 reduces to the fraction of sampled answers that pass.

Keys (grouped, as in ``metrics.jsonl``, wandb and Ray): ``eval/<name>/reward_mean``,
``eval/<name>/pass@1``, ``eval/<name>/pass@<n>`` (n = the set's ``n_samples``, when > 1),
``eval/<name>/greedy_pass@1`` and ``eval/<name>/greedy_reward_mean`` (with ``greedy``),
``eval/<name>/response_len_mean`` (sampled answers), ``eval/<name>/num_prompts``, and over all
sets ``eval/reward_mean`` (the mean of the sets' ``reward_mean``: each set weighs the same).
"""
from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``n`` answers, ``c`` of them passing (``k <= n``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset holds a passing answer
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0


def dataset_metrics(name: str, sampled: list[list], greedy: list | None, threshold: float) -> dict:
    """Metrics of set ``name``: ``sampled[i]`` holds prompt i's sampled answers (objects with
    ``reward`` and ``response_length``), ``greedy[i]`` its greedy answer (None: no greedy pass)."""
    if not sampled or any(len(g) != len(sampled[0]) or not g for g in sampled):
        raise ValueError(f"eval set {name!r}: every prompt needs the same number (>= 1) of sampled answers")
    n = len(sampled[0])
    passes = [sum(s.reward >= threshold for s in group) for group in sampled]
    flat = [s for group in sampled for s in group]
    out = {f"eval/{name}/reward_mean": _mean([s.reward for s in flat]),
           f"eval/{name}/pass@1": _mean([pass_at_k(n, c, 1) for c in passes])}
    if n > 1:
        out[f"eval/{name}/pass@{n}"] = _mean([pass_at_k(n, c, n) for c in passes])
    if greedy is not None:
        out[f"eval/{name}/greedy_pass@1"] = _mean([float(s.reward >= threshold) for s in greedy])
        out[f"eval/{name}/greedy_reward_mean"] = _mean([s.reward for s in greedy])
    out[f"eval/{name}/response_len_mean"] = _mean([s.response_length for s in flat])
    out[f"eval/{name}/num_prompts"] = len(sampled)
    return out


def overall_metrics(per_set: dict[str, dict]) -> dict:
    """``eval/reward_mean``: the mean over sets (name -> that set's metrics) of their reward_mean."""
    return {"eval/reward_mean": _mean([m[f"eval/{name}/reward_mean"] for name, m in per_set.items()])}
