"""Score: one number per sample, higher = keep first (PAPER.md section 2).

Every scorer in ``SCORERS`` has the signature ``(x, groups, seeds, **params) -> (N,) float64``,
where ``groups`` lists (label, rows) pairs: one per class when scoring per class, a single one
holding all rows otherwise. Density scorers (gaussian, ppca, knn) and coverage scorers (kcenter,
ccs) are fitted inside each group; moderate and random are defined over the whole set (see their
docstrings for what ``per_class`` means to them).

Coverage scorers turn a ranking into a score, 1 - position / n_group, so each group's first pick
scores 1 and a global top-r selection takes about the same fraction r of every group.
Numerics: gaussian and ppca accumulate in float64 over row chunks of ~64 MB, so their memory is
O(chunk + d^2) beyond the input, never a float64 copy of all N rows.
scipy and faiss are imported inside the scorers that use them, so ``dedt.config`` can validate
``score.method`` against ``METHODS`` without loading either.

``MODEL_SCORERS`` score images with the trained full-data diffusion model instead of embeddings
(``dedt.difficulty``): the pipeline's score stage calls them, ``score`` does not.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from dedt.errors import DedtError
from dedt.selection import class_groups

Group = tuple[int | None, np.ndarray]  # (class label, or None for "all samples"; ascending rows)
Scorer = Callable[..., np.ndarray]

REG_COVAR = 1e-5  # the ridge of sklearn's GaussianMixture(reg_covar=1e-5): PAPER.md's Sigma
PPCA_VARIANCE_FRAC = 0.95  # PAPER.md: keep the components whose cumulative variance stays below this
CHUNK_ELEMENTS = 1 << 23  # 8M float64 = 64 MB per row chunk
LOG_2PI = math.log(2.0 * math.pi)


def score(
    method: str,
    embeddings: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    per_class: bool = True,
    seed: int = 0,
    **params: Any,
) -> np.ndarray:
    """Score every sample for selection; higher = keep first.

    Args:
        method: a key of ``SCORERS``: gaussian, ppca, knn, moderate, random, kcenter, ccs.
        embeddings: (N, d) real and finite; float64 stays float64, anything else becomes float32.
        labels: (N,) integer classes, or None (then scoring is global).
        per_class: fit each class on its own (PAPER.md's default); ignored without labels.
        seed: seeds random, kcenter's first centre and ccs's sampling; the others ignore it.
        **params: the method's own keyword parameters (e.g. ``k`` for knn); unknown ones are errors.

    Returns:
        (N,) float64 scores, all finite.
    """
    scorer = _lookup(method)
    _check_params(method, scorer, params)
    x = _check_embeddings(embeddings)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DedtError(f"score: seed must be a non-negative integer; got {seed!r}")
    groups: list[Group] = (
        class_groups(labels, len(x)) if per_class and labels is not None else [(None, np.arange(len(x)))]
    )
    return scorer(x, groups, np.random.SeedSequence(int(seed)), **params)


# -- density scorers, fitted per group ---------------------------------------------------------


def gaussian(x: np.ndarray) -> np.ndarray:
    """log N(x; mu, Sigma), Sigma = ML covariance + 1e-5 I (Instance Selection, DeVries et al. 2020).

    Equals sklearn's ``GaussianMixture(1, covariance_type="full", reg_covar=1e-5).score_samples``:
    Sigma = L L^T (Cholesky), log|Sigma| = 2 sum log diag L, Mahalanobis term |L^-1 (x - mu)|^2.
    A class with fewer samples than dimensions has a singular ML covariance; the ridge keeps Sigma
    positive definite, so every score stays finite (and large: log|Sigma| is very negative).
    """
    mean, cov = _moments(x, ddof=0)
    cov[np.diag_indices_from(cov)] += REG_COVAR
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise DedtError(
            "gaussian: the covariance is not positive definite even with the 1e-5 ridge (feature scale "
            f"up to {float(np.abs(cov).max()):.3g}); standardise the embeddings or use the ppca scorer"
        ) from None
    from scipy.linalg import solve_triangular

    whiten = solve_triangular(chol, np.eye(len(cov)), lower=True).T  # (x - mu) @ whiten = L^-1 (x - mu)
    maha = np.concatenate([_sq_norms((c - mean) @ whiten) for c in _chunks(x)])
    return -0.5 * (maha + 2.0 * np.log(np.diag(chol)).sum() + x.shape[1] * LOG_2PI)


def ppca(x: np.ndarray, *, variance_frac: float = PPCA_VARIANCE_FRAC) -> np.ndarray:
    """Probabilistic PCA log-likelihood (Tipping & Bishop 1999), as sklearn's ``PCA(m).score_samples``.

    m = number of leading components whose cumulative explained-variance ratio stays below
    ``variance_frac`` (at least 1); the noise variance s2 is the mean of the remaining eigenvalues
    of the (n-1)-normalised covariance, as in sklearn. The model covariance has eigenvalue
    max(lambda_j, s2) on component j <= m and s2 elsewhere, so the score needs only the m
    projections and the residual norm, never a d x d precision matrix per row.
    Undefined (an error) for fewer than 2 samples, or when the samples span at most m dimensions
    exactly (s2 = 0, e.g. two samples); the gaussian scorer's ridge covers those cases.
    """
    n, d = x.shape
    if n < 2:
        raise DedtError("ppca needs at least 2 samples: use the gaussian scorer or score globally (per_class=false)")
    if not 0.0 < variance_frac <= 1.0:
        raise DedtError(f"ppca: variance_frac must be in (0, 1]; got {variance_frac!r}")
    mean, variances, axes, total = _principal_axes(x)
    m = max(1, int((np.cumsum(variances) < variance_frac * total).sum()))
    noise = float(variances[m:].mean()) if m < len(variances) else 0.0
    if noise <= 1e-12 * total:
        raise DedtError(
            f"ppca: the {n} samples span at most {m} dimensions exactly, so the noise variance is 0 and "
            "the likelihood is undefined; use the gaussian scorer (ridge-regularised) or more samples"
        )
    lam = np.maximum(variances[:m], noise)
    log_det = np.log(lam).sum() + (d - m) * math.log(noise)
    maha = np.concatenate([_ppca_mahalanobis(c - mean, axes[:m], lam, noise) for c in _chunks(x)])
    return -0.5 * (maha + log_det + d * LOG_2PI)


def knn_score(
    x: np.ndarray,
    *,
    k: int = 5,
    index: str = "exact",
    device: str = "auto",
    nprobe: int = 8,
    ef_search: int = 128,
) -> np.ndarray:
    """-(Euclidean distance to the k-th nearest neighbour, self excluded): dense regions score high.

    Exact by default (PAPER.md); ``index`` = ivf / hnsw / auto trades measured recall for speed at
    millions of rows (``bench/knn.py``).
    """
    from dedt.knn import knn

    dist, _ = knn(x, k, exclude_self=True, index=index, device=device, nprobe=nprobe, ef_search=ef_search)
    kth = dist[:, -1].astype(np.float64)
    if not np.isfinite(kth).all():
        raise DedtError(
            f"knn: the {index} index found fewer than k={k} neighbours for {int((~np.isfinite(kth)).sum())} rows; "
            "raise nprobe / ef_search or use index='exact'"
        )
    return -kth


def _knn_needs(n: int, params: Mapping[str, Any]) -> str | None:
    """A group of n rows must hold k neighbours besides each row itself."""
    k = params.get("k", 5)
    if isinstance(k, numbers.Integral) and n <= k:
        return (
            f"has {n} samples but knn with k={k} needs at least k+1 = {k + 1} (self excluded); "
            f"lower score.k to at most {n - 1} or score globally (per_class=false)"
        )
    return None


# -- coverage scorers, fitted per group --------------------------------------------------------


def kcenter(x: np.ndarray, *, rng: np.random.Generator, budget_frac: float = 1.0) -> np.ndarray:
    """Greedy k-center order (Gonzalez 1985; the core-set of Sener & Savarese 2018) as a score.

    Start from a seeded random row, then repeatedly pick the row farthest from all picks so far.
    Memory O(n): one vector of min squared distances, updated by one GEMV per pick; no n x n or
    n x budget matrix. Time O(picks * n * d), so ``budget_frac`` < 1 stops after
    ceil(budget_frac * n) picks and orders the rest by their distance to the picks (farthest
    first, the order greedy would roughly continue in). Rows are centred first so that the
    |a|^2 - 2 a.b + |b|^2 expansion does not cancel away float32 precision.
    """
    if not 0.0 < budget_frac <= 1.0:
        raise DedtError(f"kcenter: budget_frac must be in (0, 1]; got {budget_frac!r}")
    n = len(x)
    centred = np.ascontiguousarray(x - x.mean(axis=0, dtype=np.float64).astype(np.float32), dtype=np.float32)
    sq = np.concatenate([_sq_norms(c) for c in _chunks(centred)])
    min_sq = np.full(n, np.inf)
    position = np.full(n, -1, dtype=np.int64)
    pick = int(rng.integers(n))
    for step in range(min(n, math.ceil(budget_frac * n))):
        position[pick] = step
        dist_sq = sq - 2.0 * (centred @ centred[pick]).astype(np.float64) + sq[pick]
        np.minimum(min_sq, np.maximum(dist_sq, 0.0), out=min_sq)
        min_sq[pick] = -np.inf  # never pick twice, even among exact duplicates (min only lowers it)
        pick = int(np.argmax(min_sq))  # ties: lowest index
    rest = np.flatnonzero(position < 0)
    position[rest[np.argsort(-min_sq[rest], kind="stable")]] = np.arange(n - len(rest), n)
    return 1.0 - position / n


def ccs(
    x: np.ndarray,
    *,
    rng: np.random.Generator,
    difficulty: str = "gaussian",
    strata: int = 50,
    hard_frac: float = 0.0,
    difficulty_params: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Coverage-centric coreset selection (CCS, Zheng et al. ICLR 2023, Algorithm 1) as a ranking.

    Difficulty: CCS uses training dynamics (forgetting, AUM, EL2N); dedt trains no classifier, so
    difficulty = minus a density score of the embeddings: ``gaussian`` (default: low density =
    hard), ``ppca``, or ``knn`` (the k-th neighbour distance). CCS then (1) drops the ``hard_frac``
    hardest samples (its beta; default 0), (2) cuts the difficulty range into ``strata`` equal-width
    bins (CCS's k = 50), and (3) for a budget m visits the non-empty bins from smallest to largest,
    giving each min(size, floor(m_left / bins_left)) samples drawn at random.

    Mapping the sampler to one ranking: each bin's random draw is fixed as one seeded permutation
    of it (a draw of a items is its first a), and a bin's allocation never decreases as m grows
    while the total is exactly m, so going from m to m + 1 adds exactly one sample. A sample's
    position is the budget at which it is first drawn, and top-m of this ranking is CCS's sample
    for budget m, for every m. Dropped hard samples come last, least hard first.
    """
    if difficulty not in _DIFFICULTY:
        raise DedtError(f"ccs: unknown difficulty {difficulty!r}; choose one of {', '.join(_DIFFICULTY)}")
    if isinstance(strata, bool) or not isinstance(strata, numbers.Integral) or strata < 1:
        raise DedtError(f"ccs: strata must be a positive integer; got {strata!r}")
    if not 0.0 <= hard_frac < 1.0:
        raise DedtError(f"ccs: hard_frac must be in [0, 1); got {hard_frac!r}")
    params = dict(difficulty_params or {})
    _check_params(difficulty, _DIFFICULTY[difficulty], params)
    hardness = -_DIFFICULTY[difficulty](x, **params)
    return 1.0 - ccs_positions(hardness, rng, strata=int(strata), hard_frac=hard_frac) / len(x)


def ccs_positions(hardness: np.ndarray, rng: np.random.Generator, *, strata: int, hard_frac: float) -> np.ndarray:
    """Position (0 = first) of each sample in CCS's budget order; see ``ccs``. O(strata * n) time."""
    n = len(hardness)
    hardest_first = np.argsort(-hardness, kind="stable")
    n_hard = math.floor(hard_frac * n)
    pool = np.sort(hardest_first[n_hard:])
    h = hardness[pool]
    edges = np.linspace(h.min(), h.max(), strata + 1)
    bin_of = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, strata - 1)  # last bin closed, as CCS
    bins = [pool[bin_of == b] for b in range(strata) if (bin_of == b).any()]
    position = np.empty(n, dtype=np.int64)
    budgets = np.arange(1, len(pool) + 1)
    left = budgets.copy()  # budget not yet allocated, for every budget m at once
    for visited, b in enumerate(np.argsort([len(members) for members in bins], kind="stable")):
        members = rng.permutation(bins[b])
        alloc = np.minimum(len(members), left // (len(bins) - visited))  # non-decreasing in m
        left -= alloc
        # the j-th member (1-based) is drawn from the smallest budget whose allocation reaches j
        position[members] = np.searchsorted(alloc, np.arange(1, len(members) + 1), side="left")
    position[hardest_first[:n_hard][::-1]] = np.arange(len(pool), n)
    return position


# -- scorers over the whole set ----------------------------------------------------------------


def moderate(x: np.ndarray, groups: list[Group], seeds: np.random.SeedSequence) -> np.ndarray:
    """Moderate-DS (Xia et al., ICLR 2023): keep the samples at a moderate distance from their class centre.

    d_i = |z_i - m_c|, m_c the coordinate-wise median of sample i's group; all N distances are
    ranked globally (ascending, ties by sample index) and score = -|rank - (N-1)/2|, so a global
    top-r selection is a contiguous band of ranks centred on the median distance. The ranking is
    always global: ``per_class`` only chooses per-class medians (True) or one median of all
    samples (False). With per-class *selection* each class keeps its rows ranked nearest the
    global middle; select globally (select.per_class=false) for Moderate-DS proper.
    """
    dist = np.empty(len(x))
    for _, rows in groups:
        centre = np.median(x[rows], axis=0).astype(np.float64)
        dist[rows] = np.sqrt(np.concatenate([_sq_norms(c - centre) for c in _chunks(x[rows])]))
    rank = np.empty(len(x))
    rank[np.argsort(dist, kind="stable")] = np.arange(len(x))
    return -np.abs(rank - (len(x) - 1) / 2.0)


def random_uniform(x: np.ndarray, groups: list[Group], seeds: np.random.SeedSequence) -> np.ndarray:
    """Seeded uniform baseline: i.i.d. U[0, 1) per sample, so any top-r within any group is a uniform subset."""
    return np.random.default_rng(seeds).random(len(x))


# -- plumbing ----------------------------------------------------------------------------------


def _per_group(fn: Scorer, *, needs: Callable[[int, Mapping[str, Any]], str | None] | None = None) -> Scorer:
    """Lift a one-group scorer ``fn(x, [rng], **params)`` to ``(x, groups, seeds, **params)``.

    Group sizes are checked for every group before any work starts; each group gets its own child
    seed (so a class's scores do not depend on the other classes); errors name the group.
    """
    wants_rng = "rng" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def scorer(x: np.ndarray, groups: list[Group], seeds: np.random.SeedSequence, **params: Any) -> np.ndarray:
        for label, rows in groups:
            problem = needs(len(rows), params) if needs else None
            if problem:
                raise DedtError(f"{_group_name(label)} {problem}")
        out = np.empty(len(x))
        for (label, rows), child in zip(groups, seeds.spawn(len(groups)), strict=True):
            extra = {"rng": np.random.default_rng(child)} if wants_rng else {}
            try:
                out[rows] = fn(x[rows], **extra, **params)
            except DedtError as err:
                raise DedtError(f"{_group_name(label)}: {err}") from None
        return out

    return scorer


def _group_name(label: int | None) -> str:
    """How errors name a group."""
    return "all samples" if label is None else f"class {label}"


def _lookup(method: str) -> Scorer:
    """The registered scorer, or an error listing the known names."""
    if method in MODEL_SCORERS:
        raise DedtError(
            f"scorer {method!r} scores images with the reference diffusion model, not embeddings: call "
            "dedt.difficulty.difficulty_scores (the pipeline's score stage does)"
        )
    if method not in SCORERS:
        raise DedtError(f"unknown scorer {method!r}; choose one of {', '.join(SCORERS)}")
    return SCORERS[method]


def _check_params(method: str, scorer: Scorer, params: Mapping[str, Any]) -> None:
    """Reject parameters the method does not take, before any work."""
    known = [
        name
        for name, p in inspect.signature(scorer).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "rng"
    ]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise DedtError(
            f"scorer {method!r} takes no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters: {', '.join(known) or 'none'}"
        )


def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """A non-empty, real, finite (N, d) array; float64 is kept, other types become float32."""
    a = np.asarray(embeddings)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DedtError(f"embeddings must be a non-empty 2-D array (samples, dims); got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DedtError(f"embeddings must be real numbers; got dtype {a.dtype}")
    if a.dtype != np.float64:
        a = a.astype(np.float32)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise DedtError(
            f"embeddings row {int(np.flatnonzero(bad)[0])} holds NaN or inf ({int(bad.sum())} bad rows); "
            "re-encode those images or drop them from the dataset"
        )
    return a


def _chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """Row chunks of ~64 MB as float64."""
    rows = max(1, CHUNK_ELEMENTS // x.shape[1])
    for start in range(0, len(x), rows):
        yield x[start : start + rows].astype(np.float64)


def _sq_norms(a: np.ndarray) -> np.ndarray:
    """Squared Euclidean norm of each row."""
    return np.einsum("ij,ij->i", a, a)


def _moments(x: np.ndarray, *, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (divided by n - ddof) in float64, two passes over row chunks."""
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for c in _chunks(x):
        c -= mean
        cov += c.T @ c
    return mean, cov / (len(x) - ddof)


def _principal_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean, the min(n, d) eigenvalues (descending, ddof=1), their unit axes (rows), total variance.

    n >= d: eigen-decompose the d x d covariance (chunked, like sklearn's covariance_eigh solver);
    n < d: SVD of the n x d centred rows, which is then the smaller matrix.
    """
    n, d = x.shape
    if n >= d:
        mean, cov = _moments(x, ddof=1)
        values, vectors = np.linalg.eigh(cov)
        return mean, np.maximum(values[::-1], 0.0), vectors[:, ::-1].T, float(np.trace(cov))
    mean = x.mean(axis=0, dtype=np.float64)
    _, singular, axes = np.linalg.svd(x.astype(np.float64) - mean, full_matrices=False)
    variances = singular**2 / (n - 1)
    return mean, variances, axes, float(variances.sum())


def _ppca_mahalanobis(centred: np.ndarray, axes: np.ndarray, lam: np.ndarray, noise: float) -> np.ndarray:
    """(x-mu)^T C^-1 (x-mu) for C = sum_j lam_j a_j a_j^T + noise (I - sum_j a_j a_j^T)."""
    proj = centred @ axes.T
    residual = centred - proj @ axes  # explicit residual: no |x|^2 - |p|^2 cancellation
    return (proj**2 / lam).sum(axis=1) + _sq_norms(residual) / noise


_DIFFICULTY: dict[str, Callable[..., np.ndarray]] = {"gaussian": gaussian, "ppca": ppca, "knn": knn_score}

SCORERS: dict[str, Scorer] = {
    "gaussian": _per_group(gaussian),
    "ppca": _per_group(ppca),
    "knn": _per_group(knn_score, needs=_knn_needs),
    "moderate": moderate,
    "random": random_uniform,
    "kcenter": _per_group(kcenter),
    "ccs": _per_group(ccs),
}

# Scorers of images by the full-data diffusion model (dedt.difficulty); higher = keep first as well.
MODEL_SCORERS = ("difficulty",)
METHODS = (*SCORERS, *MODEL_SCORERS)  # every score.method
