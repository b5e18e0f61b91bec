"""Time to quality and the power-function EMA: known answers (EDM2's formulas, hand-computed
crossings), bounds, and the snapshot invariant that makes the full-data curve a control."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dedt.diffusion.ema import power_ema_beta, sigma_rel_to_gamma
from dedt.diffusion.snapshots import snapshot_points
from dedt.quality import Curve, equal_quality_speedup, per_doubling_fall, speedup_interval, time_to_target


def _edm2_std_to_exp(std: float) -> float:
    """NVlabs/edm2 training/phema.py std_to_exp, restated: the largest real root of its cubic."""
    t = std**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2])
def test_sigma_rel_to_gamma_matches_edm2_and_inverts_the_std(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(_edm2_std_to_exp(sigma_rel), abs=1e-9)
    # EDM2 exp_to_std: the profile's relative std is sqrt((g+1) / ((g+2)^2 (g+3)))
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, abs=1e-9)


def test_known_gammas_and_range():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)  # EDM2's two tracked profiles
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    for bad in (0.0, 0.29, -0.1):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("nimg,batch", [(128, 128), (1280, 128), (64_000, 128), (10**7, 512)])
def test_power_ema_beta_matches_edm2(nimg, batch):
    gamma = _edm2_std_to_exp(0.1)
    assert power_ema_beta(0.1, nimg, batch) == pytest.approx((1 - batch / nimg) ** (gamma + 1), abs=1e-9)
    assert power_ema_beta(0.1, batch, batch) == 0.0  # the first step copies the live weights


def test_power_ema_weights_follow_the_power_profile():
    """Unrolled, the EMA after T steps weights step i by ~ (i/T)^gamma: its mass sits at the end in
    proportion to the run, the same shape at every T (what makes snapshots fair)."""
    gamma, batch = sigma_rel_to_gamma(0.1), 1
    for total in (200, 2000):
        weights = np.zeros(total)
        for step in range(1, total + 1):
            beta = power_ema_beta(0.1, step, batch)
            weights *= beta
            weights[step - 1] = 1 - beta
        assert weights.sum() == pytest.approx(1.0)
        steps = np.arange(1, total + 1)
        profile = steps**gamma / (steps**gamma).sum()
        np.testing.assert_allclose(weights, profile, atol=profile.max() / total)  # O(1/T) discretisation


def test_snapshot_points_are_halvings_rounded_to_batches():
    assert snapshot_points(64_000, 128, 5) == [2048, 4096, 8064, 16000, 32000]
    assert snapshot_points(1000, 512, 3) == [512]  # 500, 250, 125 round up to one batch; no repeats
    assert snapshot_points(64_000, 128, 0) == []


def test_first_reaching_interpolates_log_log():
    curve = Curve([1, 2, 4, 8], [80, 80 / 2**0.5, 40, 40 / 2**0.5])  # FD = 80 / sqrt(kimg)
    assert curve.first_reaching(80 / 3**0.5) == pytest.approx(3.0)  # exact on a power law
    assert curve.first_reaching(100) == 1.0  # already there at the first point
    assert curve.first_reaching(10) is None
    assert curve.at(2**1.5) == pytest.approx(80 / 2**0.75)
    assert per_doubling_fall(curve) == pytest.approx(1 - 2**-0.5)
    assert time_to_target(curve, 40, s_per_kimg=2.0, overhead_s=5.0) == pytest.approx(13.0)


def test_first_crossing_not_the_last():
    curve = Curve([1, 2, 4], [50, 20, 30])  # noisy: down below, then up again
    assert curve.first_reaching(25) < 2.0


def test_curve_validation_and_mean():
    with pytest.raises(ValueError, match="increasing"):
        Curve([2, 1], [1, 1])
    mean = Curve.mean([Curve([1, 2], [10, 6]), Curve([1, 2], [14, 8])])
    assert mean.fd.tolist() == [12, 7]
    mixed = Curve.mean([Curve([1, 2, 4], [10, 6, 4]), Curve([1, 4], [14, 2])])
    assert mixed.kimg.tolist() == [1, 4] and mixed.fd.tolist() == [12, 3]


def test_equal_quality_speedup_and_its_bounds():
    full = Curve([1, 2, 4, 8], [80, 80 / 2**0.5, 40, 40 / 2**0.5])
    # a model with FD 40 costing 2 s: full data gets there after 4 kimg = 4 s -> 2x
    s = equal_quality_speedup(full, 1.0, 40.0, 2.0)
    assert (s.value, s.bound) == (pytest.approx(2.0), "=")
    worse = equal_quality_speedup(full, 1.0, 100.0, 2.0)  # worse than full data's first point
    assert (worse.value, worse.bound, str(worse)) == (0.5, "<=", "≤0.50x")
    better = equal_quality_speedup(full, 1.0, 5.0, 2.0)  # better than full data ever gets
    assert (better.value, better.bound, str(better)) == (4.0, ">=", "≥4.00x")


def test_speedup_interval_known_answer_and_unreached():
    full = [Curve([1, 2, 4, 8], 80 / np.sqrt([1, 2, 4, 8]))] * 2
    arm = [Curve([1, 2, 4, 8], 40 / np.sqrt([1, 2, 4, 8]))] * 3
    target = full[0].fd[-1]
    iv = speedup_interval(full, arm, target, full_s_per_kimg=1.0, arm_s_per_kimg=1.0, arm_overhead_s=1.0)
    assert iv.value == pytest.approx(8 / 3) and iv.low == iv.high == pytest.approx(8 / 3) and iv.reached == 1.0
    slow = [Curve([1, 2, 4, 8], 100 / np.sqrt([1, 2, 4, 8]))]
    none = speedup_interval(full, slow, target, full_s_per_kimg=1.0, arm_s_per_kimg=1.0, arm_overhead_s=0.0)
    assert none.value is None and str(none) == "not reached" and none.reached == 0.0


def test_speedup_interval_spreads_with_seed_noise():
    rng = np.random.default_rng(0)
    kimg = np.array([1, 2, 4, 8])
    full = [Curve(kimg, 80 / np.sqrt(kimg) * rng.uniform(0.9, 1.1)) for _ in range(3)]
    arm = [Curve(kimg, 40 / np.sqrt(kimg) * rng.uniform(0.8, 1.2)) for _ in range(3)]
    iv = speedup_interval(
        full, arm, Curve.mean(full).fd[-1], full_s_per_kimg=1.0, arm_s_per_kimg=1.0, arm_overhead_s=0.0
    )
    assert iv.low < iv.value < iv.high
