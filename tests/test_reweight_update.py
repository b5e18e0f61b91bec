"""DoReMi update: hand-computed values, the simplex, the smoothing floor, large-step safety."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedt.errors import DedtError
from dedt.reweight import collapse_warning, doremi_update, stratified_batch


def test_two_steps_three_groups_by_hand():
    alpha = np.full(3, 1 / 3)
    excess = np.array([0.0, 0.5, 1.0])
    # Step 1: softmax(log(1/3) + [0, .5, 1]) = e^[0,.5,1] / sum; then 0.9 * that + 0.1 / 3.
    e = np.exp([0.0, 0.5, 1.0])
    step1 = 0.9 * e / e.sum() + 0.1 / 3
    np.testing.assert_allclose(doremi_update(alpha, excess, eta=1.0, smoothing=0.1), step1, rtol=1e-12)
    # Step 2 with eta = 2 and excess [1, 0, 0]: weights step1 * e^[2,0,0], renormalised, smoothed.
    w = step1 * np.exp([2.0, 0.0, 0.0])
    step2 = 0.9 * w / w.sum() + 0.1 / 3
    got = doremi_update(step1, np.array([1.0, 0.0, 0.0]), eta=2.0, smoothing=0.1)
    np.testing.assert_allclose(got, step2, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=2, max_size=12), st.floats(1e-3, 100), st.floats(0, 0.99))
def test_simplex_and_smoothing_floor(excess, eta, smoothing):
    k = len(excess)
    out = doremi_update(np.full(k, 1 / k), np.array(excess), eta=eta, smoothing=smoothing)
    assert np.all(np.isfinite(out))
    assert out.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.all(out >= smoothing / k - 1e-12)


def test_larger_excess_gains_weight():
    out = doremi_update(np.full(4, 0.25), np.array([0.0, 0.1, 0.2, 0.3]), eta=1.0, smoothing=1e-3)
    assert np.all(np.diff(out) > 0)


@pytest.mark.parametrize("eta,smoothing", [(0.0, 0.1), (-1.0, 0.1), (1.0, 1.0), (1.0, -0.1)])
def test_bad_options_rejected(eta, smoothing):
    with pytest.raises(DedtError):
        doremi_update(np.full(2, 0.5), np.zeros(2), eta=eta, smoothing=smoothing)


def test_stratified_batch_has_every_group():
    groups = np.repeat(np.arange(10), [1, 2, 50, 50, 50, 50, 50, 50, 50, 3])
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = stratified_batch(groups, 16, rng)
        assert len(batch) == 16
        assert set(groups[batch]) == set(range(10))


def test_collapse_warning_names_causes():
    assert collapse_warning(np.full(10, 0.1), batch_size=128, eta=1.0, steps=500) is None
    collapsed = np.array([0.95] + [0.05 / 9] * 9)
    message = collapse_warning(collapsed, batch_size=16, eta=5.0, steps=10)
    assert "collapsed" in message and "batch 16" in message and "eta 5.0" in message
