"""The decisions behind recovery, without a cluster: when the same trainer failure counts as "in a
row" (and stops the run), what makes two failures the same, and which fired faults count as
recovered."""
import pytest
import ray

from jobs.faults import recovered
from jobs.recovery import FailureStreak, RepeatedFailure, failure_signature


def _task_error(cause: BaseException) -> ray.exceptions.RayTaskError:
    return ray.exceptions.RayTaskError("train_step", "Traceback ... pid=1234 actor_id=abc", cause)


def test_signature_is_the_cause_not_the_attempt():
    a = _task_error(ValueError("shape mismatch (2, 3)\nmore detail"))
    b = ray.exceptions.RayTaskError("train_step", "Traceback ... pid=999 actor_id=def", ValueError("shape mismatch (2, 3)"))
    assert failure_signature(a) == failure_signature(b) == "ValueError: shape mismatch (2, 3)"
    assert failure_signature(_task_error(ValueError("other"))) != failure_signature(a)
    assert failure_signature(ray.exceptions.ActorDiedError()) == "ActorDiedError"


def test_same_failure_twice_before_passing_its_step_stops():
    streak, bug = FailureStreak(limit=2), _task_error(RuntimeError("CUDA out of memory"))
    streak.failed(bug, step=5)
    for step in range(3, 5):  # the steps redone after the restore, short of the failing one
        streak.completed(step)
    with pytest.raises(RepeatedFailure, match="2 times in a row at step 5.*CUDA out of memory.*max_same_failure=2"):
        streak.failed(bug, step=5)


def test_streak_resets_past_the_step_or_on_another_error():
    streak, bug = FailureStreak(limit=2), _task_error(RuntimeError("boom"))
    streak.failed(bug, step=5)
    streak.completed(5)  # got past it: a later identical failure is a new one
    streak.failed(bug, step=9)
    streak.failed(_task_error(KeyError("x")), step=9)  # a different error: count 1
    streak.failed(bug, step=9)
    assert streak.count == 1
    assert FailureStreak(limit=3).failed(bug, 1) is None  # below the limit: no stop


def test_recovered_matches_each_event_to_one_earlier_fault_of_the_same_actor():
    fired = [{"role": "rollout", "rank": 0, "time": 1.0}, {"role": "rollout", "rank": 0, "time": 2.0},
             {"role": "reward", "rank": 1, "time": 3.0}, {"role": "critic", "rank": 0, "time": 4.0}]
    events = [{"role": "rollout", "index": 0, "time": 2.5}, {"role": "reward", "index": 0, "time": 3.5},
              {"role": "trainer", "index": None, "time": 5.0}]
    # engine 0: one recovery for two kills; reward 1: only worker 0 recovered; critic: the group rebuild
    assert recovered(fired, events) == {0, 3}
    assert recovered(fired, [{"role": "rollout", "index": None, "time": 0.5}]) == set()  # before the fault
