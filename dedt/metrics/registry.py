"""Feature spaces for evaluation: a name -> an extractor of float32 (N, C, H, W) images in [-1, 1].

    classifier                  the pipeline's own CNN (64-d penultimate features), trained on the
                                dataset by the classifier stage: the meaningful space for 8x8 digits
    inception                   FID Inception-v3 (2048-d pool features) with clean-fid's "clean"
                                preprocessing on uint8 images: FD here is FID
    clip:<model>[:<pretrained>] open_clip image embeddings; <pretrained> is a tag found in the local
                                caches (default ``openai``) or a weights file
    dinov2:<size>[:<file>]      DINOv2 ViT/14 CLS features (small, base, large, giant); weights from
                                the local torch-hub / Hugging Face caches or the file

Every network runs in IEEE fp32 on every device (``dedt.precision.ieee_fp32``: no TF32, no bf16
autocast): FID is defined on fp32 Inception features, and TF32 convolutions or bf16 shift them. A
space's identity names the device class and this precision, so statistics computed on a CPU and on
a GPU are cached apart. Random-init networks are refused: a Fréchet distance in an untrained
network's features measures nothing. Weights are located when a name is validated (config load), so a missing file stops a
pipeline before its first stage, not after hours of training; the message names the file and
where to put it. Models load on the first ``extract`` call, so a cache hit on the reference
statistics never pays for one. Validating ``classifier`` or ``inception`` imports no torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dedt.errors import DedtError
from dedt.metrics.inception import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_SHA1, weights_path

FAMILIES = {
    "classifier": "the dataset's own CNN classifier (64-d), trained by the classifier stage",
    "inception": "FID Inception-v3 (2048-d), clean-fid preprocessing; FD = FID",
    "clip": "open_clip image embeddings: clip:<model>[:<pretrained tag or weights file>], default tag openai",
    "dinov2": "DINOv2 CLS features: dinov2:<size>[:<weights file>], size = small, base, large, giant",
}
DEFAULT_CLIP_TAG = "openai"
ENCODER_BATCH = 128  # images per forward pass of the CLIP / DINOv2 encoders
FEATURE_PRECISION = "fp32-ieee"  # how every feature space computes, on every device (dedt.precision.ieee_fp32)

Extractor = Callable[[np.ndarray], np.ndarray]


@dataclass
class FeatureSpace:
    """One named feature space: what keys its cached reference statistics, and its extractor.

    ``identity`` is everything besides the images that its features depend on (the weights file, the
    device class, the precision); it goes into the reference-statistics cache key, so swapped weights
    never reuse stale features and a GPU's statistics never mix with a CPU's.
    """

    name: str
    identity: dict[str, Any]
    load: Callable[[], Extractor] = field(repr=False)

    @cached_property
    def _extractor(self) -> Extractor:
        return self.load()

    def extract(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [-1, 1] (C = 1 or 3) -> float32 (N, d); loads the model on first use."""
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.dtype != np.float32:
            raise DedtError(
                f"feature space {self.name}: images must be float32 (N, C, H, W) in [-1, 1] with C = 1 or 3, "
                f"got {x.dtype} of shape {x.shape}"
            )
        return np.ascontiguousarray(self._extractor(x), dtype=np.float32)


def known_feature_spaces() -> str:
    return "; ".join(f"{name}: {about}" for name, about in FAMILIES.items())


def validate_feature_space(name: str) -> None:
    """Raise DedtError unless ``name`` is a feature space whose weights are on this machine."""
    locate_weights(name)


def locate_weights(name: str) -> Path | None:
    """The local weights file of feature space ``name`` (None for ``classifier``, which the pipeline trains).

    Raises:
        DedtError: unknown name, bad argument, or weights not found (naming the file and where to put it).
    """
    family, _, arg = name.partition(":")
    if family not in FAMILIES:
        raise DedtError(f"unknown feature space {name!r}; known: {known_feature_spaces()}")
    if family in ("classifier", "inception") and arg:
        hint = f" (set ${WEIGHTS_ENV} to use another {WEIGHTS_FILE})" if family == "inception" else ""
        raise DedtError(f"feature space {family!r} takes no ':' argument (got {name!r}){hint}")
    if family in ("clip", "dinov2") and not arg:
        raise DedtError(f"feature space {name!r} needs an argument: {FAMILIES[family]}")
    if family == "classifier":
        return None
    if family == "inception":
        return weights_path()
    if family == "clip":
        return _clip_weights(*_clip_parts(arg))
    return _dinov2_weights(*_dinov2_parts(arg))


