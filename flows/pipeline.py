"""The ``dedt-pipeline`` flow: one named pipeline, each stage a cached task, then a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from dedt.config import resolve
from dedt.export import check_export
from dedt.pipeline import NodeResult, plan
from dedt.report import markdown_table, stage_table, summary_rows, weights_vs_difficulty
from dedt.store_root import default_root, store_root
from tasks.artifacts import publish_run_artifacts
from tasks.export import export_task
from tasks.stages import stage_task


@flow(name="dedt-pipeline", log_prints=True)
def pipeline_flow(
    name: str, pipelines_file: str = "pipelines.yaml", overrides: list[str] | None = None, root: str | None = None
) -> dict[str, Any]:
    """Run pipeline ``name`` from ``pipelines_file``; every stage is skipped when already in the store.

    With ``deployment.gpu_pool`` set, the heavy stages run as ``dedt-stage`` flow runs on that
    pool; ``root`` (default ``$DEDT_HOME``) must then be the same path on the GPU worker.
    """
    cfg = resolve(name, Path(pipelines_file), overrides or [])
    store = store_root(root) if root else default_root()
    if cfg.export.to:  # a bad export target or model fails before any stage runs
        check_export(cfg, store)
    results: dict[str, NodeResult] = {}
    for key, node in plan(cfg, store).items():
        result = NodeResult(**stage_task(node, cfg)(cfg, key, str(store)))
        results[key] = result
        print(f"{key:<22} {'cached' if result.cached else 'computed':<9} {result.seconds:8.1f}s  {result.path}")
    rows = summary_rows(results, proxy_kimg=cfg.reweight.proxy_kimg * cfg.reweight.rounds)
    publish_run_artifacts(cfg, results, rows)
    exported = export_task(cfg, str(store)) if cfg.export.to else None
    return {
        "stages": stage_table(results),
        "summary": rows,
        "summary_markdown": markdown_table(rows),
        "exported": exported,
        "weights": results["reweight"].summary["weights"] if "reweight" in results else None,
        "weights_vs_difficulty": weights_vs_difficulty(results),
    }
