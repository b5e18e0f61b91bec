"""Select: keep the top ceil(keep_frac * n_c) samples of each class by score (PAPER.md section 3).

Exact and deterministic: the count per class is computed in exact rational arithmetic from the
decimal that ``keep_frac`` prints as (so 0.1 of 30 is 3, not ceil(3.0000000000000004) = 4), and
equal scores are broken by sample index, lower first.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np

from dedt.errors import DedtError


def select(
    scores: np.ndarray,
    labels: np.ndarray | None = None,
    keep_frac: float | None = None,
    *,
    per_class: bool = True,
) -> np.ndarray:
    """Indices of the kept samples.

    Args:
        scores: (N,) higher = keep first; NaN is an error, +-inf is allowed.
        labels: (N,) integer classes, or None (then selection is global).
        keep_frac: fraction in (0, 1] to keep; required.
        per_class: keep ceil(keep_frac * n_c) of every class (default, PAPER.md); False keeps the
            global top ceil(keep_frac * N) whatever their class.

    Returns:
        sorted int64 indices into ``scores``.
    """
    s = check_scores(scores)
    frac = check_keep_frac(keep_frac)
    groups = class_groups(labels, len(s)) if per_class and labels is not None else [(None, np.arange(len(s)))]
    kept = [rows[_best_first(s[rows])[: keep_count(len(rows), frac)]] for _, rows in groups]
    return np.sort(np.concatenate(kept)).astype(np.int64)


def keep_count(n: int, keep_frac: float) -> int:
    """ceil(keep_frac * n), exact: keep_frac is read as the shortest decimal that prints it."""
    return math.ceil(Fraction(repr(float(keep_frac))) * n)


def kept_per_class(indices: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Kept count for every class in ``labels`` (zero included), for the selection log."""
    labels = check_labels(labels, len(labels))
    classes, counts = np.unique(labels[np.asarray(indices, dtype=np.int64)], return_counts=True)
    kept = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    return {int(c): int(kept.get(c, 0)) for c in np.unique(labels).tolist()}


def class_groups(labels: np.ndarray, n: int) -> list[tuple[int, np.ndarray]]:
    """(label, ascending row indices) for each class, classes in ascending order; O(N log N)."""
    labels = check_labels(labels, n)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rows = np.argsort(inverse, kind="stable")  # stable: rows stay ascending inside each class
    return list(zip(classes.tolist(), np.split(rows, np.cumsum(counts)[:-1]), strict=True))


def check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    """Labels must be a 1-D integer array with one entry per sample."""
    a = np.asarray(labels)
    if a.ndim != 1 or len(a) != n:
        raise DedtError(f"labels must be a 1-D array with one entry per sample ({n}); got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise DedtError(f"labels must be integers (class ids); got dtype {a.dtype}: map class names to ids first")
    return a


def check_scores(scores: np.ndarray) -> np.ndarray:
    """Scores must be a non-empty 1-D real array without NaN."""
    s = np.asarray(scores)
    if s.ndim != 1 or len(s) == 0:
        raise DedtError(f"scores must be a non-empty 1-D array; got shape {s.shape}")
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise DedtError(f"scores must be real numbers; got dtype {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise DedtError(f"scores hold NaN at index {int(np.flatnonzero(np.isnan(s))[0])}; rescore those samples")
    return s


def check_keep_frac(keep_frac: float | None) -> float:
    """keep_frac must be a real number in (0, 1]."""
    if keep_frac is None:
        raise DedtError("select: keep_frac is required (a fraction in (0, 1], e.g. select.keep_frac=0.2)")
    if isinstance(keep_frac, bool) or not isinstance(keep_frac, numbers.Real) or not 0.0 < keep_frac <= 1.0:
        raise DedtError(f"select.keep_frac must be in (0, 1]; got {keep_frac!r} (0.2 keeps 20% of each class)")
    return float(keep_frac)


def _best_first(s: np.ndarray) -> np.ndarray:
    """Order positions by descending score; the stable sort keeps equal scores in index order."""
    return np.argsort(-s, kind="stable")
