"""Async driver checkpoint/resume on a real local Ray: the checkpoint holds the buffered groups and
the in-flight requests; a run stopped and resumed trains every submitted group exactly once."""
import pytest

from jobs.checkpointing import load_async_state
from miles_ray.training import checkpoint_format as ckpt
from miles_ray.config import load_config
from miles_ray.errors import UserError
from tests.helpers.ledger import check_run, final_weights, rows

pytestmark = pytest.mark.ray
BASE = ("rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.backend=native",
        "rollout.num_engines=2", "rollout.max_new_tokens=24", "rollout.ignore_eos=true", "train.sft_warmup_steps=1",
        "train.sft_batch_size=4", "async_rl.enabled=true", "async_rl.staleness=1", "async_rl.off_policy.mode=tis",
        "checkpoint.every=1", "checkpoint.keep=3", "checkpoint.export_hf=false", "logging.progress_bar=false",
        "logging.wandb=false", "run_name=aresume")


def _cfg(out, model_cache, *extra):
    return load_config(None, [f"output_dir={out}", f"model.tiny_cache_dir={model_cache}", *BASE, *extra])


def test_async_stop_and_resume_nothing_lost(local_ray, tmp_path, model_cache, tokenizer):
    from jobs.train import run

    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = run(_cfg(out, model_cache, "total_steps=2"))
    assert first["lost"] == 0 and first["duplicates"] == 0
    metas = {p.name: ckpt.read_meta(p) for p in ckpt.checkpoints(root)}
    assert list(metas) == ["step_0", "step_1", "step_2"]  # step 0: what trainer recovery restores first
    # a mid-run checkpoint holds the groups admitted but not finished (re-sent on resume)
    assert metas["step_1"]["async"]["inflight_groups"] >= 1
    # the end of a run drains: (S + 1) full batches buffered, nothing in flight
    assert metas["step_2"]["async"] == {"buffered_groups": 8, "inflight_groups": 0, "next_group": 16}
    buffered = {g[0].group_id for g in load_async_state(root / "step_2")["buffer"]}

    cfg = _cfg(out, model_cache, "total_steps=4", "resume=auto")
    second = run(cfg)
    assert second["steps"] == 2 and second["resumed_from_step"] == 2
    assert second["lost"] == 0 and second["duplicates"] == 0 and second["consumed"] == 4 * 4
    # right after resume the trainer takes a full batch straight from the restored buffer
    assert set(rows(out)[2]["train/ledger_groups"]) <= buffered
    # a second save after the resume, its state continues the first run's; checkpoint.keep=3 rotates
    assert [p.name for p in ckpt.checkpoints(root)] == ["step_2", "step_3", "step_4"]
    assert ckpt.read_meta(root / "step_4")["async"]["next_group"] == 24
    check_run(out, cfg, tokenizer)


def test_sync_driver_refuses_an_async_checkpoint_with_pending_groups(tmp_path):
    """Checked before any actor starts: the sync driver would drop the buffered / in-flight groups."""
    from jobs.checkpointing import find

    tmp = ckpt.begin(tmp_path, 3)
    (tmp / "policy").mkdir()  # a sharded policy state (its contents are not read here)
    ckpt.commit(tmp, {"step": 3, "async": {"buffered_groups": 4, "inflight_groups": 2, "next_group": 18}}, keep=2)
    base = [f"checkpoint.dir={tmp_path}", "resume=auto"]
    with pytest.raises(UserError, match="holds 4 buffered and 2 in-flight groups"):
        find(load_config(None, base))
    assert find(load_config(None, base + ["async_rl.enabled=true"])) == tmp_path / "step_3"


def test_async_s0_stop_and_resume_equals_uninterrupted(local_ray, tmp_path, model_cache, tokenizer):
    """S = 0 is deterministic: stopped after 1 step (a full batch buffered by the drain) and
    resumed to 3 (step 1 from the restored buffer, step 2 generated after it), the run ends with
    the metrics and weights of an uninterrupted 3-step run."""
    import torch

    from jobs.train import run

    full, split = tmp_path / "full", tmp_path / "split"
    s0 = ("async_rl.staleness=0", "checkpoint.every=0", "checkpoint.export_hf=true")
    run(_cfg(full, model_cache, "total_steps=3", *s0))
    run(_cfg(split, model_cache, "total_steps=1", *s0))
    assert ckpt.read_meta(ckpt.latest(split / "checkpoints"))["async"]["buffered_groups"] == 4
    cfg = _cfg(split, model_cache, "total_steps=3", "resume=auto", *s0)
    assert run(cfg)["resumed_from_step"] == 1
    a, b = rows(full), rows(split)
    assert [r["step"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert x["train/ledger_groups"] == y["train/ledger_groups"]
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "rollout/response_len_mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    wa, wb = final_weights(full, "3"), final_weights(split, "3")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    check_run(split, cfg, tokenizer)
