"""``make ui-check``: run a pipeline as a deployment on a fresh local server, then look at the
Prefect UI in headless Chromium: a screenshot of the run's Artifacts tab and of its summary, and
an assertion that the rendered pages show the summary.

The server's state goes to a temporary folder and the server is stopped at the end; the store is
``$DEDT_HOME`` as usual, so a pipeline already run (``make demo``) is read from it. Pages are
the V2 UI's (``/v2/...``): it honours ``?tab=Artifacts`` on first load, the V1 UI does not.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows import server
from tasks.artifacts import slug

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--run-all-compositor-stages-before-draw",
    "--virtual-time-budget=15000",
]
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _chromium(profile: Path, *args: str) -> str:
    """Run headless Chromium once; return stdout (the DOM for --dump-dom)."""
    proc = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180
    )
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def _text(dom: str) -> str:
    """Visible text of a dumped DOM: styles and scripts dropped, tags removed, spaces collapsed."""
    dom = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def run_as_deployment(pipelines: Path, pipeline: str, api: str, env: dict[str, str], timeout_s: float) -> str:
    """`dedt deploy`, then `prefect deployment run` as a user types it; wait for Completed; the run id."""
    subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--pipelines", str(pipelines)], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", f"dedt-pipeline/{pipeline}"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    run_id = re.search(r"flow-run/([0-9a-f-]{36})", out).group(1)
    deadline = time.monotonic() + timeout_s
    while (state := server.get_json(f"{api}/flow_runs/{run_id}")["state"])["type"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {state['name']} after {timeout_s:.0f}s")
        time.sleep(2)
    if state["type"] != "COMPLETED":
        raise RuntimeError(f"run {run_id} ended {state['name']}: {state.get('message')}")
    return run_id


def look(ui: str, api: str, run_id: str, pipeline: str, out: Path, profile: Path) -> list[str]:
    """Screenshots of the run's Artifacts tab and of its summary; what the rendered pages lack."""
    key = f"{slug(pipeline)}-summary"
    artifact = server.post_json(
        f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [run_id]}}}
    )[0]
    pages = {
        "run-artifacts": (f"{ui}/v2/runs/flow-run/{run_id}?tab=Artifacts", "1400,1200"),
        "summary": (f"{ui}/v2/artifacts/artifact/{artifact['id']}", "1400,2400"),
    }
    text = {}
    for name, (url, size) in pages.items():
        _chromium(profile, f"--window-size={size}", f"--screenshot={out.resolve() / f'{name}.png'}", url)
        text[name] = _text(_chromium(profile, "--dump-dom", url))
        (out / f"{name}.txt").write_text(text[name])
    checks = {
        f"{key} on the run's Artifacts tab": key in text["run-artifacts"],
        f"the heading 'dedt: {pipeline}'": f"dedt: {pipeline}" in text["summary"],
        "the summary table": "pruned" in text["summary"] or "full data" in text["summary"],
        "links to the Parquet files": ".parquet" in text["summary"],
    }
    return [what for what, ok in checks.items() if not ok]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="digits-demo")
    parser.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"))
    parser.add_argument("--out", type=Path, default=Path("build/ui-check"), help="screenshots and page texts")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dedt-ui-check-") as tmp:
        os.environ["DEDT_SERVER_HOME"] = f"{tmp}/server"
        # Without auth: headless Chromium cannot type the auth string into the UI's login page.
        info = server.start(server.free_port(), [server.DEFAULT_POOL], query_seconds=1.0, auth=False)
        env = os.environ | {"PREFECT_API_URL": info["api_url"], "PREFECT_HOME": f"{tmp}/client"}
        try:
            run_id = run_as_deployment(args.pipelines, args.pipeline, info["api_url"], env, args.timeout)
            missing = look(info["ui_url"], info["api_url"], run_id, args.pipeline, args.out, Path(tmp) / "chromium")
        finally:
            server.stop()
    if missing:
        print(f"ui-check FAILED: the UI does not show {', '.join(missing)}; see {args.out}", file=sys.stderr)
        return 1
    print(f"ui-check ok: run {run_id}; screenshots {args.out}/run-artifacts.png and {args.out}/summary.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
