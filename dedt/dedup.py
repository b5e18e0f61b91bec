"""Near-duplicate removal and outlier trimming: cleaning before any scorer's keep rule.

Scraped data repeats images, and duplicated training images are the ones diffusion models
replicate (Carlini et al. 2023; Somepalli et al. 2023, who both recommend deduplication). Two
options of the select stage act before ``keep_frac`` and compose with every scorer:

- ``select.dedup_threshold``: embeddings are L2-normalised and every pair closer than the threshold
  in cosine distance (1 - cos) is linked (FAISS range search on inner products); each connected
  group keeps one member, its best-scored (ties: lowest sample id). Linking is transitive, so a
  loose threshold can chain distinct images into one group: the groups are written out
  (``duplicates.parquet``) to be checked.
- ``select.trim_outliers_frac``: of what is left, the lowest-density tail goes: per class (or of
  all, with ``select.per_class: false``) the floor(frac * n) images farthest from their k-th
  nearest neighbour, everything else stays.

``keep_frac`` then applies to the images left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dedt.errors import DedtError

TRIM_K = 5  # density = distance to the 5th neighbour: the knn scorer's default k (score.k)
QUERY_BLOCK = 4096  # rows per range search: bounds the result lists held at once


@dataclass(frozen=True)
class Cleaned:
    """What cleaning removed; every array is over the input rows."""

    groups: np.ndarray  # int64 (N,): group id (its lowest row), equal for linked rows; -1 without dedup
    duplicate: np.ndarray  # bool (N,): removed as a near-duplicate of a kept member
    trimmed: np.ndarray  # bool (N,): removed as a low-density outlier

    @property
    def kept(self) -> np.ndarray:
        """bool (N,): rows the keep rule chooses from."""
        return ~(self.duplicate | self.trimmed)


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (a zero row stays zero: it links to nothing)."""
    x = np.ascontiguousarray(embeddings, np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise DedtError(f"embeddings must be a finite 2-D array; got shape {x.shape}; re-run the encode stage")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def duplicate_groups(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Group of each row: connected components of the graph linking rows within cosine distance ``threshold``.

    Args:
        embeddings: (N, d) float, any scale.
        threshold: cosine distance in (0, 2); pairs with 1 - cos < threshold are linked.

    Returns:
        int64 (N,): the lowest row index of each row's group (a row alone is its own group).
    """
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not 0.0 < threshold < 2.0:
        raise DedtError(f"select.dedup_threshold must lie in (0, 2) (cosine distance); got {threshold}")
    x = normalise(embeddings)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    rows, cols = [], []
    for start in range(0, len(x), QUERY_BLOCK):
        lims, _, found = index.range_search(x[start : start + QUERY_BLOCK], 1.0 - threshold)
        rows.append(np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64))))
        cols.append(found.astype(np.int64))
    n = len(x)
    graph = coo_matrix((np.ones(sum(map(len, rows)), bool), (np.concatenate(rows), np.concatenate(cols))), (n, n))
    _, component = connected_components(graph, directed=False)
    lowest = np.full(component.max() + 1, n, np.int64)
    np.minimum.at(lowest, component, np.arange(n))
    return lowest[component]


def best_of_groups(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """bool (N,): the one member of each group kept, the highest score (ties: lowest row)."""
    order = np.lexsort((np.arange(len(groups)), -scores, groups))  # by group, best first
    first = np.ones(len(order), bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    keep = np.zeros(len(groups), bool)
    keep[order[first]] = True
    return keep


def low_density(embeddings: np.ndarray, candidates: np.ndarray, labels: np.ndarray | None, frac: float) -> np.ndarray:
    """bool (N,): among ``candidates``, the floor(frac * n) rows of each class (or of all when ``labels`` is None)
    farthest from their TRIM_K-th nearest candidate (normalised embeddings; ties: higher row first)."""
    from dedt.knn import knn

    x = normalise(embeddings)
    groups = np.zeros(len(x), np.int64) if labels is None else np.asarray(labels, np.int64)
    trimmed = np.zeros(len(x), bool)
    for g in np.unique(groups[candidates]):
        rows = np.flatnonzero(candidates & (groups == g))
        n_trim = math.floor(frac * len(rows))
        if n_trim == 0 or len(rows) < 2:
            continue
        k = min(TRIM_K, len(rows) - 1)
        distances, _ = knn(x[rows], k, exclude_self=True, index="exact", device="cpu")
        farthest = np.lexsort((-rows, -distances[:, k - 1].astype(np.float64)))[:n_trim]
        trimmed[rows[farthest]] = True
    return trimmed


def clean(
    embeddings: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray | None,
    *,
    dedup_threshold: float | None,
    trim_outliers_frac: float,
    per_class: bool = True,
) -> Cleaned:
    """Near-duplicate removal (``dedup_threshold``, None = off), then outlier trimming (``trim_outliers_frac``).

    Args:
        embeddings: (N, d) rows aligned with ``scores`` and ``labels``.
        scores: (N,) a scorer's scores, higher = keep first: they pick each group's survivor.
        labels: (N,) classes; trimming is per class when given and ``per_class``.
    """
    n = len(scores)
    if len(embeddings) != n or (labels is not None and len(labels) != n):
        raise DedtError(f"{len(embeddings)} embeddings for {n} scores; re-run the encode and score stages")
    if not 0.0 <= trim_outliers_frac < 1.0:
        raise DedtError(f"select.trim_outliers_frac must lie in [0, 1); got {trim_outliers_frac}")
    groups = np.full(n, -1, np.int64)
    duplicate = np.zeros(n, bool)
    if dedup_threshold is not None:
        groups = duplicate_groups(embeddings, dedup_threshold)
        duplicate = ~best_of_groups(groups, np.asarray(scores, np.float64))
    trimmed = np.zeros(n, bool)
    if trim_outliers_frac > 0:
        trimmed = low_density(embeddings, ~duplicate, labels if per_class else None, trim_outliers_frac)
    return Cleaned(groups, duplicate, trimmed)


def group_table(ids: np.ndarray, cleaned: Cleaned) -> dict[str, np.ndarray]:
    """Columns of duplicates.parquet: one row per member of a group of two or more (sample_id, group as the
    group's lowest sample id, kept)."""
    sizes = np.bincount(np.maximum(cleaned.groups, 0), minlength=len(ids))
    member = (cleaned.groups >= 0) & (sizes[np.maximum(cleaned.groups, 0)] > 1)
    return {
        "sample_id": ids[member].astype(np.int64),
        "group": ids[cleaned.groups[member]].astype(np.int64),
        "kept": ~cleaned.duplicate[member],
    }
