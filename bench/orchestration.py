"""Orchestration overhead: the demo as bare library calls vs `dedt run` vs a Prefect deployment.

    python bench/orchestration.py [--budget tiny|nano|demo]

Baseline: ``dedt.pipeline.plan`` + ``run_node`` per stage in a plain Python process, no Prefect.
Then the same pipeline through ``dedt run`` (flow and tasks in the calling process, reporting to a
local server) and as the ``dedt-pipeline`` deployment triggered with ``prefect deployment run``
(a process worker polling every second starts the flow in a subprocess). Each mode computes
everything in its own fresh store, then runs again fully cached.

Per stage, "wall" is what the orchestrator spent on it: for Prefect modes the time from the end
of the previous task run (or the flow run's start) to the end of this one, from the API; for the
baseline the time around ``run_node``. "compute" is the stage's own time measured inside
``run_node`` in that run, so overhead = wall - compute is independent of how busy the machine was
during the compute. Start-up is process start (or the trigger) to the first stage. Targets:
Prefect adds <= 1 s per stage after start-up; a fully cached re-run takes <= 5 s
beyond start-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows import server  # noqa: E402

# Budgets merged into digits-demo. tiny: tests/helpers.py's TINY, minutes on 2 CPU cores; nano:
# two optimiser steps per model (tests/test_orchestration.py), where orchestration dominates.
BUDGETS = {
    "tiny": {
        "reweight": {"reference_kimg": 1.0, "proxy_kimg": 0.5},
        "train": {"budget_kimg": 0.5, "batch_size": 64, "checkpoint_every_kimg": 0.25},
        "sample": {"steps": 2, "per_class": 8},
        "evaluate": {"classifier_epochs": 1},
    },
    "nano": {
        "reweight": {"reference_kimg": 0.128, "proxy_kimg": 0.128},
        "train": {"budget_kimg": 0.128, "batch_size": 64, "checkpoint_every_kimg": 0.128, "log_every_kimg": 0.064},
        "sample": {"steps": 2, "per_class": 2},
        "evaluate": {"classifier_epochs": 1},
    },
    "demo": {},
}
PER_STAGE_TARGET_S, CACHED_TARGET_S = 1.0, 5.0


def _pipelines(budget: str, path: Path) -> None:
    """pipelines.yaml's digits-demo as 'bench', with the budget's values merged in."""
    demo = copy.deepcopy(yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"]["digits-demo"])
    for section, values in BUDGETS[budget].items():
        demo[section] = {**demo.get(section, {}), **values}
    path.write_text(yaml.safe_dump({"pipelines": {"bench": demo}}))


def bare(pipelines: Path, store: Path) -> dict[str, Any]:
    """The baseline, in this process: plan, then run_node per stage; per-stage wall and compute."""
    from dedt.config import resolve
    from dedt.pipeline import plan, run_node

    cfg = resolve("bench", pipelines)
    planned = plan(cfg, store)
    stages = {}
    for key in planned:
        start = time.perf_counter()
        result = run_node(cfg, planned, key)
        stages[key] = {"wall": time.perf_counter() - start, "compute": result.seconds, "cached": result.cached}
    return stages


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _compute_seconds(pipelines: Path, store: Path) -> dict[str, float]:
    """Each stage's own time as ``run_node`` measured it, from the summary.json in its store folder."""
    from dedt.artifacts import read_summary
    from dedt.config import resolve
    from dedt.pipeline import plan

    return {key: read_summary(node.out)["seconds"] for key, node in plan(resolve("bench", pipelines), store).items()}


def _flow_stages(api: str, flow_run_id: str, compute: dict[str, float]) -> tuple[dict[str, Any], float, float]:
    """Per-stage wall (from task-run end times) and compute, the flow run's start and end."""
    run = server.get_json(f"{api}/flow_runs/{flow_run_id}")
    tasks = server.post_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    tasks = sorted((t for t in tasks if t["end_time"]), key=lambda t: _t(t["end_time"]))
    previous, stages = _t(run["start_time"]), {}
    for t in tasks:
        stages[t["name"]] = {
            "wall": _t(t["end_time"]) - previous,
            "compute": compute[t["name"]],
            "cached": t["state"]["name"] == "Cached",
        }
        previous = _t(t["end_time"])
    return stages, _t(run["start_time"]), _t(run["end_time"])


def _latest_local_run(api: str) -> str:
    """The newest flow run without a deployment: the one `dedt run` just made."""
    runs = server.post_json(
        f"{api}/flow_runs/filter",
        {"sort": "START_TIME_DESC", "limit": 1, "flow_runs": {"deployment_id": {"is_null_": True}}},
    )
    return runs[0]["id"]


def _wait(api: str, flow_run_id: str) -> None:
    while (state := server.get_json(f"{api}/flow_runs/{flow_run_id}")["state"])["type"] not in (
        "COMPLETED",
        "FAILED",
        "CRASHED",
        "CANCELLED",
    ):
        time.sleep(0.5)
    if state["type"] != "COMPLETED":
        raise RuntimeError(f"flow run {flow_run_id} ended {state['name']}: {state.get('message')}")


def measure(budget: str) -> dict[str, Any]:
    """Every mode, fresh then cached, against one temporary local server."""
    with tempfile.TemporaryDirectory(prefix="dedt-bench-orch-") as folder:
        return _measure(budget, Path(folder))


