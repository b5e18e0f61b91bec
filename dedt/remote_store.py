"""The store on S3-compatible object storage (S3, MinIO, R2, GCS's XML API): ``DEDT_HOME=s3://bucket/prefix``.

Stages keep reading and writing local folders: each machine has a cache of the store,
``$DEDT_CACHE/<bucket>/<prefix>`` (default ``~/.cache/dedt``), laid out as a local store. Under a
stage's file lock, ``run_node`` first :meth:`Remote.pull`\\ s it (a stage complete in the bucket is
downloaded and checked against its SHA-256s, the local marker written last; nothing moves when the
local marker already lists the same files) and, when it computed the stage or the bucket lacks it,
:meth:`Remote.push`\\ es it.

Bucket layout, under the prefix: ``<stage>/<fingerprint>/<sha256>/<name>`` for each file, and
``<stage>/<fingerprint>/_COMPLETE``, JSON: ``files`` (the local marker's, name -> SHA-256) and
``extra`` (config.json and the files of the output subfolders, e.g. train's ``snapshots/``).
Files are content-addressed, so two writers never overwrite each other's bytes with other bytes,
and the marker goes last, only after every file it names is uploaded and its upload verified (the
server's ETag is the MD5 we computed), with a conditional put (``If-None-Match: *``): the first
writer wins, a loser adopts the winner's files. A reader therefore never sees a partial stage.

Endpoint, region and credentials come only from the standard AWS variables and files
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/...``), never from a config.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dedt.errors import DedtError
from dedt.store import (
    MARKER,
    MAX_MARKER_BYTES,
    CorruptArtifactWarning,
    StageDir,
    atomic_write_text,
    canonical_json,
    file_sha256,
    open_regular,
)

SCHEME = "s3://"
LINK = ".dedt-remote"  # in a cache root: the URL it mirrors, so any process handed the folder finds the bucket
# Resume state a finished stage may keep but no reader needs (train's checkpoints, encode's shards,
# curve's points): never uploaded. Every other subfolder (train's snapshots/) is an output and is.
RESUME_FOLDERS = frozenset({"checkpoints", "shards", "points"})
CHUNK = 1 << 20

# What pull found, under the stage's lock.
ABSENT = "absent"  # the bucket has no marker for the stage
IN_SYNC = "in-sync"  # the local folder is the bucket's stage (already, or downloaded now)
DAMAGED = "damaged"  # the bucket's marker or one of its files is bad: recompute and replace it


@dataclass(frozen=True)
class Transfer:
    """One stage moved: ``direction`` "up" or "down", the files and bytes moved, the seconds it took."""

    folder: str
    direction: str
    files: int
    bytes: int
    seconds: float


class _Damaged(Exception):
    """A remote object failed its check: the stage is recomputed and the bucket's copy replaced."""


def cache_base() -> Path:
    """Where this machine keeps its caches of remote stores: ``$DEDT_CACHE`` or ``~/.cache/dedt``."""
    return Path(os.environ.get("DEDT_CACHE") or Path.home() / ".cache" / "dedt").expanduser().absolute()


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at its ends)."""
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    prefix = prefix.strip("/")
    if not url.startswith(SCHEME) or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise DedtError(
            f"DEDT_HOME={url!r} is not s3://bucket/prefix with a valid bucket name (3-63 characters: "
            "lowercase letters, digits, '.', '-'); credentials go in AWS_* variables, never in the URL"
        )
    if prefix and any(part in ("", ".", "..") or part.startswith(".") for part in prefix.split("/")):
        raise DedtError(f"DEDT_HOME={url!r}: the prefix may not hold empty, '.', '..' or hidden parts")
    return bucket, prefix


def attach(url: str) -> Path:
    """This machine's cache folder of the store at ``url``, created and linked to it."""
    bucket, prefix = parse_url(url)
    root = cache_base() / bucket / prefix if prefix else cache_base() / bucket
    canonical = f"{SCHEME}{bucket}/{prefix}"
    link = root / LINK
    if not link.is_file() or link.read_text() != canonical:
        atomic_write_text(link, canonical)
    return root


_REMOTES: dict[tuple[Path, str], Remote] = {}


def remote_for(root: Path) -> Remote | None:
    """The bucket a cache folder mirrors, or None for a plain local store (no link file)."""
    link = Path(root) / LINK
    if not link.is_file():
        return None
    url = link.read_text().strip()
    key = (Path(root), url)
    if key not in _REMOTES:
        parse_url(url)
        _REMOTES[key] = Remote(url, Path(root))
    return _REMOTES[key]


