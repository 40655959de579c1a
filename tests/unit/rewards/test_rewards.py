import time

import pytest

from miles_ray.rewards import RewardRunner, resolve_reward_fn
from miles_ray.rewards.math import extract_answer, math_reward


@pytest.mark.parametrize("response,label,expected", [
    ("The answer is 12", "12", 1.0),
    ("7 then 8", "8", 1.0),            # the last number counts
    ("7 then 8", "7", 0.0),
    ("\\boxed{3/4} and 9", "0.75", 1.0),  # boxed beats trailing numbers; fractions compare numerically
    ("1,234", "1234", 1.0),
    ("12.0", "12", 1.0),
    ("no number", "3", 0.0),
    ("-5", "-5", 1.0),
])
def test_math_reward(response, label, expected):
    assert math_reward("", response, label) == expected


def test_extract_answer():
    assert extract_answer("x = \\boxed{42}.") == "42"
    assert extract_answer("none") is None


def test_import_path_and_bad_specs():
    assert resolve_reward_fn("tests.helpers.custom_rewards:length_reward")("", "abc", "") == 3.0
    with pytest.raises(ValueError, match="not a registered reward"):
        resolve_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_reward_fn("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="has no function"):
        resolve_reward_fn("tests.helpers.custom_rewards:missing")


@pytest.mark.parametrize("isolate", [False, True])
def test_raising_reward_gives_failure_score(isolate):
    runner = RewardRunner("tests.helpers.custom_rewards:raising_reward", failure_score=-1.0, isolate=isolate)
    scores, stats = runner.score([("", "ok", ""), ("", "boom", ""), ("", "ok", "")])
    runner.close()
    assert scores == [1.0, -1.0, 1.0]
    assert (stats.scored, stats.errors, stats.timeouts) == (2, 1, 0)
    assert "bad sample" in stats.messages[0]


def test_hanging_reward_times_out_and_runner_recovers():
    runner = RewardRunner("tests.helpers.custom_rewards:hanging_reward", timeout_s=1.0, failure_score=-2.0)
    t0 = time.time()
    scores, stats = runner.score([("", "ok", ""), ("", "hang", ""), ("", "ok", "")])
    runner.close()
    assert scores == [1.0, -2.0, 1.0]
    assert stats.timeouts == 1 and stats.scored == 2
    assert time.time() - t0 < 20


def test_prints_in_reward_do_not_break_isolated_worker():
    runner = RewardRunner("tests.helpers.custom_rewards:noisy_reward")
    scores, stats = runner.score([("", "a", ""), ("", "b", "")])
    runner.close()
    assert scores == [2.0, 2.0] and stats.errors == 0
