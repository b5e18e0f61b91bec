"""Encode benchmark: streaming encode throughput and peak memory against dataset size.

    python bench/encode.py [--sizes 10000,100000] [--resolution 28] [--encoders pixels,random-projection]

Prints one Markdown table. Each (encoder, N, mode) runs in a fresh Python process, so its peak RSS
(ru_maxrss) is that run's alone. Images are synthetic uniform noise in [-1, 1], generated lazily by
a loader fn(start, stop): in "streaming" mode (`encode_to_parquet`, the encode stage's path) the
dataset never sits in memory, so what could grow with N is the encoder's own footprint. The
baseline mode "in-memory" materialises all N images, encodes them in one call and writes the
table in one go: the plain approach streaming replaces. Target: streaming peak RSS at
the largest N within 10% of the smallest. images/s counts image generation and the Parquet write.

On a shared 2-core machine, threaded OpenBLAS is slow on the 256-row GEMMs of random-projection
(measured 49 ms vs 2.7 ms single-threaded at load average 6): run with OPENBLAS_NUM_THREADS=1 or a
larger --batch-size to see the encode's own cost rather than thread contention.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedt.encoders import get_encoder  # noqa: E402
from dedt.encoders.streaming import embedding_table, encode_to_parquet  # noqa: E402
from dedt.store import write_parquet  # noqa: E402

RSS_TARGET = 1.10  # peak RSS at the largest N may exceed the smallest N's by at most 10%
MODES = ("streaming", "in-memory")


def main(argv: list[str] | None = None) -> None:
    """Parse options; run one measurement (--worker) or all of them in subprocesses and print the table."""
    args = _parse(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    encoders = [e for e in args.encoders.split(",") if e]
    print(
        f"<!-- {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__} -->"
    )
    print(
        f"Synthetic {args.channels}x{args.resolution}x{args.resolution} images, batch {args.batch_size}, "
        f"shard {args.shard_size}, random-projection dim {args.dim}; one fresh process per row.\n"
    )
    print("| encoder | mode | N | images/s | seconds | peak RSS (MiB) | RSS after imports (MiB) | peak vs smallest N |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for encoder in encoders:
        for mode in MODES:
            rows = [run_worker(args, encoder, mode, n) for n in sizes]
            for n, row in zip(sizes, rows, strict=True):
                growth = row["peak_rss_mib"] / rows[0]["peak_rss_mib"]
                print(
                    f"| {encoder} | {mode} | {n:,} | {n / row['seconds']:,.0f} | {row['seconds']:.2f} | "
                    f"{row['peak_rss_mib']:.0f} | {row['import_rss_mib']:.0f} | {growth:.2f}x |"
                )
            if mode == "streaming":
                growth = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
                verdicts.append(f"{encoder}: {growth:.3f}x ({'met' if growth <= RSS_TARGET else 'MISSED'})")
    print(
        f"\nStreaming peak RSS at N={sizes[-1]:,} vs N={sizes[0]:,} (target <= {RSS_TARGET:.2f}x): "
        + "; ".join(verdicts)
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="comma-separated image counts (default 10000,100000)")
    p.add_argument("--encoders", default="pixels,random-projection", help="comma-separated encoder names")
    p.add_argument("--resolution", type=int, default=28, help="image side in pixels (default 28)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="image channels (default 1)")
    p.add_argument("--dim", type=int, default=256, help="random-projection output width (default 256)")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder call (default 256)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one measurement, JSON out
    p.add_argument("--encoder", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_worker(args: argparse.Namespace, encoder: str, mode: str, n: int) -> dict[str, float]:
    """One measurement in a fresh interpreter: ru_maxrss is a process-lifetime maximum."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--encoder",
        encoder,
        "--mode",
        mode,
        "--n",
        str(n),
        "--resolution",
        str(args.resolution),
        "--channels",
        str(args.channels),
        "--dim",
        str(args.dim),
        "--batch-size",
        str(args.batch_size),
        "--shard-size",
        str(args.shard_size),
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def synthetic_loader(channels: int, resolution: int):
    """fn(start, stop) -> float32 images in [-1, 1]; each slice seeded by its start, so reruns agree."""

    def load(start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng(start)
        return rng.random((stop - start, channels, resolution, resolution), dtype=np.float32) * 2 - 1

    return load


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Encode N synthetic images in the given mode; report seconds and peak RSS."""
    import_rss = _peak_rss_mib()
    load = synthetic_loader(args.channels, args.resolution)
    encoder = get_encoder(args.encoder, dim=args.dim, device="cpu")
    ids = np.arange(args.n, dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "embeddings.parquet"
        start = time.perf_counter()
        if args.mode == "streaming":
            encode_to_parquet(
                load,
                args.n,
                ids,
                encoder,
                out,
                Path(tmp) / "work",
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                progress=False,
            )
        else:
            embeddings = encoder.encode_batch(load(0, args.n))
            metadata = {"encoder": encoder.name, "dim": embeddings.shape[1], "preprocessing": encoder.preprocessing}
            write_parquet(embedding_table(ids, embeddings), out, metadata)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "import_rss_mib": import_rss}


def _peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
