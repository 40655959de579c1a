"""Rollout functions (``rollout.fn``) used by tests through their import paths."""
import time

from miles_ray.sample import Sample


def chat_once(ctx) -> Sample:
    """One OpenAI-style chat call on the engine; the sample is built from the exact token ids. Group
    ``g`` waits ``0.3 * (g % 4)`` s first (groups finish at different times); a label naming a
    ``.txt`` file gets the finish time appended (tests compare it with the reward's)."""
    time.sleep(0.3 * (ctx.request["group_id"] % 4))
    messages = ctx.request.get("messages") or [{"role": "user", "content": ctx.request["prompt"]}]
    reply = ctx.client.chat.completions.create(messages=messages, max_tokens=ctx.params.max_new_tokens)
    choice = reply["choices"][0]
    sample = ctx.sample("chat", reply["prompt_token_ids"], response_ids=choice["token_ids"],
                        response_logprobs=[x["logprob"] for x in choice["logprobs"]["content"]],
                        response_text=choice["message"]["content"] or "", finish_reason="stop")
    if ctx.request["label"].endswith(".txt"):
        with open(ctx.request["label"], "a") as f:
            f.write(f"generated {time.time()}\n")
    return sample


def raises_on_odd(ctx) -> Sample:
    if ctx.request["group_id"] % 2:
        raise RuntimeError("tool server unreachable")
    return chat_once(ctx)


def returns_dict(ctx):
    return {"response": "not a Sample"}


def over_budget(ctx) -> Sample:
    n = ctx.limits.max_tokens + 5
    return ctx.sample("p", [1, 2], response_ids=[3] * n, response_logprobs=[0.0] * n)


def too_slow(ctx) -> Sample:
    time.sleep(ctx.limits.timeout_s + 0.5)
    return over_budget(ctx)


def three_turns(ctx) -> Sample:
    """Three model turns with a fixed environment message between them (masked), built by hand
    from the client's token turns: what a custom agent loop does."""
    tok = ctx.tokenizer
    prompt_ids = tok(ctx.request["prompt"], add_special_tokens=False)["input_ids"]
    ids, mask, lps, versions = [], [], [], []
    for turn in range(3):
        out = ctx.client.generate(prompt_ids + ids, max_tokens=6, ignore_eos=True)
        ids, mask, lps = ids + out.ids, mask + [1] * len(out.ids), lps + out.logprobs
        versions.append(out.weight_version)
        if turn < 2:
            env = tok("\nok\n", add_special_tokens=False)["input_ids"]
            ids, mask, lps = ids + env, mask + [0] * len(env), lps + [0.0] * len(env)
    return ctx.sample(ctx.request["prompt"], prompt_ids, response_ids=ids, response_logprobs=lps, loss_mask=mask,
                      response_text=tok.decode(ids), finish_reason="stop", weight_version=versions[0],
                      metadata={"turn_versions": versions})
