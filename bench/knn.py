"""kNN benchmark: dedt's exact search vs FAISS's flat index, numpy and scikit-learn; IVF and HNSW.

    python bench/knn.py [--sizes 10000,100000] [--dim 512] [--k 5] [--million]

Prints one Markdown table. Every method searches all N rows against themselves for k neighbours,
self excluded. Rows:
- dedt.knn exact: numpy-BLAS GEMM blocks + FAISS heaps (dedt's CPU exact path; the reference);
- FAISS IndexFlatL2.search: the same algorithm on the faiss-cpu wheel's bundled OpenBLAS;
- numpy GEMM + argpartition and sklearn NearestNeighbors(algorithm="brute"): plain baselines;
- IVF and HNSW through dedt.knn (index build and training included in the time): dedt's IVF
  (k-means lists, one GEMM per list, FAISS heaps) and FAISS's IndexHNSWFlat.
"GFLOP/s" counts the 2 N^2 d flops of the distance GEMM (for approximate indexes an *equivalent*
rate: how fast they deliver the same answer). "of GEMM" divides by the machine's float32 GEMM rate
measured at the start of the same run (numpy, best of 5, the larger of a 2048^3 product and the
2048 x 512 x 8192 block product that exact search runs). Recall@k is against dedt's exact result;
speed-up is dedt-exact seconds / the row's seconds. With --million, 1M x d is scored with IVF only,
and recall is measured on 1,000 random queries against exact search for just those queries.

Data: synthetic "embedding-like" float32 rows: 100 Gaussian clusters, each spread on its own
16-dimensional subspace, plus isotropic noise. Real embeddings have this kind of low intrinsic
dimension; uniform noise in 512-d has no neighbour structure, and no index beats brute force there.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedt.knn import ivf_nlist, knn  # noqa: E402

Result = tuple[np.ndarray, np.ndarray]
METHODS = ("faiss-flat", "numpy", "sklearn", "ivf", "hnsw")


def main(argv: list[str] | None = None) -> None:
    """Parse options, measure, print the table."""
    args = _parse(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    gemm = gemm_rate()
    print(
        f"<!-- {platform.processor() or platform.machine()}, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} OpenMP threads, numpy float32 GEMM {gemm:.1f} GFLOP/s -->"
    )
    print(
        f"Synthetic clustered data, d = {args.dim}, k = {args.k}, self excluded; "
        f"machine float32 GEMM rate {gemm:.1f} GFLOP/s (numpy, best of 2048^3 and 2048x512x8192, same run).\n"
    )
    print("| N | method | seconds | GFLOP/s | of GEMM | recall@k | speed-up vs dedt exact |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in sizes:
        _bench_size(n, args, gemm)
    if args.million:
        _bench_million(args, gemm)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="comma-separated row counts (default 10000,100000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--k", type=int, default=5, help="neighbours per row (default 5)")
    p.add_argument("--nprobe", type=int, default=8, help="IVF lists visited per query (default 8, as dedt.knn)")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth (default 128)")
    p.add_argument("--million", action="store_true", help="also score 1,000,000 rows with IVF")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comparisons beside dedt exact, which always runs (default {','.join(METHODS)})",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown --methods {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    return args


def gemm_rate(repeats: int = 5) -> float:
    """The machine's float32 GEMM rate in GFLOP/s: numpy matmul, best of ``repeats`` over two shapes."""
    rng = np.random.default_rng(0)
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (2048, 512, 8192)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        a @ b  # warm-up: thread pool start, page faults
        best = max(best, 2.0 * m * k * n / min(_seconds(lambda a=a, b=b: a @ b) for _ in range(repeats)) / 1e9)
    return best


def embedding_like(n: int, d: int, seed: int, clusters: int = 100, intrinsic: int = 16) -> np.ndarray:
    """n x d float32: clusters on random low-dimensional subspaces plus noise (see module docstring)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    which = rng.integers(0, clusters, n)
    for c in range(clusters):
        rows = np.flatnonzero(which == c)
        centre = rng.normal(scale=2.0, size=d)
        basis = rng.normal(size=(intrinsic, d)) / np.sqrt(intrinsic)
        out[rows] = centre + rng.normal(size=(len(rows), intrinsic)) @ basis + 0.1 * rng.normal(size=(len(rows), d))
    return out


def faiss_flat(x: np.ndarray, k: int) -> Result:
    """FAISS's own exact search: IndexFlatL2, self dropped from k+1."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    dist, idx = index.search(x, k + 1)
    return _drop_own(np.sqrt(np.maximum(dist, 0.0)), idx, np.arange(len(x)), k)


