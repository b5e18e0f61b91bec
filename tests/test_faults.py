"""Fault injection: kill -9 anywhere then resume byte for byte, disk full, corruption, two writers.

How the kills are made fast: a *zygote* subprocess imports torch, diffusers and every stage once,
then forks one child per run. A child runs the pipeline (``dedt.pipeline.plan`` + ``run_node``,
no Prefect) with hooks that count instrumented events (an encoder batch, a scorer call, a UNet
forward pass, an optimiser step, a temp file opened or fully written by ``atomic_path``) and
SIGKILL the child at a chosen one: no ``finally``, no ``atexit``, no flush, as ``kill -9``. A
``truncate`` kill first cuts the temp file in half (killed mid-write). Other kills come from the
zygote after a seeded random delay. The re-run then completes in a fresh child, and every file
listed in every stage's ``_COMPLETE`` marker must have the SHA-256 of an uninterrupted run's
(fingerprints, so paths, are equal for equal configs). Only wall-clock fields (``seconds``,
``images_per_s`` ...) in ``summary.json`` and ``log.jsonl`` are dropped before hashing those two.

``DEDT_SOAK_KILLS=200`` (``make soak``) runs that many instrumented kill points instead of 24.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SEED = 20240917
DEFAULT_KILLS = 20
SOAK_KILLS = int(os.environ.get("DEDT_SOAK_KILLS", "0"))
TIMING_KEYS = {
    "seconds",
    "images_per_s",
    "mfu",
    "proxy_seconds",
    "proxy_images_per_s",
    "train_s_per_img",
    "proxy_s_per_img",
    "overhead_seconds",
    "reference_seconds",
}
# curve.parquet's wall-clock columns: measured, like the seconds of summary.json
CURVE_TIMING_COLUMNS = ("train_seconds", "overhead_seconds", "reference_seconds")
ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PYTHONPATH": str(REPO),
    "TQDM_DISABLE": "1",
}


def fault_config(npz: Path) -> dict:
    """Every stage real, budgets tiny: 400 digits, 4 checkpoints per model, 7 encode shards."""
    return {
        "seed": 0,
        "dataset": {"source": "npz", "path": str(npz)},
        "encode": {"encoder": "pixels", "batch_size": 32, "shard_size": 64},
        "score": {"method": "gaussian"},
        "select": {"keep_frac": 0.3},
        "reweight": {"method": "doremi", "reference_kimg": 0.256, "proxy_kimg": 0.128},
        "train": {
            "preset": "digits-tiny",
            "budget_kimg": 0.192,
            "batch_size": 32,
            "checkpoint_every_kimg": 0.064,
            "keep_checkpoints": 2,
        },
        "sample": {"steps": 2, "per_class": 4, "batch_size": 16},
        "evaluate": {"classifier_epochs": 1},
    }


def write_digits_npz(path: Path, per_class: int = 40) -> Path:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = np.concatenate([np.flatnonzero(bunch.target == c)[:per_class] for c in range(10)])
    images = np.rint(bunch.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    np.savez(path, images=images, labels=bunch.target[keep].astype(np.int64))
    return path


# ----------------------------------------------------------------------------------------------
# Child side: instrumentation installed after fork, never in the zygote itself.


class Injector:
    """Counts events per (stage key, label); SIGKILLs this process at the chosen one."""

    def __init__(self, kill: dict | None, log: Path | None) -> None:
        self.kill, self.log = kill, log
        self.key = "?"
        self.counts: dict[str, int] = {}
        self.seen = 0

    def event(self, label: str, tmp: Path | None = None) -> None:
        name = f"{self.key}|{label}"
        self.counts[name] = self.counts.get(name, 0) + 1
        kill = self.kill
        if not kill or kill["key"] != self.key or not label.startswith(kill["label"]):
            return
        self.seen += 1
        if self.seen < kill["m"]:
            return
        if kill.get("truncate") and tmp is not None and tmp.exists():
            with open(tmp, "r+b") as handle:  # killed mid-write: half the bytes reached the disk
                handle.truncate(tmp.stat().st_size // 2)
        if self.log is not None:
            self.log.write_text(json.dumps({"killed_at": name, "m": self.seen}))
        os.kill(os.getpid(), signal.SIGKILL)


def install_hooks(inj: Injector) -> None:
    from diffusers import UNet2DModel
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import dedt.encoders
    import dedt.metrics.classifier
    import dedt.scoring
    import dedt.store

    real_atomic = dedt.store.atomic_path

    @contextlib.contextmanager
    def atomic_path(path):  # noqa: ANN001, ANN202
        path = Path(path)
        where = "ckpt/" if path.parent.name.startswith(".tmp-ckpt") else ""
        with real_atomic(path) as tmp:
            inj.event(f"open:{where}{path.name}", tmp)
            yield tmp
            inj.event(f"written:{where}{path.name}", tmp)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("dedt") and getattr(module, "atomic_path", None) is real_atomic:
            module.atomic_path = atomic_path

    real_get_encoder = dedt.encoders.get_encoder

    class CountingEncoder:
        def __init__(self, inner) -> None:  # noqa: ANN001
            self.inner = inner

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.inner, name)

        def encode_batch(self, images):  # noqa: ANN001, ANN202
            inj.event("encode_batch")
            return self.inner.encode_batch(images)

    dedt.encoders.get_encoder = lambda *a, **k: CountingEncoder(real_get_encoder(*a, **k))

    real_score = dedt.scoring.score

    def score(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        inj.event("score:start")
        result = real_score(*args, **kwargs)
        inj.event("score:end")
        return result

    dedt.scoring.score = score

    real_forward = UNet2DModel.forward

    def forward(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        inj.event("unet")
        return real_forward(self, *args, **kwargs)

    UNet2DModel.forward = forward
    register_optimizer_step_post_hook(lambda *_: inj.event("optim-step"))


def child_run(cmd: dict, cfg) -> int:  # noqa: ANN001
    """One pipeline run in a forked child; writes its outcome to cmd['reply']."""
    import resource
    import traceback
    import warnings

    from dedt.errors import DedtError
    from dedt.pipeline import plan, run_node

    reply: dict = {"results": []}
    code = 0
    inj = Injector(cmd.get("kill"), Path(cmd["reply"] + ".kill"))
    install_hooks(inj)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if cmd.get("fsize"):  # the soft limit only: it can be raised again below
        resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize"], hard))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            planned = plan(cfg, Path(cmd["store"]))
            keys = list(planned)
            if cmd.get("upto"):
                keys = keys[: keys.index(cmd["upto"]) + 1]
            for key in keys:
                inj.key = key
                start = time.perf_counter()
                result = run_node(cfg, planned, key)
                reply["results"].append(
                    {"key": key, "cached": result.cached, "seconds": round(time.perf_counter() - start, 3)}
                )
        except DedtError as exc:
            reply["error"], code = str(exc), 2
        except BaseException:  # noqa: BLE001
            reply["error"], code = traceback.format_exc(), 1
    reply["warnings"] = [str(w.message) for w in caught]
    reply["counts"] = inj.counts
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    Path(cmd["reply"]).write_text(json.dumps(reply))
    return code


def zygote_main(pipelines: str, name: str) -> None:
    """Serve run commands (JSON lines on stdin) by forking a child per run; reply on the old stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a child prints goes to stderr, never into the protocol
    import torch

    torch.set_num_threads(1)
    import diffusers  # noqa: F401  (imported once here, so children start instantly)

    import dedt.diffusion.sample  # noqa: F401
    import dedt.diffusion.train  # noqa: F401
    import dedt.encoders.offline  # noqa: F401
    import dedt.encoders.streaming  # noqa: F401
    import dedt.metrics.classifier  # noqa: F401
    import dedt.report  # noqa: F401
    import dedt.reweight  # noqa: F401
    import dedt.scoring  # noqa: F401
    import dedt.selection  # noqa: F401
    import dedt.stages  # noqa: F401
    from dedt.config import resolve
    from dedt.pipeline import plan  # noqa: F401

    with contextlib.suppress(ImportError):  # stages import these lazily: pay once, here
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas  # noqa: F401
        import pyarrow.dataset  # noqa: F401
        from PIL import Image, PngImagePlugin  # noqa: F401

        import dedt.evaluate  # noqa: F401

        figure = plt.figure(figsize=(1, 1))  # loads the font cache
        figure.gca().set_title("warm-up")
        figure.savefig(io.BytesIO(), format="png")
        plt.close(figure)

    cfg = resolve(name, Path(pipelines))
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child_run(cmd, cfg)
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        reaped, status = 0, 0
        if cmd.get("delay") is not None:
            deadline = start + cmd["delay"]
            while time.perf_counter() < deadline:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    break
                time.sleep(0.01)
            if not reaped:
                os.kill(pid, signal.SIGKILL)
        if not reaped:
            _, status = os.waitpid(pid, 0)
        out = {
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": round(time.perf_counter() - start, 3),
        }
        for suffix, field in (("", "reply"), (".kill", "kill")):
            path = Path(cmd["reply"] + suffix)
            if path.exists():
                out[field] = json.loads(path.read_text())
                path.unlink()
        protocol.write(json.dumps(out) + "\n")
    protocol.close()
    os._exit(0)


