"""A contaminated copy of any dataset, with its ground truth: what scraped training data looks like.

Scraped image sets hold exact and near-duplicates, some of them copied many times, images from
outside the domain, wrong labels and imbalanced classes; duplicates are the main cause of
training-image replication by diffusion models (Carlini et al. 2023; Somepalli et al. 2023). From
one seed, ``contaminate`` adds each of these to a source's raw images (``dataset.contaminate``).

Only the train split is touched: the held-out images stay a clean sample of the domain, so the
classifier, the real-data floor and the memorization threshold measure against clean data. Every
added or changed row carries its ground truth (``contaminant``: none | duplicate | near-duplicate |
off-domain | mislabel; ``duplicate_of``: the sample id a copy was made from, else -1) as manifest
columns that no selection method reads. Rows are shuffled at the end, so a sample id says nothing
about which rows were added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from dedt.data.sources import RawDataset
from dedt.errors import DedtError

if TYPE_CHECKING:
    from dedt.config import ContaminateConfig

KINDS = ("none", "duplicate", "near-duplicate", "off-domain", "mislabel")
CONTAMINANT, DUPLICATE_OF = "contaminant", "duplicate_of"  # manifest columns, written only when contaminated

# Near-duplicate perturbations (our choice: a copy still reads as the same image, yet no byte is shared):
SHIFT_FRAC = 0.04  # shift up to 4% of the side: 1 px at 28 px (MNIST), as a re-crop would
# Half the copies are re-cropped: at 8x8 a 1/28 shift moves an MNIST digit as far (in cosine distance)
# as its nearest other digit, so shifted copies test an encoder's invariance, unshifted ones deduplication.
SHIFT_PROB = 0.5
CONTRAST, BRIGHTNESS = 0.10, 0.05  # contrast x U(0.9, 1.1); brightness + U(-0.05, 0.05) of full scale
NOISE_STD = 0.02  # Gaussian noise, 2% of full scale (re-encoding, resampling)
PATCH_MIN = 32  # off-domain patches: at least 32x32 px of a 427x640 photo before resizing


@dataclass(frozen=True)
class Contaminated:
    """A dataset with its contamination; row i of each array describes image i."""

    raw: RawDataset
    holdout: np.ndarray  # bool (N,)
    kinds: np.ndarray  # str (N,), one of KINDS
    duplicate_of: np.ndarray  # int64 (N,): row of the original a (near-)duplicate copies, else -1

    def columns(self) -> dict[str, pa.Array]:
        """The manifest's ground-truth columns (row i = sample id i)."""
        return {
            CONTAMINANT: pa.array(self.kinds.tolist(), pa.string()),
            DUPLICATE_OF: pa.array(self.duplicate_of, pa.int64()),
        }

    def counts(self) -> dict[str, int]:
        """Train rows of each kind (held-out rows are all clean)."""
        return {kind: int((self.kinds[~self.holdout] == kind).sum()) for kind in KINDS}


def contaminate(raw: RawDataset, holdout: np.ndarray, options: ContaminateConfig) -> Contaminated:
    """Contaminate the train rows of ``raw`` (``holdout`` marks the rest) as ``options`` declare, from its seed.

    With n train rows left after the class imbalance: ``round(mislabel_frac * n)`` labels are changed,
    ``round(duplicate_frac * n)`` and ``round(near_duplicate_frac * n)`` further rows (disjoint sets)
    are each copied 1..max_copies times (a Zipf tail, exponent ``copies_exponent``), exactly or
    perturbed, and ``round(off_domain_frac * n)`` off-domain images join with uniformly random labels.
    """
    streams = np.random.SeedSequence(options.seed).spawn(6)  # one per step: changing one option keeps the others' draws
    rng_imbalance, rng_pick, rng_copies, rng_perturb, rng_off, rng_order = map(np.random.default_rng, streams)
    k = len(raw.class_names)
    if options.mislabel_frac > 0 and k < 2:
        raise DedtError("dataset.contaminate.mislabel_frac needs at least 2 classes; set it to 0")
    images = list(raw.images)
    labels = raw.labels.astype(np.int64).copy()
    keep = _imbalance_keep(labels, ~holdout, options.imbalance, k, rng_imbalance) | holdout
    rows = np.flatnonzero(keep)
    images, labels, holdout = [images[i] for i in rows], labels[rows], holdout[rows]
    kinds = np.full(len(rows), "none", dtype=object)
    duplicate_of = np.full(len(rows), -1, np.int64)

    train = np.flatnonzero(~holdout)
    n = len(train)
    counts = [_count(f, n) for f in (options.mislabel_frac, options.duplicate_frac, options.near_duplicate_frac)]
    picked = rng_pick.permutation(train)
    mislabelled, exact_sources, near_sources = np.split(picked[: sum(counts)], np.cumsum(counts)[:-1])
    labels[mislabelled] = (labels[mislabelled] + rng_pick.integers(1, max(k, 2), len(mislabelled))) % k
    kinds[mislabelled] = "mislabel"

    added_images: list[np.ndarray] = []
    added_labels, added_kinds, added_of = [], [], []
    for kind, sources in (("duplicate", exact_sources), ("near-duplicate", near_sources)):
        copies = np.minimum(rng_copies.zipf(options.copies_exponent, len(sources)), options.max_copies)
        for source, m in zip(sources, copies, strict=True):
            for _ in range(m):
                added_images.append(images[source] if kind == "duplicate" else _perturb(images[source], rng_perturb))
                added_labels.append(labels[source])
                added_kinds.append(kind)
                added_of.append(source)
    n_off = _count(options.off_domain_frac, n)
    shapes = [images[i].shape for i in rng_off.choice(train, n_off)]
    added_images += _off_domain(shapes, options.off_domain, rng_off)
    added_labels += rng_off.integers(0, k, n_off).tolist()
    added_kinds += ["off-domain"] * n_off
    added_of += [-1] * n_off

    # Shuffle every row: sample ids (and id tie-breaks) must not tell the added rows apart.
    images += added_images
    labels = np.concatenate([labels, np.asarray(added_labels, np.int64)])
    holdout = np.concatenate([holdout, np.zeros(len(added_images), bool)])
    kinds = np.concatenate([kinds, np.asarray(added_kinds, dtype=object)])
    duplicate_of = np.concatenate([duplicate_of, np.asarray(added_of, np.int64)])
    order = rng_order.permutation(len(images))
    new_id = np.empty(len(order), np.int64)
    new_id[order] = np.arange(len(order))
    duplicate_of = np.where(duplicate_of >= 0, new_id[np.maximum(duplicate_of, 0)], -1)[order]
    images = [images[i] for i in order]
    stacked = np.stack(images) if len({img.shape for img in images}) == 1 else images  # mixed sizes stay a list
    raw = RawDataset(stacked, labels[order], list(raw.class_names))  # type: ignore[arg-type]
    return Contaminated(raw, holdout[order], kinds[order].astype(str), duplicate_of)


