"""Checkpoint/resume on a real local Ray: a run stopped and resumed ends with the same metrics and
weights as an uninterrupted one; checkpoints are atomic and rotated; the HF export loads."""
import json

import pytest
import torch

from miles_ray.training import checkpoint_format as ckpt
from miles_ray.config import load_config

pytestmark = pytest.mark.ray
BASE = ("rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "train.sft_warmup_steps=2",
        "data.num_synthetic=8", "rollout.num_engines=2", "logging.progress_bar=false", "logging.wandb=false")


def _run(out, model_cache, *extra):
    from jobs.train import run

    cfg = load_config(None, [f"output_dir={out}", f"model.tiny_cache_dir={model_cache}", *BASE, *extra])
    return run(cfg)


def _rows(out):
    return [json.loads(x) for x in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_stop_and_resume_equals_uninterrupted(local_ray, tmp_path, model_cache, backend):
    full, split = tmp_path / "full", tmp_path / "split"
    _run(full, model_cache, "total_steps=4", f"rollout.backend={backend}", "run_name=full")
    # 8 prompts: the SFT warm-up draws 2 x 32 (8 epochs), steps 0-1 draw 2 x 4: the checkpoint at
    # step 2 sits exactly on an epoch boundary (cursor at the end of epoch 8)
    _run(split, model_cache, "total_steps=2", f"rollout.backend={backend}", "run_name=split")
    _run(split, model_cache, "total_steps=4", f"rollout.backend={backend}", "run_name=split", "resume=auto")
    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in b] == list(range(4))
    for x, y in zip(a, b):
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "rollout/response_len_mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    wa, wb = _final_weights(full), _final_weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # second save after resume happened; the HF export is only in the final one, and loads
    assert [p.name for p in ckpt.checkpoints(split / "checkpoints")] == ["step_0", "step_2", "step_4"]  # step 0: for recovery
    assert (split / "checkpoints" / "step_2" / "policy" / ".metadata").is_file()  # sharded (DCP) policy state
    assert ckpt.read_meta(split / "checkpoints" / "step_2")["sampler"] == {"epoch": 8, "position": 8}  # the boundary
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt.latest(split / "checkpoints") / "hf")
    assert torch.equal(hf.state_dict()["model.norm.weight"], wb["model.norm.weight"])


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(ckpt.latest(out / "checkpoints") / "hf" / "model.safetensors")


def test_resume_at_another_number_of_trainer_ranks(local_ray, tmp_path, model_cache):
    """A checkpoint of 2 trainer ranks (FSDP2) resumes on 1 rank and trains on as the 2 ranks would
    have (DP=1 and DP=2 give the same gradients)."""
    full, split, two = tmp_path / "full", tmp_path / "split", ("cluster.num_trainers=2", "train.strategy=fsdp2")
    _run(full, model_cache, "total_steps=3", *two, "run_name=ws2full")
    _run(split, model_cache, "total_steps=2", *two, "run_name=ws2")
    _run(split, model_cache, "total_steps=3", "cluster.num_trainers=1", "run_name=ws1", "resume=auto")
    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in b] == [0, 1, 2]
    for key in ("train/loss", "train/grad_norm", "rollout/reward_mean"):
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-4, abs=1e-6), key
    wa, wb = _final_weights(full), _final_weights(split)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_hf_export_only_at_the_end_or_every_n():
    from jobs.checkpointing import exports_hf

    cfg = load_config(None, ["total_steps=10", "checkpoint.every=2"])
    assert [s for s in range(1, 11) if exports_hf(cfg, s)] == [10]
    cfg = load_config(None, ["total_steps=10", "checkpoint.export_hf_every=4"])
    assert [s for s in range(1, 11) if exports_hf(cfg, s)] == [4, 8, 10]
    assert not exports_hf(load_config(None, ["total_steps=10", "checkpoint.export_hf=false"]), 10)


def test_checkpoints_atomic_and_rotated(tmp_path):
    for step in (1, 2, 3, 4):
        tmp = ckpt.begin(tmp_path, step)
        (tmp / "x").write_text(str(step))
        ckpt.commit(tmp, {"step": step}, keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step_3", "step_4"]
    half = ckpt.begin(tmp_path, 5)  # a crash before commit: never picked up
    (half / "x").write_text("partial")
    assert ckpt.latest(tmp_path).name == "step_4" and ckpt.read_meta(ckpt.latest(tmp_path)) == {"step": 4}


def test_resume_errors_are_clear(tmp_path):
    from jobs.checkpointing import find

    cfg = load_config(None, [f"resume={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        find(cfg)
    assert find(load_config(None, [f"output_dir={tmp_path}", "resume=auto"])) is None  # nothing yet: fresh start


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path):
    """A driver killed after checkpoint 2 had logged step 2 and half of step 3: at resume those
    rows go (the steps are redone), so each step appears once in the end."""
    from jobs.checkpointing import truncate_metrics

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(3))
                                            + '{"step": 3, "lo')
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 0, 1, 1, 2, 2)))
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in _rows(tmp_path)] == [0, 1]
    assert [json.loads(x)["step"] for x in open(tmp_path / "samples.jsonl")] == [0, 0, 1, 1]


def test_fresh_run_sets_an_earlier_runs_logs_aside(tmp_path):
    """A fresh run in a folder with an earlier run's metrics/samples starts new files (the ledger
    of one run must not count another's steps as duplicates); the earlier ones are kept."""
    from jobs.checkpointing import set_aside_logs

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "samples.jsonl").write_text('{"step": 0}\n')
    moved = set_aside_logs(tmp_path)
    assert len(moved) == 2 and not (tmp_path / "metrics.jsonl").exists()
    assert sorted(p.read_text() for p in tmp_path.glob("*.jsonl")) == ['{"step": 0}\n'] * 2
    assert set_aside_logs(tmp_path) == []  # nothing left to move
