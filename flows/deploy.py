"""``dedt deploy``: every pipeline and sweep in pipelines.yaml becomes a Prefect deployment.

Deployments load the flows from this repository folder (``flow.from_source`` with a local path:
a process worker runs them in place, no image), so a worker needs the repository at the same
path, as on one machine or in the images of ``docker/``. Applying is idempotent: a deployment
is created or updated by name, so editing the YAML and deploying again updates parameters,
pools, tags and schedules (a removed ``cron`` clears the schedule).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dedt.config import load_pipelines, resolve
from dedt.sweep import expand, load_sweeps
from flows.server import DEFAULT_POOL
from tasks.stages import STAGE_FLOW, gpu_tag

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {
    "dedt-pipeline": "flows/pipeline.py:pipeline_flow",
    "dedt-sweep": "flows/sweep.py:sweep_flow",
    STAGE_FLOW: "flows/stage.py:stage_flow",
}
GPU_LIMIT = 1  # concurrent train/evaluate task runs per GPU pool


@dataclass(frozen=True)
class DeploymentSpec:
    flow: str  # a key of ENTRYPOINTS
    name: str
    work_pool: str
    parameters: dict[str, Any]
    tags: list[str]
    cron: str | None = None
    description: str = ""
    concurrency_tags: list[str] = field(default_factory=list)  # tag limits to create with it

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"


def _file_parameter(pipelines_file: Path, source: Path) -> str:
    """The pipelines file as a worker sees it: relative to the repository when inside it."""
    path = Path(pipelines_file).resolve()
    return str(path.relative_to(source)) if path.is_relative_to(source) else str(path)


def deployment_specs(pipelines_file: Path, source: Path = REPO) -> list[DeploymentSpec]:
    """All deployments of a pipelines file; every pipeline and sweep is validated first."""
    file_param = _file_parameter(pipelines_file, source)
    specs, gpu_pools = [], set()
    for name in load_pipelines(pipelines_file):
        cfg = resolve(name, pipelines_file)
        d = cfg.deployment
        where = f"; heavy stages on pool {d.gpu_pool}" if d.gpu_pool else ""
        specs.append(
            DeploymentSpec(
                "dedt-pipeline",
                name,
                d.work_pool or DEFAULT_POOL,
                {"name": name, "pipelines_file": file_param},
                ["dedt", *d.tags],
                d.cron,
                f"dedt pipeline {name}{where}",
            )
        )
        if d.gpu_pool:
            gpu_pools.add(d.gpu_pool)
    for pool in sorted(gpu_pools):
        specs.append(
            DeploymentSpec(
                STAGE_FLOW,
                pool,
                pool,
                {},
                ["dedt", "gpu"],
                description=f"one train/evaluate stage of the pipelines with gpu_pool {pool}",
                concurrency_tags=[gpu_tag(pool)],
            )
        )
    for name, sweep in load_sweeps(pipelines_file).items():
        points = expand(name, pipelines_file)
        pool = sweep.work_pool or points[0].cfg.deployment.work_pool or DEFAULT_POOL
        specs.append(
            DeploymentSpec(
                "dedt-sweep",
                name,
                pool,
                {"name": name, "pipelines_file": file_param},
                ["dedt", "sweep", *sweep.tags],
                sweep.cron,
                f"dedt sweep {name}: {len(points)} points over "
                f"{', '.join(dict.fromkeys(k for grid in sweep.grids for k in grid))}",
            )
        )
    return specs


def ensure_work_pool(name: str) -> None:
    """Create a process work pool named ``name`` unless one exists (of any type)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # a worker created it meanwhile
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                    )
                )


def apply(specs: list[DeploymentSpec], source: Path = REPO) -> dict[str, str]:
    """Create or update each deployment (and its pool and tag limits); deployment id by full name."""
    from prefect import Flow
    from prefect.client.orchestration import get_client

    for pool in sorted({s.work_pool for s in specs}):
        ensure_work_pool(pool)
    with get_client(sync_client=True) as client:
        for tag in sorted({t for s in specs for t in s.concurrency_tags}):
            client.create_concurrency_limit(tag=tag, concurrency_limit=GPU_LIMIT)  # an upsert
    flows = {
        name: Flow.from_source(source=str(source), entrypoint=ENTRYPOINTS[name]) for name in {s.flow for s in specs}
    }
    ids = {}
    for spec in specs:
        deployment = flows[spec.flow].to_deployment(
            name=spec.name,
            work_pool_name=spec.work_pool,
            parameters=spec.parameters,
            tags=spec.tags,
            cron=spec.cron,
            description=spec.description,
        )
        ids[spec.full_name] = str(deployment.apply())
    return ids
