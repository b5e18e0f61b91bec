"""Fréchet distance: closed forms, agreement with clean-fid, singular covariances vs a 40-digit reference."""

import contextlib
import io

import mpmath
import numpy as np
import pytest
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from hypothesis import given, settings
from hypothesis import strategies as st

from dedt.errors import DedtError
from dedt.metrics import fid_from_features, frechet_distance, gaussian_stats
from dedt.metrics import frechet as frechet_module


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def _cleanfid(mu1, s1, mu2, s2) -> float:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints when it adds its eps offset
        return float(cleanfid_frechet_distance(mu1, s1, mu2, s2))


def _reference_fd(mu1, s1, mu2, s2, dps: int = 40) -> float:
    """FD of the PSD projections of s1, s2 in `dps`-digit arithmetic (mpmath), from the float64 inputs."""
    mpmath.mp.dps = dps

    def factor(s: np.ndarray) -> mpmath.matrix:
        w, v = mpmath.eigsy(mpmath.matrix(s.tolist()))
        return v * mpmath.diag([mpmath.sqrt(max(w[i], 0)) for i in range(s.shape[0])])

    m = factor(s1).T * factor(s2)
    trace_sqrt = mpmath.fsum(mpmath.sqrt(max(e, 0)) for e in mpmath.eigsy(m.T * m, eigvals_only=True))
    diff = mpmath.matrix((mu1 - mu2).tolist())
    trace = mpmath.fsum(mpmath.mpf(s1[i, i]) + mpmath.mpf(s2[i, i]) for i in range(s1.shape[0]))
    return float(mpmath.fsum(x * x for x in diff) + trace - 2 * trace_sqrt)


def test_identical_gaussians_give_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(32), _random_spd(32, rng)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-10 * np.trace(s))


def test_shifted_means_give_squared_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, s = rng.standard_normal(16), rng.standard_normal(16), _random_spd(16, rng)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3)), min_size=1, max_size=12), st.integers(0, 99))
def test_diagonal_and_commuting_covariances(pairs, seed):
    a, b = (np.array(x) for x in zip(*pairs, strict=True))
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    zero = np.zeros(len(a))
    assert frechet_distance(zero, np.diag(a), zero, np.diag(b)) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # A common rotation keeps the value: Q diag(a) Q^T and Q diag(b) Q^T commute but are not diagonal.
    q = _rotation(len(a), np.random.default_rng(seed))
    rotated = frechet_distance(zero, q @ np.diag(a) @ q.T, zero, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7, abs=1e-7 * float(np.max(a) + np.max(b)))


@pytest.mark.parametrize(("d", "seed"), [(2, 0), (8, 1), (64, 2), (256, 3)])
def test_agrees_with_cleanfid_on_well_conditioned_inputs(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), 0.1 * rng.standard_normal(d)
    s1, s2 = _random_spd(d, rng), 2.0 * _random_spd(d, rng)
    ours, theirs = frechet_distance(mu1, s1, mu2, s2), _cleanfid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize(("d", "n1", "n2"), [(20, 5, 7), (20, 21, 4), (16, 3, 3)])
def test_rank_deficient_covariances_match_high_precision(d, n1, n2):
    # n <= d samples: singular covariances (Cholesky fails; scipy's sqrtm path needs an eps offset).
    rng = np.random.default_rng(d + n1 + n2)
    x = rng.standard_normal((n1, d)) * np.linspace(3.0, 0.01, d)
    y = rng.standard_normal((n2, d)) * np.linspace(0.1, 2.0, d) + 0.3
    stats = (*gaussian_stats(x), *gaussian_stats(y))
    ours = frechet_distance(*stats)
    assert np.isfinite(ours)
    assert ours == pytest.approx(_reference_fd(*stats), rel=1e-6)


def test_near_singular_spectrum_matches_high_precision():
    # Eigenvalues spanning 1 .. 1e-14 and exact zeros, different eigenbases: the ill-conditioned case.
    rng = np.random.default_rng(7)
    d = 18
    w1 = np.concatenate([np.logspace(0, -14, d - 4), np.zeros(4)])
    w2 = np.concatenate([np.zeros(3), np.logspace(-14, 1, d - 3)])
    q1, q2 = _rotation(d, rng), _rotation(d, rng)
    s1, s2 = ((q * w) @ q.T for q, w in ((q1, w1), (q2, w2)))
    mu = np.zeros(d)
    ours = frechet_distance(mu, s1, mu, s2)
    assert ours == pytest.approx(_reference_fd(mu, s1, mu, s2), rel=1e-6)


def test_zero_covariance():
    # Identical samples: sigma = 0, so FD = ||dmu||^2 + tr(sigma2).
    rng = np.random.default_rng(5)
    mu1, sigma1 = gaussian_stats(np.ones((3, 6)))
    mu2, sigma2 = rng.standard_normal(6), _random_spd(6, rng)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma2))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-12)


def test_gaussian_stats_match_numpy_and_chunking(monkeypatch):
    x = np.random.default_rng(3).standard_normal((50, 6)).astype(np.float32)
    monkeypatch.setattr(frechet_module, "STATS_CHUNK_ROWS", 7)
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid_from_features_is_fd_of_stats():
    rng = np.random.default_rng(4)
    f1, f2 = rng.standard_normal((40, 5)), rng.standard_normal((30, 5)) + 1
    assert fid_from_features(f1, f2) == pytest.approx(_cleanfid(*gaussian_stats(f1), *gaussian_stats(f2)), rel=1e-6)


def test_too_few_samples_states_the_minimum():
    with pytest.raises(DedtError, match="at least 2"):
        gaussian_stats(np.ones((1, 8)))
    with pytest.raises(DedtError, match="at least 2"):
        fid_from_features(np.ones((1, 8)), np.ones((5, 8)))


def test_mismatched_dimensions_and_bad_inputs():
    with pytest.raises(DedtError, match="dimensions differ"):
        fid_from_features(np.ones((4, 8)), np.ones((4, 9)))
    with pytest.raises(DedtError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(DedtError, match=r"\(d, d\)"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(DedtError, match="NaN"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(DedtError, match="negative variances"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
