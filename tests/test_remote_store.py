"""The store on S3-compatible object storage, against a real S3 server on 127.0.0.1 (moto's
standalone server, started here): two workers with separate caches, a kill -9 mid-upload, a
corrupted object, two writers of one stage, and the one-line errors of a missing credential or an
unreachable endpoint. The pipeline is TINY without the DRO and the reference model (the stages the
store moves are the same kinds; ~15 s of CPU).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY

REPO = Path(__file__).resolve().parent.parent
BUCKET = "dedt-test"
CONFIG = TINY | {"reweight": {"method": "none"}, "evaluate": {"classifier_epochs": 1, "baselines": False}}
UP_TO_SELECT = ["data", "encode", "score", "select"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on a free port with one bucket; the AWS variables point every client at it."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield {"client": client, "env": env, "work": tmp_path_factory.mktemp("s3")}
    server.stop()


def _cfg():
    from dedt.config import PipelineConfig

    return PipelineConfig.model_validate({"name": "tiny", **CONFIG})


def _worker(monkeypatch: pytest.MonkeyPatch, cache: Path, prefix: str) -> Path:
    """A worker: its own cache folder, the store s3://BUCKET/prefix; returns its local root."""
    from dedt.store_root import store_root

    monkeypatch.setenv("DEDT_CACHE", str(cache))
    return store_root(f"s3://{BUCKET}/{prefix}")


def _run(root: Path, keys: list[str] | None = None) -> dict:
    from dedt.pipeline import plan, run_node

    planned = plan(_cfg(), root)
    return {key: run_node(_cfg(), planned, key) for key in (keys or list(planned))}


def _remote_marker(s3: dict, prefix: str, folder: str) -> dict | None:
    try:
        body = s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/{folder}/_COMPLETE")["Body"].read()
    except s3["client"].exceptions.NoSuchKey:
        return None
    return json.loads(body)


def _folder(result) -> str:  # noqa: ANN001
    return "/".join(Path(result.path).parts[-2:])


def _files(root: Path, folder: str) -> dict[str, bytes]:
    """Every file the marker names, and config.json, by name: their bytes."""
    path = root / folder
    names = [*json.loads((path / "_COMPLETE").read_text())["files"], "config.json"]
    return {name: (path / name).read_bytes() for name in names}


