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
ROOT = Path(__file__).resolve().parents[1]
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


def test_ray_job_submit_runs_training(ray_head, tmp_path):
    env, dashboard = ray_head
    with pytest.raises(urllib.error.HTTPError) as err:  # token auth is on: no token, no entry
        urllib.request.urlopen(f"{dashboard}/api/version", timeout=10)
    assert err.value.code == 401
    out = tmp_path / "run"
    cmd = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
           "python", "-m", "jobs.train", "examples/grpo_arith_tiny.yaml", "total_steps=3",
           "train.sft_warmup_steps=2", "rollout.prompts_per_step=4", "logging.progress_bar=false",
           f"output_dir={out}", f"model.tiny_cache_dir={tmp_path / 'models'}", "run_name=jobsubmit"]
    for _ in range(40):  # right after start the head's job agent may not be up yet ("No available agent"; 30 s+ when loaded)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        if "No available agent" not in log:
            break
        time.sleep(3)
    assert proc.returncode == 0, log[-3000:]
    assert "succeeded" in log and "done: 3 steps" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all("rollout/reward_mean" in r for r in rows)
