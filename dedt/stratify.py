"""Cluster-stratified selection and kept counts from class weights: levers of the select stage.

Keeping only the densest images drops the rare modes that FD counts; on diffusion models simple
cluster-based selection beats score-based pruning (Briq et al. 2024, "Data Pruning in Generative
Diffusion Models": random, nearest/farthest-to-centroid and middle-band picks inside k-means
clusters of CLIP/DINO features). Here:

- ``select.strata: kmeans``: FAISS k-means (seeded) splits each class (or all images, with
  ``select.per_class: false``) into ``select.strata_k`` clusters of the embeddings; every cluster
  keeps its share of the group's kept count (``dedt.apportion``: exact, sums to the plain rule's
  count), and inside a cluster ``select.within`` picks: ``score`` (the scorer's best), ``random``
  (seeded), ``centroid`` (nearest the cluster's centroid) or ``band`` (random among the images whose
  score quantile in the cluster lies in [``band_low``, ``band_high``]; Briq et al.'s middle band is
  the symmetric case).
- ``select.keep_by: weights``: each class's kept count follows its learned DRO weight
  (``dedt.apportion.counts_from_weights``) instead of being ``keep_frac`` of the class.

The kept total is always the plain rule's (``dedt.selection.keep_count`` per class, or of all), so
every lever compares with plain selection at equal images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from dedt.apportion import apportion, counts_from_weights
from dedt.errors import DedtError
from dedt.selection import check_keep_frac, check_scores, class_groups, keep_count

Within = Literal["score", "random", "centroid", "band"]
WITHIN_RULES = ("score", "random", "centroid", "band")
KMEANS_ITERATIONS = 25  # FAISS's default niter, as dedt.reweight.kmeans_groups uses


def select_stratified(
    scores: np.ndarray,
    labels: np.ndarray | None = None,
    keep_frac: float | None = None,
    *,
    per_class: bool = True,
    embeddings: np.ndarray | None = None,
    strata_k: int | None = None,
    within: Within = "score",
    band: tuple[float, float] = (0.1, 0.9),
    class_weights: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of the kept samples under the stratification and count levers.

    Without ``strata_k`` and ``class_weights`` (and ``within="score"``) this is ``dedt.selection.select``.

    Args:
        scores: (N,) higher = keep first; used by ``within`` score and band.
        labels: (N,) integer classes, or None (one group of all samples).
        keep_frac: fraction in (0, 1]: the kept total is the plain rule's.
        per_class: groups are the classes (default) or, False, all samples at once.
        embeddings: (N, d) rows aligned with ``scores``; needed with ``strata_k`` (k-means, centroids).
        strata_k: k-means clusters per group; None = each group is one stratum.
        within: how a stratum picks its images: score | random | centroid | band.
        band: (low, high) quantiles of the score inside a stratum, 0 = its lowest, for ``within="band"``.
        class_weights: (K,) weights indexed by class id: each class keeps a count proportional to its
            weight (``counts_from_weights``) out of the plain rule's total; needs labels and ``per_class``.
        seed: seeds k-means and the random picks.

    Returns:
        sorted int64 indices into ``scores``.
    """
    s = check_scores(scores)
    frac = check_keep_frac(keep_frac)
    if within not in WITHIN_RULES:
        raise DedtError(f"select.within must be one of {', '.join(WITHIN_RULES)}; got {within!r}")
    low, high = check_band(band)
    by_class = per_class and labels is not None
    groups = class_groups(labels, len(s)) if by_class else [(None, np.arange(len(s)))]
    counts = [keep_count(len(rows), frac) for _, rows in groups]
    if class_weights is not None:
        if not by_class:
            raise DedtError(
                "select.keep_by: weights sets a count per class: it needs labels and select.per_class: true"
            )
        counts = _weighted_counts(class_weights, groups, sum(counts))
    x = None
    if strata_k is not None or within == "centroid":
        x = _check_embeddings(embeddings, len(s))
    kept = []
    for (label, rows), count, child in zip(
        groups, counts, np.random.SeedSequence(seed).spawn(len(groups)), strict=True
    ):
        if count == 0:
            continue
        rng = np.random.default_rng(child)
        strata, centroids = (np.zeros(len(rows), np.int64), None)
        if strata_k is not None:
            _check_k(strata_k, len(rows), label)
            strata, centroids = kmeans_strata(x[rows], strata_k, seed=seed)
        sizes = np.bincount(strata, minlength=strata.max() + 1)
        for j, m in enumerate(apportion(count, sizes, sizes)):
            if m == 0:
                continue
            members = rows[strata == j]
            centre = None if centroids is None else centroids[j]
            order = pick_order(
                within, s[members], rng, x=None if x is None else x[members], centre=centre, band=(low, high)
            )
            kept.append(members[order[:m]])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def pick_order(
    within: Within,
    scores: np.ndarray,
    rng: np.random.Generator,
    *,
    x: np.ndarray | None = None,
    centre: np.ndarray | None = None,
    band: tuple[float, float] = (0.1, 0.9),
) -> np.ndarray:
    """Positions of one stratum's members, first kept first.

    score: descending score (ties: lower position); random: a uniform permutation; centroid: ascending
    Euclidean distance to ``centre`` (default: the members' mean; ties: lower position); band: the
    members whose score quantile (rank + 0.5) / n lies in [low, high] in random order, then the rest,
    nearest the band first (ties random), so any count is met exactly.
    """
    n = len(scores)
    if within == "score":
        return np.argsort(-scores, kind="stable")
    if within == "random":
        return rng.permutation(n)
    if within == "centroid":
        xs = np.asarray(x, np.float64)
        c = xs.mean(axis=0) if centre is None else np.asarray(centre, np.float64)
        return np.argsort(np.linalg.norm(xs - c, axis=1), kind="stable")
    low, high = band
    q = np.empty(n)
    q[np.argsort(scores, kind="stable")] = (np.arange(n) + 0.5) / n
    outside = np.maximum(low - q, 0.0) + np.maximum(q - high, 0.0)
    return np.lexsort((rng.random(n), outside))


