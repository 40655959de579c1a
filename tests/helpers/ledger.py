"""Checks on a finished (possibly killed and resumed) run, from its files only: ``metrics.jsonl``
(one row per step, each with the ledger of the groups it trained on) and, for async runs, the
final checkpoint (groups still buffered)."""
from __future__ import annotations

import json
from pathlib import Path

from jobs.checkpointing import load_async_state
from miles_ray.training import checkpoint_format as ckpt
from miles_ray.data import PromptSampler, load_prompts
from miles_ray.ledger import GROUPS_KEY, PROMPTS_KEY, check_rows


def rows(out: Path) -> list:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]


def prompt_order(cfg, tokenizer, count: int) -> list:
    """Dataset row of the i-th prompt the run draws for RL (after the SFT warm-up's draws)."""
    items, _ = load_prompts(cfg.data, tokenizer, seed=cfg.seed)
    sampler = PromptSampler(items, seed=cfg.seed, shuffle=cfg.data.shuffle)
    sampler.next_batch(cfg.train.sft_warmup_steps * cfg.train.sft_batch_size)
    return [p.index for p in sampler.next_batch(count)]


def check_run(out: Path, cfg, tokenizer) -> dict:
    """Steps 0..total_steps-1 each exactly once, every group trained with all its samples once,
    group g trained on the g-th prompt drawn (no prompt skipped or repeated across a restart);
    sync: the groups are exactly 0..steps*B-1; async: trained + still buffered = every group
    submitted (nothing lost in flight)."""
    got = rows(out)
    steps, b, n = cfg.total_steps, cfg.rollout.prompts_per_step, cfg.rollout.n_samples_per_prompt
    assert [r["step"] for r in got] == list(range(steps))
    trained = [g for r in got for g in r[GROUPS_KEY]]
    if cfg.async_rl.enabled:
        last = ckpt.latest(Path(out) / "checkpoints")
        buffered = [g[0].group_id for g in load_async_state(last)["buffer"]]
        submitted = ckpt.read_meta(last)["async"]["next_group"]
        assert sorted(trained + buffered) == list(range(submitted)), "a group was lost or trained twice"
        expected = None
    else:
        expected = range(steps * b)
        assert sorted(trained) == list(expected)
    counts = check_rows(got, n, expected)
    assert counts == {"steps": steps, "lost": 0, "duplicates": 0, "groups": steps * b}, counts
    order = prompt_order(cfg, tokenizer, max(trained) + 1)
    for r in got:
        assert r[PROMPTS_KEY] == [order[g] for g in r[GROUPS_KEY]], f"step {r['step']}: wrong prompts"
    return counts


def final_weights(out: Path, step: str | None = None) -> dict:
    """The policy of a run's final checkpoint (or of ``step_<step>``), from its HF export."""
    from safetensors.torch import load_file

    folder = Path(out) / "checkpoints" / f"step_{step}" if step else ckpt.latest(Path(out) / "checkpoints")
    return load_file(folder / "hf" / "model.safetensors")
