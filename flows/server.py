"""``dedt server start|stop|status``: a local Prefect server on 127.0.0.1 and its process workers.

State lives in ``$DEDT_SERVER_HOME`` (default ``.prefect-server`` beside the store, i.e.
``$DEDT_HOME/../.prefect-server``): the server's ``PREFECT_HOME`` with its SQLite database,
``server.json`` (port, pids, the API's auth string), and one log per process. Every process
starts in its own session, so ``stop`` can end it and whatever it spawned (flow runs) without
touching anything else.

A worker runs whatever flow run the API hands it, as the user who started it; so the API asks
for a random auth string (Prefect's basic auth) that only this user can read: the state folder
is 0700 and must belong to the user, and ``server.json`` is trusted only when the user owns it,
nobody else can write it, and its URL is a loopback one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dedt.errors import DedtError
from dedt.store import atomic_write_text, open_regular
from dedt.store_root import default_root, root_spec

DEFAULT_PORT = 4200
DEFAULT_POOL = "dedt-default"  # the pool of every deployment that names none
STATE_FILE = "server.json"
LOOPBACK_API = re.compile(r"http://127\.0\.0\.1:[0-9]{1,5}/api")


def state_dir() -> Path:
    home = os.environ.get("DEDT_SERVER_HOME")
    return Path(home).resolve() if home else default_root().parent / ".prefect-server"


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def _headers(auth: str | None) -> dict[str, str]:
    """Prefect's basic auth: ``auth``, else $PREFECT_API_AUTH_STRING as Prefect's own client does."""
    auth = auth or os.environ.get("PREFECT_API_AUTH_STRING")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def post_json(url: str, body: dict[str, Any], auth: str | None = None) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"} | _headers(auth)
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def get_json(url: str, auth: str | None = None) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=_headers(auth)), timeout=30) as response:
        return json.loads(response.read())


def worker_online(api: str, pool: str, auth: str | None = None) -> bool:
    """True once the pool exists and a worker polls it (its heartbeat marks it ONLINE)."""
    try:
        workers = post_json(f"{api}/work_pools/{pool}/workers/filter", {}, auth)
    except OSError:  # 404 until the worker has created its pool
        return False
    return any(w["status"] == "ONLINE" for w in workers)


def _private_folder(folder: Path) -> None:
    """``folder`` is a real folder of this user's, made 0700 (it holds the auth string and the database)."""
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise DedtError(
            f"server state folder {folder} is not a folder of yours (another user's, or a link); remove "
            "it or set DEDT_SERVER_HOME to a folder of your own"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def read_state() -> dict[str, Any] | None:
    """What `start` saved (port, URLs, pids, auth); None without a state file. A file another user
    could have written, or naming a non-loopback URL, is refused: its URL would receive the auth string."""
    folder = state_dir()
    path = folder / STATE_FILE
    if not os.path.lexists(path):
        return None
    _private_folder(folder)
    try:
        with open_regular(path) as handle:
            owner = os.fstat(handle.fileno())
            info = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    if owner.st_uid != os.getuid() or owner.st_mode & 0o022:
        raise DedtError(f"{path} is not yours alone (owned by uid {owner.st_uid} or writable by others); delete it")
    if not isinstance(info, dict) or not LOOPBACK_API.fullmatch(str(info.get("api_url"))):
        raise DedtError(f"{path}: api_url is not http://127.0.0.1:<port>/api; delete the file")
    return info


def running_server() -> dict[str, Any] | None:
    """The state of this project's server when it is up (for commands without PREFECT_API_URL)."""
    state = read_state()
    return state if state and healthy(state["api_url"]) else None


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _environment(state: Path, port: int, query_seconds: float, auth: str | None) -> dict[str, str]:
    """Server and workers share it: the API URL (the UI needs it off port 4200), the auth string the
    server asks for and the workers send, the store, no telemetry."""
    url = api_url(port)
    secret = {"PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_AUTH_STRING": auth} if auth else {}
    return (
        os.environ
        | secret
        | {
            "PREFECT_HOME": str(state),
            "PREFECT_API_URL": url,
            "PREFECT_UI_API_URL": url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_WORKER_QUERY_SECONDS": f"{query_seconds:g}",
            "DEDT_HOME": root_spec(default_root()),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        }
    )


def _spawn(args: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        ).pid


def start(
    port: int = DEFAULT_PORT,
    pools: Sequence[str] = (DEFAULT_POOL,),
    query_seconds: float = 2.0,
    timeout_s: float = 180.0,
    auth: bool = True,
) -> dict[str, Any]:
    """Start the server, wait until its API answers, then one process worker per pool.

    ``auth=False`` leaves the API open to every local user: only for a throwaway server that a
    headless browser must read (the UI check), which cannot type the auth string in."""
    if running_server():
        raise DedtError(f"a dedt server already runs at {read_state()['api_url']}; `dedt server stop` first")
    if not _port_free(port):
        raise DedtError(f"port {port} on 127.0.0.1 is in use; pass --port PORT")
    state = state_dir()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private_folder(state)
    secret = f"dedt:{secrets.token_urlsafe(32)}" if auth else None
    env = _environment(state, port, query_seconds, secret)
    pids = {
        "server": _spawn(["server", "start", "--host", "127.0.0.1", "--port", str(port)], env, state / "server.log")
    }
    info = {
        "port": port,
        "api_url": api_url(port),
        "ui_url": f"http://127.0.0.1:{port}",
        "state": str(state),
        "store": env["DEDT_HOME"],
        "pids": pids,
        "auth": secret,
    }
    atomic_write_text(
        state / STATE_FILE, json.dumps(info, indent=2)
    )  # written first: `stop` can clean up a failed start
    deadline = time.monotonic() + timeout_s
    while not healthy(info["api_url"]):
        if time.monotonic() > deadline or not _alive(pids["server"]):
            stop()
            raise DedtError(f"the Prefect server did not come up on port {port}; see {state / 'server.log'}")
        time.sleep(0.5)
    for pool in pools:
        pids[f"worker:{pool}"] = _spawn(
            ["worker", "start", "--pool", pool, "--type", "process", "--name", f"dedt-{pool}"],
            env,
            state / f"worker-{pool}.log",
        )
    atomic_write_text(state / STATE_FILE, json.dumps(info, indent=2))
    for pool in pools:  # ready means a run triggered now is picked up
        while not worker_online(info["api_url"], pool, secret):
            if time.monotonic() > deadline or not _alive(pids[f"worker:{pool}"]):
                stop()
                raise DedtError(f"the worker for pool {pool!r} did not come online; see {state / f'worker-{pool}.log'}")
            time.sleep(0.5)
    return info


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its parent) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid`` from /proc (flow runs start in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_ours(pid: int) -> bool:
    """Guards against a reused pid: ours run ``python -m prefect``."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _terminate(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM ``pids`` and their descendants at once, SIGKILL what is left after ``grace_s``: processes that
    take their grace period take it side by side, not one after another."""
    targets = [t for pid in pids for t in (pid, *_descendants(pid))]
    for p in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in targets) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in targets:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def stop() -> list[str]:
    """Stop the workers first (they may be running flows), then the server; names of what was stopped."""
    info = read_state()
    if info is None:
        return []
    stopped = []
    for is_server in (False, True):
        ours = {
            name: pid
            for name, pid in info["pids"].items()
            if (name == "server") == is_server and _alive(pid) and _is_ours(pid)
        }
        _terminate(list(ours.values()))
        stopped += sorted(ours)
    (state_dir() / STATE_FILE).unlink(missing_ok=True)
    return stopped


def status() -> dict[str, Any] | None:
    """The saved state with each process's liveness and the API's health; None when never started."""
    info = read_state()
    if info is None:
        return None
    info["alive"] = {name: _alive(pid) and _is_ours(pid) for name, pid in info["pids"].items()}
    info["healthy"] = healthy(info["api_url"])
    return info