def _count(frac: float, n: int) -> int:
    """round(frac * n), halves up."""
    return int(math.floor(frac * n + 0.5))


def _imbalance_keep(
    labels: np.ndarray, train: np.ndarray, ratio: float, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Train rows kept under an exponential class profile: class c keeps ceil(n_c * ratio^(-c/(k-1))), so the
    last class keeps 1/ratio of its images (the long-tailed CIFAR of Cao et al. 2019, LDAM)."""
    keep = np.zeros(len(labels), bool)
    for c in range(k):
        rows = np.flatnonzero(train & (labels == c))
        share = ratio ** (-c / (k - 1)) if k > 1 else 1.0
        keep[rng.permutation(rows)[: max(1, math.ceil(len(rows) * share))]] = True
    return keep


def _perturb(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate: a small shift (edges repeated), brightness and contrast change, Gaussian noise."""
    h, w = img.shape[:2]
    s = round(SHIFT_FRAC * min(h, w))  # none below 13 px: one pixel would move a tiny image too far
    dy, dx = rng.integers(-s, s + 1, 2) * (rng.random() < SHIFT_PROB)
    x = np.pad(img.astype(np.float64), ((s, s), (s, s), (0, 0)), mode="edge")[s - dy : s - dy + h, s - dx : s - dx + w]
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - CONTRAST, 1 + CONTRAST) + mean + 255 * rng.uniform(-BRIGHTNESS, BRIGHTNESS)
    x += rng.normal(0.0, 255 * NOISE_STD, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _off_domain(shapes: list[tuple[int, ...]], kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Off-domain images of the given (H, W, C) shapes: patches of scikit-learn's two sample photos, or
    synthetic textures (sums of random sinusoidal gratings)."""
    from PIL import Image

    photos = _sample_photos() if kind == "patches" and shapes else []
    out = []
    for h, w, c in shapes:
        if kind == "patches":
            photo = photos[rng.integers(len(photos))]
            side = int(rng.integers(PATCH_MIN, min(photo.shape[:2]) + 1))
            y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
            patch = np.asarray(Image.fromarray(photo[y : y + side, x : x + side]).resize((w, h), Image.BICUBIC))
            img = patch if c == 3 else np.rint(patch.mean(axis=2, keepdims=True)).astype(np.uint8)
        else:
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            channels = []
            for _ in range(c):
                wave = sum(
                    np.sin(
                        2 * np.pi * rng.uniform(1, 6) * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi)
                    )
                    for a in rng.uniform(0, np.pi, 3)
                )
                channels.append(np.clip(np.rint(127.5 + 42.5 * wave), 0, 255))  # 3 gratings: |wave| <= 3
            img = np.stack(channels, axis=2).astype(np.uint8)
        out.append(img)
    return out


def _sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # china.jpg, flower.jpg: shipped with scikit-learn, 427x640x3


def read_contaminants(manifest: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids int64, split str, contaminant str, duplicate_of int64) of every manifest row; a clean
    manifest (no contamination columns) reads as all ``none`` and -1."""
    from dedt.store import read_parquet

    table = read_parquet(manifest, ("sample_id", "split"))
    present = set(table.column_names)
    ids = table.column("sample_id").to_numpy()
    split = np.asarray(table.column("split").to_pylist(), dtype=str)
    kinds = (
        np.asarray(table.column(CONTAMINANT).to_pylist(), dtype=str)
        if CONTAMINANT in present
        else np.full(len(ids), "none")
    )
    of = table.column(DUPLICATE_OF).to_numpy() if DUPLICATE_OF in present else np.full(len(ids), -1, np.int64)
    return ids, split, kinds, of


def duplicated_ids(manifest: Path) -> np.ndarray:
    """Sample ids of the train images that belong to a constructed duplicate group (copies and their originals)."""
    ids, split, _, of = read_contaminants(manifest)
    copies = of >= 0
    return np.unique(np.concatenate([ids[copies], of[copies]])).astype(np.int64)
