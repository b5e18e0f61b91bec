"""Encoders that need no model and no network: raw pixels and a fixed random projection.

They serve tests, tiny datasets (8x8 digits) and the baseline every learned encoder must beat.
Also home of the input check that every encoder applies to its batches, because it is plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dedt.errors import DedtError

# Slack on the [-1, 1] range: resampling and float round-off push values a hair outside.
RANGE_SLACK = 1e-3


def as_image_batch(images: np.ndarray) -> np.ndarray:
    """Check a batch is (B, C, H, W), C in {1, 3}, finite, in [-1, 1]; return it as float32."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DedtError(f"images must be (B, C, H, W) with C in {{1, 3}}; got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise DedtError(f"images must be float in [-1, 1]; got {images.dtype} (convert uint8 with x / 127.5 - 1)")
    images = images.astype(np.float32, copy=False)
    if images.size:
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DedtError("images contain NaN or inf; fix the data source")
        if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
            raise DedtError(f"images must lie in [-1, 1]; got [{low:.3g}, {high:.3g}] (uint8: use x / 127.5 - 1)")
    return images


def _flatten(images: np.ndarray) -> np.ndarray:
    return as_image_batch(images).reshape(len(images), -1)


def _check_width(name: str, expected: int | None, got: int) -> None:
    """One encoder instance serves one image size: mixed sizes would mix embedding spaces."""
    if expected is not None and expected != got:
        raise DedtError(f"encoder {name}: images have C*H*W = {got} but earlier batches had {expected}; use one size")


@dataclass
class PixelEncoder:
    """z = the image itself, flattened in (C, H, W) order; dim = C*H*W, known after the first batch."""

    name: str = "pixels"
    dim: int | None = None
    preprocessing: str = "none: [-1, 1] pixels flattened in (C, H, W) order"

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        flat = _flatten(images)
        _check_width(self.name, self.dim, flat.shape[1])
        self.dim = flat.shape[1]
        return np.ascontiguousarray(flat)


@dataclass
class RandomProjectionEncoder:
    """z = x R / sqrt(dim), R ~ N(0, 1) of shape (C*H*W, dim) drawn from ``seed``.

    The 1/sqrt(dim) scale keeps E||z||^2 = ||x||^2 (Johnson-Lindenstrauss), so distances, and
    hence kNN and density scores, are preserved in expectation at a fraction of the width.
    R is drawn on the first batch, once the input width is known.
    """

    dim: int
    seed: int = 0
    name: str = "random-projection"
    preprocessing: str = ""
    _matrix: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.preprocessing = (
            f"[-1, 1] pixels flattened in (C, H, W) order, times a N(0, 1) matrix (numpy PCG64, seed {self.seed}) "
            f"/ sqrt({self.dim})"
        )

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        flat = _flatten(images)
        _check_width(self.name, None if self._matrix is None else self._matrix.shape[0], flat.shape[1])
        if self._matrix is None:
            self._matrix = projection_matrix(flat.shape[1], self.dim, self.seed)
        return flat @ self._matrix


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """The fixed (in_dim, out_dim) float32 Gaussian matrix, scaled by 1/sqrt(out_dim)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((in_dim, out_dim), dtype=np.float32) / np.float32(np.sqrt(out_dim))


def pixels(arg: str | None, *, weights: str | None, device: str, seed: int, dim: int) -> PixelEncoder:
    """Registry factory; every option is irrelevant to raw pixels."""
    return PixelEncoder()


def random_projection(
    arg: str | None, *, weights: str | None, device: str, seed: int, dim: int
) -> RandomProjectionEncoder:
    """Registry factory: the projection is fixed by ``seed`` and ``dim``."""
    return RandomProjectionEncoder(dim=dim, seed=seed)
