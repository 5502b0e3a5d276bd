"""The autoscaling decision (pdserve/ray_cluster/autoscale.py) on made-up clocks and metric
sequences: no wall clock, no Ray. The controller's side of it (ranges, a stale step) too."""
from __future__ import annotations

import pytest

from pdserve.ray_cluster.actors import Controller
from pdserve.ray_cluster.autoscale import Clock, Rule, decide

RULE = Rule(min=1, max=3, metric="waiting", target=4, up_after_s=10, down_after_s=60)


def run(rule, count, samples, clock=None):
    """Feed (now, per-worker values) in order; the count after each sample."""
    clock, out = clock or Clock(), []
    for now, values in samples:
        count, clock, _ = decide(rule, count, values, now, clock)
        out.append(count)
    return out


def test_up_only_once_the_load_has_stayed_above_target_for_up_after_s():
    assert run(RULE, 1, [(0, [5]), (5, [5]), (9.9, [5]), (10, [5])]) == [1, 1, 1, 2]
    assert run(RULE, 1, [(0, [4]), (100, [4])]) == [1, 1]   # at target is not above it


def test_a_dip_below_target_restarts_the_up_clock():
    assert run(RULE, 1, [(0, [5]), (5, [3]), (6, [5]), (15, [5]), (16, [5])]) == [1, 1, 1, 1, 2]


def test_down_only_when_one_worker_less_would_stay_below_target_for_down_after_s():
    # 2 waiting in all: on one worker that is 2 < 4
    assert run(RULE, 2, [(0, [1, 1]), (59, [1, 1]), (60, [1, 1])]) == [2, 2, 1]
    # 5 in all: 2.5 each now (below target) but 5 > 4 on one worker: stays
    assert run(RULE, 2, [(0, [2.5, 2.5]), (1000, [2.5, 2.5])]) == [2, 2]
    # a burst in between restarts the down clock
    assert run(RULE, 2, [(0, [1, 1]), (30, [3, 3]), (31, [1, 1]), (90, [1, 1]), (91, [1, 1])]) == [2, 2, 2, 2, 1]


def test_within_min_and_max():
    assert run(RULE, 3, [(0, [9, 9, 9]), (1000, [9, 9, 9])]) == [3, 3]
    assert run(RULE, 1, [(0, [0]), (1000, [0])]) == [1, 1]
    assert decide(RULE, 5, [0] * 5, 0, Clock())[0] == 3 and decide(RULE, 0, [], 0, Clock())[0] == 1


def test_to_zero_only_with_no_load():
    rule = Rule(min=0, max=2, metric="waiting", target=4, up_after_s=10, down_after_s=60)
    assert run(rule, 1, [(0, [0.5]), (1000, [0.5])]) == [1, 1]
    assert run(rule, 1, [(0, [0]), (60, [0])]) == [1, 0]
    assert run(rule, 0, [(0, []), (1000, [])]) == [0, 0]   # no worker, no metrics: nothing to judge


def test_a_count_changed_from_outside_restarts_the_clocks():
    _, clock, _ = decide(RULE, 1, [5], 0, Clock())
    assert clock.above_since == 0
    # `pdserve scale --decode 2` meanwhile: 10s after the first sample is not 10s of 2 workers
    assert run(RULE, 2, [(10, [5, 5]), (19, [5, 5]), (20, [5, 5])], clock) == [2, 2, 3]


def test_each_step_says_why():
    _, _, why = decide(RULE, 1, [5], 10, Clock(1, above_since=0))
    assert why.startswith("1 -> 2") and "waiting" in why and "target 4" in why
    assert decide(RULE, 2, [3, 3], 10, Clock())[2] == ""


@pytest.mark.parametrize("start", [1, 2, 3])
@pytest.mark.parametrize("total", [x / 2 for x in range(0, 41)])
def test_a_steady_load_settles_without_flapping(start, total):
    """A constant total load spread evenly over the workers: the count moves one way only and
    stops where neither rule holds (mean <= target, and > target with one worker less)."""
    count, clock, seen = start, Clock(), [start]
    for now in range(0, 2000):
        count, clock, _ = decide(RULE, count, [total / count] * count, float(now), clock)
        if count != seen[-1]:
            seen.append(count)
    assert seen == sorted(seen) or seen == sorted(seen, reverse=True), seen
    assert count == RULE.max or total / count <= RULE.target
    assert count == RULE.min or total / (count - 1) >= RULE.target


def test_controller_keeps_a_ruled_role_within_its_range():
    c = Controller({"prefill": 1, "decode": 1, "both": 0}, "http://r", {"decode": (1, 3)})
    assert c.set_counts({"decode": 3})["decode"] == 3
    with pytest.raises(ValueError, match="decode.*max 3"):
        c.set_counts({"decode": 4})
    with pytest.raises(ValueError, match="decode.*min 1"):
        c.set_counts({"decode": 0})
    assert c.set_counts({"prefill": 5})["prefill"] == 5   # no rule: any count
    # the rule's step applies only to the count it was decided on (a manual scale wins)
    assert c.autoscale("decode", 2, 1) is False and c.get()["counts"]["decode"] == 3
    assert c.autoscale("decode", 3, 2) is True and c.get()["counts"]["decode"] == 2
    assert c.autoscale("decode", 2, 4) is False   # outside the range: refused, not raised
