"""Apportionment: split a kept total into whole counts per group, exactly and deterministically.

Two levers of the select stage share it: cluster-stratified selection gives each k-means cluster
its share of a class's kept count (``dedt.stratify``), and ``select.keep_by: weights`` gives each
class a kept count proportional to its learned DRO weight. Both need counts that sum to the total
exactly, stay within what each group holds, and do not depend on float rounding: quotas are exact
rationals (a float weight is read as the exact binary fraction it is), rounded by largest
remainders (Hamilton's method), ties to the lower group index.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from dedt.errors import DedtError


def apportion(
    total: int,
    weights: Sequence[float] | np.ndarray,
    upper: Sequence[int] | np.ndarray,
    lower: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Whole counts c_g with sum c_g = total and lower_g <= c_g <= upper_g, as near lam * w_g as the bounds allow.

    The exact quota of group g is q_g = clip(lam * w_g, lower_g, upper_g), lam chosen so the quotas sum
    to ``total`` (water-filling: a group that hits its bound gives its excess to the others in proportion
    to their weights); each count is then floor(q_g) plus one for the groups of largest remainder.

    Args:
        total: the count to split, >= 0.
        weights: (G,) finite, >= 0; a group of weight 0 gets its lower bound.
        upper: (G,) ints >= lower: what each group holds.
        lower: (G,) ints >= 0; default 0.

    Returns:
        int64 (G,) counts.
    """
    w = np.asarray(weights, np.float64)
    hi = np.asarray(upper, np.int64)
    lo = np.zeros(len(w), np.int64) if lower is None else np.asarray(lower, np.int64)
    if w.ndim != 1 or hi.shape != w.shape or lo.shape != w.shape:
        raise DedtError(
            f"apportion: weights, upper and lower need one entry per group; got shapes "
            f"{w.shape}, {hi.shape}, {lo.shape}"
        )
    if not np.isfinite(w).all() or (w < 0).any():
        raise DedtError(f"apportion: weights must be finite and >= 0; got {w.tolist()}")
    if (lo < 0).any() or (lo > hi).any():
        raise DedtError(f"apportion: need 0 <= lower <= upper per group; got lower {lo.tolist()}, upper {hi.tolist()}")
    reachable = int(lo.sum() + (hi - lo)[w > 0].sum())
    if not int(lo.sum()) <= total <= reachable:
        raise DedtError(
            f"apportion: cannot split {total} into counts between {int(lo.sum())} (the lower bounds) "
            f"and {reachable} (what the groups of positive weight hold)"
        )
    exact = [Fraction(float(x)) for x in w]
    quotas = _quotas(total, exact, lo.tolist(), hi.tolist())
    counts = [math.floor(q) for q in quotas]
    short = total - sum(counts)
    by_remainder = sorted(range(len(w)), key=lambda g: (-(quotas[g] - counts[g]), g))
    for g in by_remainder[:short]:
        counts[g] += 1
    return np.asarray(counts, np.int64)


def _quotas(total: int, w: list[Fraction], lo: list[int], hi: list[int]) -> list[Fraction]:
    """clip(lam * w_g, lo_g, hi_g) with lam such that they sum to ``total`` (exact; f(lam) is piecewise linear)."""

    def clipped(lam: Fraction) -> list[Fraction]:
        return [min(max(lam * wg, Fraction(a)), Fraction(b)) for wg, a, b in zip(w, lo, hi, strict=True)]

    def f(lam: Fraction) -> Fraction:
        return sum(clipped(lam), Fraction(0))

    # f is continuous and nondecreasing, linear between the breakpoints lo/w and hi/w.
    points = sorted(
        {Fraction(0)}
        | {Fraction(b) / wg for wg, a, b in zip(w, lo, hi, strict=True) if wg > 0}
        | {Fraction(a) / wg for wg, a, b in zip(w, lo, hi, strict=True) if wg > 0}
    )
    i = bisect.bisect_left(range(len(points)), True, key=lambda j: f(points[j]) >= total)
    if i == 0:  # total == sum(lo): every group at its lower bound
        return clipped(Fraction(0))
    a, b = points[i - 1], points[i]
    fa, fb = f(a), f(b)
    return clipped(a + (total - fa) * (b - a) / (fb - fa))


def counts_from_weights(
    weights: Sequence[float] | np.ndarray, sizes: Sequence[int] | np.ndarray, total: int
) -> np.ndarray:
    """Kept count per class from learned class weights (``select.keep_by: weights``).

    A class's count is proportional to its weight, so uniform draws over the kept subset realise the
    weights' class mixture (what ``train.weighting: sampling`` draws), with more distinct images for the
    classes DRO favours instead of more repeats. Each class keeps at most its size and, when it has images
    and a positive weight, at least one; a class of weight 0 keeps none.

    Args:
        weights: (K,) class weights, >= 0 (need not sum to 1), indexed by class id.
        sizes: (K,) images each class holds.
        total: the kept total (the plain rule's, so levers compare at equal images).

    Returns:
        int64 (K,) counts summing to ``total``.
    """
    w = np.asarray(weights, np.float64)
    n = np.asarray(sizes, np.int64)
    if w.shape != n.shape:
        raise DedtError(f"{len(w)} class weights for {len(n)} classes; re-run the reweight stage on this data")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DedtError(f"class weights must be finite, >= 0 and not all 0; got {w.tolist()}")
    present = (w > 0) & (n > 0)
    if total < present.sum():
        raise DedtError(
            f"a kept total of {total} cannot keep one image of each of the {int(present.sum())} classes "
            "of positive weight; raise select.keep_frac"
        )
    held = int(n[w > 0].sum())
    if total > held:
        raise DedtError(
            f"the classes of positive weight hold {held} images, fewer than the {total} to keep; "
            "lower select.keep_frac or use select.keep_by: uniform"
        )
    return apportion(total, w, n, present.astype(np.int64))