class Remote:
    """One bucket prefix, mirrored by the cache folder ``root`` of this machine."""

    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        self.bucket, self.prefix = parse_url(url)
        self.transfers: list[Transfer] = []  # what moved in this process, for logs and the bench
        self._client: Any = None
        self._damaged: dict[Path, bytes] = {}  # stages found damaged in this process: not downloaded again

    # -- connection ---------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Our choice: a dead endpoint fails in seconds (5 s to connect, 3 attempts), not minutes.
            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
            self._client = boto3.session.Session().client("s3", config=config)
        return self._client

    def check(self) -> None:
        """Credentials exist, the endpoint answers and the bucket is there: else one DedtError line."""
        import boto3

        if boto3.session.Session().get_credentials() is None:
            raise DedtError(
                f"no S3 credentials for DEDT_HOME={self.url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials), and AWS_ENDPOINT_URL for a "
                "server other than AWS"
            )
        with self._errors(f"reaching bucket {self.bucket!r}"):
            self.client.head_bucket(Bucket=self.bucket)

    def _errors(self, what: str) -> Any:
        return _S3Errors(self, what)

    def _key(self, out: StageDir, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, out.stage, out.fingerprint, *parts) if p)

    # -- pull ---------------------------------------------------------------------------------

    def pull(self, out: StageDir) -> str:
        """Make ``out`` (locked by the caller) the bucket's copy of the stage when it has one: ABSENT,
        IN_SYNC or DAMAGED (warned; the caller recomputes the stage and pushes with ``replace``)."""
        raw = self._get_marker(out)
        if raw is None:
            return ABSENT
        remote = _parse_marker(raw)
        if remote is None or self._damaged.get(out.path) == raw:
            if remote is None:
                _warn(out, f"the bucket's {MARKER} at {self._key(out, MARKER)} is unreadable")
            return DAMAGED
        if _local_files(out) == remote["files"]:
            return IN_SYNC  # the marker compared, no artifact byte moved
        try:
            self._download(out, remote)
        except _Damaged as exc:
            self._damaged[out.path] = raw
            _warn(out, str(exc))
            return DAMAGED
        return IN_SYNC

    def pull_input(self, out: StageDir) -> None:
        """Bring an input stage into the cache when the bucket has another copy; the exclusive lock is
        taken only to download, so readers of an up-to-date input are never held up."""
        raw = self._get_marker(out)
        remote = _parse_marker(raw) if raw is not None else None
        if remote is not None and _local_files(out) != remote["files"]:
            with out.lock():
                self.pull(out)

    def _get_marker(self, out: StageDir) -> bytes | None:
        with self._errors(f"reading {self._key(out, MARKER)}"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(out, MARKER))
            except self.client.exceptions.NoSuchKey:
                return None
            return response["Body"].read(MAX_MARKER_BYTES + 1)

    def _download(self, out: StageDir, remote: dict[str, dict[str, str]]) -> None:
        """Every file of the bucket's marker into temp files, each checked; then renamed, marker last."""
        start, moved = time.perf_counter(), 0
        staged: list[tuple[Path, Path]] = []
        try:
            for name, digest in sorted({**remote["files"], **remote["extra"]}.items()):
                target = out.path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                staged.append((Path(tmp), target))
                sha = hashlib.sha256()
                with os.fdopen(fd, "wb") as handle, self._errors(f"downloading {name} of {out.path}"):
                    try:
                        body = self.client.get_object(Bucket=self.bucket, Key=self._key(out, digest, name))["Body"]
                    except self.client.exceptions.NoSuchKey:
                        raise _Damaged(f"{self._key(out, digest, name)} is missing from the bucket") from None
                    for block in body.iter_chunks(CHUNK):
                        sha.update(block)
                        handle.write(block)
                        moved += len(block)
                    handle.flush()
                    os.fsync(handle.fileno())
                if sha.hexdigest() != digest:
                    raise _Damaged(f"{self._key(out, digest, name)} failed its SHA-256 check")
            out.invalidate()  # from here the folder is the bucket's: a kill leaves it unfinished, not mixed
            for tmp, target in staged:
                os.replace(tmp, target)
            out.write_marker(remote["files"])
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        self.transfers.append(Transfer(str(out.path), "down", len(staged), moved, time.perf_counter() - start))

    # -- push ---------------------------------------------------------------------------------

    def push(self, out: StageDir, *, replace: bool = False) -> None:
        """Publish ``out`` (complete, locked by the caller): every file uploaded and verified, then the
        marker, conditionally unless ``replace`` (the bucket's copy is damaged). If another writer
        published first, its files are adopted (downloaded and checked) and ours dropped."""
        files = _local_files(out)
        if files is None:
            raise DedtError(f"{out.path} has no readable {MARKER}: it cannot be uploaded; re-run the pipeline")
        if not replace:
            raw = self._get_marker(out)
            if raw is not None:
                remote = _parse_marker(raw)
                if remote is None:
                    replace = True  # an unreadable marker vouches for nothing: ours replaces it
                elif remote["files"] != files:
                    self.pull(out)  # another writer finished first: use its files
                    return
                else:
                    return
        start, moved = time.perf_counter(), 0
        names = {**files, **_extra_files(out)}
        for name in sorted(names):
            moved += self._put_file(out, name, names[name])
        marker = canonical_json({"files": files, "extra": {k: v for k, v in names.items() if k not in files}})
        if self._put_marker(out, marker.encode(), replace):
            self._damaged.pop(out.path, None)  # replaced: the bucket's copy is good again
            self.transfers.append(Transfer(str(out.path), "up", len(names), moved, time.perf_counter() - start))
        else:
            self.pull(out)  # lost the race: the winner's files replace ours

    def _put_file(self, out: StageDir, name: str, digest: str) -> int:
        """Upload one file to its content address; the server's ETag must be the MD5 of our bytes."""
        path = out.path / name
        sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 - MD5 only as S3's integrity check
        with open_regular(path, max_bytes=None) as handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                sha.update(block)
                md5.update(block)
            if sha.hexdigest() != digest:
                raise DedtError(
                    f"{path} changed after its stage finished (SHA-256 differs from {MARKER}); "
                    "re-run the pipeline to compute it again"
                )
            handle.seek(0)
            with self._errors(f"uploading {path}"):
                response = self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(out, digest, name),
                    Body=handle,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                )
        etag = response.get("ETag", "").strip('"')
        # A plain 32-hex ETag is the MD5 of the stored bytes (single PUT, no SSE-KMS); other ETags are
        # opaque, and the server's own Content-MD5 check is the verification.
        if re.fullmatch(r"[0-9a-f]{32}", etag) and etag != md5.hexdigest():
            raise DedtError(f"the bucket stored other bytes for {path} than were sent; re-run to upload it again")
        return path.stat().st_size

    def _put_marker(self, out: StageDir, body: bytes, replace: bool) -> bool:
        """Write the marker; False when another writer's marker got there first (conditional put)."""
        extra = {} if replace else {"IfNoneMatch": "*"}
        with self._errors(f"writing {self._key(out, MARKER)}"):
            from botocore.exceptions import ClientError

            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(out, MARKER), Body=body, **extra)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        return True


