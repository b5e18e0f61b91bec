"""The ``dedt-pipeline`` flow: one named pipeline, each stage a cached task, then a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from dedt.config import resolve
from dedt.pipeline import NodeResult, plan
from dedt.report import markdown_table, stage_table, summary_rows
from dedt.store import default_root
from tasks.artifacts import publish_run_artifacts
from tasks.stages import STAGE_TASKS


@flow(name="dedt-pipeline", log_prints=True)
def pipeline_flow(name: str, pipelines_file: str = "pipelines.yaml", overrides: list[str] | None = None,
                  root: str | None = None) -> dict[str, Any]:
    """Run pipeline ``name`` from ``pipelines_file``; every stage is skipped when already in the store."""
    cfg = resolve(name, Path(pipelines_file), overrides or [])
    store = Path(root) if root else default_root()
    results: dict[str, NodeResult] = {}
    for key, node in plan(cfg, store).items():
        was_complete = node.out.is_complete()
        stage_task = STAGE_TASKS[node.stage].with_options(refresh_cache=not was_complete,
                                                          result_storage=store / "_prefect_results")
        result = NodeResult(**stage_task(cfg, key, str(store)))
        result.cached = was_complete
        results[key] = result
        print(f"{key:<22} {'cached' if was_complete else 'computed':<9} {result.seconds:8.1f}s  {result.path}")
    rows = summary_rows(results)
    publish_run_artifacts(cfg, results, rows)
    return {"stages": stage_table(results), "summary": rows, "summary_markdown": markdown_table(rows),
            "weights": results["reweight"].summary["weights"] if "reweight" in results else None}
