"""k-nearest neighbours behind one small interface: exact / IVF / HNSW, CPU or GPU.

Exact search is a blocked GEMM plus a k-selection heap, so it should run near the machine's
float32 GEMM rate. On the CPU, dedt computes the GEMM blocks with numpy's BLAS and keeps the k best
in FAISS's heaps (``float_maxheap_array_t``, OpenMP-parallel), rather than calling
``IndexFlatL2.search``: the faiss-cpu 1.15 wheel bundles OpenBLAS 0.3.15, which on a recent Intel
Xeon (2 pinned cores, AVX-512) ran its flat search at ~37 GFLOP/s against numpy's 221 GFLOP/s GEMM;
this path ran at 138 GFLOP/s there (30k x 512). IVF on the CPU is built the same way (k-means
lists, then one GEMM per list against the queries that probe it; see ``_cpu_ivf``); HNSW is
FAISS's ``IndexHNSWFlat``. Both trade a measured amount of recall for speed when N reaches the
millions (``bench/knn.py`` prints both). Devices, in order of preference under ``device="auto"``:
FAISS GPU indexes (faiss-gpu built with CUDA and a visible GPU; flat and IVF), a torch CUDA
matmul + top-k (exact only; the approximate indexes then run on the CPU), the CPU.

Conventions (DESIGN.md, "Public API"): ``metric="l2"`` returns Euclidean distances, not squared,
ascending; ``metric="ip"`` returns inner products, descending. Indices are int64 rows of ``x``.
An approximate index may find fewer than k candidates for a query: the missing slots hold index
-1 and distance +inf (l2) or -inf (ip).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

from dedt.errors import DedtError

IndexKind = Literal["exact", "ivf", "hnsw", "auto"]
Metric = Literal["l2", "ip"]
Device = Literal["auto", "cpu", "cuda"]

AUTO_EXACT_MAX_ROWS = 200_000  # from this many rows, "auto" switches from exact search to IVF
HNSW_M = 32  # graph degree; FAISS's recommended range is 16-64 for d ~ 100-1000
CPU_QUERY_BATCH = 65_536  # query rows per FAISS index call: bounds the (batch, k) outputs in flight
IVF_QUERY_BATCH = 1 << 20  # CPU IVF: queries per scan pass; each pass reads every list once, and more
# queries per list make each list's GEMM larger (1M x 512: 1<<18 ran the scan at 108 GFLOP/s, 1<<20 faster)
EXACT_BASE_ROWS = 8192  # CPU exact: database rows per GEMM block
EXACT_BLOCK_ELEMENTS = 1 << 24  # ... and query rows to fill 16M floats = a 64 MB score buffer (2048 x 8192)
GPU_SCORE_BYTES = 1 << 30  # torch path: at most 1 GiB for the query block's scores, inputs and top-k
IVF_TRAIN_POINTS_PER_LIST = 32  # k-means sample per list (FAISS samples up to 256): training stays
IVF_TRAIN_ITERATIONS = 10  # well below the search cost (FAISS runs 25); bench/knn.py measures the recall


def knn(
    x: np.ndarray,
    k: int,
    *,
    queries: np.ndarray | None = None,
    exclude_self: bool = True,
    index: IndexKind = "exact",
    metric: Metric = "l2",
    device: Device = "auto",
    batch_size: int | None = None,
    nprobe: int = 8,
    ef_search: int = 128,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the k nearest rows of ``x`` for every query.

    Args:
        x: (N, d) database, converted to contiguous float32.
        k: neighbours per query.
        queries: (Q, d) query rows; None searches ``x`` against itself.
        exclude_self: only when ``queries`` is None: search k+1 and drop each row's own match (the
            entry whose index equals the row; with exact duplicates it may rank anywhere among
            equal distances, and when the index missed it, the last entry is dropped instead).
        index: "exact" (brute force), "ivf" (inverted lists, nlist ~ sqrt(N)), "hnsw" (graph, M=32) or
            "auto" (exact below 200k rows, else IVF).
        metric: "l2" (Euclidean) or "ip" (inner product; cosine if rows are normalised).
        device: "auto", "cpu" or "cuda" ("cuda" without a GPU is an error).
        batch_size: query rows per search call (memory bound); None picks one per device.
        nprobe: IVF lists visited per query (more = higher recall, slower).
        ef_search: HNSW candidate-list size per query (more = higher recall, slower).
        seed: seed of the IVF k-means sample.

    Returns:
        distances (Q, k) float32 and indices (Q, k) int64, nearest first.
    """
    x = _as_matrix(x, "x")
    n, d = x.shape
    q = x if queries is None else _as_matrix(queries, "queries")
    if q.shape[1] != d:
        raise DedtError(f"knn: queries have {q.shape[1]} columns but x has {d}; embed both with the same encoder")
    drop_self = exclude_self and queries is None
    k_search = _check_k(k, n, drop_self)
    if metric not in _METRICS:
        raise DedtError(f"knn: unknown metric {metric!r}; choose one of {', '.join(_METRICS)}")
    kind = _resolve_index(index, n)
    backend = _resolve_device(device, kind)
    options = _Options(metric, batch_size, nprobe, ef_search, seed)
    with _thread_cap():
        dist, idx = _SEARCHERS[backend, kind](x, q, k_search, options)
    if drop_self:
        dist, idx = _drop_self(dist, idx)
    return _finish(dist, idx, metric)


