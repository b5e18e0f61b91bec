"""dedt.scoring: sklearn agreement, hand-checked values, direction, determinism, per class, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from dedt.errors import DedtError
from dedt.scoring import SCORERS, ccs_positions, score
from dedt.selection import select

RNG = np.random.default_rng(0)
X = (RNG.normal(size=(240, 6)) @ RNG.normal(size=(6, 6))).astype(np.float64)
Y = RNG.integers(0, 3, 240)


def _sklearn_ppca_m(x: np.ndarray) -> int:
    """PAPER.md's m: leading components whose cumulative explained variance stays below 0.95."""
    ratio = PCA().fit(x).explained_variance_ratio_
    return max(1, int((np.cumsum(ratio) < 0.95).sum()))


def _cluster_with_outliers() -> tuple[np.ndarray, np.ndarray]:
    """95 points in a tight blob at the origin plus 5 far away (rows 95-99), one class."""
    rng = np.random.default_rng(1)
    blob = rng.normal(scale=0.1, size=(95, 3))
    far = rng.normal(scale=0.1, size=(5, 3)) + 5.0 * rng.choice([-1, 1], (5, 3))
    x = np.concatenate([blob, far])
    return x.astype(np.float32), np.zeros(100, dtype=int)


# -- agreement with scikit-learn ---------------------------------------------------------------


def test_gaussian_equals_sklearn_global_and_per_class() -> None:
    def ref(x: np.ndarray) -> np.ndarray:
        return GaussianMixture(1, covariance_type="full", reg_covar=1e-5).fit(x).score_samples(x)

    np.testing.assert_allclose(score("gaussian", X, per_class=False), ref(X), rtol=1e-6)
    per_class = score("gaussian", X, Y)
    for c in range(3):
        np.testing.assert_allclose(per_class[Y == c], ref(X[Y == c]), rtol=1e-6)


@pytest.mark.parametrize("shape", [(300, 8), (25, 40)], ids=["n>d", "n<d"])
def test_ppca_equals_sklearn(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape) * np.geomspace(3.0, 0.1, shape[1])
    m = _sklearn_ppca_m(x)
    assert 1 <= m < min(shape)
    np.testing.assert_allclose(score("ppca", x, per_class=False), PCA(m).fit(x).score_samples(x), rtol=1e-6)


def test_ppca_keeps_components_below_the_threshold() -> None:
    # variances 0.90, 0.06, 0.04 of the total: cumulative 0.90 < 0.95 <= 0.96, so m = 1
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2000, 3))
    q = np.linalg.qr(z - z.mean(axis=0))[0]  # centred orthonormal columns
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    x = (q * np.sqrt(np.array([0.90, 0.06, 0.04]) * 1999)) @ rotation
    assert _sklearn_ppca_m(x) == 1
    np.testing.assert_allclose(score("ppca", x, per_class=False), PCA(1).fit(x).score_samples(x), rtol=1e-6)


# -- hand-checked values -----------------------------------------------------------------------


def test_gaussian_hand_checked() -> None:
    # x = -1, +1: mean 0, ML variance 1, Sigma = 1 + 1e-5
    var = 1.0 + 1e-5
    expected = -0.5 * (1.0 / var + math.log(var) + math.log(2 * math.pi))
    np.testing.assert_allclose(score("gaussian", np.array([[-1.0], [1.0]])), [expected, expected], rtol=1e-12)


def test_knn_hand_checked() -> None:
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_allclose(score("knn", x, k=1), [-1, -1, -2, -3, -4], atol=1e-6)
    np.testing.assert_allclose(score("knn", x, k=2), [-3, -2, -3, -4, -7], atol=1e-6)