class Zygote:
    """The pytest side of the zygote: ``run(store=..., kill=..., delay=..., upto=...)``."""

    def __init__(self, pipelines: Path, name: str, workdir: Path) -> None:
        self.workdir = workdir
        self.stderr = open(workdir / "zygote.stderr", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_faults", "zygote", str(pipelines), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=REPO,
            env={**os.environ, **ENV},
        )
        ready = self.proc.stdout.readline()
        assert ready, (workdir / "zygote.stderr").read_text()[-3000:]
        self.calls = 0

    def run(self, **cmd) -> dict:  # noqa: ANN003
        self.calls += 1
        cmd = {"store": str(cmd.pop("store")), "reply": str(self.workdir / f"reply-{self.calls}.json"), **cmd}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, (self.workdir / "zygote.stderr").read_text()[-3000:]
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


# ----------------------------------------------------------------------------------------------
# Comparing stores


def normalised_digest(path: Path) -> str:
    """SHA-256 of the file; for summary.json, log.jsonl and curve.parquet, of their content minus
    wall-clock fields (the calibrate stage's per-image costs are measurements too)."""

    def strip(obj):  # noqa: ANN001, ANN202
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    if path.name == "summary.json":
        data = json.dumps(strip(json.loads(path.read_text())), sort_keys=True).encode()
    elif path.name == "curve.parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        data = json.dumps(table.drop_columns(list(CURVE_TIMING_COLUMNS)).to_pylist(), sort_keys=True).encode()
    elif path.name == "log.jsonl":
        lines = [json.dumps(strip(json.loads(line)), sort_keys=True) for line in path.read_text().splitlines()]
        data = "\n".join(lines).encode()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def store_digests(root: Path) -> dict[str, str]:
    """{"<stage>/<fingerprint>/<file>": digest} for every file named by a valid marker in the store."""
    from dedt.store import MARKER, StageDir

    digests = {}
    for marker in sorted(Path(root).glob(f"*/*/{MARKER}")):
        folder = marker.parent
        assert StageDir(Path(root), folder.parent.name, folder.name).is_complete(), f"{folder}: checksum mismatch"
        for name in json.loads(marker.read_text())["files"]:
            digests[f"{folder.parent.name}/{folder.name}/{name}"] = normalised_digest(folder / name)
    return digests