class _S3Errors:
    """Turns the S3 client's errors into one DedtError line naming the store and the fix."""

    def __init__(self, remote: Remote, what: str) -> None:
        self.remote, self.what = remote, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (DedtError, _Damaged)):
            return False
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        url = self.remote.url
        if isinstance(exc, NoCredentialsError):
            raise DedtError(
                f"no S3 credentials for DEDT_HOME={url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from exc
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "404") or (status == 404 and "bucket" in self.what):
                fix = f"create the bucket (aws s3 mb s3://{self.remote.bucket}, or mc mb on MinIO)"
            elif status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                fix = "the server refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
            else:
                fix = "check the server and re-run: finished stages are kept"
            raise DedtError(f"S3 store {url}: {self.what} failed ({code}); {fix}") from exc
        if isinstance(exc, BotoCoreError):
            endpoint = getattr(self.remote.client.meta, "endpoint_url", "?")
            raise DedtError(
                f"S3 store {url}: {self.what} failed: cannot reach {endpoint} ({exc}); check "
                "AWS_ENDPOINT_URL and that the server is up"
            ) from exc
        return False


def _warn(out: StageDir, why: str) -> None:
    warnings.warn(
        f"{out.stage}/{out.fingerprint}: {why}; computing the stage again and replacing the bucket's copy",
        CorruptArtifactWarning,
        stacklevel=3,
    )


def _safe_name(name: object, *, nested: bool) -> bool:
    """A file of the stage folder (or, ``nested``, of an output subfolder): no '..', no hidden part."""
    if not isinstance(name, str) or "\\" in name or "\0" in name:
        return False
    parts = PurePosixPath(name).parts
    return (
        0 < len(parts) <= (8 if nested else 1)
        and "/".join(parts) == name
        and not any(p in ("..", ".") or p.startswith(".") or p == "/" for p in parts)
        and (not nested or len(parts) == 1 or parts[0] not in RESUME_FOLDERS)
    )


def _parse_marker(raw: bytes) -> dict[str, dict[str, str]] | None:
    """The bucket's marker, or None when it is unreadable or names anything outside the stage folder."""
    try:
        data = json.loads(raw)
        files, extra = data["files"], data["extra"]
    except (ValueError, KeyError, TypeError):
        return None
    digest = re.compile(r"[0-9a-f]{64}")
    ok = (
        isinstance(files, dict)
        and isinstance(extra, dict)
        and len(raw) <= MAX_MARKER_BYTES
        and all(_safe_name(n, nested=False) and isinstance(d, str) and digest.fullmatch(d) for n, d in files.items())
        and all(
            _safe_name(n, nested=True) and n not in files and isinstance(d, str) and digest.fullmatch(d)
            for n, d in extra.items()
        )
    )
    return {"files": files, "extra": extra} if ok else None


def _local_files(out: StageDir) -> dict[str, str] | None:
    """The local marker's files (name -> SHA-256), or None without a readable one."""
    try:
        with open_regular(out.path / MARKER) as handle:
            files = json.loads(handle.read(MAX_MARKER_BYTES + 1))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def _extra_files(out: StageDir) -> dict[str, str]:
    """config.json and the files of the output subfolders (not resume state, not temp or hidden files)."""
    found = {}
    for path in sorted(out.path.rglob("*")):
        name = path.relative_to(out.path).as_posix()
        if (
            path.is_file()
            and not path.is_symlink()
            and _safe_name(name, nested=True)
            and (name == "config.json" or "/" in name)
        ):
            found[name] = file_sha256(path, follow_links=False)
    return found
