"""Content-addressed stage store: fingerprints, atomic writes, completion markers.

Layout: ``<root>/<stage>/<fingerprint>/`` holds a stage's artifacts, its resolved config
(``config.json``) and, written last, the completion marker ``_COMPLETE`` (JSON with the
artifact checksums). A folder without the marker is work in progress: it may hold partial
state (shards, checkpoints) that the stage resumes from, and nothing downstream reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dedt.errors import DedtError

MARKER = "_COMPLETE"
MAX_MARKER_BYTES = 1 << 20  # a marker lists a stage's files: a few KB
MAX_JSON_BYTES = 64 << 20  # summary.json and the like: KBs


class CorruptArtifactWarning(UserWarning):
    """A finished stage's artifact failed its checksum: the stage is computed again."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(stage: str, version: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """hash(stage, code version, canonical config, input fingerprints): 16 hex chars."""
    payload = canonical_json({"stage": stage, "version": version, "config": config, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageDir:
    """One stage's folder in the store, named by its fingerprint."""

    root: Path
    stage: str
    fingerprint: str

    @property
    def path(self) -> Path:
        return self.root / self.stage / self.fingerprint

    def file(self, name: str) -> Path:
        return self.path / name

    def is_complete(self) -> bool:
        """True when the marker exists and every recorded artifact still has its checksum."""
        return os.path.lexists(self.path / MARKER) and not self.damaged()

    def damaged(self) -> list[Path]:
        """Artifacts whose SHA-256 no longer matches the marker (or that are gone), the marker itself
        when unreadable; empty when there is no marker (work in progress, not damage).

        The store may be shared, so a marker is untrusted: it may name plain files of its own folder
        only (no path, no link, no device or FIFO that would hang the read), else it is damaged."""
        marker = self.path / MARKER
        if not os.path.lexists(marker):
            return []
        try:
            with open_regular(marker) as handle:
                recorded = json.loads(handle.read(MAX_MARKER_BYTES + 1))["files"]
            if not isinstance(recorded, dict) or not all(
                _plain_name(n) and isinstance(d, str) for n, d in recorded.items()
            ):
                return [marker]
        except (ValueError, KeyError, TypeError, OSError):
            return [marker]
        bad = []
        for name, digest in recorded.items():
            path = self.path / name
            try:
                if file_sha256(path, follow_links=False) != digest:
                    bad.append(path)
            except OSError:  # missing, or not a readable file
                bad.append(path)
        return bad

    def read_json(self, name: str) -> Any:
        """A JSON file of the folder, read as a marker's files are (regular, no link, bounded)."""
        try:
            with open_regular(self.path / name, MAX_JSON_BYTES) as handle:
                return json.loads(handle.read())
        except (OSError, ValueError) as exc:
            raise DedtError(f"{self.path / name} is unreadable ({exc}); delete {self.path} and re-run") from exc

    def mark_complete(self, files: list[str], config: Mapping[str, Any]) -> None:
        """Record checksums of ``files`` and the resolved config; the marker goes last."""
        atomic_write_text(self.path / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))
        self.write_marker({name: file_sha256(self.path / name) for name in files})

    def write_marker(self, digests: Mapping[str, str]) -> None:
        """The completion marker (file name -> SHA-256), written once every file it names is in place."""
        atomic_write_text(self.path / MARKER, json.dumps({"files": dict(digests)}, indent=2, sort_keys=True))

    def invalidate(self) -> None:
        """Drop the marker so the stage recomputes (a corrupted artifact was found)."""
        (self.path / MARKER).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """Exclusive file lock: two processes never write one stage at once; the second waits.

        ``shared=True`` is a reader's lock: any number of readers, but never while a writer holds it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise DedtError(
                f"cannot create the stage folder {self.path}: {exc.strerror}; check the store "
                f"($DEDT_HOME={self.root}) is a writable folder and that no file stands in its place"
            ) from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def remove_temp_files(self) -> None:
        """Delete the temp files (``.<name>.*.tmp``) a killed writer left; call only under ``lock()``."""
        for tmp in self.path.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def _plain_name(name: object) -> bool:
    """A file name of the folder itself: no separator, no '..', not hidden (temp files and locks)."""
    return isinstance(name, str) and name == os.path.basename(name) and not name.startswith(".") and "\0" not in name


def open_regular(path: Path, max_bytes: int | None = MAX_MARKER_BYTES, *, follow_links: bool = False) -> Any:
    """Open ``path`` for reading only if it is a regular file (not a FIFO or device, which would block
    or never end), by default not through a symlink; ``max_bytes`` caps its size (None: any size).
    Raises OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (max_bytes is not None and info.st_size > max_bytes):
        os.close(fd)
        raise OSError(f"{path} is not a regular file" if not stat.S_ISREG(info.st_mode) else f"{path} is too large")
    return os.fdopen(fd, "rb")


def file_sha256(path: Path, *, follow_links: bool = True) -> str:
    """SHA-256 of a regular file; ``follow_links=False`` refuses a symlink (files named by a marker)."""
    digest = hashlib.sha256()
    with open_regular(path, max_bytes=None, follow_links=follow_links) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync and rename it into place.

    A reader never sees a partial file: either the old content or the complete new one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise DedtError(
            f"cannot write to {path.parent}: {exc.strerror}; check the store ($DEDT_HOME) is writable"
        ) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise DedtError(
            f"writing {path} failed: {exc.strerror or exc}; free disk space or fix permissions, then re-run"
        ) from exc
    except DedtError:
        tmp_path.unlink(missing_ok=True)
        raise
    except Exception as exc:
        # Writers that wrap the OS error (safetensors: SafetensorError, torch.save: RuntimeError):
        # if the folder cannot take more bytes now, that was the cause: say so, not a traceback.
        reason = _unwritable(tmp_path)
        tmp_path.unlink(missing_ok=True)
        if reason:
            raise DedtError(
                f"writing {path} failed: {reason}; free disk space or fix permissions, then re-run"
            ) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems don't open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unwritable(tmp_path: Path, probe: int = 1 << 20) -> str | None:
    """Why ``tmp_path`` cannot grow by ``probe`` bytes (disk full, file size limit, read-only), or None."""
    try:
        with open(tmp_path, "ab") as handle:
            handle.write(bytes(probe))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_parquet(table: pa.Table, path: Path, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``table`` atomically; ``metadata`` is stored as JSON under the key ``dedt``."""
    if metadata is not None:
        existing = dict(table.schema.metadata or {})
        existing[b"dedt"] = canonical_json(metadata).encode()
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        # Fixed writer settings keep the bytes identical across runs (determinism invariant).
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def read_parquet(path: Path, required: tuple[str, ...] = ()) -> pa.Table:
    """Read a Parquet artifact, checking it is readable and has the ``required`` columns."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError as exc:
        raise DedtError(f"artifact {path} is missing; re-run the stage that writes it") from exc
    except (OSError, pa.ArrowException) as exc:
        raise DedtError(f"artifact {path} is corrupted ({exc}); delete its stage folder and re-run") from exc
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DedtError(f"artifact {path} lacks columns {missing}; it was written by another stage or version")
    return table


def parquet_metadata(table: pa.Table) -> dict[str, Any]:
    """The ``dedt`` metadata stored by :func:`write_parquet` (empty when absent)."""
    raw = (table.schema.metadata or {}).get(b"dedt")
    return json.loads(raw) if raw else {}