def assert_same_as_baseline(store: Path, baseline: dict[str, str], folders: set[str] | None = None) -> int:
    got = store_digests(store)
    expected = {k: v for k, v in baseline.items() if folders is None or k.rsplit("/", 1)[0] in folders}
    assert {k: v for k, v in got.items() if k in expected} == expected
    assert set(expected) <= set(got)
    return len(expected)


def leftover_temp_files(root: Path, folders: dict[str, str]) -> list[Path]:
    """Temp files (``.<name>.*.tmp``) a killed writer left in the plan's stage folders: a stage that
    runs again deletes them first, so after a completed run there are none."""
    return [p for folder in folders.values() for p in (Path(root) / folder).rglob(".*.tmp")]


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("faults")
    npz = write_digits_npz(work / "digits400.npz")
    pipelines = work / "pipelines.yaml"
    pipelines.write_text(yaml.safe_dump({"pipelines": {"fault": fault_config(npz)}}))
    return {"work": work, "pipelines": pipelines, "npz": npz}


@pytest.fixture(scope="module")
def zygote(env: dict):
    z = Zygote(env["pipelines"], "fault", env["work"])
    yield z
    z.close()


@pytest.fixture(scope="module")
def baseline(env: dict, zygote: Zygote) -> dict:
    """One uninterrupted run: its digests, its event counts and the plan's stage folders."""
    from dedt.config import resolve
    from dedt.pipeline import plan

    store = env["work"] / "baseline"
    out = zygote.run(store=store)
    assert out["code"] == 0, out
    cfg = resolve("fault", env["pipelines"])
    planned = plan(cfg, store)
    folders = {key: f"{n.out.stage}/{n.out.fingerprint}" for key, n in planned.items()}
    return {
        "store": store,
        "digests": store_digests(store),
        "counts": out["reply"]["counts"],
        "keys": list(planned),
        "folders": folders,
        "seconds": out["seconds"],
    }