def test_two_workers_share_one_bucket(s3: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker A trains; worker B, from an empty cache, finds every stage up to train in the bucket
    (byte for byte A's) and computes only the evaluation; A's re-run then moves no artifact byte."""
    from dedt.remote_store import remote_for
    from dedt.runner import run_pipeline

    root_a = _worker(monkeypatch, tmp_path / "cache-a", "two")
    first = _run(root_a, [*UP_TO_SELECT, "classifier", "train:uniform"])
    assert not any(r.cached for r in first.values())
    for result in first.values():  # each finished stage is in the bucket, marker last
        assert (
            _remote_marker(s3, "two", _folder(result))["files"]
            == json.loads((Path(result.path) / "_COMPLETE").read_text())["files"]
        )

    root_b = _worker(monkeypatch, tmp_path / "cache-b", "two")
    second = run_pipeline(_cfg(), f"s3://{BUCKET}/two")  # with preflight, as `dedt run` does
    assert {k for k, r in second.items() if not r.cached} == {"evaluate:train:uniform"}
    for key, result in first.items():
        assert _files(root_b, _folder(result)) == _files(root_a, _folder(result)), key
    assert [t.direction for t in remote_for(root_b).transfers].count("up") == 1  # the evaluation

    monkeypatch.setenv("DEDT_CACHE", str(tmp_path / "cache-a"))
    remote_a = remote_for(root_a)
    before = len(remote_a.transfers)
    again = _run(root_a)
    assert all(r.cached for r in again.values())
    assert [t.direction for t in remote_a.transfers[before:]] == ["down"]  # B's evaluation, pulled once
    before = len(remote_a.transfers)
    assert all(r.cached for r in _run(root_a).values())
    assert remote_a.transfers[before:] == []  # fully cached: the markers compared, no artifact byte moved


def test_kill_during_upload_then_rerun(s3: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 between two uploads of the encode stage: the bucket has no encode marker (readers see
    nothing partial); the re-run uploads it, and a fresh cache gets the killed worker's exact bytes."""
    cache = tmp_path / "cache-killed"
    env = {**os.environ, **s3["env"], "DEDT_CACHE": str(cache), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, __file__, "kill-at-upload", "5", json.dumps(CONFIG)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    root = _worker(monkeypatch, cache, "kill")
    planned_folders = {k: f"{n.out.stage}/{n.out.fingerprint}" for k, n in _plan(root).items()}
    assert _remote_marker(s3, "kill", planned_folders["data"]) is not None  # 3 files + marker, then killed
    assert _remote_marker(s3, "kill", planned_folders["encode"]) is None
    assert (root / planned_folders["encode"] / "_COMPLETE").exists()  # complete here, not yet there

    rerun = _run(root, UP_TO_SELECT)
    assert [k for k, r in rerun.items() if not r.cached] == ["score", "select"]
    fresh = _worker(monkeypatch, tmp_path / "cache-fresh", "kill")
    pulled = _run(fresh, UP_TO_SELECT)
    assert all(r.cached for r in pulled.values())
    for key in UP_TO_SELECT:
        assert _files(fresh, planned_folders[key]) == _files(root, planned_folders[key]), key


def _plan(root: Path) -> dict:
    from dedt.pipeline import plan

    return plan(_cfg(), root)


def test_corrupted_object_is_detected_and_replaced(s3: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket object whose bytes no longer match the marker: the reader warns, recomputes the
    stage and uploads it again; the next reader gets good bytes."""
    from dedt.store import CorruptArtifactWarning

    root = _worker(monkeypatch, tmp_path / "cache-1", "corrupt")
    _run(root, UP_TO_SELECT)
    folder = f"select/{_plan(root)['select'].out.fingerprint}"
    digest = _remote_marker(s3, "corrupt", folder)["files"]["subset.parquet"]
    key = f"corrupt/{folder}/{digest}/subset.parquet"
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=b"not a parquet file")

    other = _worker(monkeypatch, tmp_path / "cache-2", "corrupt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _run(other, UP_TO_SELECT)
    assert not again["select"].cached and all(again[k].cached for k in UP_TO_SELECT[:-1])
    assert any(issubclass(w.category, CorruptArtifactWarning) and "subset.parquet" in str(w.message) for w in caught)
    assert (
        s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
        == (other / folder / "subset.parquet").read_bytes()
    )
    third = _worker(monkeypatch, tmp_path / "cache-3", "corrupt")
    assert _run(third, ["select"])["select"].cached
    assert _files(third, folder) == _files(other, folder)


def test_two_writers_first_wins(s3: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers finish one stage with different bytes: the first marker stands (conditional put),
    the second worker adopts the first's files, and a late conditional put is refused."""
    from dedt.remote_store import remote_for
    from dedt.store import StageDir

    outs = []
    for name, text in (("a", "first"), ("b", "second")):
        root = _worker(monkeypatch, tmp_path / f"cache-{name}", "race")
        out = StageDir(root, "data", "0123456789abcdef")
        out.path.mkdir(parents=True)
        (out.path / "summary.json").write_text(json.dumps({"writer": text}))
        (out.path / "snapshots").mkdir()
        (out.path / "snapshots" / "ema-1.json").write_text(text)
        out.mark_complete(["summary.json"], {"writer": text})
        outs.append(out)
    remote_for(outs[0].root).push(outs[0])
    remote_for(outs[1].root).push(outs[1])
    for out in outs:
        assert out.is_complete() and json.loads(out.file("summary.json").read_text()) == {"writer": "first"}
        assert (out.path / "snapshots" / "ema-1.json").read_text() == "first"
    assert not remote_for(outs[1].root)._put_marker(outs[1], b"{}", replace=False)


def test_missing_credentials_and_dead_endpoint_fail_in_one_line(
    s3: dict, tmp_path: Path, pipelines_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from dedt.runner import main

    monkeypatch.setenv("DEDT_CACHE", str(tmp_path / "cache"))
    pipelines_file.write_text(yaml.safe_dump({"pipelines": {"tiny": CONFIG}}))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["tiny", "--pipelines", str(pipelines_file), "--root", f"s3://{BUCKET}/nocreds"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no S3 credentials" in err and "AWS_ACCESS_KEY_ID" in err, err

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    assert main(["tiny", "--pipelines", str(pipelines_file), "--root", f"s3://{BUCKET}/dead"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"127.0.0.1:{dead}" in err and "AWS_ENDPOINT_URL" in err, err
    assert not list((tmp_path / "cache").rglob(".lock"))  # no stage started


def test_bad_store_urls_are_refused() -> None:
    from dedt.errors import DedtError
    from dedt.store_root import store_root

    for url in ("gs://bucket/x", "s3://Bad_Bucket/x", "s3://user:secret@bucket/x", "s3://bucket/../x"):
        with pytest.raises(DedtError):
            store_root(url)


def _kill_at_upload(n: int, config: dict) -> None:
    """Child of the kill test: run up to select on s3://BUCKET/kill; SIGKILL before the n-th upload."""
    import dedt.remote_store
    from dedt.config import PipelineConfig
    from dedt.pipeline import plan, run_node
    from dedt.store_root import store_root

    real, calls = dedt.remote_store.Remote._put_file, [0]

    def put_file(self, out, name, digest):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, out, name, digest)

    dedt.remote_store.Remote._put_file = put_file
    cfg = PipelineConfig.model_validate({"name": "tiny", **config})
    planned = plan(cfg, store_root(f"s3://{BUCKET}/kill"))
    for key in UP_TO_SELECT:
        run_node(cfg, planned, key)


if __name__ == "__main__" and sys.argv[1] == "kill-at-upload":
    _kill_at_upload(int(sys.argv[2]), json.loads(sys.argv[3]))
