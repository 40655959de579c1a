"""A real Ray head (``ray start --head``) with token auth, and ``ray job submit`` of the training job."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
from helpers.paths import ROOT  # noqa: E402
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    # --block in its own process group: teardown kills exactly this cluster (``ray stop`` would
    # stop every Ray instance on the machine)
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={_free_port()}", f"--dashboard-port={dash}",
                             # the agent's default port (52365) may still be held by a Ray of an earlier test
                             f"--dashboard-agent-listen-port={_free_port()}", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=8",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, head)
        yield env, url
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _wait_for_dashboard(url: str, head, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # 401: up, and token auth is on
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    raise TimeoutError("Ray dashboard did not come up")


def _actors(env: dict, dashboard: str) -> list[dict]:
    """The cluster's actors as ``ray list actors`` reports them (Ray's state API)."""
    out = subprocess.run([RAY, "list", "actors", "--address", dashboard, "--detail", "--format", "json",
                          "--limit", "10000"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _pids(env: dict, dashboard: str, names: list, proc, timeout_s: float = 300) -> dict:
    """The pids of the live actors ``names``, found through the state API once they are all up."""
    deadline = time.time() + timeout_s
    while True:
        alive = {a["name"]: a["pid"] for a in _actors(env, dashboard) if a.get("name") in names and a["state"] == "ALIVE"}
        if len(alive) == len(names):
            return alive
        assert proc.poll() is None, "the job ended early"
        assert time.time() < deadline, f"only {sorted(alive)} of {names} alive after {timeout_s}s"
        time.sleep(1)


def _wait_rows(metrics: Path, count: int, proc, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= count):
        assert proc.poll() is None, "the job ended early"
        assert time.time() < deadline, f"fewer than {count} steps after {timeout_s}s"
        time.sleep(0.2)


def _submit(cmd: list, env: dict, started: Path) -> subprocess.Popen:
    """``ray job submit`` (waits for the job); retried while the head's job agent is not up yet
    ("No available agent"; 30 s+ right after start when the machine is loaded). Returns once the
    job's driver wrote ``started`` (or after 20 s)."""
    for _ in range(40):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 20
        while proc.poll() is None and time.time() < deadline and not started.exists():
            time.sleep(0.5)
        if proc.poll() is None or "No available agent" not in proc.stdout.read():
            return proc
        time.sleep(3)
    raise AssertionError("the job agent never came up")


def test_ray_job_submit_runs_training_through_external_kills(ray_head, tmp_path, tokenizer):
    """Faults from outside the project: the test finds the run's actors with Ray's state API (as
    ``ray list actors`` does) and kill -9s the engine's and the reward worker's processes, then the
    trainer rank's. The job succeeds with every step once and nothing lost; the restarts show in
    the state API (the rebuilt trainer rank as a new ``-g1`` actor)."""
    from miles_ray.config import load_config
    from tests.helpers.ledger import check_run

    env, dashboard = ray_head
    with pytest.raises(urllib.error.HTTPError) as err:  # token auth is on: no token, no entry
        urllib.request.urlopen(f"{dashboard}/api/version", timeout=10)
    assert err.value.code == 401
    out = tmp_path / "run"
    args = ["total_steps=5", "train.sft_warmup_steps=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=32",
            "rollout.ignore_eos=true", "logging.progress_bar=false", "checkpoint.every=2", "checkpoint.export_hf=false",
            f"output_dir={out}",
            f"model.tiny_cache_dir={tmp_path / 'models'}", "run_name=jobsubmit"]
    cmd = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
           "python", "-m", "jobs.train", "examples/grpo_arith_tiny.yaml", *args]
    proc, metrics = _submit(cmd, env, out / "config.yaml"), out / "metrics.jsonl"
    try:  # pids looked up first: a kill lands at once when its step comes (steps are short)
        pids = _pids(env, dashboard, [f"jobsubmit-{a}-0" for a in ("rollout", "reward", "trainer")], proc)
        _wait_rows(metrics, 1, proc)
        os.kill(pids["jobsubmit-rollout-0"], signal.SIGKILL)
        os.kill(pids["jobsubmit-reward-0"], signal.SIGKILL)
        _wait_rows(metrics, 3, proc)  # past the step-2 checkpoint
        os.kill(pids["jobsubmit-trainer-0"], signal.SIGKILL)
        log = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert "succeeded" in log and "done: 5 steps" in log
    cfg = load_config(str(ROOT / "examples/grpo_arith_tiny.yaml"), args)
    check_run(out, cfg, tokenizer)  # steps 0..4 once each, no group lost or trained twice
    actors = {a["name"]: a for a in _actors(env, dashboard) if a.get("name", "").startswith("jobsubmit-")}
    assert actors["jobsubmit-rollout-0"]["num_restarts"] >= 1 and actors["jobsubmit-reward-0"]["num_restarts"] >= 1
    assert "jobsubmit-trainer-0-g1" in actors  # the rebuilt trainer group
