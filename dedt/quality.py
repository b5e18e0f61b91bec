"""Time to quality (PAPER.md section 7): when does a training curve reach a target FD, and at what cost.

A curve is a model's FD at log-spaced points of its training (``kimg`` ascending). Time is counted
in images seen, exact and reproducible, and converted to seconds with per-image costs measured side
by side (``dedt.calibrate``): on a shared machine one run's wall-clock varies 2-3x, which would swamp
the differences measured here. Everything is a pure function of arrays, usable from a notebook:

    full = Curve.mean([Curve(kimg, fd_seed0), Curve(kimg, fd_seed1)])
    kimg = full.first_reaching(target_fd)              # None: not reached within the run
    speedup = equal_quality_speedup(full, 1e3 * s_per_img, model_fd, model_cost_s)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Curve:
    """FD (lower is better) at ascending images seen, in kimg."""

    kimg: np.ndarray
    fd: np.ndarray

    def __post_init__(self) -> None:
        kimg, fd = np.asarray(self.kimg, np.float64), np.asarray(self.fd, np.float64)
        if kimg.ndim != 1 or kimg.shape != fd.shape or len(kimg) == 0:
            raise ValueError(f"a curve needs 1-D kimg and fd of one length, got {kimg.shape} and {fd.shape}")
        if np.any(np.diff(kimg) <= 0) or kimg[0] <= 0:
            raise ValueError("curve points must have positive, strictly increasing kimg")
        object.__setattr__(self, "kimg", kimg)
        object.__setattr__(self, "fd", fd)

    @staticmethod
    def mean(curves: Sequence[Curve]) -> Curve:
        """The mean curve over seeds, on the points all of them have (seeds of one arm share them)."""
        if all(np.array_equal(c.kimg, curves[0].kimg) for c in curves):  # the usual case: one grid
            return Curve(curves[0].kimg, np.mean([c.fd for c in curves], axis=0))
        common = sorted(set.intersection(*(set(np.round(c.kimg, 6)) for c in curves)))
        if not common:
            raise ValueError("the curves share no evaluation point")
        fd = [np.mean([c.fd[np.isclose(c.kimg, k)][0] for c in curves]) for k in common]
        return Curve(np.asarray(common), np.asarray(fd))

    def first_reaching(self, target: float) -> float | None:
        """The first kimg at which the curve is at or below ``target``, interpolated between the two
        points around the crossing linearly in log(kimg) vs log(FD) (FD falls as a power law of the
        images seen); the first point when it is already there; None when it never gets there."""
        below = np.flatnonzero(self.fd <= target)
        if len(below) == 0:
            return None
        i = int(below[0])
        if i == 0:
            return float(self.kimg[0])
        x0, x1 = math.log(self.kimg[i - 1]), math.log(self.kimg[i])
        f0, f1 = math.log(self.fd[i - 1]), math.log(max(self.fd[i], 1e-12))
        frac = (math.log(target) - f0) / (f1 - f0) if f1 != f0 else 1.0
        return math.exp(x0 + frac * (x1 - x0))

    def at(self, kimg: float) -> float:
        """The FD at ``kimg``, interpolated log-log (``kimg`` within the curve's range)."""
        return float(np.exp(np.interp(math.log(kimg), np.log(self.kimg), np.log(self.fd))))


@dataclass(frozen=True)
class Speedup:
    """A speed-up, or a bound on one when the yardstick's curve cannot bracket the quality."""

    value: float
    bound: str = "="  # "=", ">=" (full data does not reach it within its run), "<=" (reached before its first point)

    def __str__(self) -> str:
        prefix = {"=": "", ">=": "≥", "<=": "≤"}[self.bound]
        return f"{prefix}{self.value:.2f}x"


def equal_quality_speedup(full: Curve, full_s_per_kimg: float, model_fd: float, model_cost_s: float) -> Speedup:
    """The full-data curve's time to reach ``model_fd``, divided by the model's total cost.

    Below 1 means training on all the data for less time would have given the same FD for less.
    """
    if not model_cost_s > 0:
        raise ValueError(f"a model's cost must be positive seconds, got {model_cost_s}")
    kimg = full.first_reaching(model_fd)
    if kimg is None:
        return Speedup(full.kimg[-1] * full_s_per_kimg / model_cost_s, ">=")
    bound = "<=" if kimg == full.kimg[0] and full.fd[0] < model_fd else "="
    return Speedup(kimg * full_s_per_kimg / model_cost_s, bound)


def time_to_target(curve: Curve, target: float, s_per_kimg: float, overhead_s: float = 0.0) -> float | None:
    """Seconds until the curve first reaches ``target``: its training time there plus one-off costs."""
    kimg = curve.first_reaching(target)
    return None if kimg is None else kimg * s_per_kimg + overhead_s


@dataclass(frozen=True)
class Interval:
    """A speed-up at a target with a 95% percentile-bootstrap interval over seeds; ``value`` None
    when the arm's mean curve does not reach the target, ``reached`` the fraction of resamples
    in which it does (an unreached resample counts as speed-up 0); ``lower_bound`` when the arm is
    already past the target at its first evaluation point, so its true time may be shorter."""

    value: float | None
    low: float
    high: float
    reached: float
    lower_bound: bool = False

    def __str__(self) -> str:
        if self.value is None:
            return "not reached"
        return f"{'≥' if self.lower_bound else ''}{self.value:.2f}x [{self.low:.2f}, {self.high:.2f}]"


def speedup_interval(
    full: Sequence[Curve],
    arm: Sequence[Curve],
    target: float,
    *,
    full_s_per_kimg: float,
    arm_s_per_kimg: float,
    arm_overhead_s: float,
    resamples: int = 1000,
    seed: int = 0,
) -> Interval:
    """Full-data time to ``target`` / the arm's, on the mean curves over seeds, with an interval from
    resampling the seeds of both sides with replacement (the target stays fixed).

    When a resampled full-data mean does not reach the target within its run, its time is taken as
    its whole run: a lower bound, so the arm's speed-up is never flattered.
    """

    def ratio(full_mean: Curve, arm_mean: Curve) -> float:
        arm_time = time_to_target(arm_mean, target, arm_s_per_kimg, arm_overhead_s)
        if arm_time is None:
            return 0.0
        full_time = time_to_target(full_mean, target, full_s_per_kimg)
        if full_time is None:
            full_time = full_mean.kimg[-1] * full_s_per_kimg
        return full_time / arm_time

    point_arm = Curve.mean(arm)
    value = None if point_arm.first_reaching(target) is None else ratio(Curve.mean(full), point_arm)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        f = [full[i] for i in rng.integers(0, len(full), len(full))]
        a = [arm[i] for i in rng.integers(0, len(arm), len(arm))]
        draws[b] = ratio(Curve.mean(f), Curve.mean(a))
    low, high = np.percentile(draws, [2.5, 97.5])
    early = value is not None and point_arm.fd[0] < target
    return Interval(value, float(low), float(high), float(np.mean(draws > 0)), early)


def per_doubling_fall(curve: Curve) -> float:
    """How much the FD still falls per doubling of images seen over the curve's last doubling
    (1 - F(B) / F(B/2)): near 0 means the curve has levelled off."""
    end = curve.kimg[-1]
    if end / 2 < curve.kimg[0]:
        return math.nan
    return 1.0 - curve.fd[-1] / curve.at(end / 2)
