"""Speculative rollout in a real local Ray run: the DraftTrainerActor (own placement group) trains on
every step's rollouts while the policy trains, and its weights reach the engines with the policy's."""
import json

import pytest
import ray

from miles_ray.config import load_config

pytestmark = pytest.mark.ray


def _run(tmp_path, model_cache, name: str, online: bool) -> list[dict]:
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path / name}", f"model.tiny_cache_dir={model_cache}", "total_steps=3",
                             "rollout.backend=native", "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4",
                             "rollout.max_new_tokens=12", "rollout.ignore_eos=true", "draft.enabled=true",
                             f"draft.online={str(online).lower()}", "draft.lr=3e-3", "draft.epochs=2",
                             "train.sft_warmup_steps=20", "logging.progress_bar=false", "logging.wandb=false",
                             f"run_name={name}"])
    assert run(cfg)["steps"] == 3
    return [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]


def test_sync_run_with_online_draft(local_ray, tmp_path, model_cache):
    online = _run(tmp_path, model_cache, "spec-online", True)
    pgs = [pg for pg in ray.util.placement_group_table().values() if pg["name"] == "spec-online-draft"]
    frozen = _run(tmp_path, model_cache, "spec-frozen", False)
    assert len(pgs) == 1  # the draft trainer had its own placement group
    for r in online:
        assert r["rollout/spec_accept_len"] >= 1.0 and r["perf/rollout_tokens_per_s"] > 0
        assert r["train/mismatch_abs"] < 1e-4  # speculation keeps the target's log-probs
    # SFT warm-up (20 batches) and every step's rollouts, 2 epochs each
    assert [r["train/draft_version"] for r in online] == [40 + 2 * (i + 1) for i in range(3)]
    assert sum(r["train/draft_loss_last"] for r in online) < sum(r["train/draft_loss"] for r in online)
    assert "train/draft_loss" not in frozen[0]  # draft.online=false: no draft trainer
    from miles_ray.training import checkpoint_format as ckpt

    assert (ckpt.latest(tmp_path / "spec-online" / "checkpoints") / "draft" / ".metadata").is_file()  # resumable
    # the trained draft reached the engines: it accepts far more than the untrained one
    rate = lambda rows: sum(r["rollout/spec_accept_rate"] for r in rows) / len(rows)  # noqa: E731
    assert rate(online) > rate(frozen) + 0.2, (rate(online), rate(frozen))


def test_async_run_with_online_draft(local_ray, tmp_path, model_cache):
    """The async driver (S=1, partial rollout) trains the draft on every batch and speculates."""
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "total_steps=3",
                             "rollout.backend=native", "rollout.prompts_per_step=8",
                             "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=12", "rollout.ignore_eos=true",
                             "draft.enabled=true", "draft.epochs=2", "async_rl.enabled=true", "async_rl.staleness=1", "train.sft_warmup_steps=20",
                             "logging.progress_bar=false", "logging.wandb=false", "run_name=spec-async"])
    summary = run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert summary["steps"] == 3 and summary["lost"] == 0 and summary["duplicates"] == 0
    assert [r["train/draft_version"] for r in rows] == [40 + 2 * (i + 1) for i in range(3)]
    spec = [r for r in rows if "rollout/spec_accept_rate" in r]  # an interval can pass with no verify round
    assert len(spec) >= 2 and all(r["rollout/spec_accept_rate"] > 0.5 for r in spec)
    assert all(r["perf/rollout_tokens_per_s"] > 0 for r in rows)