def kmeans_strata(x: np.ndarray, k: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means of the rows of ``x`` into k clusters (seeded): each row's cluster and the centroids.

    Cluster ids are numbered by their lowest row, so they do not depend on FAISS's centroid order.

    Returns:
        (int64 (n,) cluster per row, float32 (k, d) centroids in that numbering).
    """
    import faiss

    xs = np.ascontiguousarray(x, np.float32)
    km = faiss.Kmeans(xs.shape[1], k, niter=KMEANS_ITERATIONS, seed=int(seed), verbose=False, min_points_per_centroid=1)
    km.train(xs)
    _, assign = km.index.search(xs, 1)
    raw = assign[:, 0].astype(np.int64)
    first = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(first, raw, np.arange(len(raw)))
    order = np.argsort(first, kind="stable")  # clusters no row chose (if any) go last
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return rank[raw], np.asarray(km.centroids, np.float32)[order]


def check_band(band: tuple[float, float]) -> tuple[float, float]:
    """The band's quantile bounds: 0 <= low < high <= 1."""
    low, high = (float(b) for b in band)
    if not 0.0 <= low < high <= 1.0:
        raise DedtError(f"select.band_low and select.band_high must satisfy 0 <= low < high <= 1; got {low}, {high}")
    return low, high


def _weighted_counts(
    class_weights: Sequence[float] | np.ndarray, groups: list[tuple[int, np.ndarray]], total: int
) -> list[int]:
    """Counts of the present classes (in ``groups`` order) from weights indexed by class id."""
    w = np.asarray(class_weights, np.float64)
    ids = [label for label, _ in groups]
    if w.ndim != 1 or min(ids) < 0 or max(ids) >= len(w):
        raise DedtError(
            f"{len(w)} class weights cannot index the classes {ids[0]}..{ids[-1]}; re-run the "
            "reweight stage (reweight.groups: class) on this data"
        )
    return counts_from_weights(w[ids], [len(rows) for _, rows in groups], total).tolist()


def _check_embeddings(embeddings: np.ndarray | None, n: int) -> np.ndarray:
    """Embeddings must be a finite (N, d) array aligned with the scores."""
    if embeddings is None:
        raise DedtError("select.strata and select.within: centroid need the embeddings; pass embeddings=")
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) != n or not np.isfinite(x).all():
        raise DedtError(
            f"embeddings must be a finite ({n}, d) array aligned with the scores; got shape {x.shape}; "
            "re-run the encode stage"
        )
    return x


def _check_k(k: int, n: int, label: int | None) -> None:
    """k-means needs at least k images in every group."""
    if k < 1:
        raise DedtError(f"select.strata_k must be at least 1; got {k}")
    if k > n:
        where = "all samples" if label is None else f"class {label}"
        raise DedtError(
            f"select.strata_k={k} is more than the {n} images of {where}; lower select.strata_k to at "
            "most the smallest class's size"
        )