def _as_matrix(a: np.ndarray, name: str) -> np.ndarray:
    """Validate a finite 2-D array and return it as contiguous float32 (FAISS's only input type)."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DedtError(f"knn: {name} must be a non-empty 2-D array (rows, dims); got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise DedtError(f"knn: {name} must be real numbers; got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DedtError(f"knn: {name} row {row} holds NaN or inf ({int(bad.sum())} bad rows); re-encode or drop them")
    return a


def _check_k(k: int, n: int, drop_self: bool) -> int:
    """Check k (a positive int the database can supply) and return how many to search for."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DedtError(f"knn: k must be a positive integer; got {k!r}")
    k_search = int(k) + int(drop_self)
    if k_search > n:
        need = "k+1 (self excluded)" if drop_self else "k"
        raise DedtError(
            f"knn: {n} rows cannot supply {need} = {k_search} neighbours; lower k to at most {n - int(drop_self)}"
        )
    return k_search


def _resolve_index(index: str, n: int) -> str:
    """Map "auto" to a concrete index: exact search is fast enough below ~200k rows."""
    if index == "auto":
        return "exact" if n < AUTO_EXACT_MAX_ROWS else "ivf"
    if index not in ("exact", "ivf", "hnsw"):
        raise DedtError(f"knn: unknown index {index!r}; choose one of exact, ivf, hnsw, auto")
    return index


def _resolve_device(device: str, kind: str) -> str:
    """Pick the backend: FAISS GPU > torch CUDA (exact only) > CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise DedtError(f"knn: unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    if _faiss_has_gpu() and kind != "hnsw":  # FAISS has no GPU HNSW
        return "faiss-gpu"
    if _torch_has_cuda():
        return "torch-cuda" if kind == "exact" else "cpu"
    if device == "cuda":
        raise DedtError("knn: device='cuda' but no CUDA GPU is visible to faiss or torch; use device='auto' or 'cpu'")
    return "cpu"


def _faiss_has_gpu() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _torch_has_cuda() -> bool:
    """True when torch is installed and sees a GPU; torch is imported only here, lazily."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@contextlib.contextmanager
def _thread_cap() -> Iterator[None]:
    """Run FAISS with no more OpenMP threads than torch uses, so the two never oversubscribe.

    FAISS's own default already follows OMP_NUM_THREADS; this only lowers it when torch (if the
    caller imported it) was set to fewer threads, and restores the old value afterwards.
    """
    before = faiss.omp_get_max_threads()
    torch = sys.modules.get("torch")
    cap = min(before, torch.get_num_threads()) if torch is not None else before
    faiss.omp_set_num_threads(max(1, cap))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass(frozen=True)
class _Options:
    """Search settings shared by every backend."""

    metric: str
    batch_size: int | None
    nprobe: int
    ef_search: int
    seed: int


