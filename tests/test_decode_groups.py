"""plan_decode_groups: padded decode attention split where padding costs more than a group."""
import pytest

from pdserve.models.attention import plan_decode_groups


def cost(widths, sizes, group_cost):
    total, start = 0, 0
    for n in sizes:
        total += n * widths[start + n - 1] + group_cost
        start += n
    return total


def test_equal_widths_stay_one_group():
    assert plan_decode_groups([4] * 10, 8) == [10]


def test_one_long_row_gets_its_own_group():
    # 13 rows of 15 blocks and one of 40: one group reads 14 x 40 = 560 blocks, two read 195 + 40 + 8
    assert plan_decode_groups([15] * 13 + [40], 8) == [13, 1]


def test_free_groups_split_every_width_and_dear_ones_never():
    widths = [1, 2, 3, 5, 8]
    assert plan_decode_groups(widths, 0) == [1, 1, 1, 1, 1]
    assert plan_decode_groups(widths, 1000) == [5]


def test_plan_is_optimal_against_every_split():
    import itertools
    widths = [1, 1, 2, 6, 7, 7, 20, 21]
    for gc in (0.5, 3, 8, 30):
        best = min(cost(widths, [b - a for a, b in zip((0,) + c, c + (len(widths),))], gc)
                   for r in range(len(widths)) for c in itertools.combinations(range(1, len(widths)), r))
        assert cost(widths, plan_decode_groups(widths, gc), gc) == pytest.approx(best)


def test_unsorted_widths_are_refused():
    with pytest.raises(ValueError):
        plan_decode_groups([3, 1], 8)
