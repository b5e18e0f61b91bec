"""One Prefect task per stage. Each is a few lines around ``dedt.pipeline.run_node``.

Prefect neither caches nor persists their results: a result file would be read back with the
serializer it names (pickle among them), so anyone able to write to the shared store could run
code. The store is the cache instead: ``run_node`` returns a stage whose ``_COMPLETE`` marker
checks out without computing it, so a second run of an unchanged pipeline recomputes nothing.

When a pipeline names ``deployment.gpu_pool``, its heavy stages (``GPU_STAGES``, and the score stage of
``score.method: difficulty``, which runs the reference model) are *dispatched*:
the task starts a ``dedt-stage`` flow run on that pool's worker (``run_deployment``) and, once it
completes, reads the result from the store both sides share (the same path on both machines).

A running stage reports its progress (training, the DRO proxy, sampling, encoding) as a Prefect
progress artifact and a log line a few times a minute (``tasks.progress``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from dedt.config import PipelineConfig
from dedt.errors import DedtError
from dedt.pipeline import VERSIONS, Node, plan, run_node
from dedt.progress import reporting
from dedt.store_root import root_spec, store_root
from tasks.progress import artifact_progress

# Store folder names of the stages that run models on the resolved device (train also holds the
# reference model; reweight runs the DRO proxy and the reference; curve samples every snapshot).
GPU_STAGES = ("encode", "latents", "reweight", "train", "evaluate", "curve", "calibrate")
STAGE_FLOW = "dedt-stage"
DISPATCH_POLL_S = 1.0  # the parent waits on a dispatched stage; 1 s adds at most 1 s per stage


def gpu_tag(pool: str) -> str:
    """The task tag that a concurrency limit of 1 holds to: one heavy stage at a time per GPU pool."""
    return f"dedt-gpu-{pool}"


def _run(cfg: PipelineConfig, key: str, root: str) -> dict[str, Any]:
    with reporting(artifact_progress(key)):
        return asdict(run_node(cfg, plan(cfg, store_root(root)), key))


def _dispatch(cfg: PipelineConfig, key: str, root: str) -> dict[str, Any]:
    """Run ``key`` as a ``dedt-stage`` flow run on the GPU pool's worker, then read its result."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    pool = cfg.deployment.gpu_pool
    if not plan(cfg, store_root(root))[key].out.is_complete():
        try:
            run = run_deployment(
                f"{STAGE_FLOW}/{pool}",
                flow_run_name=f"{cfg.name}:{key}",
                parameters={
                    "config": cfg.model_dump(mode="json"),
                    "key": key,
                    "root": root_spec(store_root(root)),
                    "concurrency_tag": gpu_tag(pool),
                },
                poll_interval=DISPATCH_POLL_S,
            )
        except ObjectNotFound:
            raise DedtError(
                f"no deployment {STAGE_FLOW}/{pool} for deployment.gpu_pool={pool!r}: run `dedt deploy`"
            ) from None
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(
                f"{key} on pool {pool!r} ended {run.state.name if run.state else 'without a state'}; "
                f"see flow run {run.name} ({run.id})"
            )
    return _run(cfg, key, root)


def _stage_task(stage: str, fn: Any) -> Task[..., dict[str, Any]]:
    return task(fn, name=stage, task_run_name="{key}", cache_policy=NO_CACHE, persist_result=False, retries=0)


STAGE_TASKS = {stage: _stage_task(stage, _run) for stage in VERSIONS}
DISPATCH_TASKS = {stage: _stage_task(stage, _dispatch) for stage in GPU_STAGES}
SCORE_BY_MODEL = _stage_task("score", _dispatch)  # score.method: difficulty runs the reference model


def stage_task(node: Node, cfg: PipelineConfig) -> Task[..., dict[str, Any]]:
    """The task that computes ``node``: dispatched to the GPU pool for a heavy stage when one is named."""
    if cfg.deployment.gpu_pool is not None and node.stage == "score" and "reference" in node.inputs:
        return SCORE_BY_MODEL
    dispatch = cfg.deployment.gpu_pool is not None and node.stage in GPU_STAGES
    return DISPATCH_TASKS[node.stage] if dispatch else STAGE_TASKS[node.stage]
