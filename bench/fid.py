"""FID benchmark: dedt's Fréchet distance vs clean-fid's scipy ``sqrtm`` path; Inception throughput.

    python bench/fid.py [--dims 64,512,2048] [--repeats 3] [--images 64] [--batch-size 32] [--no-singular]

Prints one Markdown table.
- Fréchet distance: statistics of synthetic features (n = 4 d rows of ReLU(Gaussian @ W), like
  pool features: non-negative, correlated, full rank), timed for ``dedt.metrics.frechet_distance``
  and ``cleanfid.fid.frechet_distance`` in the same run, best of ``--repeats`` (clean-fid at
  d >= 2048: once, it takes seconds). "speed-up" = clean-fid seconds / dedt seconds; "rel. diff"
  = |dedt - clean-fid| / clean-fid. Unless --no-singular, one more row at d = 2048 with n = 1000 < d
  samples per side: singular covariances, where clean-fid's sqrtm warns and may retry with an
  offset on the diagonal.
- Inception features: ``--images`` random 32x32 uint8 images through ``dedt.metrics.inception``
  (clean-fid resize to 299 + the FID Inception TorchScript) on the CPU, after one warm-up batch
  (TorchScript's profiling runs); images/s for the resize alone and for resize + forward.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedt.metrics import frechet_distance, gaussian_stats  # noqa: E402

SINGULAR_DIM, SINGULAR_SAMPLES = 2048, 1000


def main(argv: list[str] | None = None) -> None:
    """Parse options, measure, print the table."""
    args = _parse(argv)
    import torch
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    print(
        f"<!-- {platform.processor() or platform.machine()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at start -->"
    )
    print("| measurement | dedt | clean-fid (scipy sqrtm) | speed-up | rel. diff |")
    print("|---|---:|---:|---:|---:|")
    cases = [(d, 4 * d) for d in (int(s) for s in args.dims.split(",") if s)]
    if not args.no_singular:
        cases.append((SINGULAR_DIM, SINGULAR_SAMPLES))
    for d, n in cases:
        stats = _synthetic_stats(d, n, seed=d + n)
        ours, t_ours = _best_of(functools.partial(frechet_distance, *stats), args.repeats)
        theirs, t_theirs = _best_of(
            functools.partial(_quiet, cleanfid_frechet_distance, *stats), 1 if d >= 2048 else args.repeats
        )
        label = f"FD, d = {d}, n = {n}" + (" (singular)" if n <= d else "")
        print(
            f"| {label} | {t_ours:.4f} s | {t_theirs:.4f} s | {t_theirs / t_ours:.1f}x | "
            f"{abs(ours - theirs) / abs(theirs):.1e} |"
        )
    resize_rate, total_rate = _inception_throughput(args.images, args.batch_size)
    print(f"| clean-fid resize to 299 (PIL bicubic per channel), CPU | {resize_rate:.1f} images/s | | | |")
    print(
        f"| Inception features (resize + forward), {args.images} images, batch {args.batch_size}, CPU "
        f"| {total_rate:.2f} images/s | | | |"
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", default="64,512,2048", help="comma-separated feature dimensions")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    p.add_argument("--images", type=int, default=64, help="images for the Inception throughput")
    p.add_argument("--batch-size", type=int, default=32, help="Inception batch size")
    p.add_argument("--no-singular", action="store_true", help="skip the n < d row")
    return p.parse_args(argv)


def _synthetic_stats(d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mu1, sigma1, mu2, sigma2) from two n-row sets of ReLU(Gaussian @ W) features, the second shifted and scaled."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, d)) / np.sqrt(d)
    x = np.maximum(rng.standard_normal((n, d)) @ w, 0.0)
    y = np.maximum(rng.standard_normal((n, d)) @ w * 1.1 + 0.05, 0.0)
    return (*gaussian_stats(x), *gaussian_stats(y))


def _best_of(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(value, best wall seconds) over ``repeats`` calls."""
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = float(fn())
        best = min(best, time.perf_counter() - start)
    return value, best


def _quiet(fn: Callable[..., float], *args: np.ndarray) -> float:
    """Call ``fn`` with its stdout swallowed (clean-fid prints when it adds a diagonal offset)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _inception_throughput(count: int, batch_size: int) -> tuple[float, float]:
    """(resize-only images/s, resize + forward images/s) for ``count`` random 32x32 images."""
    from dedt.metrics.inception import clean_resize, inception_features, load_inception

    model = load_inception()
    images = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    for _ in range(2):  # warm-up: TorchScript profiles the first calls of a shape, then optimises
        inception_features(images[:batch_size], model, batch_size=batch_size)
    start = time.perf_counter()
    for image in images:
        clean_resize(image)
    resize_seconds = time.perf_counter() - start
    start = time.perf_counter()
    inception_features(images, model, batch_size=batch_size)
    return count / resize_seconds, count / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
