"""One Prefect task per stage. Each is a few lines around ``dedt.pipeline.run_node``.

The cache key is the stage fingerprint (not Prefect's default policy, which includes the run
id), with results persisted as JSON under the store, so a cache hit carries across runs,
processes and workers. The flow refreshes the cache whenever the store lacks the artifact.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from dedt.config import PipelineConfig
from dedt.pipeline import VERSIONS, plan, run_node


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    node = plan(parameters["cfg"], Path(parameters["root"]))[parameters["key"]]
    return f"dedt-{node.stage}-{node.out.fingerprint}"


def _run(cfg: PipelineConfig, key: str, root: str) -> dict[str, Any]:
    return asdict(run_node(cfg, plan(cfg, Path(root)), key))


def _stage_task(stage: str):  # noqa: ANN202
    return task(_run, name=stage, task_run_name="{key}", cache_key_fn=stage_cache_key,
                persist_result=True, result_serializer="json", retries=0)


STAGE_TASKS = {stage: _stage_task(stage) for stage in VERSIONS}