def test_knn_matches_brute_force_per_class() -> None:
    s = score("knn", X, Y, k=3)
    for c in range(3):
        xc = X[Y == c]
        d = np.sqrt(((xc[:, None] - xc[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        np.testing.assert_allclose(s[Y == c], -np.sort(d, axis=1)[:, 2], rtol=1e-4)


def test_knn_ivf_probing_every_list_is_exact() -> None:
    # nprobe >= nlist visits every inverted list, so IVF must return the exact answer
    np.testing.assert_allclose(score("knn", X, Y, k=3, index="ivf", nprobe=10_000), score("knn", X, Y, k=3), rtol=1e-5)


def test_moderate_hand_checked() -> None:
    # median 2, distances [2, 1, 0, 1, 8]; ascending ranks (ties by index) [3, 1, 0, 2, 4]; (N-1)/2 = 2
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    s = score("moderate", x)
    np.testing.assert_array_equal(s, [-1, -1, -2, 0, -2])
    assert select(s, None, 0.2).tolist() == [3]
    assert select(s, None, 0.6).tolist() == [0, 1, 3]  # ranks 1..3: a contiguous band around the median


def test_moderate_ranks_globally_with_class_medians() -> None:
    # class 1 sits far away; per-class medians make its distances small, one global median does not
    x = np.array([[0.0], [1.0], [2.0], [100.0], [101.0], [104.0]])
    y = np.array([0, 0, 0, 1, 1, 1])
    per_class = score("moderate", x, y)
    assert sorted(per_class.tolist()) == sorted((-np.abs(np.arange(6) - 2.5)).tolist())  # one global ranking
    assert not np.array_equal(per_class, score("moderate", x, y, per_class=False))


def test_kcenter_follows_the_greedy_rule() -> None:
    x = RNG.normal(size=(60, 3))
    s = score("kcenter", x, seed=5)
    order = np.argsort(-s, kind="stable")
    assert sorted(s.tolist()) == sorted((1 - np.arange(60) / 60).tolist())
    for step in range(1, 60):
        d = np.sqrt(((x[:, None] - x[None, order[:step]]) ** 2).sum(-1)).min(axis=1)
        d[order[:step]] = -1
        assert d[order[step]] == pytest.approx(d.max(), rel=1e-5)


def test_kcenter_budget_orders_the_rest_by_distance() -> None:
    x = np.array([[0.0], [10.0], [5.0], [1.0], [9.0]])
    full = score("kcenter", x, seed=0)
    partial = score("kcenter", x, seed=0, budget_frac=0.4)  # 2 greedy picks, then farthest-first
    first_two = set(np.argsort(-full)[:2].tolist())
    assert set(np.argsort(-partial)[:2].tolist()) == first_two
    rest = np.argsort(-partial, kind="stable")[2:]
    picks = x[list(first_two)]
    dist = np.abs(x[rest] - picks.T).min(axis=1)
    assert np.all(np.diff(dist) <= 0)


def test_kcenter_identical_rows_still_form_a_ranking() -> None:
    s = score("kcenter", np.ones((7, 2)))
    assert sorted(s.tolist()) == sorted((1 - np.arange(7) / 7).tolist())


# -- CCS: the ranking reproduces the sampler's allocation for every budget ----------------------


def _ccs_allocation(sizes: list[int], budget: int) -> list[int]:
    """CCS Algorithm 1 (Zheng et al. 2023), literally: smallest stratum first, an equal share of what is left."""
    alloc = [0] * len(sizes)
    left, remaining = budget, [b for b in range(len(sizes)) if sizes[b] > 0]
    while remaining:
        b = min(remaining, key=lambda i: (sizes[i], i))
        alloc[b] = min(sizes[b], left // len(remaining))
        left -= alloc[b]
        remaining.remove(b)
    return alloc


@settings(max_examples=40, deadline=None)
@given(hardness=st.lists(st.integers(0, 30), min_size=1, max_size=80), strata=st.integers(1, 8))
def test_ccs_top_m_is_ccs_sample_for_every_budget(hardness: list[int], strata: int) -> None:
    h = np.array(hardness, dtype=float)
    pos = ccs_positions(h, np.random.default_rng(0), strata=strata, hard_frac=0.0)
    assert sorted(pos.tolist()) == list(range(len(h)))
    edges = np.linspace(h.min(), h.max(), strata + 1)
    bin_of = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, strata - 1)
    sizes = np.bincount(bin_of, minlength=strata).tolist()
    for m in range(1, len(h) + 1):
        taken = np.bincount(bin_of[pos < m], minlength=strata).tolist()
        assert taken == _ccs_allocation(sizes, m)


def test_ccs_drops_the_hardest_last() -> None:
    h = np.arange(10.0)  # row 9 hardest
    pos = ccs_positions(h, np.random.default_rng(0), strata=3, hard_frac=0.2)
    assert pos[8] == 8 and pos[9] == 9  # the dropped 20%: least hard of them first


def test_ccs_uses_the_chosen_difficulty() -> None:
    x, y = _cluster_with_outliers()
    for difficulty in ("gaussian", "knn", "ppca"):
        s = score("ccs", x, y, difficulty=difficulty, strata=5)
        assert np.isfinite(s).all()
    # hard_frac removes the outliers (lowest density) to the very end
    s = score("ccs", x, y, hard_frac=0.05)
    assert set(np.argsort(s)[:5].tolist()) == set(range(95, 100))


# -- direction, determinism, per class ---------------------------------------------------------


@pytest.mark.parametrize("method", ["gaussian", "knn", "ppca"])
def test_density_scorers_drop_outliers(method: str) -> None:
    x, y = _cluster_with_outliers()
    kept = select(score(method, x, y), y, 0.95)
    assert set(range(95, 100)).isdisjoint(kept.tolist())


def test_kcenter_keeps_outliers_first() -> None:
    x, y = _cluster_with_outliers()
    kept = select(score("kcenter", x, y), y, 0.1)
    assert len(set(range(95, 100)) & set(kept.tolist())) >= 4  # coverage: far points are picked early


@pytest.mark.parametrize("method", ["random", "kcenter", "ccs"])
def test_seeded_scorers_are_deterministic(method: str) -> None:
    a = score(method, X, Y, seed=3)
    np.testing.assert_array_equal(a, score(method, X, Y, seed=3))
    assert not np.array_equal(a, score(method, X, Y, seed=4))


def test_random_is_uniform_in_unit_interval() -> None:
    s = score("random", np.zeros((5000, 2)))
    assert 0.0 <= s.min() and s.max() < 1.0 and abs(s.mean() - 0.5) < 0.02


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_every_scorer_returns_finite_float64(method: str) -> None:
    s = score(method, X.astype(np.float32), Y)
    assert s.dtype == np.float64 and s.shape == (len(X),) and np.isfinite(s).all()


def test_per_class_differs_from_global_and_no_labels_is_global() -> None:
    assert not np.allclose(score("gaussian", X, Y), score("gaussian", X, Y, per_class=False))
    np.testing.assert_array_equal(score("gaussian", X, None), score("gaussian", X, Y, per_class=False))


def test_gaussian_with_fewer_samples_than_dimensions_is_finite() -> None:
    # 4 samples in 10-d: the ML covariance has rank 3; the 1e-5 ridge keeps Sigma positive definite
    x = np.random.default_rng(4).normal(size=(4, 10))
    s = score("gaussian", x)
    assert np.isfinite(s).all()
    ref = GaussianMixture(1, covariance_type="full", reg_covar=1e-5).fit(x).score_samples(x)
    np.testing.assert_allclose(s, ref, rtol=1e-6)
    assert np.isfinite(score("gaussian", x[:1])).all()  # a single sample: Sigma = 1e-5 I


# -- bad input ---------------------------------------------------------------------------------


def test_knn_class_too_small_names_class_and_fix() -> None:
    y = np.array([0] * 10 + [7] * 4)
    x = np.random.default_rng(5).normal(size=(14, 2))
    with pytest.raises(DedtError, match=r"class 7 has 4 samples.*k\+1 = 6.*lower score.k to at most 3"):
        score("knn", x, y, k=5)
    assert np.isfinite(score("knn", x, y, k=5, per_class=False)).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("nope", X), {}, "unknown scorer 'nope'; choose one of gaussian, ppca, knn"),
        (("gaussian", X), {"k": 3}, "takes no parameter 'k'; its parameters: none"),
        (("knn", X), {"kk": 3}, "its parameters: k, index"),
        (("gaussian", np.array([[0.0, 1.0], [1.0, np.inf], [2.0, 0.0]])), {}, "row 1 holds NaN or inf"),
        (("gaussian", np.zeros(4)), {}, "2-D"),
        (("gaussian", np.array([["a"]])), {}, "real numbers"),
        (("gaussian", X, Y[:10]), {}, "one entry per sample"),
        (("gaussian", X, Y.astype(float)), {}, "integers"),
        (("random", X), {"seed": -1}, "seed"),
        (("ppca", X[:1]), {}, "at least 2 samples"),
        (("ppca", X[:2]), {}, "noise variance is 0"),
        (("ccs", X), {"difficulty": "moderate"}, "unknown difficulty"),
        (("kcenter", X), {"budget_frac": 0.0}, "budget_frac"),
    ],
)
def test_bad_input(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(DedtError, match=match):
        score(*args, **kwargs)
