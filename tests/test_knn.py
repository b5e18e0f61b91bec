"""dedt.knn: exact against brute-force numpy, self exclusion, IP, approximate recall, bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from dedt import knn as knn_module
from dedt.errors import DedtError
from dedt.knn import knn


def _brute_l2(x: np.ndarray, q: np.ndarray, k: int, skip_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference: all pairwise distances in float64, self set to +inf when excluded."""
    d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    if skip_self:
        np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Embedding-like data: 8 clusters on 4-dim subspaces plus a little noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(8, d))
    bases = rng.normal(size=(8, 4, d))
    c = rng.integers(0, 8, n)
    z = rng.normal(size=(n, 4))
    return (centres[c] + np.einsum("nj,njd->nd", z, bases[c]) + 0.05 * rng.normal(size=(n, d))).astype(np.float32)


def test_exact_matches_brute_force() -> None:
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    dist, idx = knn(x, 5, device="cpu")
    ref_d, ref_i = _brute_l2(x, x, 5, skip_self=True)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and dist.shape == (200, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_hand_checked_line() -> None:
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    dist, idx = knn(x, 2, device="cpu")
    np.testing.assert_allclose(dist, [[1, 3], [1, 2], [2, 3], [3, 4], [4, 7]], atol=1e-6)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0], [2, 4], [3, 2]]


def test_queries_are_searched_without_self_exclusion() -> None:
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    dist, idx = knn(x, 3, queries=x[:7], device="cpu")
    assert idx[:, 0].tolist() == list(range(7))
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-3)


def test_duplicates_never_return_self() -> None:
    x = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0]], dtype=np.float32)
    dist, idx = knn(x, 2, device="cpu")
    assert all(i not in row for i, row in enumerate(idx.tolist()))
    np.testing.assert_allclose(dist[:3], 0.0, atol=1e-6)  # the two other copies, at distance 0


def test_inner_product_descending() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    sim, idx = knn(x, 4, metric="ip", exclude_self=False, device="cpu")
    ref = x @ x.T
    np.testing.assert_array_equal(idx, np.argsort(-ref, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(sim, np.take_along_axis(ref, idx, axis=1), rtol=1e-5)
    sim_self, idx_self = knn(x, 4, metric="ip", device="cpu")
    assert all(i not in row for i, row in enumerate(idx_self.tolist()))
    assert np.all(np.diff(sim_self, axis=1) <= 0)


def test_batching_gives_identical_results() -> None:
    x = np.random.default_rng(3).normal(size=(300, 8)).astype(np.float32)
    whole = knn(x, 5, device="cpu")
    batched = knn(x, 5, device="cpu", batch_size=7)
    np.testing.assert_array_equal(whole[1], batched[1])
    np.testing.assert_array_equal(whole[0], batched[0])


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_recall(index: str) -> None:
    x = _clustered(3000, 32)
    _, exact = knn(x, 5, device="cpu")
    _, approx = knn(x, 5, index=index, device="cpu")
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.9


def test_ivf_reports_missing_neighbours() -> None:
    # two far-apart clusters of 32 -> 2 lists; nprobe=1 sees 31 others, asked for 40
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=(32, 4)), 100 + rng.normal(size=(32, 4))]).astype(np.float32)
    dist, idx = knn(x, 40, index="ivf", nprobe=1, device="cpu")
    assert (idx == -1).any()
    assert np.all(np.isinf(dist[idx == -1])) and np.all(np.isfinite(dist[idx >= 0]))


def test_auto_picks_exact_for_small_data() -> None:
    assert knn_module._resolve_index("auto", 1000) == "exact"
    assert knn_module._resolve_index("auto", knn_module.AUTO_EXACT_MAX_ROWS) == "ivf"


def test_faiss_thread_setting_is_restored() -> None:
    before = faiss.omp_get_max_threads()
    knn(np.random.default_rng(5).normal(size=(20, 3)), 2, device="cpu")
    assert faiss.omp_get_max_threads() == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]), "k": 1}, "row 1"),
        ({"x": np.zeros(5), "k": 1}, "2-D"),
        ({"x": np.zeros((5, 2)), "k": 5}, "lower k to at most 4"),
        ({"x": np.zeros((5, 2)), "k": 0}, "positive integer"),
        ({"x": np.zeros((5, 2)), "k": 1, "index": "lsh"}, "unknown index"),
        ({"x": np.zeros((5, 2)), "k": 1, "metric": "cosine"}, "unknown metric"),
        ({"x": np.zeros((5, 2)), "k": 1, "queries": np.zeros((2, 3))}, "columns"),
        ({"x": np.zeros((5, 2)), "k": 1, "device": "tpu"}, "unknown device"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(DedtError, match=match):
        knn(**kwargs)


HAS_GPU = knn_module._faiss_has_gpu() or knn_module._torch_has_cuda()


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_cuda_request_without_gpu_is_an_error() -> None:
    with pytest.raises(DedtError, match="no CUDA GPU"):
        knn(np.zeros((5, 2)), 1, device="cuda")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_path_matches_cpu_path(metric: str) -> None:
    """The torch top-k backend (used on CUDA without faiss-gpu), run on torch's CPU device."""
    pytest.importorskip("torch")
    x = np.random.default_rng(7).normal(size=(300, 16)).astype(np.float32)
    opt = knn_module._Options(metric, 64, 16, 128, 0)  # batch of 64 rows: several blocks
    ref = knn_module._cpu_exact(x, x, 6, opt)
    got = knn_module._torch_topk(x, x, 6, opt, device="cpu")
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_matches_cpu() -> None:
    x = np.random.default_rng(6).normal(size=(2000, 64)).astype(np.float32)
    cpu_d, cpu_i = knn(x, 5, device="cpu")
    gpu_d, gpu_i = knn(x, 5, device="cuda")
    assert (gpu_i == cpu_i).mean() > 0.99
    np.testing.assert_allclose(gpu_d, cpu_d, rtol=1e-3, atol=1e-3)
