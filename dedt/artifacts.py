"""The catalogue of what stages write: each artifact's file name, columns, reader, writer and check.

The stages write and read through it, preflight checks finished stages through it and the Prefect
artifacts find their files by it, so a name or a column lives here once. ``columns`` are the ones
every reader may rely on; a writer may add more (the manifest's contamination ground truth). The
domain readers of the richest files stay with their logic (``dedt.data.manifest.load_split``,
``dedt.encoders.streaming.read_embeddings``, ``dedt.evaluate.read_metrics``) and read these names.

A ``check_*`` reads narrow columns of a finished stage before a run starts (``dedt.preflight``) and
raises a DedtError naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dedt.data.manifest import COLUMNS as MANIFEST_COLUMNS
from dedt.errors import DedtError
from dedt.store import StageDir, parquet_metadata, read_parquet, write_parquet


@dataclass(frozen=True)
class Artifact:
    """A Parquet file of one stage's folder and the columns its readers rely on."""

    name: str
    stage: str
    columns: tuple[str, ...]

    def __fspath__(self) -> str:  # a relative path: ``stage_dir.file(WEIGHTS)`` and ``folder / WEIGHTS`` work too
        return self.name

    def path(self, folder: StageDir | Path | str) -> Path:
        """The file in a stage folder (a StageDir, or its path as a NodeResult holds it)."""
        return (folder.path if isinstance(folder, StageDir) else Path(folder)) / self.name

    def read(self, folder: StageDir | Path | str) -> pa.Table:
        """The whole table, checked readable and holding ``columns``."""
        return read_parquet(self.path(folder), self.columns)

    def write(self, folder: StageDir, table: pa.Table, metadata: dict[str, Any] | None = None) -> None:
        """Write atomically with fixed writer settings (same bytes every run); ``metadata`` as JSON."""
        missing = [c for c in self.columns if c not in table.column_names]
        if missing:
            raise DedtError(f"{self.path(folder)}: the {self.stage} stage's table lacks columns {missing}")
        write_parquet(table, self.path(folder), metadata)

    def read_columns(self, folder: StageDir, columns: list[str]) -> tuple[pa.Table, dict[str, Any]]:
        """Only ``columns`` (no image or embedding bytes), with the file's metadata; a missing column or
        an unreadable file is a DedtError saying to delete the folder."""
        import pyarrow.parquet as pq

        path = self.path(folder)
        try:
            schema = pq.read_schema(path)
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise DedtError(f"artifact {path} lacks columns {missing}; {delete_hint(folder)}")
            table = pq.read_table(path, columns=columns)
        except DedtError:
            raise
        except Exception as exc:  # noqa: BLE001 - any read failure is a damaged artifact
            raise DedtError(f"artifact {path} is unreadable ({exc}); delete {folder.path} and re-run") from exc
        return table, parquet_metadata(table.replace_schema_metadata(schema.metadata))


MANIFEST = Artifact("manifest.parquet", "data", MANIFEST_COLUMNS)
EMBEDDINGS = Artifact("embeddings.parquet", "encode", ("sample_id", "embedding"))
SCORES = Artifact("scores.parquet", "score", ("sample_id", "label", "score"))
SUBSET = Artifact("subset.parquet", "select", ("sample_id",))  # also label, score, rank (0 = best score)
DUPLICATES = Artifact("duplicates.parquet", "select", ("sample_id", "group", "kept"))
GROUPS = Artifact("groups.parquet", "reweight", ("sample_id", "group"))  # k-means groups only
WEIGHTS = Artifact("weights.parquet", "reweight", ("group", "weight"))  # also samples_in_subset
TRAJECTORY = Artifact("trajectory.parquet", "reweight", ("round", "step", "group", "alpha", "excess"))
METRICS = Artifact(
    "metrics.parquet",
    "evaluate",
    ("metric", "feature_space", "reference", "class", "value", "n_real", "n_fake", "seed"),
)
SAMPLES = Artifact("samples.parquet", "evaluate", ("sample_id", "label", "image"))
CURVE = Artifact(
    "curve.parquet",
    "curve",
    (
        "kimg",
        "train_seconds",
        "overhead_seconds",
        "reference_seconds",
        "fd",
        "precision",
        "recall",
        "fd_per_class",
        "fd_bank2",
        "final",
    ),
)

# The other files of a stage folder.
SUMMARY = "summary.json"  # every stage: its return value plus "seconds" (dedt.pipeline.run_node)
CONFIG = "config.json"  # every stage: the resolved node config (key, options, input fingerprints)
CLASSIFIER = "classifier.safetensors"  # classifier stage
TRAIN_LOG = "log.jsonl"  # train stage: one line per log interval (dedt.diffusion)
WEIGHTS_PLOT = "weights.png"  # reweight stage: the DRO trajectory and the averaged weights
GRID, CLASS_FD_PLOT, REPORT = "grid.png", "class_fd.png", "report.md"  # evaluate stage


def read_summary(folder: StageDir) -> dict[str, Any]:
    """A finished stage's summary.json."""
    return folder.read_json(SUMMARY)


