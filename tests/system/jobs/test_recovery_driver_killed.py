"""Driver death: the training job runs as a real subprocess (its own local Ray), is SIGKILLed once
a checkpoint exists, and is started again with resume=auto. Rows that the dead run wrote after its
last checkpoint are dropped at resume (those steps are redone), so metrics.jsonl ends with every
step exactly once; the ledger shows no group lost or trained twice across the restart.

No Ray in the pytest process here: each job starts (and, killed, leaves) its own local Ray; the
test kills every process of the job's session (Ray workers set their own process group, but stay
in the session)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from miles_ray.training import checkpoint_format as ckpt
from miles_ray.config import load_config
from tests.helpers.ledger import check_run, rows

pytestmark = pytest.mark.ray
from helpers.paths import ROOT  # noqa: E402
STEPS = 4  # killed after checkpoint 2, resumed for the rest
COMMON = [f"total_steps={STEPS}", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
          "rollout.backend=native", "rollout.max_new_tokens=32", "rollout.ignore_eos=true", "checkpoint.every=1", "checkpoint.export_hf=false",
          "logging.progress_bar=false", "logging.wandb=false", "cluster.dashboard=false"]
MODES = {"sync": [], "async": ["async_rl.enabled=true", "async_rl.staleness=1", "async_rl.off_policy.mode=tis"]}


def _start(args: list, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the job's session (the driver, GCS, raylet, workers, agents)."""
    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
                procs.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    psutil.wait_procs(procs, timeout=30)


def _wait_for_checkpoint(proc, root: Path, step: int, log: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not (root / f"step_{step}" / "meta.json").is_file():
        assert proc.poll() is None, f"the job exited before checkpoint {step}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no checkpoint {step} after {timeout_s}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_driver_killed_and_resubmitted_with_resume_auto(tmp_path, model_cache, tokenizer, mode):
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [f"output_dir={out}", f"model.tiny_cache_dir={model_cache}", f"run_name=driver-{mode}", *COMMON, *MODES[mode]]
    first = _start(args, tmp_path / "first.log")
    try:
        _wait_for_checkpoint(first, root, 2, tmp_path / "first.log")
        os.kill(first.pid, signal.SIGKILL)  # the driver dies mid-run; its local Ray goes with it
        first.wait()
    finally:
        _kill_session(first.pid)
    assert not (out / "summary.json").exists(), "the job finished before it was killed"
    resume_from = ckpt.latest(root)
    meta = ckpt.read_meta(resume_from)
    assert 2 <= meta["step"] < STEPS
    if mode == "async":  # a mid-run async checkpoint: admitted groups still in flight, re-sent on resume
        assert meta["async"]["inflight_groups"] >= 1

    second = _start(args + ["resume=auto"], tmp_path / "second.log")
    try:
        assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        _kill_session(second.pid)
    log = (tmp_path / "second.log").read_text()
    assert f"resumed from {resume_from}" in log and f"done: {STEPS - meta['step']} steps" in log
    cfg = load_config(None, args)
    check_run(out, cfg, tokenizer)  # steps 0..STEPS-1 once each, no group lost or trained twice, right prompts
    assert len(rows(out)) == STEPS