def seed_store(baseline: dict, dest: Path, before: str) -> None:
    """Copy the baseline's finished stages that come before ``before`` in plan order into ``dest``."""
    for key in baseline["keys"][: baseline["keys"].index(before)]:
        src = baseline["store"] / baseline["folders"][key]
        if not (dest / baseline["folders"][key]).exists():
            shutil.copytree(src, dest / baseline["folders"][key])


# Instrumented kill targets: (stage key, event label prefix, truncate the temp file first).
TARGETS = [
    ("data", "open:manifest.parquet", False),
    ("data", "written:manifest.parquet", True),  # mid-Parquet write
    ("encode", "encode_batch", False),  # mid-shard
    ("encode", "written:shard-", True),
    ("encode", "written:embeddings.parquet", True),
    ("score", "score:", False),  # mid-score
    ("score", "written:scores.parquet", True),
    ("select", "written:subset.parquet", True),
    ("classifier", "optim-step", False),
    ("classifier", "written:classifier.safetensors", True),
    ("reference", "unet", False),  # mid-training
    ("reference", "written:ckpt/", True),  # during a checkpoint write
    ("reweight", "unet", False),  # mid-proxy
    ("reweight", "written:weights.parquet", True),
    ("reweight", "written:weights.png", False),
    ("train", "unet", False),
    ("train", "open:ckpt/", False),
    ("train", "written:ckpt/training_state.pt", True),
    ("train", "written:_COMPLETE", True),  # the marker itself
    ("train:uniform", "unet", False),
    ("evaluate:train", "unet", False),  # mid-sampling
    ("evaluate:train", "written:metrics.parquet", True),  # mid-evaluation
    ("evaluate:reference", "written:samples.parquet", True),
    ("evaluate:train:uniform", "written:grid.png", False),
]


def matching(counts: dict[str, int], key: str, label: str) -> int:
    return sum(
        n for name, n in counts.items() if name.split("|", 1)[0] == key and name.split("|", 1)[1].startswith(label)
    )


def check_partial_store(store: Path, baseline: dict) -> None:
    """After a kill: every stage with a valid marker matches the baseline (nothing partial is vouched for)."""
    got = store_digests(store)
    assert {k: baseline["digests"].get(k) for k in got} == got


