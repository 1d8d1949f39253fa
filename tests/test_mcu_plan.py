"""The Cortex-M arena planner: greedy-by-size placement over lifetimes, checked on small cases."""

import pytest

from qcompiler.backends.mcu_plan import Item, Plan, check, place
from qcompiler.errors import LoweringError


def test_greedy_by_size_reuses_memory_of_dead_items():
    """Items live at disjoint times share offsets; overlapping ones are packed above, aligned."""
    items = [Item("a", 100, 0, 1), Item("b", 50, 1, 2), Item("c", 100, 2, 3)]
    offsets = place(items, align=16)
    assert offsets == {"a": 0, "c": 0, "b": 112}


def test_largest_first_fills_gaps():
    """A small item goes into a gap between larger ones when its lifetime allows."""
    items = [Item("big", 64, 0, 0), Item("mid", 32, 1, 1), Item("long", 32, 0, 1), Item("tiny", 16, 1, 1)]
    offsets = place(items, align=16)
    assert offsets["big"] == 0 and offsets["long"] == 64
    assert offsets["mid"] == 0 and offsets["tiny"] == 32  # in the space big left at step 1


def test_check_catches_an_overlap():
    """check() refuses a plan where two simultaneously live items share bytes, or one sticks
    out of the arena; the same items apart pass."""
    items = [Item("a", 32, 0, 1), Item("b", 32, 1, 2)]
    with pytest.raises(LoweringError, match="overlap"):
        check(Plan(64, {"a": 0, "b": 16}, items, [64, 64, 32]))
    with pytest.raises(LoweringError, match="past the arena"):
        check(Plan(48, {"a": 0, "b": 32}, items, [64, 64, 32]))
    check(Plan(64, {"a": 0, "b": 32}, items, [64, 64, 32]))
