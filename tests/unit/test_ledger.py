"""The ledger and the weight-version convention, alone (pure functions, no Ray)."""
import pytest

from miles_ray import versioning
from miles_ray.async_rl import StalenessController
from miles_ray.ledger import GROUPS_KEY, SIZES_KEY, GroupLedger, check_rows, step_entry
from miles_ray.sample import Sample


def _samples(groups: dict) -> list:
    """{group_id: (prompt_index, count)} -> samples."""
    return [Sample(prompt_index=p, group_id=g, prompt="", label="", prompt_ids=[1], response_ids=[2],
                   response_logprobs=[0.0]) for g, (p, n) in groups.items() for _ in range(n)]


def test_step_entry_sorted_with_prompts_and_sizes():
    entry = step_entry(_samples({5: (50, 2), 1: (10, 3)}))
    assert entry == {"ledger_groups": [1, 5], "ledger_prompts": [10, 50], "ledger_sizes": [3, 2]}


def _row(step, groups, sizes):
    return {"step": step, GROUPS_KEY: groups, SIZES_KEY: sizes}  # as in metrics.jsonl: train/ledger_*


def test_check_rows_clean_run():
    rows = [_row(0, [0, 1], [4, 4]), _row(1, [2, 3], [4, 4])]
    assert check_rows(rows, 4, range(4)) == {"steps": 2, "lost": 0, "duplicates": 0, "groups": 4}


def test_check_rows_counts_lost_and_duplicated_samples():
    rows = [_row(0, [0, 1], [4, 3]),  # group 1 trained short by one sample
            _row(1, [1, 2], [4, 4]),  # group 1 trained again: 4 + 3 = 7 > 4 -> 3 duplicates
            _row(1, [3], [4])]  # step 1 logged twice -> 1 duplicate row
    out = check_rows(rows, 4, range(5))  # group 4 never trained: 4 lost
    assert out == {"steps": 2, "lost": 4, "duplicates": 3 + 1, "groups": 4}


def test_group_ledger_invariant_and_state_round_trip():
    led = GroupLedger()
    led.submitted.update(range(6))
    led.accepted.update({0, 1, 2, 3})
    led.filtered.add(4)
    led.consumed += [0, 1]
    assert led.lost(running={5}) == 0  # 0,1 consumed; 2,3 buffered; 4 filtered; 5 running
    assert led.lost(running=set()) == 1  # group 5 is nowhere
    assert led.lost(running={5}, buffered={2}) == 1  # the buffer lost group 3
    led.consumed.append(1)
    assert led.duplicates() == 1
    again = GroupLedger.from_state(led.state_dict())
    assert again == led
    assert GroupLedger.after_sync_steps(3).lost(set()) == 0


def test_weight_version_convention():
    assert versioning.after_steps(0) == versioning.INITIAL == 1
    assert [versioning.after_steps(k) for k in range(3)] == [1, 2, 3]
    assert all(versioning.steps_of(versioning.after_steps(k)) == k for k in range(10))
    assert versioning.staleness(versioning.after_steps(4), 3) == 2
    with pytest.raises(AssertionError, match="newer than the trained version"):
        versioning.staleness(2, 3)
    with pytest.raises(ValueError):
        versioning.steps_of(0)  # version 0 = disk weights, before any sync


def test_staleness_controller_state_round_trip():
    ctrl = StalenessController(staleness=1, batch_groups=4)
    ctrl.submit(ctrl.capacity(0), 0)  # (S + 0 + 1) * 4 = 8
    ctrl.accept(5)
    ctrl.filter(1)
    other = StalenessController(1, 4)
    other.load_state(ctrl.state())
    assert other.state() == ctrl.state() == {"submitted": 8, "accepted": 5, "filtered": 1, "running": 2}
    with pytest.raises(AssertionError):
        other.load_state({"submitted": 3, "accepted": 1, "filtered": 0, "running": 1})