def kill_chain(env: dict, zygote: Zygote, baseline: dict, rng: random.Random, targets: list, name: str) -> list[str]:
    """One store, the targets in pipeline order: each run goes up to its target's stage and is killed
    at a seeded random occurrence of the target's event (a resumed stage may finish first: no kill).
    The next run resumes what the last one left; a final run completes the pipeline."""
    store = env["work"] / name
    position = {key: i for i, key in enumerate(baseline["keys"])}
    where = []
    for key, label, truncate in sorted(targets, key=lambda t: position[t[0]]):
        total = matching(baseline["counts"], key, label)
        assert total, f"no event {key}|{label} in the baseline run"
        m = rng.randint(1, total)
        out = zygote.run(store=store, upto=key, kill={"key": key, "label": label, "m": m, "truncate": truncate})
        if out["signal"] is None:
            assert out["code"] == 0, out
        else:
            assert out["signal"] == signal.SIGKILL and out["kill"]["killed_at"].startswith(f"{key}|{label}"), out
            where.append(f"{out['kill']['killed_at']}#{out['kill']['m']}")
        check_partial_store(store, baseline)
    out = zygote.run(store=store)
    assert out["code"] == 0, out
    assert not leftover_temp_files(store, baseline["folders"])
    assert assert_same_as_baseline(store, baseline["digests"]) == len(baseline["digests"])
    shutil.rmtree(store)
    return where


# ----------------------------------------------------------------------------------------------
# Tests: kill -9


def test_kill_at_random_points_resumes_byte_identical(env: dict, zygote: Zygote, baseline: dict) -> None:
    """Every target once (the reference's twice), in one store, then complete: >= 20 kill points.
    With DEDT_SOAK_KILLS, more chains of randomly drawn targets until that many kills."""
    rng = random.Random(SEED)
    where = kill_chain(env, zygote, baseline, rng, TARGETS + [t for t in TARGETS if t[0] == "reference"], "chain-0")
    chains = 1
    while len(where) < SOAK_KILLS:
        where += kill_chain(env, zygote, baseline, rng, rng.choices(TARGETS, k=2 * len(TARGETS)), f"chain-{chains}")
        chains += 1
    stages = {w.split("|")[0] for w in where}
    print(f"\n{len(where)} kill points survived in {chains} chain(s), stages {sorted(stages)}")
    assert len(where) >= max(DEFAULT_KILLS, SOAK_KILLS)
    assert {
        "data",
        "encode",
        "score",
        "select",
        "classifier",
        "reference",
        "reweight",
        "train",
        "evaluate:train",
    } <= stages


