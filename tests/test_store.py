"""The store: fingerprints, atomic writes, completion markers with checksums, corruption."""

import numpy as np
import pyarrow as pa
import pytest

from dedt.errors import DedtError
from dedt.store import StageDir, fingerprint, read_parquet, write_parquet


def test_fingerprint_depends_on_config_inputs_and_version():
    base = fingerprint("score", "1", {"method": "gaussian"}, {"encode": "abc"})
    assert base == fingerprint("score", "1", {"method": "gaussian"}, {"encode": "abc"})
    assert base != fingerprint("score", "1", {"method": "knn"}, {"encode": "abc"})
    assert base != fingerprint("score", "1", {"method": "gaussian"}, {"encode": "abd"})
    assert base != fingerprint("score", "2", {"method": "gaussian"}, {"encode": "abc"})


def test_parquet_round_trip_is_byte_deterministic(tmp_path):
    table = pa.table({"a": np.arange(5), "b": np.linspace(0, 1, 5)})
    write_parquet(table, tmp_path / "x.parquet", {"k": 1})
    write_parquet(table, tmp_path / "y.parquet", {"k": 1})
    assert (tmp_path / "x.parquet").read_bytes() == (tmp_path / "y.parquet").read_bytes()
    assert read_parquet(tmp_path / "x.parquet", ("a", "b")).equals(
        table.replace_schema_metadata(read_parquet(tmp_path / "x.parquet").schema.metadata)
    )
    assert not list(tmp_path.glob(".*tmp"))


def test_marker_detects_corruption(tmp_path):
    stage = StageDir(tmp_path, "score", "f00")
    write_parquet(pa.table({"a": [1, 2, 3]}), stage.file("scores.parquet"))
    assert not stage.is_complete()
    stage.mark_complete(["scores.parquet"], {"x": 1})
    assert stage.is_complete()
    data = stage.file("scores.parquet").read_bytes()
    stage.file("scores.parquet").write_bytes(data[: len(data) // 2])  # truncated
    assert not stage.is_complete()
    with pytest.raises(DedtError, match="corrupted"):
        read_parquet(stage.file("scores.parquet"))


def test_failed_write_leaves_previous_artifact(tmp_path):
    path = tmp_path / "x.parquet"
    write_parquet(pa.table({"a": [1]}), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        from dedt.store import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


def test_unwritable_store_is_a_clear_error(tmp_path):
    import os

    if os.geteuid() == 0:
        target = tmp_path / "file-not-dir"
        target.write_text("")
        path = target / "x.parquet"  # parent is a file: cannot create
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        path = tmp_path / "ro" / "x.parquet"
    with pytest.raises(DedtError, match="cannot write"):
        write_parquet(pa.table({"a": [1]}), path)
