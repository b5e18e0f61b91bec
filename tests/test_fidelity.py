"""Precision/recall/density/coverage on point clouds with known answers, KID, the memorization check."""

import numpy as np
import pytest
from cleanfid.fid import kernel_distance
from scipy.spatial.distance import cdist

from dedt.errors import DedtError
from dedt.metrics import fidelity
from dedt.metrics.fidelity import kid, nn_distance_stats, prdc


def _reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Transcription of clovaai/generative-evaluation-prdc (prdc.py) on full distance matrices."""
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(real, fake)
    return {
        "precision": float((d < real_radii[:, None]).any(axis=0).mean()),
        "recall": float((d < fake_radii[None, :]).any(axis=1).mean()),
        "density": float((1 / k) * (d < real_radii[:, None]).sum(axis=0).mean()),
        "coverage": float((d.min(axis=1) < real_radii).mean()),
    }


def test_identical_sets_have_full_precision_recall_coverage():
    x = np.random.default_rng(0).standard_normal((200, 16))
    out = prdc(x, x.copy(), k=5)
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0


def test_far_disjoint_sets_score_zero():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((100, 8)), rng.standard_normal((80, 8)) + 100.0
    assert prdc(real, fake, k=3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_hand_computed_line():
    # Reals at 0..9 with k = 1: every real ball has radius 1. Fakes at 0.5 and 100: each other's only
    # neighbour, so both fake balls have radius 99.5 and cover every real.
    real = np.arange(10.0)[:, None]
    fake = np.array([[0.5], [100.0]])
    # precision: 0.5 lies in balls 0 and 1, 100 in none -> 1/2; density: (2 + 0) / 2 / k = 1;
    # coverage: only reals 0 and 1 have a fake within radius 1 -> 2/10; recall: all reals within 99.5 of a fake.
    assert prdc(real, fake, k=1) == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.2}


@pytest.mark.parametrize(("seed", "k", "block_bytes"), [(0, 1, 1 << 28), (1, 3, 1 << 28), (2, 5, 4096)])
def test_matches_reference_implementation(seed, k, block_bytes, monkeypatch):
    monkeypatch.setattr(fidelity, "BLOCK_BYTES", block_bytes)  # 4096: blocks of 2 fake rows
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((250, 10))
    fake = 1.3 * rng.standard_normal((170, 10)) + 0.4
    ours, ref = prdc(real, fake, k=k), _reference_prdc(real, fake, k)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_prdc_errors():
    with pytest.raises(DedtError, match="at least k \\+ 1 = 6"):
        prdc(np.zeros((5, 3)), np.ones((10, 3)), k=5)
    with pytest.raises(DedtError, match="dimensions differ"):
        prdc(np.zeros((10, 3)), np.ones((10, 4)))
    with pytest.raises(DedtError, match="NaN"):
        prdc(np.full((10, 3), np.nan), np.ones((10, 3)))


def test_kid_same_distribution_is_near_zero_and_shift_is_not():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((400, 32)), rng.standard_normal((400, 32))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=200)
    shifted_mean, _ = kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 50 * abs(same_mean) and shifted_mean > 10 * same_std


def test_kid_equals_cleanfid_on_a_full_subset():
    # With the whole set as the one subset, the estimator is deterministic (MMD is permutation invariant).
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((60, 12)), rng.standard_normal((60, 12)) + 0.2
    mean, std = kid(real, fake, subsets=1, subset_size=60)
    assert std == 0.0
    assert mean == pytest.approx(kernel_distance(real, fake, num_subsets=1, max_subset_size=60), rel=1e-9)


def test_kid_errors():
    with pytest.raises(DedtError, match="at least 2"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(DedtError, match="dimensions differ"):
        kid(np.zeros((5, 3)), np.zeros((5, 2)))


def test_memorized_samples_sit_on_the_training_set():
    rng = np.random.default_rng(5)
    train, heldout = rng.standard_normal((300, 16)), rng.standard_normal((500, 16))
    copies = train[rng.choice(300, 100)] + 1e-3 * rng.standard_normal((100, 16))
    fresh = rng.standard_normal((100, 16))
    memorized, honest = nn_distance_stats(copies, train, heldout), nn_distance_stats(fresh, train, heldout)
    assert memorized["n_reference"] == honest["n_reference"] == 300  # heldout subsampled to train's size
    assert memorized["train_q95"] < 0.01 and memorized["closer_to_train"] == 1.0
    assert memorized["median_ratio"] < 0.01
    assert 0.8 < honest["median_ratio"] < 1.25 and 0.3 < honest["closer_to_train"] < 0.7
    assert honest["train_q05"] <= honest["train_q50"] <= honest["train_q95"]


def test_nn_distance_stats_errors():
    with pytest.raises(DedtError, match="dimensions differ"):
        nn_distance_stats(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((4, 2)))