def test_kill_chain_at_random_delays_then_complete(env: dict, zygote: Zygote, baseline: dict) -> None:
    """Uninstrumented points: SIGKILL after seeded random delays, run after run; whenever a run
    gets to the end, its store is compared with the baseline and a fresh one started."""
    rng = random.Random(SEED + 1)
    store = env["work"] / "delays"
    n = max(4, SOAK_KILLS // 10)
    kills = completed = 0
    for _ in range(4 * n):
        if not store.exists():
            seed_store(baseline, store, "train")
        out = zygote.run(store=store, delay=rng.uniform(0.2, 1.5))
        if out["signal"] == signal.SIGKILL:
            kills += 1
            check_partial_store(store, baseline)
            if kills >= n:
                break
        else:
            assert out["code"] == 0, out
            assert assert_same_as_baseline(store, baseline["digests"]) == len(baseline["digests"])
            shutil.rmtree(store)
            completed += 1
    if store.exists():
        assert zygote.run(store=store)["code"] == 0
        assert not leftover_temp_files(store, baseline["folders"])
        assert assert_same_as_baseline(store, baseline["digests"]) == len(baseline["digests"])
        shutil.rmtree(store)
    print(f"\n{kills} kills at random delays survived ({completed + 1} completed runs compared)")
    assert kills >= n


def runner_cmd(env: dict, store: Path) -> list[str]:
    return [sys.executable, "-m", "dedt.runner", "fault", "--pipelines", str(env["pipelines"]), "--root", str(store)]


def test_two_runner_processes_one_killed(env: dict, baseline: dict) -> None:
    """Two ``python -m dedt.runner`` runs of one pipeline on one store at once; one is killed with
    SIGKILL from outside after a seeded delay. Each stage is computed by exactly one process (the
    other waits on the stage's lock, then reuses it; a stage whose writer was killed is finished by
    the survivor); the store ends with the uninterrupted run's bytes."""
    store = env["work"] / "two"
    seed_store(baseline, store, "reweight")
    procs = [
        subprocess.Popen(
            runner_cmd(env, store),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, **ENV},
        )
        for _ in range(2)
    ]
    victim, survivor = procs
    lines = []
    for line in victim.stdout:  # the finished stages are reported at once; then reweight starts
        lines.append(line)
        if json.loads(line)["key"] == "reference":
            break
    time.sleep(random.Random(SEED + 2).uniform(0.2, 1.0))  # reweight and 5 more stages are left: seconds
    victim.kill()
    rest, _ = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-3000:]
    computed: dict[str, int] = {}
    for line in [*lines, *rest.splitlines(), *out.splitlines()]:
        record = json.loads(line)
        computed[record["key"]] = computed.get(record["key"], 0) + (not record["cached"])
    todo = baseline["keys"][baseline["keys"].index("reweight") :]
    assert all(computed[k] == 0 for k in baseline["keys"] if k not in todo)
    assert all(computed[k] <= 1 for k in todo), computed  # never two writers of one stage
    # Every stage reported computed by one process; at most one not reported, when the victim
    # died between finishing it and printing its line.
    assert sum(computed[k] for k in todo) >= len(todo) - 1, computed
    assert assert_same_as_baseline(store, baseline["digests"]) == len(baseline["digests"])
    shutil.rmtree(store)


# ----------------------------------------------------------------------------------------------
# Disk full, unwritable store


@pytest.mark.parametrize(
    "stage,fsize,fails",
    [
        ("data", 16_384, "manifest.parquet"),  # pyarrow: OSError
        ("reference", 1_000_000, "model.safetensors"),  # safetensors: SafetensorError
        ("reference", 3_000_000, "training_state.pt"),  # torch.save: RuntimeError
    ],
)
def test_disk_full_is_a_clear_error_and_loses_nothing(
    env: dict, zygote: Zygote, baseline: dict, stage: str, fsize: int, fails: str
) -> None:
    """RLIMIT_FSIZE stands in for a full disk: files cannot grow past ``fsize`` bytes."""
    store = env["work"] / f"full-{stage}-{fsize}"
    seed_store(baseline, store, stage)
    before = store_digests(store)
    out = zygote.run(store=store, upto=stage, fsize=fsize)
    assert out["code"] == 2, out
    error = out["reply"]["error"]
    assert fails in error and "free disk space" in error and "Traceback" not in error
    folder = store / baseline["folders"][stage]
    assert not (folder / "_COMPLETE").exists()
    assert not [p for p in folder.rglob(fails) if ".tmp-ckpt" not in str(p)]  # no partial file at its path
    assert not list(folder.rglob(".*.tmp"))  # the temp file was removed
    assert store_digests(store) == before  # the finished stages are intact
    out = zygote.run(store=store, upto=stage)  # space freed: the same command completes
    assert out["code"] == 0, out
    assert_same_as_baseline(
        store,
        baseline["digests"],
        {baseline["folders"][k] for k in baseline["keys"][: baseline["keys"].index(stage) + 1]},
    )
    shutil.rmtree(store)


def test_file_in_place_of_a_stage_folder(env: dict, zygote: Zygote, baseline: dict) -> None:
    store = env["work"] / "blocked"
    seed_store(baseline, store, "reference")
    before = store_digests(store)
    (store / "train").write_text("not a folder")
    out = zygote.run(store=store, upto="reference")
    assert out["code"] == 2, out
    assert str(store / "train") in out["reply"]["error"] and "writable folder" in out["reply"]["error"]
    assert store_digests(store) == before
    shutil.rmtree(store)


