"""The autoscaling rule of one role, and the decision it makes: pure (no Ray, no I/O, the time
passed in), so that it is tested with made-up clocks and metric sequences.

    decode:
      count: 1
      autoscale: {min: 1, max: 3, metric: waiting, target: 4, up_after_s: 10, down_after_s: 60}

One step at a time. Up: the mean per worker has stayed above `target` for `up_after_s`. Down:
the same load spread over one worker less would still be below `target` (sum / (n - 1) <
target), and has been for `down_after_s`. Between the two (mean in [target*(n-1)/n, target])
nothing changes, so a count that just went up does not come straight down again. Every change
of the count (ours or `pdserve scale`'s) restarts both clocks.
"""
from __future__ import annotations

from dataclasses import dataclass

# the worker gauge each metric reads (pdserve/server/metrics.py)
METRICS = {"waiting": "pdserve:num_requests_waiting", "running": "pdserve:num_requests_running",
           "kv_usage": "pdserve:kv_cache_usage_perc"}
KEYS = ("min", "max", "metric", "target", "up_after_s", "down_after_s")


@dataclass(frozen=True)
class Rule:
    min: int
    max: int
    metric: str
    target: float
    up_after_s: float = 10.0
    down_after_s: float = 60.0


@dataclass(frozen=True)
class Clock:
    """Since when the condition for a step up (or down) has held, for the count `count`."""
    count: int = -1
    above_since: float | None = None
    below_since: float | None = None


def parse_rule(v, where: str) -> Rule:
    if not isinstance(v, dict):
        raise ValueError(f"{where}: a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(v) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    missing = [k for k in ("min", "max", "metric", "target") if k not in v]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if v["metric"] not in METRICS:
        raise ValueError(f"{where}.metric: one of {', '.join(METRICS)}, got {v['metric']!r}")
    try:
        r = Rule(int(v["min"]), int(v["max"]), v["metric"], float(v["target"]),
                 float(v.get("up_after_s", 10.0)), float(v.get("down_after_s", 60.0)))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: min and max are integers; target, up_after_s, down_after_s numbers")
    if r.min < 0 or r.max < max(r.min, 1):
        raise ValueError(f"{where}: need 0 <= min <= max and max >= 1, got min {r.min}, max {r.max}")
    if r.target <= 0:
        raise ValueError(f"{where}.target: must be > 0, got {r.target}")
    if r.up_after_s < 0 or r.down_after_s < 0:
        raise ValueError(f"{where}: up_after_s and down_after_s must be >= 0")
    return r


def decide(rule: Rule, count: int, values: list[float], now: float, clock: Clock) -> tuple[int, Clock, str]:
    """(the wanted count, the clock to pass next time, why: '' when unchanged).

    `values`: the rule's metric on each of the `count` workers of the role, all ready."""
    if clock.count != count:
        clock = Clock(count)
    if count < rule.min or count > rule.max:
        want = min(max(count, rule.min), rule.max)
        return want, Clock(want), f"{count} -> {want} (outside min {rule.min}, max {rule.max})"
    if not values:   # no worker of this role: no load to judge by
        return count, clock, ""
    total = sum(values)
    mean = total / len(values)
    above = mean > rule.target
    # with one worker less, would the mean still be below target? (to none: only with no load)
    below = count > rule.min and (total / (count - 1) < rule.target if count > 1 else total == 0)
    clock = Clock(count, (clock.above_since if clock.above_since is not None else now) if above else None,
                  (clock.below_since if clock.below_since is not None else now) if below else None)
    if above and count < rule.max and now - clock.above_since >= rule.up_after_s:
        return count + 1, Clock(count + 1), (f"{count} -> {count + 1} (mean {rule.metric} {mean:.3g} > target "
                                             f"{rule.target:g} for {now - clock.above_since:.0f}s)")
    if below and now - clock.below_since >= rule.down_after_s:
        return count - 1, Clock(count - 1), (f"{count} -> {count - 1} (mean {rule.metric} {mean:.3g}, "
                                             f"{total / max(count - 1, 1):.3g} on one worker less, < target "
                                             f"{rule.target:g} for {now - clock.below_since:.0f}s)")
    return count, clock, ""
