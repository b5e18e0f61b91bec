"""The ``dedt-stage`` flow: one stage of a pipeline, run on the worker of a GPU work pool.

``dedt deploy`` deploys it once per ``deployment.gpu_pool`` named in pipelines.yaml (as
``dedt-stage/<pool>``); ``tasks.stages`` dispatches the heavy stages (``GPU_STAGES``) to it. The config
travels as a parameter, so the GPU worker needs the code and the shared store, not the YAML.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dedt.config import PipelineConfig
from dedt.pipeline import plan
from dedt.store_root import store_root
from tasks.stages import STAGE_TASKS


@flow(name="dedt-stage", log_prints=True)
def stage_flow(config: dict[str, Any], key: str, root: str, concurrency_tag: str = "dedt-gpu") -> dict[str, Any]:
    """Compute node ``key`` of pipeline ``config`` into the store ``root``.

    The task carries ``concurrency_tag``, which ``dedt deploy`` limits to one running task, so a
    GPU worker never trains (or samples) two models at once even when several runs are queued.
    """
    cfg = PipelineConfig.model_validate(config)
    node = plan(cfg, store_root(root))[key]
    stage = STAGE_TASKS[node.stage].with_options(tags=[concurrency_tag])
    result = stage(cfg, key, root)
    print(f"{key} done in {result['seconds']:.1f}s, {result['path']}")
    return result
