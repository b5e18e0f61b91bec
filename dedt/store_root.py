"""Where the store lives: ``$DEDT_HOME`` as a local folder, or an ``s3://`` URL and this machine's
cache of it. Kept apart from ``dedt.store`` (the folder format) so the remote layer, which builds on
that format, is not imported by it."""

from __future__ import annotations

import os
from pathlib import Path

from dedt.errors import DedtError
from dedt.remote_store import attach, remote_for


def default_root() -> Path:
    """The store root: ``$DEDT_HOME`` or ``./.dedt`` (for ``s3://...``, this machine's cache of it)."""
    return store_root(os.environ.get("DEDT_HOME", ".dedt")).resolve()


def store_root(spec: str | os.PathLike[str]) -> Path:
    """The local folder of a store: ``spec`` itself, or for ``s3://bucket/prefix`` this machine's cache
    of that bucket (``dedt.remote_store``), whose stages are downloaded and uploaded around each run."""
    text = os.fspath(spec)
    if "://" in text:
        if not text.startswith("s3://"):
            raise DedtError(
                f"store {text!r}: only local folders and s3://bucket/prefix URLs are supported (an "
                "S3-compatible server such as MinIO, R2 or GCS is reached through AWS_ENDPOINT_URL)"
            )
        return attach(text)
    return Path(text)


def root_spec(root: Path) -> str:
    """How to name the store ``root`` to another machine: its ``s3://`` URL for a cache, else the path."""
    remote = remote_for(root)
    return remote.url if remote is not None else str(root)