def _cpu_exact(x: np.ndarray, q: np.ndarray, k: int, opt: _Options) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in GEMM blocks of up to 8192 database rows, whose scores FAISS heaps keep the k best of.

    Memory: one 64 MB score block (2048 queries x 8192 rows; more queries when the database is
    small, e.g. k-means centroids, so each OpenMP heap pass has enough work to pay for itself).
    Squared L2 ranks by |x|^2 - 2 q.x (one GEMM on -2q, one add); |q|^2 is added to the k survivors
    only, as it is constant along a query's row and cannot change the ranking.
    """
    base_rows = min(EXACT_BASE_ROWS, x.shape[0])
    query_rows = opt.batch_size or max(1, EXACT_BLOCK_ELEMENTS // base_rows)
    heap_type = faiss.float_maxheap_array_t if opt.metric == "l2" else faiss.float_minheap_array_t
    base_sq = np.einsum("ij,ij->i", x, x) if opt.metric == "l2" else None
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    buffer = np.empty(min(query_rows, q.shape[0]) * base_rows, dtype=np.float32)
    for start in range(0, q.shape[0], query_rows):
        block = q[start : start + query_rows]
        rows = block.shape[0]
        heap = heap_type()  # a max-heap keeps the k smallest (l2), a min-heap the k largest (ip)
        heap.nh, heap.k = rows, k
        heap.val, heap.ids = faiss.swig_ptr(dist[start : start + rows]), faiss.swig_ptr(idx[start : start + rows])
        heap.heapify()
        lhs = block * np.float32(-2.0) if base_sq is not None else block
        for first in range(0, x.shape[0], base_rows):
            base = x[first : first + base_rows]
            scores = buffer[: rows * base.shape[0]].reshape(rows, base.shape[0])  # a contiguous view
            np.matmul(lhs, base.T, out=scores)
            if base_sq is not None:
                scores += base_sq[first : first + base.shape[0]]
            heap.addn(base.shape[0], faiss.swig_ptr(scores), first, 0, rows)
        heap.reorder()
        if base_sq is not None:
            dist[start : start + rows] += np.einsum("ij,ij->i", block, block)[:, None]
    return dist, idx


def _cpu_ivf(x: np.ndarray, q: np.ndarray, k: int, opt: _Options) -> tuple[np.ndarray, np.ndarray]:
    """IVF-Flat (Jegou et al. 2011) scanned list by list with GEMMs: k-means lists, nprobe per query.

    FAISS's CPU IndexIVFFlat scans per query, re-reading every probed list from memory for each
    query: at 100k x 512, nprobe 16, that is ~256 GB of traffic, and it ran at ~4 GFLOP/s here.
    Grouping the queries by the lists they probe reads each list once per query batch and turns
    the scan into one GEMM per list, whose scores FAISS heaps merge per query
    (``addn_query_subset_with_ids``). k-means, list assignment and probe choice run on
    ``_cpu_exact``; a self-search reuses each row's nearest list as its assignment.
    """
    centroids = _kmeans(x, ivf_nlist(x.shape[0]), opt)
    probes = _cpu_exact(centroids, q, min(opt.nprobe, len(centroids)), opt)[1]  # (Q, nprobe) lists to scan
    assign = probes[:, 0] if q is x else _cpu_exact(centroids, x, 1, opt)[1][:, 0]  # each row's own list
    members = _group(assign, len(centroids))
    base_sq = np.einsum("ij,ij->i", x, x) if opt.metric == "l2" else None
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    batch = opt.batch_size or IVF_QUERY_BATCH
    for start in range(0, q.shape[0], batch):
        part = slice(start, start + batch)
        _scan_lists(x, base_sq, members, q[part], probes[part], dist[part], idx[part], opt.metric)
    return dist, idx


def _scan_lists(
    x: np.ndarray,
    base_sq: np.ndarray | None,
    members: list[np.ndarray],
    block: np.ndarray,
    probes: np.ndarray,
    dist: np.ndarray,
    idx: np.ndarray,
    metric: str,
) -> None:
    """Fill (dist, idx) for ``block``: one GEMM per inverted list against the queries probing it."""
    heap = (faiss.float_maxheap_array_t if metric == "l2" else faiss.float_minheap_array_t)()
    heap.nh, heap.k = block.shape[0], dist.shape[1]
    heap.val, heap.ids = faiss.swig_ptr(dist), faiss.swig_ptr(idx)
    heap.heapify()  # unfilled slots stay (+-FLT_MAX, -1): fewer than k candidates probed
    lhs = block * np.float32(-2.0) if base_sq is not None else block
    for rows, queries in zip(members, _group(probes.ravel(), len(members), every=probes.shape[1]), strict=True):
        if len(rows) == 0 or len(queries) == 0:
            continue
        scores = lhs[queries] @ x[rows].T
        if base_sq is not None:
            scores += base_sq[rows]
        heap.addn_query_subset_with_ids(
            len(queries), faiss.swig_ptr(queries), len(rows), faiss.swig_ptr(scores), faiss.swig_ptr(rows), 0
        )
    heap.reorder()
    if base_sq is not None:
        dist += np.einsum("ij,ij->i", block, block)[:, None]


def _group(labels: np.ndarray, n_groups: int, *, every: int = 1) -> list[np.ndarray]:
    """Positions // every, grouped by label (ascending within a group): inverted lists."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=n_groups)
    return np.split(np.ascontiguousarray(order // every), np.cumsum(counts)[:-1])


def _kmeans(x: np.ndarray, nlist: int, opt: _Options) -> np.ndarray:
    """Lloyd's k-means on 32 sampled rows per list, 10 iterations, seeded random start (as FAISS's).

    An empty cluster keeps its previous centroid (FAISS would split a large one instead; with
    random starts on real data this is rare and costs only that list's share of recall).
    """
    rng = np.random.default_rng(opt.seed)
    picked = rng.choice(x.shape[0], min(x.shape[0], IVF_TRAIN_POINTS_PER_LIST * nlist), replace=False)
    sample = x[np.sort(picked)]
    centroids = sample[rng.choice(sample.shape[0], nlist, replace=False)]
    for _ in range(IVF_TRAIN_ITERATIONS):
        nearest = _cpu_exact(centroids, sample, 1, opt)[1][:, 0]
        counts = np.bincount(nearest, minlength=nlist)
        filled = counts > 0
        starts = (np.cumsum(counts) - counts)[filled]
        sums = np.add.reduceat(sample[np.argsort(nearest, kind="stable")], starts, axis=0)
        centroids[filled] = sums / counts[filled, None]
    return centroids


def _cpu_hnsw(x: np.ndarray, q: np.ndarray, k: int, opt: _Options) -> tuple[np.ndarray, np.ndarray]:
    """HNSW graph (Malkov & Yashunin 2018), M=32; build cost grows ~ N log N, no GEMM involved."""
    index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, _METRICS[opt.metric])
    index.hnsw.efSearch = opt.ef_search
    return _add_and_search(index, x, q, k, opt.batch_size or CPU_QUERY_BATCH)


def _faiss_gpu(x: np.ndarray, q: np.ndarray, k: int, opt: _Options, *, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """FAISS on this process's GPU (cuBLAS does the GEMMs): a flat index, or IVF trained there by FAISS's k-means."""
    device = _cuda_device()
    cpu_index = _flat_index(x.shape[1], opt.metric)
    if kind == "ivf":
        cpu_index = faiss.IndexIVFFlat(cpu_index, x.shape[1], ivf_nlist(x.shape[0]), _METRICS[opt.metric])
    index = faiss.index_cpu_to_gpu(_gpu_resources(device), device, cpu_index)
    if kind == "ivf":
        index.cp.niter, index.cp.seed = IVF_TRAIN_ITERATIONS, opt.seed
        index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
        index.cp.min_points_per_centroid = 1  # the sample size is chosen on purpose: no warning
        index.nprobe = min(opt.nprobe, index.nlist)
        index.train(x)
    return _add_and_search(index, x, q, k, opt.batch_size or CPU_QUERY_BATCH)


def _torch_topk(
    x: np.ndarray, q: np.ndarray, k: int, opt: _Options, *, device: str = "cuda"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search as one fused matmul + top-k per query block, for a GPU with CPU-only FAISS.

    Squared L2 ranks by |x|^2 - 2 q.x, one ``addmm`` into a preallocated score block; |q|^2 is
    added to the k survivors only, as in the CPU path. Beside the database (N x d, resident), a
    block holds ``torch_block_bytes`` (its queries, scores and top-k), kept under
    ``GPU_SCORE_BYTES``. ``device`` is "cuda" (the current device) in use; tests run it on "cpu".
    """
    import torch

    dev = torch.device(device)
    (n, d), queries = x.shape, q.shape[0]
    base = torch.from_numpy(x).to(dev)
    base_sq = torch.einsum("ij,ij->i", base, base) if opt.metric == "l2" else torch.zeros(n, device=dev)
    rows = min(queries, opt.batch_size or torch_block_rows(n, d, k))
    scores = torch.empty((rows, n), dtype=torch.float32, device=dev)
    dist = np.empty((queries, k), dtype=np.float32)
    idx = np.empty((queries, k), dtype=np.int64)
    alpha = -2.0 if opt.metric == "l2" else 1.0
    for start in range(0, queries, rows):
        block = torch.from_numpy(q[start : start + rows]).to(dev)
        out = scores[: len(block)]
        torch.addmm(base_sq, block, base.T, beta=1.0, alpha=alpha, out=out)
        values, found = torch.topk(out, k, dim=1, largest=opt.metric != "l2")
        if opt.metric == "l2":
            values += torch.einsum("ij,ij->i", block, block)[:, None]
        dist[start : start + len(block)] = values.cpu().numpy()
        idx[start : start + len(block)] = found.cpu().numpy()
    return dist, idx


def torch_block_bytes(n: int, d: int, k: int, rows: int) -> int:
    """Device memory of one query block of the torch path: queries (rows x d), scores (rows x N),
    top-k values and indices (rows x k, float32 + int64), and the k survivors' |q|^2."""
    return rows * (4 * d + 4 * n + 12 * k + 4)


def torch_block_rows(n: int, d: int, k: int) -> int:
    """The most query rows whose block fits ``GPU_SCORE_BYTES`` (at least one)."""
    return max(1, GPU_SCORE_BYTES // torch_block_bytes(n, d, k, 1))


def _cuda_device() -> int:
    """The CUDA device this process works on: torch's current one when torch is loaded (torchrun
    binds each rank to its own), else the first visible."""
    torch = sys.modules.get("torch")
    return int(torch.cuda.current_device()) if torch is not None and torch.cuda.is_available() else 0


@functools.cache
def _gpu_resources(device: int) -> faiss.StandardGpuResources:
    """One FAISS GPU resource set (cuBLAS handle, streams, a scratch pool of ~18% of the GPU's memory)
    per device for the process: making one per call (once per class when scoring) pays that each time."""
    return faiss.StandardGpuResources()


def _flat_index(d: int, metric: str) -> faiss.Index:
    """An empty flat (exact) FAISS index for the metric."""
    return faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)


def ivf_nlist(n: int) -> int:
    """IVF list count ~ sqrt(N), <= N/32.

    FAISS suggests 4-16 sqrt(N) for its per-query scan; dedt scans by GEMM, whose rate grows with
    list size, so fewer, larger lists win: at 1M x 512 (bench/knn.py) 1,000 lists with nprobe 8
    ran in ~100 s at recall@5 0.995, against 4,000 lists with nprobe 16 in ~230 s.
    """
    return max(1, min(n // IVF_TRAIN_POINTS_PER_LIST, round(math.sqrt(n))))


def _add_and_search(
    index: faiss.Index, x: np.ndarray, q: np.ndarray, k: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Add the database, then search the queries in batches."""
    index.add(x)
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], batch):
        dist[start : start + batch], idx[start : start + batch] = index.search(q[start : start + batch], k)
    return dist, idx


def _drop_self(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its k+1 results, else (self not found) its last entry."""
    rows = np.arange(idx.shape[0])[:, None]
    is_self = idx == rows
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self  # exactly one False per row: FAISS returns each index at most once
    k = idx.shape[1] - 1
    return dist[keep].reshape(-1, k), idx[keep].reshape(-1, k)


def _finish(dist: np.ndarray, idx: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 -> Euclidean (clipped at 0: the GEMM expansion can round below it); mark misses."""
    dist = np.sqrt(np.maximum(dist, 0.0)) if metric == "l2" else dist.copy()
    dist[idx < 0] = np.inf if metric == "l2" else -np.inf
    return np.ascontiguousarray(dist, dtype=np.float32), np.ascontiguousarray(idx, dtype=np.int64)


_METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
_SEARCHERS: dict[tuple[str, str], Callable[[np.ndarray, np.ndarray, int, _Options], tuple[np.ndarray, np.ndarray]]] = {
    ("cpu", "exact"): _cpu_exact,
    ("cpu", "ivf"): _cpu_ivf,
    ("cpu", "hnsw"): _cpu_hnsw,
    ("faiss-gpu", "exact"): functools.partial(_faiss_gpu, kind="exact"),
    ("faiss-gpu", "ivf"): functools.partial(_faiss_gpu, kind="ivf"),
    ("torch-cuda", "exact"): _torch_topk,
}
