"""The built-in rollout function ``multi_turn``: the model talks with ``agent.env`` (tools) for up
to ``agent.max_turns`` turns within ``agent.max_tokens`` response tokens.

Each model turn is generated from the trajectory's exact ids; its tool calls go to the
environment, whose answer is appended as context (``loss_mask`` 0). The conversation ends when the
model answers without a tool call, the environment says done, a turn is cut by length or aborted,
or the budget runs out. ``response_text`` is the final answer (what the reward grades).
"""
from __future__ import annotations

from miles_ray.agents.runner import RolloutContext, register_rollout_fn
from miles_ray.agents.trajectory import Trajectory
from miles_ray.sample import Sample


@register_rollout_fn("multi_turn")
def multi_turn(ctx: RolloutContext) -> Sample:
    env, req = ctx.new_env(), ctx.request
    obs = env.reset(req.get("raw_prompt") or req.get("prompt", ""), req.get("label", ""), req.get("messages"))
    traj = Trajectory(ctx.tokenizer, obs.messages, obs.tools, ctx.limits.max_tokens)
    finish, info = "length", {}
    for _ in range(ctx.limits.max_turns):
        if traj.remaining <= 0:
            break
        out = ctx.client.generate(traj.ids, min(ctx.params.max_new_tokens, traj.remaining))
        content, calls = traj.add_model_turn(out.ids, out.logprobs, out.text, out.weight_version)
        finish = out.finish_reason
        if finish != "stop":  # cut by length or aborted: the conversation ends here
            break
        result = env.step(content, calls)
        info = result.info
        if result.done or not result.messages:
            break
        if not traj.add_env_messages(result.messages):
            finish = "length"
            break
        finish = "length"  # a conversation that runs out of turns after a tool answer is unfinished
    versions = [v for v in traj.turn_versions if v is not None]
    return ctx.sample(traj.prompt_text, traj.prompt_ids, response_ids=traj.response_ids,
                      response_logprobs=traj.logprobs, loss_mask=traj.loss_mask, response_text=traj.final_answer(),
                      finish_reason="length" if traj.truncated else finish,
                      weight_version=versions[0] if versions else 0,
                      metadata={"turns": len(traj.turn_versions), "turn_versions": versions, **info})
