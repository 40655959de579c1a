"""The ``miles-ray`` command as a user runs it (real subprocesses): help, a mistyped command, user
errors found at start (one line, exit 2, no traceback; ``--debug`` adds it), ``config show``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import ROOT  # noqa: E402
SCRIPT = Path(sys.executable).parent / "miles-ray"  # installed by `pip install -e .` ([project.scripts])


def _run(*args, module=None, timeout=120):
    cmd = [sys.executable, "-m", module, *args] if module else [str(SCRIPT), *args]
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def _installed():
    if not SCRIPT.is_file():
        pytest.fail(f"{SCRIPT} is missing: run scripts/setup.sh (pip install -e .)")


def test_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("train", "rollout", "serve", "config", "plot", "analyze"):
        assert command in out.stdout
    train = _run("train", "--help")
    assert train.returncode == 0 and "key.sub=value" in train.stdout and "--debug" in train.stdout
    serve = _run("serve", "--help")
    assert serve.returncode == 0 and "--model-path" in serve.stdout
    legacy = _run("--help", module="jobs.train")  # what README and `ray job submit` use
    assert legacy.returncode == 0 and "key.sub=value" in legacy.stdout


def test_mistyped_command_is_a_usage_error():
    out = _run("trian", "examples/grpo_arith_tiny.yaml")
    assert out.returncode == 2 and "invalid choice: 'trian'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("override,message", [
    ("model.path=/nonexistent/model", "model.path='/nonexistent/model' is not a model folder"),
    ("reward.fn=no_such_pkg.rewards:score", "reward.fn='no_such_pkg.rewards:score': cannot import module"),
    ("train.lrr=1", "Unknown config key 'train.lrr' (command line). Did you mean 'train.lr'?"),
    # a private local Ray cannot grow: no waiting cluster.pg_timeout_s for nodes that never come
    ("cluster.use_gpu=true", "(GPU: needs 2, cluster has 0) and this local Ray cannot grow"),
])
def test_user_errors_at_start_are_one_line(tmp_path, override, message):
    out = _run("train", "examples/grpo_arith_tiny.yaml", override, f"output_dir={tmp_path}", "logging.wandb=false")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]


def test_debug_shows_the_traceback(tmp_path):
    out = _run("train", "examples/grpo_arith_tiny.yaml", "model.path=/nonexistent/model", f"output_dir={tmp_path}",
               "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "UserPathError" in out.stderr


def test_config_show_resolves_defaults_with_descriptions():
    out = _run("config", "show", "examples/grpo_arith_tiny_async.yaml", "async_rl.staleness=2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "  staleness: 2  # int: max policy versions a sample may lag (0 = synchronous)" in lines  # override
    assert "  lr: 0.0005  # float" in lines  # from the file
    assert "  bucket_mb: 256  # float: bucket size bound in MiB" in lines  # a default
    import yaml

    assert yaml.safe_load(out.stdout)["async_rl"]["staleness"] == 2  # it is valid YAML too
