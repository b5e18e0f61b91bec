"""The store on S3: a cached re-run against the bucket vs a local store, and upload vs compute per stage.

    python bench/remote_store.py [--pipeline digits-demo] [--bucket NAME]

By default a moto S3 server is started on 127.0.0.1 (the dev extra); with ``--bucket`` the bucket of
the standard AWS variables (``AWS_ENDPOINT_URL``, credentials) is used, under a fresh prefix.
The pipeline (``--pipeline``: a name in pipelines.yaml, default the demo, or ``tiny`` for the tests'
``tests.helpers.TINY``, a few seconds) is computed once against the bucket
(cache A): per stage, its compute seconds (``run_node``'s) and its upload seconds. Then, fully
cached: the same cache A copied as a plain local store (the baseline), cache A against the bucket
(only the markers are compared), and an empty cache B (every stage downloaded and checked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _start_moto() -> object:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return server


def _timed_run(cfg: object, root: str | Path) -> tuple[float, dict]:
    from dedt.runner import run_pipeline

    start = time.perf_counter()
    results = run_pipeline(cfg, root)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pipeline", default="digits-demo", help="a pipeline of pipelines.yaml, or 'tiny' (default: %(default)s)"
    )
    parser.add_argument("--bucket", help="an existing bucket (AWS_* variables); default: a moto server here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from dedt.config import PipelineConfig, resolve
    from dedt.remote_store import LINK, remote_for
    from dedt.store_root import store_root
    from tests.helpers import TINY

    server = None
    bucket = args.bucket
    if bucket is None:
        server = _start_moto()
        import boto3

        bucket = "dedt-bench"
        boto3.client("s3").create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/bench-{os.getpid()}-{int(time.time())}"
    if args.pipeline == "tiny":
        cfg = PipelineConfig.model_validate({"name": "tiny", **TINY})
    else:
        cfg = resolve(args.pipeline, REPO / "pipelines.yaml")
    work = Path(tempfile.mkdtemp(prefix="dedt-bench-remote-"))
    try:
        # Cold: compute every stage, each uploaded when it completes.
        os.environ["DEDT_CACHE"] = str(work / "cache-a")
        cold_s, cold = _timed_run(cfg, url)
        remote_a = remote_for(store_root(url))
        uploads = {t.folder: t for t in remote_a.transfers if t.direction == "up"}

        # Cached: a plain local store (the same files), the bucket with cache A, the bucket with an empty cache.
        local = work / "local"
        shutil.copytree(store_root(url), local)
        (local / LINK).unlink()  # without the link it is a plain local store
        local_s, _ = _timed_run(cfg, local)
        before = len(remote_a.transfers)
        warm_s, warm = _timed_run(cfg, url)
        warm_bytes = sum(t.bytes for t in remote_a.transfers[before:])
        os.environ["DEDT_CACHE"] = str(work / "cache-b")
        fresh_s, fresh = _timed_run(cfg, url)
        fresh_bytes = sum(t.bytes for t in remote_for(store_root(url)).transfers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.stop()

    print(f"\n{url}: pipeline {args.pipeline}, {len(cold)} stages, computed in {cold_s:.1f} s (uploads included)\n")
    print("| fully cached re-run | seconds | vs local | artifact bytes moved |")
    print("|---|---:|---:|---:|")
    print(f"| local store | {local_s:.2f} | 1.00 | 0 |")
    print(f"| s3 store, warm cache | {warm_s:.2f} | {warm_s / local_s:.2f} | {warm_bytes} |")
    print(f"| s3 store, empty cache | {fresh_s:.2f} | {fresh_s / local_s:.2f} | {fresh_bytes} |")
    assert all(r.cached for r in warm.values()) and all(r.cached for r in fresh.values())
    print("\n| stage | compute s | upload s | upload / compute | files | KB |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, result in cold.items():
        up = uploads.get(result.path)
        if up is None:
            continue
        print(
            f"| {key} | {result.seconds:.2f} | {up.seconds:.3f} | {up.seconds / max(result.seconds, 1e-3):.3f} | "
            f"{up.files} | {up.bytes / 1024:.0f} |"
        )


if __name__ == "__main__":
    main()