def _measure(budget: str, tmp: Path) -> dict[str, Any]:
    pipelines = tmp / "pipelines.yaml"
    _pipelines(budget, pipelines)
    os.environ["DEDT_SERVER_HOME"] = str(tmp / "server")
    info = server.start(server.free_port(), [server.DEFAULT_POOL], query_seconds=1.0)
    api = info["api_url"]
    os.environ["PREFECT_API_AUTH_STRING"] = info["auth"]  # for the commands below and server.get_json
    env = os.environ | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "client")}
    out: dict[str, Any] = {}
    try:
        for run in ("fresh", "cached"):
            store = tmp / "store-bare"
            wall, text = _timed([sys.executable, __file__, "--bare", str(pipelines), str(store)], env)
            stages = json.loads(text)
            out[f"bare/{run}"] = {
                "stages": stages,
                "total": wall,
                "startup": wall - sum(s["wall"] for s in stages.values()),
            }

            store = tmp / "store-run"
            wall, _ = _timed(
                [sys.executable, "-m", "flows.cli", "run", "bench", "--pipelines", str(pipelines)],
                env | {"DEDT_HOME": str(store)},
            )
            stages, start, end = _flow_stages(api, _latest_local_run(api), _compute_seconds(pipelines, store))
            out[f"dedt run/{run}"] = {
                "stages": stages,
                "total": wall,
                "flow": end - start,
                "startup": wall - (end - start),
            }

            store = tmp / "store-deployment"
            if run == "fresh":
                _timed([sys.executable, "-m", "flows.cli", "deploy", "--pipelines", str(pipelines)], env)
            trigger = time.time()
            _, text = _timed(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "deployment",
                    "run",
                    "dedt-pipeline/bench",
                    "--param",
                    f"root={json.dumps(str(store))}",
                ],
                env,
            )
            flow_run_id = re.search(r"flow-run/([0-9a-f-]{36})", text).group(1)
            _wait(api, flow_run_id)
            stages, start, end = _flow_stages(api, flow_run_id, _compute_seconds(pipelines, store))
            out[f"deployment/{run}"] = {
                "stages": stages,
                "total": end - trigger,
                "flow": end - start,
                "startup": start - trigger,
            }
    finally:
        server.stop()
    return out


def report(out: dict[str, Any], budget: str) -> str:
    """The per-stage table, the start-up and cached-rerun table, and the verdict against the targets."""
    modes = ("bare", "dedt run", "deployment")
    keys = list(out["bare/fresh"]["stages"])
    lines = [
        f"Pipeline: digits-demo with {budget} budgets; fresh store per mode, then the same again (cached).\n",
        "| stage | compute s (bare) | bare wall s | dedt run wall s | deployment wall s "
        "| overhead s: bare | dedt run | deployment |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    overheads: dict[str, list[float]] = {m: [] for m in modes}
    for key in keys:
        walls, extra = [], []
        for mode in modes:
            s = out[f"{mode}/fresh"]["stages"][key]
            walls.append(f"{s['wall']:.2f}")
            extra.append(f"{s['wall'] - s['compute']:.2f}")
            overheads[mode].append(s["wall"] - s["compute"])
        lines.append(
            f"| {key} | {out['bare/fresh']['stages'][key]['compute']:.2f} | " + " | ".join(walls + extra) + " |"
        )
    lines += [
        "",
        "| mode | start-up s | stages s (fresh) | overhead per stage s: mean / max | after stages s "
        "| total fresh s | total cached s | cached beyond start-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        fresh, cached = out[f"{mode}/fresh"], out[f"{mode}/cached"]
        o = overheads[mode]
        beyond = cached["total"] - cached["startup"]
        # What a flow run does after its last stage: the summary and the UI artifacts.
        after = f"{fresh['flow'] - sum(s['wall'] for s in fresh['stages'].values()):.1f}" if "flow" in fresh else "-"
        lines.append(
            f"| {mode} | {fresh['startup']:.1f} | {fresh['total'] - fresh['startup']:.1f} | "
            f"{sum(o) / len(o):.2f} / {max(o):.2f} | {after} | {fresh['total']:.1f} | {cached['total']:.1f} "
            f"| {beyond:.1f} |"
        )
    worst = max(max(overheads["dedt run"]), max(overheads["deployment"]))
    cached_beyond = max(out[f"{m}/cached"]["total"] - out[f"{m}/cached"]["startup"] for m in ("dedt run", "deployment"))
    lines += [
        "",
        f"Prefect overhead per stage (max over stages and modes): {worst:.2f} s "
        f"(target <= {PER_STAGE_TARGET_S:.0f} s: {'met' if worst <= PER_STAGE_TARGET_S else 'NOT met'}); "
        f"fully cached re-run beyond start-up: {cached_beyond:.1f} s "
        f"(target <= {CACHED_TARGET_S:.0f} s: {'met' if cached_beyond <= CACHED_TARGET_S else 'NOT met'}). "
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default="tiny",
        help="tiny: the test budgets (minutes); nano: two steps per model; demo: digits-demo as is",
    )
    parser.add_argument("--bare", nargs=2, metavar=("PIPELINES", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        print(json.dumps(bare(Path(args.bare[0]), Path(args.bare[1]))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    print(report(measure(args.budget), args.budget))


if __name__ == "__main__":
    main()
