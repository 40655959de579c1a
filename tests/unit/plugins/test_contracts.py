"""Plug-in contracts of every extension point (docs/customization.md).

A minimal valid plug-in, given as a ``tests.helpers.plugins:<name>`` import path, is accepted through
the config (the path every command takes: ``jobs.entry.config_from``) and, called the way the
framework calls it, returns the documented type. A bad one (module not found, attribute missing, wrong
signature, wrong return type) makes ``miles-ray config show`` print exactly one ``error:`` line that
names the config key and the spec, and exit 2, before Ray or any actor exists. In-process (``jobs.cli.main``)
to stay fast; one subprocess run checks the installed command.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.cli import main as cli_main
from jobs.entry import config_from
from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import PluginError, UnknownPluginError, resolve

P = "tests.helpers.plugins"
ROOT = Path(__file__).resolve().parents[3]


def _config(*overrides):
    return config_from(argparse.Namespace(config=None, overrides=list(overrides)))


def _cli_errors(capsys, *overrides) -> list[str]:
    assert cli_main(["config", "show", *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ---- valid plug-ins: accepted by the config, called with the documented signature ------------------

def _tiny():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
    return logp, logp - 0.1, torch.tensor([[1.0] * 3, [-1.0] * 3]), torch.tensor([[1.0] * 3, [1.0, 1.0, 0.0]])


def test_policy_loss_advantage_kl_and_aggregation_plugins():
    from miles_ray.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
    from miles_ray.algorithms.advantages import AdvantageInputs, compute_advantages

    cfg = _config(f"algorithm.policy_loss={P}:policy_loss", f"algorithm.advantage={P}:advantage",
                  f"algorithm.kl_estimator={P}:kl_estimator", f"algorithm.loss_agg={P}:loss_agg")
    a = cfg.algorithm
    logp, old, adv, mask = _tiny()
    loss, metrics = POLICY_LOSSES.get_fn(a.policy_loss)(logp, old, adv, mask, eps_low=a.eps_low,
                                                        eps_high=a.eps_high, dual_clip=a.dual_clip)
    assert loss.shape == logp.shape and isinstance(metrics["clipfrac"], float)
    kl = KL_ESTIMATORS.get_fn(a.kl_estimator)(logp, old)
    assert kl.shape == logp.shape and torch.allclose(kl, torch.full_like(kl, 0.1))
    total = LOSS_AGGREGATIONS.get_fn(a.loss_agg)(loss, mask, 5.0, 2.0)
    assert total.dim() == 0 and torch.isfinite(total)
    advantages, returns = compute_advantages(a.advantage, AdvantageInputs(torch.tensor([1.0, 0.0]),
                                                                          torch.tensor([0, 0]), mask))
    assert returns is None and advantages.tolist() == [[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]]
    assert a.policy_loss not in POLICY_LOSSES  # an import path is resolved, never registered


def test_filter_lr_schedule_and_data_source_plugins():
    from miles_ray.async_rl import GROUP_FILTERS
    from miles_ray.data import synthetic_rows
    from miles_ray.sample import Sample
    from miles_ray.training.schedule import lr_factor

    cfg = _config(f"async_rl.filter={P}:group_filter", f"train.lr_schedule={P}:lr_schedule",
                  f"data.source={P}:data_source", "train.min_lr_ratio=0.25")
    group = [Sample(0, 0, "p", "l", [1], reward=r) for r in (0.0, 1.0)]
    keep = GROUP_FILTERS.get_fn(cfg.async_rl.filter)
    assert keep(group) is True and keep(group[:1]) is False
    factors = [lr_factor(cfg.train.lr_schedule, s, 4, 0, cfg.train.min_lr_ratio) for s in range(4)]
    assert factors == [1.0, 1.0, 0.25, 0.25]
    rows = synthetic_rows(cfg.data.source, 3, 9, 0)
    assert rows == [{"prompt": f"Repeat {i}", "label": str(i)} for i in range(3)]


def test_reward_rollout_fn_and_environment_plugins():
    from miles_ray.agents import make_env
    from miles_ray.agents.env import Observation, StepResult
    from miles_ray.agents.runner import AgentLimits, RolloutContext, check_sample, resolve_rollout_fn
    from miles_ray.rewards import RewardRunner, resolve_reward_fn
    from miles_ray.rollout.types import SamplingParams
    from miles_ray.sample import Sample

    cfg = _config(f"reward.fn={P}:reward", f"rollout.fn={P}:rollout", f"agent.env={P}:EchoEnv")
    assert resolve_reward_fn(cfg.reward.fn)("q", " 4 ", "4") == 1.0
    scores, _ = RewardRunner(cfg.reward.fn, isolate=False).score([("q", "4", "4"), ("q", "5", "4")])
    assert scores == [1.0, 0.0]
    ctx = RolloutContext(None, None, {"prompt": "q", "label": "4", "group_id": 7}, SamplingParams(), AgentLimits())
    sample = check_sample(resolve_rollout_fn(cfg.rollout.fn)(ctx), ctx)
    assert isinstance(sample, Sample) and sample.group_id == 7 and sample.response_text == "4"
    env = make_env(cfg.agent.env)
    assert isinstance(env.reset("q", "4"), Observation) and env.step("4", []).done
    assert isinstance(env.step("4", []), StepResult)


# ---- bad plug-ins: one `error:` line naming the key and the spec ---------------------------------

FIELDS = ["algorithm.policy_loss", "algorithm.advantage", "algorithm.kl_estimator", "algorithm.loss_agg",
          "async_rl.filter", "reward.fn", "rollout.fn", "agent.env", "data.source", "train.lr_schedule",
          "train.backend"]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("spec,why", [
    ("no_such_pkg.plugins:fn", "cannot import module 'no_such_pkg.plugins' (module not found"),
    (f"{P}:missing", "has no function or class 'missing' (attribute missing)"),
    (f"{P}:NOT_CALLABLE", "is a int, not callable"),
])
def test_unloadable_plugin_is_one_error_line(capsys, field, spec, why):
    (line,) = _cli_errors(capsys, f"{field}={spec}")
    assert line.startswith(f"error: {field}='{spec}': ") and why in line and "fix: " in line, line


@pytest.mark.parametrize("field,name", [(f, "takes_nothing") for f in FIELDS if f != "agent.env"]
                         + [("agent.env", "EnvNeedsArgs")])
def test_wrong_signature_is_one_error_line(capsys, field, name):
    (line,) = _cli_errors(capsys, f"{field}={P}:{name}")
    assert line.startswith(f"error: {field}='{P}:{name}': wrong signature: {name}(") and "fix: " in line, line


def test_environment_without_reset_and_step_is_one_error_line(capsys):
    (line,) = _cli_errors(capsys, f"agent.env={P}:NotAnEnv")
    assert f"agent.env='{P}:NotAnEnv': has no reset(), step() (attribute missing)" in line, line


@pytest.mark.parametrize("field,name,got", [
    ("algorithm.policy_loss", "loss_returns_tensor", "returned a Tensor of shape (2, 3), not (per-token loss"),
    ("algorithm.advantage", "advantage_returns_list", "returned list, not (advantages Tensor"),
    ("algorithm.kl_estimator", "kl_returns_float", "returned float, not a per-token Tensor"),
    ("algorithm.loss_agg", "agg_returns_per_token", "returned a Tensor of shape (2, 3), not a 0-dim"),
    ("async_rl.filter", "filter_returns_str", "returned str, not bool"),
    ("train.lr_schedule", "lr_returns_str", "returned str, not float"),
])
def test_wrong_return_type_is_one_error_line(capsys, field, name, got):
    (line,) = _cli_errors(capsys, f"{field}={P}:{name}")
    assert line.startswith(f"error: {field}='{P}:{name}': wrong return type: {got}") and "fix: " in line, line


def test_wrong_return_types_found_where_the_plugin_runs():
    """Data sources, rollout functions and rewards are not called at config time (they may be slow or
    reach services): their results are checked where they run, naming the plug-in."""
    from miles_ray.agents.runner import AgentLimits, RolloutContext, check_sample, resolve_rollout_fn
    from miles_ray.data import synthetic_rows
    from miles_ray.rewards import RewardRunner
    from miles_ray.rollout.types import SamplingParams

    with pytest.raises(PluginError, match=rf"data.source='{P}:data_source_returns_str': wrong return type: "
                                          "returned str, not a list of dict rows"):
        synthetic_rows(f"{P}:data_source_returns_str", 2, 9, 0)
    ctx = RolloutContext(None, None, {"prompt": "q"}, SamplingParams(), AgentLimits())
    with pytest.raises(ValueError, match="returned dict, not a miles_ray.sample.Sample"):
        check_sample(resolve_rollout_fn(f"{P}:rollout_returns_dict")(ctx), ctx)
    scores, stats = RewardRunner(f"{P}:reward_returns_str", failure_score=-1.0, isolate=False).score([("q", "a", "a")])
    assert scores == [-1.0] and stats.reasons  # scored as a failure, counted by reason


def test_cli_subprocess_prints_one_error_line():
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "config", "show", f"algorithm.policy_loss={P}:missing"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
    assert f"algorithm.policy_loss='{P}:missing'" in errors[0]


# ---- the resolver itself ---------------------------------------------------------------------------

def test_registered_names_win_and_unknown_names_are_key_errors():
    reg = Registry("widget", "x.widget")
    reg.register("synthetic:a")(len)
    assert resolve("synthetic:a", reg) is len and reg.get_fn("synthetic:a") is len  # a name, not an import path
    assert resolve("os.path:join", reg) is os.path.join and "os.path:join" not in reg
    with pytest.raises(UnknownPluginError) as err:
        reg.get_fn("nope")
    assert isinstance(err.value, KeyError) and str(err.value).startswith("x.widget='nope' is not a registered widget")
    with pytest.raises(PluginError, match="y.z='nope'"):
        resolve("nope", "widget", field="y.z")  # a bare kind takes import paths only


def test_an_import_path_is_checked_once():
    from miles_ray.async_rl import GROUP_FILTERS

    fn = GROUP_FILTERS.get_fn(f"{P}:group_filter")
    assert GROUP_FILTERS.imported[f"{P}:group_filter"] is fn and GROUP_FILTERS.get_fn(f"{P}:group_filter") is fn


def test_a_module_that_fails_to_import_is_not_module_not_found(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin_mod.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raising_plugin_mod.py").write_text("raise RuntimeError('config missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="importing it failed: No module named 'no_such_dependency_xyz'"):
        resolve("broken_plugin_mod:fn", "widget")
    with pytest.raises(PluginError, match="importing it raised RuntimeError: config missing"):
        resolve("raising_plugin_mod:fn", "widget")
