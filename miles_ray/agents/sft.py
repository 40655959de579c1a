"""SFT warm-up samples for multi-turn runs: an environment's demonstrations as trajectories whose
``loss_mask`` covers the model turns only (tool answers are context), built by the same
:class:`Trajectory` code as rollouts so warm-up and RL see identical token layouts."""
from __future__ import annotations

from miles_ray.agents.env import make_env
from miles_ray.agents.trajectory import Trajectory
from miles_ray.sample import Sample


def has_demonstrations(env_spec: str | None) -> bool:
    return bool(env_spec) and callable(getattr(make_env(env_spec), "demonstration", None))


def demonstration_samples(items, tokenizer, env_spec: str, max_tokens: int) -> list[Sample]:
    """One Sample per prompt item whose environment has a demonstration (others are skipped)."""
    out = []
    for item in items:
        env = make_env(env_spec)
        obs = env.reset(item.prompt, item.label, item.messages)
        demo = env.demonstration(item.prompt, item.label, item.messages)
        if not demo:
            continue
        traj = Trajectory(tokenizer, obs.messages, obs.tools, max_tokens)
        for msg in demo:
            if msg["role"] == "assistant":
                traj.add_demonstration_turn(msg)
            else:
                traj.add_env_messages([msg])
        out.append(Sample(prompt_index=item.index, group_id=item.index, prompt=traj.prompt_text, label=item.label,
                          prompt_ids=traj.prompt_ids, response_ids=traj.response_ids,
                          response_logprobs=traj.logprobs, loss_mask=traj.loss_mask))
    return out