def feature_space(name: str, *, classifier: Path | None = None, device: str = "auto") -> FeatureSpace:
    """Build feature space ``name`` (models load lazily, on the first ``extract``).

    Args:
        classifier: the classifier stage's ``classifier.safetensors``; required for ``classifier``.
        device: "auto" (CUDA when present), "cpu" or "cuda", for the network feature spaces.
    """
    weights = locate_weights(name)
    family, _, arg = name.partition(":")
    if family == "classifier":
        if classifier is None or not Path(classifier).is_file():
            raise DedtError(f"feature space classifier: {classifier} not found; run the classifier stage first")
        return FeatureSpace(
            name,
            {"classifier_sha256": _sha256(Path(classifier)), **_numerics("cpu")},
            lambda: _classifier_extractor(Path(classifier)),
        )
    if family == "inception":
        # load_inception refuses any file but the standard one, so its checksum is the identity.
        return FeatureSpace(
            name,
            {"weights_sha1": WEIGHTS_SHA1, "preprocessing": "clean-fid clean, uint8", **_numerics(device)},
            lambda: _inception_extractor(weights, device),
        )
    identity = {
        "weights": str(weights),
        "bytes": weights.stat().st_size,
        "mtime": int(weights.stat().st_mtime),
        **_numerics(device),
    }
    if family == "clip":
        model, pretrained = _clip_parts(arg)
        encoder_name = f"open_clip:{model}:{pretrained}"
        return FeatureSpace(name, identity, lambda: _encoder_extractor(encoder_name, None, device))
    size, _ = _dinov2_parts(arg)
    return FeatureSpace(name, identity, lambda: _encoder_extractor(f"dinov2:{size}", str(weights), device))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C): what a PNG of the image holds.

    Reals decoded from the manifest's PNGs come back to their exact bytes, so Inception sees real
    and generated images quantised the same way (clean-fid's rule: FID is defined on uint8).
    """
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _clip_parts(arg: str) -> tuple[str, str]:
    model, _, pretrained = arg.partition(":")
    return model, pretrained or DEFAULT_CLIP_TAG


def _dinov2_parts(arg: str) -> tuple[str, str]:
    size, _, file = arg.partition(":")
    return size, file


def _clip_weights(model: str, pretrained: str) -> Path:
    from dedt.encoders import validate_encoder_name

    try:
        validate_encoder_name(f"open_clip:{model}:{pretrained}")  # model name; a named file must exist
        from dedt.encoders.torch_models import resolve_open_clip_weights

        path, _ = resolve_open_clip_weights(model, pretrained)
    except DedtError as exc:
        raise DedtError(
            f"feature space clip:{model}:{pretrained}: {exc} (as a feature space: "
            f"clip:{model}:/path/to/weights.safetensors)"
        ) from None
    return path


def _dinov2_weights(size: str, file: str) -> Path:
    from dedt.encoders import DINOV2_SIZES

    if size not in DINOV2_SIZES:
        raise DedtError(f"feature space dinov2:{size}: unknown size {size!r}; choose one of {', '.join(DINOV2_SIZES)}")
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise DedtError(
                f"feature space dinov2:{size}: weights file {path} does not exist; put Meta's "
                f"dinov2_vit{size[0]}14_pretrain.pth (or timm's model.safetensors) there"
            )
        return path
    from dedt.encoders.torch_models import dinov2_candidates, first_existing

    fix = (
        f"put Meta's dinov2_vit{size[0]}14_pretrain.pth in the first place named, or name a local file: "
        f"dinov2:{size}:/path/to/weights.pth"
    )
    return first_existing(f"dinov2:{size}", dinov2_candidates(size), fix)


def _numerics(device: str) -> dict[str, str]:
    """The device class ("cpu" or "cuda") a network runs on and its precision, for the identity."""
    if device == "cpu":  # the classifier always runs on the CPU: no torch import needed
        return {"device": "cpu", "precision": FEATURE_PRECISION}
    from dedt.encoders.torch_models import resolve_device

    return {"device": resolve_device(device).type, "precision": FEATURE_PRECISION}


def _classifier_extractor(path: Path) -> Extractor:
    from dedt.metrics.classifier import features, load_classifier
    from dedt.precision import ieee_fp32

    model = load_classifier(path)

    def extract(images: np.ndarray) -> np.ndarray:
        with ieee_fp32():
            return features(model, images)

    return extract


def _inception_extractor(weights: Path, device: str) -> Extractor:
    from dedt.encoders.torch_models import resolve_device
    from dedt.metrics.inception import inception_features, load_inception

    model = load_inception(weights, str(resolve_device(device)))
    return lambda images: inception_features(to_uint8(images), model)


def _encoder_extractor(name: str, weights: str | None, device: str) -> Extractor:
    from dedt.encoders import get_encoder
    from dedt.encoders.torch_models import TorchEncoder
    from dedt.precision import ieee_fp32

    encoder = get_encoder(name, weights=weights, device=device)
    if isinstance(encoder, TorchEncoder):
        encoder.autocast = False  # the encode stage's bf16 is fine for scoring, not for metrics

    def extract(images: np.ndarray) -> np.ndarray:
        with ieee_fp32():
            return np.concatenate(
                [encoder.encode_batch(images[i : i + ENCODER_BATCH]) for i in range(0, len(images), ENCODER_BATCH)]
            )

    return extract


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
