"""The manifest: every sample's id, label, class name, split and PNG bytes, in one Parquet file.

Images are resized once, here, to the pipeline's resolution with PIL's bicubic filter (which
antialiases when shrinking), so every later stage reads identical pixels. Models see them scaled
to [-1, 1] (``x / 127.5 - 1``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa

from dedt.data.sources import RawDataset
from dedt.errors import DedtError
from dedt.store import read_parquet, write_parquet

COLUMNS = ("sample_id", "label", "class_name", "split", "image")


def prepare_images(raw: RawDataset, resolution: int | None, channels: int | None) -> np.ndarray:
    """uint8 (N, H, W, C) at ``resolution`` x ``resolution`` with ``channels`` channels."""
    from PIL import Image

    images = raw.images
    sizes = {img.shape[:2] for img in images}
    if resolution is None and len(sizes) > 1:
        raise DedtError(f"images have mixed sizes {sorted(sizes)[:3]}...; set dataset.resolution to resize them")
    out = []
    for img in images:
        c = channels or img.shape[2]
        if img.shape[2] != c:
            img = np.repeat(img, 3, axis=2) if c == 3 else np.rint(img.mean(axis=2, keepdims=True)).astype(np.uint8)
        if resolution is not None and img.shape[:2] != (resolution, resolution):
            pil = Image.fromarray(img[..., 0] if c == 1 else img)
            img = np.asarray(pil.resize((resolution, resolution), Image.BICUBIC), np.uint8).reshape(
                resolution, resolution, c
            )
        out.append(img)
    if len({img.shape[2] for img in out}) > 1:
        raise DedtError("images mix grayscale and colour; set dataset.channels to 1 or 3")
    return np.stack(out)


def holdout_mask(labels: np.ndarray, holdout_frac: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out samples: floor(frac * n_c) per class, seeded, deterministic."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_hold = int(np.floor(holdout_frac * len(idx)))
        if n_hold:
            mask[rng.choice(idx, n_hold, replace=False)] = True
    return mask


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_manifest(
    raw: RawDataset,
    images: np.ndarray,
    holdout: np.ndarray,
    path: Path,
    meta: dict,
    columns: Mapping[str, pa.Array] | None = None,
) -> None:
    """The manifest; ``columns`` adds per-row columns after the image (a contaminated set's ground truth)."""
    empty = [raw.class_names[c] for c in range(len(raw.class_names)) if not np.any(raw.labels[~holdout] == c)]
    if empty:
        raise DedtError(f"classes {empty} have no training images; add images or lower dataset.holdout_frac")
    table = pa.table(
        {
            "sample_id": pa.array(np.arange(len(images), dtype=np.int64)),
            "label": pa.array(raw.labels.astype(np.int32)),
            "class_name": pa.array([raw.class_names[c] for c in raw.labels]),
            "split": pa.array(np.where(holdout, "holdout", "train")),
            "image": pa.array([encode_png(img) for img in images], pa.binary()),
            **(columns or {}),
        }
    )
    write_parquet(table, path, {**meta, "class_names": raw.class_names, "shape": list(images.shape[1:])})


def load_split(path: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids int64, images float32 (N, C, H, W) in [-1, 1], labels int64) of one split."""
    from PIL import Image

    table = read_parquet(path, COLUMNS)
    keep = np.asarray(table.column("split").to_pylist()) == split
    ids = table.column("sample_id").to_numpy()[keep]
    labels = table.column("label").to_numpy()[keep].astype(np.int64)
    pngs = [b for b, k in zip(table.column("image").to_pylist(), keep, strict=True) if k]
    arrays = [np.asarray(Image.open(io.BytesIO(b)), np.uint8) for b in pngs]
    x = np.stack(arrays).astype(np.float32)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return ids, x / 127.5 - 1.0, labels


def class_names(path: Path) -> list[str]:
    from dedt.store import parquet_metadata

    return parquet_metadata(read_parquet(path))["class_names"]
