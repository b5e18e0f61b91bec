"""Sample-set metrics beyond FID: precision/recall/density/coverage, KID, a memorization check.

All take feature arrays (n, d) (Inception, CLIP, DINOv2 or the dataset classifier's features) and
return plain floats. Nearest-neighbour radii come from ``dedt.knn`` (exact search); the real x fake
comparisons run in float64 blocks of fake rows, so memory stays bounded at 50k x 50k.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dedt.errors import DedtError

DEFAULT_K = 5  # Naeem et al. 2020 recommend k = 5 for 10k samples
KID_SUBSETS = 100  # torch-fidelity / clean-fid defaults
KID_SUBSET_SIZE = 1000
BLOCK_BYTES = 1 << 28  # float64 (n_real, block) distance block: 256 MiB
NN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def prdc(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., ICML 2020; clovaai/generative-evaluation-prdc).

    With r_i the distance from real_i to its k-th nearest other real and s_j likewise for fakes:
      precision = frac of fakes inside some real ball:      mean_j [exists i: |f_j - x_i| < r_i]
      recall    = frac of reals inside some fake ball:      mean_i [exists j: |x_i - f_j| < s_j]
                  (Kynkäänniemi et al. 2019, as in the reference code)
      density   = mean_j #{i: |f_j - x_i| < r_i} / k         (can exceed 1)
      coverage  = frac of reals whose ball holds some fake:  mean_i [min_j |x_i - f_j| < r_i]

    Args:
        real: (n_real, d) features, n_real > k.
        fake: (n_fake, d) features, n_fake > k.
        k: neighbours defining the ball radii.

    Returns:
        {"precision", "recall", "density", "coverage"}: floats; all but density in [0, 1].
    """
    real, fake = _check_pair(real, fake, "prdc")
    if k < 1:
        raise DedtError(f"prdc: k must be >= 1, got {k}")
    for name, x in (("real", real), ("fake", fake)):
        if len(x) <= k:
            raise DedtError(f"prdc: {len(x)} {name} samples; the k-th neighbour radius needs at least k + 1 = {k + 1}")
    real_radii = _kth_neighbour_distance(real, k)
    fake_radii = _kth_neighbour_distance(fake, k)
    in_real_balls = np.zeros(len(fake), dtype=np.int64)  # per fake: how many real balls contain it
    real_recalled = np.zeros(len(real), dtype=bool)
    real_nearest_fake = np.full(len(real), np.inf)
    for start, dist in _distance_blocks(real, fake):  # dist: (n_real, block) Euclidean
        stop = start + dist.shape[1]
        in_real_balls[start:stop] = (dist < real_radii[:, None]).sum(axis=0)
        real_recalled |= (dist < fake_radii[None, start:stop]).any(axis=1)
        np.minimum(real_nearest_fake, dist.min(axis=1), out=real_nearest_fake)
    return {
        "precision": float((in_real_balls > 0).mean()),
        "recall": float(real_recalled.mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float((real_nearest_fake < real_radii).mean()),
    }


def kid(
    real: np.ndarray,
    fake: np.ndarray,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., ICLR 2018): unbiased MMD^2, cubic polynomial kernel.

    k(x, y) = (x.y / d + 1)^3. Per subset (m rows of each set drawn without replacement):
    MMD^2 = sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] / (m (m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2,
    the estimator of clean-fid's ``kernel_distance`` and torch-fidelity's ``kid``.

    Args:
        real, fake: (n, d) features.
        subsets: number of random subsets.
        subset_size: m; reduced to min(n_real, n_fake) when larger (clean-fid's rule), m >= 2.
        seed: seed of the subset draws.

    Returns:
        (mean, std) over subsets of MMD^2, in squared feature units (std with ddof=0, as torch-fidelity).
    """
    real, fake = _check_pair(real, fake, "kid")
    if subsets < 1:
        raise DedtError(f"kid: subsets must be >= 1, got {subsets}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise DedtError(f"kid: subsets of {m} sample(s); the unbiased estimator needs at least 2 per set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        values[s] = within / (m * (m - 1)) - 2.0 * kxy.sum() / m**2
    return float(values.mean()), float(values.std())


def nn_distance_stats(fake: np.ndarray, train: np.ndarray, heldout: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """Memorization check: nearest-neighbour distances from generated samples to training vs held-out reals.

    A model that generalises puts its samples no closer to its training images than to unseen real
    images of the same distribution; copies show up as a low train quantile and a train/held-out
    median ratio well below 1 (cf. Carlini et al. 2023, "Extracting training data from diffusion
    models", which flags near-duplicates by NN distance). NN distances shrink as a reference set
    grows, so the larger of train/heldout is subsampled (seeded) to the smaller's size.

    Args:
        fake: (n_fake, d) generated-sample features.
        train: (n_train, d) features of the training subset the model saw.
        heldout: (n_heldout, d) features of real images it did not see.
        seed: seed of the subsampling.

    Returns:
        ``train_q05 ... train_q95`` and ``heldout_q05 ... heldout_q95`` (quantiles of NN distances,
        feature units), ``median_ratio`` (train median / held-out median), ``closer_to_train``
        (fraction of fakes nearer the training set than the held-out set; ~0.5 without memorization),
        and ``n_reference`` (rows per reference set after subsampling).
    """
    fake, train = _check_pair(fake, train, "nn_distance_stats")
    fake, heldout = _check_pair(fake, heldout, "nn_distance_stats")
    n = min(len(train), len(heldout))
    rng = np.random.default_rng(seed)
    train, heldout = (x if len(x) == n else x[np.sort(rng.choice(len(x), n, replace=False))] for x in (train, heldout))
    to_train, to_heldout = (_nearest_distance(ref, fake) for ref in (train, heldout))
    stats: dict[str, float] = {}
    for name, dist in (("train", to_train), ("heldout", to_heldout)):
        for q, value in zip(NN_QUANTILES, np.quantile(dist, NN_QUANTILES), strict=True):
            stats[f"{name}_q{round(q * 100):02d}"] = float(value)
    heldout_median = stats["heldout_q50"]
    stats["median_ratio"] = stats["train_q50"] / heldout_median if heldout_median > 0 else float("nan")
    stats["closer_to_train"] = float((to_train < to_heldout).mean())
    stats["n_reference"] = float(n)
    return stats


def _kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """(n,) float64 distance from each row to its k-th nearest other row (exact search)."""
    from dedt.knn import knn

    distances, _ = knn(x, k, exclude_self=True, index="exact")
    return distances[:, k - 1].astype(np.float64)


def _nearest_distance(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(n_queries,) float64 Euclidean distance from each query to its nearest reference row."""
    from dedt.knn import knn

    distances, _ = knn(reference, 1, queries=queries, exclude_self=False, index="exact")
    return distances[:, 0].astype(np.float64)


def _distance_blocks(real: np.ndarray, fake: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first fake row, (n_real, block) float64 Euclidean distances) over blocks of fake rows."""
    real_sq = np.einsum("ij,ij->i", real, real)
    block = max(1, BLOCK_BYTES // (8 * len(real)))
    for start in range(0, len(fake), block):
        f = fake[start : start + block]
        sq = real_sq[:, None] + np.einsum("ij,ij->i", f, f)[None, :] - 2.0 * (real @ f.T)
        # The expansion can dip below 0 by rounding for (near-)identical rows.
        yield start, np.sqrt(np.maximum(sq, 0.0))


def _check_pair(a: np.ndarray, b: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate two finite 2-D feature arrays of equal width; return float64 copies."""
    out = []
    for x in (a, b):
        x = np.asarray(x)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise DedtError(f"{where}: features must be real 2-D (n, d) arrays, got {x.dtype} of shape {x.shape}")
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise DedtError(f"{where}: features contain NaN or inf; check the encoder's input images")
        out.append(x)
    if out[0].shape[1] != out[1].shape[1]:
        raise DedtError(
            f"{where}: feature dimensions differ ({out[0].shape[1]} vs {out[1].shape[1]}); "
            "extract both sets with the same encoder"
        )
    return out[0], out[1]