def image_shape(data: StageDir) -> tuple[int, int, int]:
    """(H, W, C) of the images of a finished data stage."""
    height, width, channels = read_summary(data)["shape"]
    return int(height), int(width), int(channels)


def subset_ids(select: StageDir) -> np.ndarray:
    """The sample ids the select stage kept."""
    return SUBSET.read(select).column("sample_id").to_numpy()


def read_weights(reweight: StageDir) -> np.ndarray:
    """The reweight stage's group weights, float64 (k,), checked on the simplex."""
    weights = WEIGHTS.read(reweight).column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    check_simplex(weights, reweight)
    return weights


def check_simplex(weights: np.ndarray, reweight: StageDir) -> None:
    """Weights are non-empty, finite, >= 0 and sum to 1 (to 1e-6: float64 sums of a float64 mean)."""
    if len(weights) == 0 or not np.all(np.isfinite(weights)) or np.any(weights < 0) or abs(weights.sum() - 1.0) > 1e-6:
        raise DedtError(
            f"artifact {WEIGHTS.path(reweight)}: class weights are not on the simplex "
            f"(sum {weights.sum():.6g}, min {weights.min() if len(weights) else 'n/a'}); "
            f"{delete_hint(reweight)}"
        )


def delete_hint(folder: StageDir) -> str:
    return f"it was not written by this pipeline's {folder.stage} stage: delete {folder.path} and re-run"


def train_ids(data: StageDir) -> np.ndarray:
    """The manifest's train-split sample ids (two narrow columns read, no images)."""
    table, _ = MANIFEST.read_columns(data, ["sample_id", "split"])
    keep = np.asarray(table.column("split").to_pylist()) == "train"
    return table.column("sample_id").to_numpy()[keep]


def check_embeddings(encode: StageDir, manifest_ids: np.ndarray, encoder: str, expected_dim: int | None) -> None:
    """Fixed-width embeddings of the train split, ``expected_dim`` wide when the ``encoder`` fixes it."""
    import pyarrow.parquet as pq

    path = EMBEDDINGS.path(encode)
    table, metadata = EMBEDDINGS.read_columns(encode, ["sample_id"])
    names = pq.read_schema(path).names
    kind = pq.read_schema(path).field("embedding").type if "embedding" in names else None
    if kind is None or not hasattr(kind, "list_size"):
        raise DedtError(
            f"artifact {path}: column embedding is {kind}, expected fixed_size_list<float32>; {delete_hint(encode)}"
        )
    width = kind.list_size
    if metadata.get("dim") not in (None, width) or (expected_dim is not None and width != expected_dim):
        want = expected_dim if expected_dim is not None else metadata.get("dim")
        raise DedtError(
            f"artifact {path} holds {width}-d embeddings but encode.encoder={encoder} "
            f"gives {want}-d; {delete_hint(encode)}"
        )
    _same_samples(EMBEDDINGS, encode, table.column("sample_id").to_numpy(), manifest_ids)


def check_scores(score: StageDir, manifest_ids: np.ndarray) -> None:
    """A finite score for every train-split sample."""
    table, _ = SCORES.read_columns(score, list(SCORES.columns))
    _same_samples(SCORES, score, table.column("sample_id").to_numpy(), manifest_ids)
    if not np.all(np.isfinite(table.column("score").to_numpy(zero_copy_only=False))):
        raise DedtError(f"artifact {SCORES.path(score)} holds NaN/inf scores; {delete_hint(score)}")


def check_subset(select: StageDir, manifest_ids: np.ndarray) -> None:
    """A non-empty set of distinct train-split samples."""
    table, _ = SUBSET.read_columns(select, ["sample_id"])
    ids = table.column("sample_id").to_numpy()
    if len(ids) == 0 or not np.all(np.isin(ids, manifest_ids)) or len(np.unique(ids)) != len(ids):
        raise DedtError(
            f"artifact {SUBSET.path(select)} names samples that are not in the manifest's train "
            f"split (or none, or twice); {delete_hint(select)}"
        )


def check_weights(reweight: StageDir, num_classes: int | None) -> None:
    """Weights on the simplex, one per class when ``num_classes`` is given (class groups)."""
    table, _ = WEIGHTS.read_columns(reweight, list(WEIGHTS.columns))
    weights = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    check_simplex(weights, reweight)
    if num_classes is not None and len(weights) != num_classes:
        raise DedtError(
            f"artifact {WEIGHTS.path(reweight)} has {len(weights)} class weights for "
            f"{num_classes} classes; {delete_hint(reweight)}"
        )


def _same_samples(artifact: Artifact, folder: StageDir, ids: np.ndarray, expected: np.ndarray) -> None:
    if len(ids) != len(expected) or not np.array_equal(np.sort(ids), np.sort(expected)):
        raise DedtError(
            f"artifact {artifact.path(folder)} covers other samples than the manifest's train split "
            f"({len(ids)} rows, {len(expected)} expected); {delete_hint(folder)}"
        )