def test_store_root_is_a_file_fails_before_work(env: dict, tmp_path: Path) -> None:
    """The runner's preflight: one line, exit 2, nothing created."""
    root = tmp_path / "store-file"
    root.write_text("x")
    proc = subprocess.run(
        runner_cmd(env, root / "sub"), capture_output=True, text=True, cwd=REPO, env={**os.environ, **ENV}, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(root) in lines[0] and "not a folder" in lines[0]
    assert root.read_text() == "x"


# ----------------------------------------------------------------------------------------------
# Corrupted artifacts


def flip_bytes(path: Path, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "key,name,damage",
    [
        ("encode", "embeddings.parquet", "truncate"),
        ("data", "manifest.parquet", "flip"),
        ("reference", "ema.safetensors", "flip"),
        ("classifier", "classifier.safetensors", "truncate"),
    ],
)
def test_corrupted_artifact_is_reported_and_recomputed(
    env: dict, zygote: Zygote, baseline: dict, key: str, name: str, damage: str
) -> None:
    store = env["work"] / f"corrupt-{key}"
    upto = baseline["keys"][baseline["keys"].index(key) + 1]  # the stage after: it reads the damaged one
    seed_store(baseline, store, upto)
    path = store / baseline["folders"][key] / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        flip_bytes(path)
    out = zygote.run(store=store, upto=upto)
    assert out["code"] == 0, out
    assert any(str(path) in w and "SHA-256" in w for w in out["reply"]["warnings"]), out["reply"]["warnings"]
    assert [r["key"] for r in out["reply"]["results"] if not r["cached"]][0] == key
    assert_same_as_baseline(
        store,
        baseline["digests"],
        {baseline["folders"][k] for k in baseline["keys"][: baseline["keys"].index(upto) + 1]},
    )
    shutil.rmtree(store)


def test_damaged_resume_checkpoint_is_skipped(env: dict, zygote: Zygote, baseline: dict) -> None:
    """Flipped bytes in the newest checkpoint of a killed training run: reported, and the run resumes
    from the checkpoint before it, ending with the uninterrupted run's bytes."""
    store = env["work"] / "ckpt"
    seed_store(baseline, store, "reference")
    total = matching(baseline["counts"], "reference", "unet")
    out = zygote.run(store=store, upto="reference", kill={"key": "reference", "label": "unet", "m": total})
    assert out["signal"] == signal.SIGKILL
    checkpoints = sorted((store / baseline["folders"]["reference"] / "checkpoints").glob("ckpt-*"))
    assert len(checkpoints) == 2
    flip_bytes(checkpoints[-1] / "model.safetensors")
    out = zygote.run(store=store, upto="reference")
    assert out["code"] == 0, out
    assert any(str(checkpoints[-1]) in w and "model.safetensors" in w for w in out["reply"]["warnings"])
    assert_same_as_baseline(store, baseline["digests"], {baseline["folders"]["reference"]})
    shutil.rmtree(store)


def test_single_stage_refuses_a_damaged_input(env: dict, baseline: dict, tmp_path: Path) -> None:
    """A stage run alone (as a dispatched GPU stage is) never reads an input that fails its checksum."""
    from dedt.config import resolve
    from dedt.errors import DedtError
    from dedt.pipeline import plan, run_node

    store = tmp_path / "store"
    seed_store(baseline, store, "score")
    damaged = store / baseline["folders"]["encode"] / "embeddings.parquet"
    flip_bytes(damaged)
    cfg = resolve("fault", env["pipelines"])
    with pytest.raises(DedtError, match="embeddings.parquet") as err:
        run_node(cfg, plan(cfg, store), "score")
    assert "input encode" in str(err.value)
    assert not (store / baseline["folders"]["score"] / "_COMPLETE").exists()


# ----------------------------------------------------------------------------------------------


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "zygote":
    zygote_main(sys.argv[2], sys.argv[3])