def numpy_topk(x: np.ndarray, k: int, block: int = 2048) -> Result:
    """Baseline: squared distances by one GEMM per query block, argpartition, then sort the k+1."""
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.empty((len(x), k), dtype=np.float32)
    idx = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), block):
        rows = np.arange(start, min(start + block, len(x)))
        d2 = sq[rows, None] - 2.0 * (x[rows] @ x.T) + sq[None, :]
        d2[np.arange(len(rows)), rows] = np.inf  # self excluded
        part = np.argpartition(d2, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d2, part, axis=1), axis=1)
        idx[rows] = np.take_along_axis(part, order, axis=1)
        dist[rows] = np.sqrt(np.maximum(np.take_along_axis(d2, idx[rows], axis=1), 0.0))
    return dist, idx


def sklearn_brute(x: np.ndarray, k: int) -> Result:
    """Baseline: scikit-learn's brute-force NearestNeighbors, self dropped from k+1."""
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x)
    return _drop_own(dist, idx, np.arange(len(x)), k)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact k neighbours that were found."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist(), strict=True)]))


def _bench_size(n: int, args: argparse.Namespace, gemm: float) -> None:
    """All methods at one N; rows are printed as soon as they are measured."""
    x = embedding_like(n, args.dim, args.seed)
    flops = 2.0 * n * n * args.dim
    t_exact, (_, exact) = _timed(lambda: knn(x, args.k, index="exact", device="cpu"))
    _row(n, "dedt.knn exact (numpy GEMM blocks + FAISS heaps)", t_exact, flops, gemm, None, None)
    methods: dict[str, tuple[str, Callable[[], Result]]] = {
        "faiss-flat": ("FAISS IndexFlatL2.search (bundled OpenBLAS)", lambda: faiss_flat(x, args.k)),
        "numpy": ("numpy GEMM + argpartition", lambda: numpy_topk(x, args.k)),
        "sklearn": ("sklearn NearestNeighbors(brute)", lambda: sklearn_brute(x, args.k)),
        "ivf": (
            f"dedt IVF ({_describe('ivf', n, args)})",
            lambda: knn(x, args.k, index="ivf", device="cpu", nprobe=args.nprobe),
        ),
        "hnsw": (
            f"FAISS HNSW ({_describe('hnsw', n, args)})",
            lambda: knn(x, args.k, index="hnsw", device="cpu", ef_search=args.ef_search),
        ),
    }
    for key in args.methods.split(","):
        name, fn = methods[key]
        t, (_, idx) = _timed(fn)
        _row(n, name, t, flops, gemm, recall(idx, exact), t_exact / t)


def _bench_million(args: argparse.Namespace, gemm: float) -> None:
    """1M rows with IVF; recall on a sample of queries against exact search for just those."""
    n = 1_000_000
    x = embedding_like(n, args.dim, args.seed)
    t, (_, idx) = _timed(lambda: knn(x, args.k, index="ivf", device="cpu", nprobe=args.nprobe))
    sample = np.random.default_rng(args.seed).choice(n, 1000, replace=False)
    exact_d, exact_i = knn(x, args.k + 1, queries=x[sample], device="cpu")
    _, exact = _drop_own(exact_d, exact_i, sample, args.k)
    _row(
        n,
        f"dedt IVF ({_describe('ivf', n, args)}); recall on 1,000 queries",
        t,
        2.0 * n * n * args.dim,
        gemm,
        recall(idx[sample], exact),
        None,
    )


def _describe(index: str, n: int, args: argparse.Namespace) -> str:
    """Index parameters as dedt.knn chooses them."""
    if index == "ivf":
        return f"nlist {ivf_nlist(n)}, nprobe {args.nprobe}"
    return f"M 32, efSearch {args.ef_search}"


def _drop_own(dist: np.ndarray, idx: np.ndarray, own: np.ndarray, k: int) -> Result:
    """Remove each query's own row from k+1 results (else the last), keeping k."""
    keep = idx != own[:, None]
    keep[keep.all(axis=1), -1] = False
    return dist[keep].reshape(-1, k), idx[keep].reshape(-1, k)


def _timed(fn: Callable[[], Result]) -> tuple[float, Result]:
    """Wall-clock seconds and the result of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _row(
    n: int, name: str, seconds: float, flops: float, gemm: float, rec: float | None, speedup: float | None
) -> None:
    """Print one table row."""
    rate = flops / seconds / 1e9
    print(
        f"| {n:,} | {name} | {seconds:.2f} | {rate:.1f} | {rate / gemm:.0%} | "
        f"{'' if rec is None else f'{rec:.3f}'} | {'' if speedup is None else f'{speedup:.2f}x'} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
