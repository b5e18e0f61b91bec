"""Fréchet distance between Gaussians, fast and stable, in pure numpy/scipy.

FD(N(mu1, S1), N(mu2, S2)) = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)
(Dowson & Landau 1982; FID is this in Inception-v3 pool features, Heusel et al. 2017).

The usual implementation (clean-fid, pytorch-fid, torch-fidelity) forms the non-symmetric product
S1 S2 and calls ``scipy.linalg.sqrtm`` (a complex Schur decomposition): ~10-20 s at d = 2048 on
two cores, and on singular covariances (n < d samples) it returns non-finite or complex values
that need an ad-hoc diagonal offset. Only the trace of the square root is needed, and that is a
sum of singular values:

    S1 = F1 F1^T, S2 = F2 F2^T  =>  S1 S2 has the nonzero eigenvalues of F1^T S2 F1 = M M^T with
    M = F1^T F2, i.e. the squared singular values of M, so
    tr sqrt(S1 S2) = sum_i sigma_i(M) = sum_i sqrt(lambda_i(M^T M)).

Everything is real and symmetric. Each covariance is factored by LAPACK's pivoted Cholesky
(``?pstrf``; Lucas 2004, LAPACK Working Note 161), which also handles the semidefinite case: it stops at the numerical rank
r (pivots below d * eps * max diag), so S = F F^T with F of shape (d, r), and singular or
rounding-indefinite covariances (n <= d samples) need no offset and make the problem smaller:
M = F1^T F2 is (r1, r2) and the eigenvalue solve runs on min(r1, r2). The eigenvalue error is
~eps ||M||^2 absolute, so a zero singular value comes back as at most ~sqrt(eps) ||M||, the same
order as the problem's own sensitivity to rounding in S (tr sqrt is not Lipschitz at singular
matrices); tests/test_frechet.py checks this against a 40-digit mpmath reference.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from dedt.errors import DedtError

MIN_SAMPLES = 2  # the unbiased covariance divides by n - 1
STATS_CHUNK_ROWS = 8192  # rows per float64 block in gaussian_stats: bounds the temporary copy


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: (d,) means.
        sigma1, sigma2: (d, d) covariances (symmetric PSD; only symmetry up to rounding is assumed:
            the symmetric part is used).

    Returns:
        The squared 2-Wasserstein distance between the Gaussians, in squared feature units, >= 0.
        Computed in float64.
    """
    mu1, s1 = _check_gaussian(mu1, sigma1, "1")
    mu2, s2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise DedtError(
            f"frechet_distance: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); "
            "compute both statistics in the same feature space"
        )
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    # The exact value is a squared distance; a negative result is rounding of equal Gaussians.
    return max(value, 0.0)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) for symmetric PSD (d, d) float64 matrices, via the nuclear norm of F1^T F2."""
    m = _psd_factor(sigma1).T @ _psd_factor(sigma2)
    if m.size == 0:  # a zero covariance: S1 S2 = 0
        return 0.0
    # The smaller Gram matrix of m has the same nonzero eigenvalues; numpy uses syrk for a.T @ a.
    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    eigenvalues = scipy.linalg.eigh(gram, eigvals_only=True, check_finite=False, driver="evd")
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of feature rows, as clean-fid's ``np.mean``/``np.cov`` give them.

    Args:
        features: (n, d) array, n >= 2 (the covariance has rank <= n - 1; FD is still defined for
            n <= d, but an accurate FID wants n in the thousands).

    Returns:
        mu float64 (d,), sigma float64 (d, d).
    """
    x = np.asarray(features)
    if x.ndim != 2:
        raise DedtError(f"gaussian_stats: features must be a 2-D (n, d) array, got shape {x.shape}")
    n, d = x.shape
    if n < MIN_SAMPLES:
        raise DedtError(
            f"gaussian_stats: {n} sample(s) of dimension {d}; a covariance needs at least {MIN_SAMPLES} "
            "(and FID wants thousands): pass more samples"
        )
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise DedtError(f"gaussian_stats: features must be real numbers, got dtype {x.dtype}")
    mu = x.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((d, d), dtype=np.float64)
    # Centre and accumulate in float64 blocks: never a full float64 copy of a (50k, 2048) array.
    for start in range(0, n, STATS_CHUNK_ROWS):
        block = x[start : start + STATS_CHUNK_ROWS].astype(np.float64) - mu
        sigma += block.T @ block
    sigma /= n - 1
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DedtError("gaussian_stats: features contain NaN or inf; check the encoder's input images")
    return mu, sigma


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (n_i, d) feature sets (FID for Inception pool features)."""
    f1, f2 = np.asarray(features1), np.asarray(features2)
    if f1.ndim == 2 and f2.ndim == 2 and f1.shape[1] != f2.shape[1]:
        raise DedtError(
            f"fid_from_features: feature dimensions differ ({f1.shape[1]} vs {f2.shape[1]}); "
            "extract both sets with the same encoder"
        )
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """A (d, r) F with F F^T = sigma up to rounding, r the numerical rank (pivoted Cholesky)."""
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma, lower=1)
    if info < 0:
        raise RuntimeError(f"LAPACK dpstrf: illegal argument {-info}")
    # dpstrf gives P^T sigma P = L L^T with piv the 1-based rows of P; only L's first `rank` columns
    # are computed (the rest of c holds the unfactored trailing block), so F = P L[:, :rank].
    factor = np.empty((sigma.shape[0], rank))
    factor[piv - 1] = np.tril(c[:, :rank])
    return factor


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (mean, covariance) pair; return float64 copies with sigma symmetrised."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DedtError(
            f"frechet_distance: mu{which} must be (d,) and sigma{which} (d, d), got {mu.shape} and {sigma.shape}; "
            "use dedt.metrics.gaussian_stats(features) to compute them"
        )
    if mu.shape[0] == 0:
        raise DedtError(f"frechet_distance: mu{which} is empty; features need at least one dimension")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DedtError(f"frechet_distance: mu{which} or sigma{which} contains NaN or inf")
    if (np.diagonal(sigma) < 0).any():
        raise DedtError(f"frechet_distance: sigma{which} has negative variances on its diagonal; pass a covariance")
    return mu, (sigma + sigma.T) / 2.0
