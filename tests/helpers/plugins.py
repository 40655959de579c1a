"""Plug-ins for every extension point, used by tests through ``tests.helpers.plugins:<name>`` import
paths (tests/unit/plugins/test_contracts.py): a minimal valid one per point, then bad ones (wrong
signature, wrong return type). docs/customization.md shows the same shapes."""
import torch

from miles_ray.agents.env import Observation, StepResult

# ---- valid: one per extension point ------------------------------------------------------------


def policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, **_):
    """Vanilla policy gradient (no clipping): -A * ratio per token."""
    ratio = torch.exp(logp - old_logp)
    return -advantages * ratio, {"clipfrac": 0.0}


def advantage(inputs):
    """Reward minus the batch mean, on every response token; no critic returns."""
    centred = inputs.rewards - inputs.rewards.mean()
    return centred[:, None] * inputs.mask, None


def kl_estimator(logp, ref_logp):
    return (logp - ref_logp).abs()


def loss_agg(loss, mask, n_tokens, n_seqs):
    return (loss * mask).sum() / max(n_tokens, 1.0)


def group_filter(samples):
    """Keep groups whose best sample has a positive reward."""
    return max(s.reward for s in samples) > 0


def reward(prompt, response, label):
    return float(response.strip() == label.strip())


def rollout(ctx):
    """One turn without a model: answers the label (a rollout function gets a RolloutContext)."""
    return ctx.sample(ctx.request["prompt"], [1, 2, 3], response_ids=[4, 5], response_logprobs=[-0.1, -0.2],
                      response_text=ctx.request.get("label", ""))


class EchoEnv:
    """One tool-less turn: the conversation ends after the model's first answer."""

    def reset(self, prompt, label, messages=None):
        return Observation(messages or [{"role": "user", "content": prompt}])

    def step(self, content, tool_calls):
        return StepResult(done=True)


def data_source(n, max_operand=9, seed=0):
    return [{"prompt": f"Repeat {i}", "label": str(i)} for i in range(n)]


def lr_schedule(progress, min_ratio):
    """Step decay: full lr for the first half, then min_ratio."""
    return 1.0 if progress < 0.5 else min_ratio


# ---- bad: wrong signature ----------------------------------------------------------------------


def takes_nothing():
    return 0.0


class EnvNeedsArgs:
    def __init__(self, server_url):
        self.server_url = server_url

    def reset(self, prompt, label, messages=None):
        return Observation([])

    def step(self, content, tool_calls):
        return StepResult(done=True)


class NotAnEnv:
    """Has no reset / step."""


# ---- bad: wrong return type (each takes the right arguments) ----------------------------------


def loss_returns_tensor(logp, old_logp, advantages, mask, **_):
    return -advantages * logp


def advantage_returns_list(inputs):
    return [0.0] * len(inputs.rewards)


def kl_returns_float(logp, ref_logp):
    return 0.0


def agg_returns_per_token(loss, mask, n_tokens, n_seqs):
    return loss * mask


def filter_returns_str(samples):
    return "keep"


def lr_returns_str(progress, min_ratio):
    return "fast"


def data_source_returns_str(n, max_operand=9, seed=0):
    return "rows.jsonl"


def rollout_returns_dict(ctx):
    return {"response": "4"}


def reward_returns_str(prompt, response, label):
    return "correct"


NOT_CALLABLE = 3
