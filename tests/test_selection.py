"""dedt.selection: exact per-class counts, ties by index, global mode, bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedt.errors import DedtError
from dedt.selection import keep_count, kept_per_class, select


def test_hand_checked_per_class() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    labels = np.array([0, 0, 0, 1, 1])
    # class 0 keeps ceil(0.5 * 3) = 2 (rows 1, 2); class 1 keeps ceil(0.5 * 2) = 1 (row 3)
    assert select(scores, labels, 0.5).tolist() == [1, 2, 3]


def test_global_ignores_classes() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.8, 0.2])
    labels = np.array([0, 0, 0, 1, 1])
    assert select(scores, labels, 0.4, per_class=False).tolist() == [1, 3]
    assert select(scores, None, 0.4).tolist() == [1, 3]  # no labels: global whatever per_class says


def test_ties_broken_by_lower_index() -> None:
    scores = np.array([1.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    labels = np.array([0, 1, 0, 1, 0, 1])
    # class 0 = rows 0, 2, 4 with scores 1, 1, 2: keep 2 -> row 4 then row 0 (lower of the tied)
    # class 1 = rows 1, 3, 5 with scores 2, 1, 1: keep 2 -> row 1 then row 3
    assert select(scores, labels, 0.5).tolist() == [0, 1, 3, 4]


def test_infinite_scores_are_ordered() -> None:
    assert select(np.array([-np.inf, 0.0, np.inf]), None, 0.6).tolist() == [1, 2]


def test_counts_are_exact_decimals() -> None:
    # 0.1 * 30 = 3.0000000000000004 and 0.7 * 10 = 7.000000000000001 in floats; ceil must see 3 and 7
    assert keep_count(30, 0.1) == 3
    assert keep_count(10, 0.7) == 7
    assert keep_count(10, 0.71) == 8
    assert keep_count(1, 1e-9) == 1
    assert len(select(np.arange(30.0), None, 0.1)) == 3


def test_keep_all_and_sorted_int64() -> None:
    kept = select(np.array([3.0, 1.0, 2.0]), np.array([2, 2, 5]), 1.0)
    assert kept.dtype == np.int64
    assert kept.tolist() == [0, 1, 2]


def test_kept_per_class_lists_every_class() -> None:
    labels = np.array([3, 3, 7, 9, 9])
    assert kept_per_class(np.array([0, 3]), labels) == {3: 1, 7: 0, 9: 1}


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    keep_frac=st.floats(0.01, 1.0),
    data=st.data(),
)
def test_property_counts_and_order(labels: list[int], keep_frac: float, data: st.DataObject) -> None:
    """Per class: exactly ceil(r n_c) kept, and no dropped row beats a kept one (ties: lower index wins)."""
    y = np.array(labels)
    s = np.array(data.draw(st.lists(st.integers(0, 3), min_size=len(y), max_size=len(y))), dtype=float)
    kept = select(s, y, keep_frac)
    assert np.all(np.diff(kept) > 0)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        mine = np.intersect1d(kept, rows)
        assert len(mine) == math.ceil(Fraction(repr(keep_frac)) * len(rows))
        dropped = np.setdiff1d(rows, mine)
        for i in dropped:
            assert np.all((s[mine] > s[i]) | ((s[mine] == s[i]) & (mine < i)))


@pytest.mark.parametrize("keep_frac", [0.0, -0.1, 1.5, float("nan"), None, True, "0.5"])
def test_bad_keep_frac(keep_frac: object) -> None:
    with pytest.raises(DedtError, match="keep_frac"):
        select(np.ones(4), None, keep_frac)  # type: ignore[arg-type]


def test_bad_scores_and_labels() -> None:
    with pytest.raises(DedtError, match="NaN at index 1"):
        select(np.array([0.0, np.nan]), None, 0.5)
    with pytest.raises(DedtError, match="1-D"):
        select(np.ones((2, 2)), None, 0.5)
    with pytest.raises(DedtError, match="one entry per sample"):
        select(np.ones(4), np.zeros(3, dtype=int), 0.5)
    with pytest.raises(DedtError, match="integers"):
        select(np.ones(2), np.array([0.0, 1.0]), 0.5)
