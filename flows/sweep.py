"""The ``dedt-sweep`` flow: a grid of pipelines, every shared stage computed once, one comparison.

Each distinct stage of the grid (by fingerprint) becomes one task, submitted with its inputs as
``wait_for``, so the reference model, the classifier and the data stages run once for all
points. A process pool of ``max_concurrency`` workers runs independent stages at once: processes,
not threads, because torch's global RNG (model init, dropout) is per process, and artifacts must
stay byte-for-byte reproducible. The store's per-stage file locks make concurrent sweeps safe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner

from dedt.frontier import describe_setup, time_to_quality_rows, write_report
from dedt.pipeline import NodeResult, plan
from dedt.report import markdown_table
from dedt.store_root import default_root, store_root
from dedt.sweep import BRIEF_COLUMNS, compare, comparison_dir, expand, node_id, resolve_sweep, unique_nodes
from tasks.artifacts import publish_report_artifact, publish_sweep_artifacts
from tasks.stages import stage_task


@flow(name="dedt-sweep", log_prints=True)
def sweep_flow(
    name: str, pipelines_file: str = "pipelines.yaml", root: str | None = None, report: str | None = None
) -> dict[str, Any]:
    """Run sweep ``name`` from ``pipelines_file``; a second run of an unchanged sweep computes nothing.
    ``report``: also write the frontier report (Markdown + plots) there, from the comparison rows."""
    sweep = resolve_sweep(name, Path(pipelines_file))
    points = expand(name, Path(pipelines_file))
    store = store_root(root) if root else default_root()
    plans = [plan(p.cfg, store) for p in points]
    nodes = unique_nodes(plans)
    cached = {n.id for n in nodes if plans[n.point][n.key].out.is_complete()}
    print(f"sweep {name}: {len(points)} points, {len(nodes)} distinct stages, {len(cached)} cached")
    task_for = {n.id: stage_task(plans[n.point][n.key], points[n.point].cfg) for n in nodes}
    args = {n.id: {"cfg": points[n.point].cfg, "key": n.key, "root": str(store)} for n in nodes}
    # Cached stages are store reads: run them here and start worker processes only for real work.
    done = {n.id: NodeResult(**task_for[n.id](**args[n.id])) for n in nodes if n.id in cached}
    todo = [n for n in nodes if n.id not in cached]
    if todo:
        with (
            _threads_per_worker(sweep.max_concurrency),
            ProcessPoolTaskRunner(max_workers=sweep.max_concurrency) as runner,
        ):
            futures = {}
            for n in todo:
                futures[n.id] = runner.submit(
                    task_for[n.id], args[n.id], wait_for=[futures[i] for i in n.inputs if i in futures]
                )
            done |= {key: NodeResult(**future.result()) for key, future in futures.items()}
    results = [{key: done[node_id(node)] for key, node in planned.items()} for planned in plans]
    folder = comparison_dir(store, name, points, plans)
    rows = compare(folder, points, results)
    publish_sweep_artifacts(name, folder.path, rows, time_to_quality_rows(rows))
    print(f"comparison: {folder.file('comparison.parquet')}")
    if report:
        path = write_report(
            rows,
            Path(report),
            title=f"Time to quality: sweep {name}",
            command=f"dedt sweep {name} --report {report}",
            setup=describe_setup(points, sweep),
        )
        publish_report_artifact(name, path)
        print(f"report: {path}")
    brief = [{k: r[k] for k in BRIEF_COLUMNS} for r in rows]
    return {
        "points": [p.label for p in points],
        "stages": len(nodes),
        "computed": len(nodes) - len(cached),
        "comparison": str(folder.file("comparison.parquet")),
        "rows": rows,
        "table_markdown": markdown_table(brief),
        "report": report,
    }


@contextlib.contextmanager
def _threads_per_worker(workers: int) -> Iterator[None]:
    """Split the cores between worker processes (torch and BLAS read these at import): without it,
    two workers each running one thread per core oversubscribe the CPU and every stage slows down."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    before = {n: os.environ.get(n) for n in names}
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for n in names:
        os.environ.setdefault(n, share)
    try:
        yield
    finally:
        for n, value in before.items():
            if value is None:
                os.environ.pop(n, None)
