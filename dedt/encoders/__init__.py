"""Surrogate encoders behind one registry (PAPER.md section 1).

An encoder maps a batch of images, float32 (B, C, H, W) in [-1, 1], to float32 embeddings
(B, dim). Names are ``family`` or ``family:arg``:

    pixels                          flattened pixels (dim = C*H*W; the ``dim`` option is ignored)
    random-projection               fixed seeded Gaussian projection of the pixels to ``dim``
    open_clip:<model>[:<pretrained>] CLIP image embeddings; pretrained = a tag found in the local
                                    cache or a local weights file; no pretrained = random init
    inception                       FID Inception-v3 2048-d pool features (default_1.pt)
    resnet18, resnet50              torchvision ResNet pooled features (512 / 2048)
    dinov2:<size>                   DINOv2 ViT-{small,base,large,giant}/14 CLS features

Importing this package is cheap: torch, torchvision and open_clip load only when a model-based
encoder is built, so config validation and the numpy encoders never pay for them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from dedt.errors import DedtError

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderEntry",
    "get_encoder",
    "known_encoders",
    "split_name",
    "validate_encoder_name",
]


@runtime_checkable
class Encoder(Protocol):
    """A frozen surrogate model: what the encode stage calls, batch by batch."""

    name: str
    dim: int | None  # None only for ``pixels`` before its first batch (dim = C*H*W of the input)
    preprocessing: str  # resize filter, size, normalisation: stored in the embeddings' metadata

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) in [-1, 1], C in {1, 3} -> float32 (B, dim)."""
        ...


@dataclass(frozen=True)
class EncoderEntry:
    """One registry family: where its factory lives (imported on first use) and its argument."""

    target: str  # "module:function"; a string so the registry never imports torch
    about: str  # one line for --help and error messages
    arg: str = ""  # placeholder shown to users, e.g. "<model>[:<pretrained>]"; "" = takes no argument
    arg_required: bool = False

    def __call__(self, arg: str | None, **options: object) -> Encoder:
        module, function = self.target.split(":")
        factory: Callable[..., Encoder] = getattr(importlib.import_module(module), function)
        return factory(arg, **options)


ENCODERS: dict[str, EncoderEntry] = {
    "pixels": EncoderEntry("dedt.encoders.offline:pixels", "flattened [-1, 1] pixels"),
    "random-projection": EncoderEntry(
        "dedt.encoders.offline:random_projection", "seeded Gaussian projection of the pixels to dim"
    ),
    "open_clip": EncoderEntry(
        "dedt.encoders.torch_models:open_clip_encoder",
        "CLIP image embeddings; pretrained = local cache tag or weights file, none = random init",
        "<model>[:<pretrained>]",
        arg_required=True,
    ),
    "inception": EncoderEntry("dedt.encoders.torch_models:inception", "FID Inception-v3 2048-d pool features"),
    "resnet18": EncoderEntry("dedt.encoders.torch_models:resnet18", "torchvision ResNet-18 pooled features (512)"),
    "resnet50": EncoderEntry("dedt.encoders.torch_models:resnet50", "torchvision ResNet-50 pooled features (2048)"),
    "dinov2": EncoderEntry(
        "dedt.encoders.torch_models:dinov2",
        "DINOv2 ViT/14 CLS features; size = small, base, large, giant (local checkpoint or weights=random)",
        "<size>",
        arg_required=True,
    ),
}

DINOV2_SIZES = ("small", "base", "large", "giant")
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def split_name(name: str) -> tuple[str, str | None]:
    """``"open_clip:ViT-B-32:openai"`` -> ``("open_clip", "ViT-B-32:openai")``; ``"pixels"`` -> ``("pixels", None)``."""
    family, sep, arg = name.partition(":")
    return family, (arg if sep else None)


def usage(family: str) -> str:
    """How a family is written in a config, e.g. ``open_clip:<model>[:<pretrained>]``."""
    arg = ENCODERS[family].arg
    return f"{family}:{arg}" if arg else family


def known_encoders() -> str:
    return ", ".join(usage(family) for family in ENCODERS)


def looks_like_path(value: str) -> bool:
    """A pretrained value is a file path (not a cache tag) when it has a directory part or a weights suffix."""
    return "/" in value or value.endswith(WEIGHT_SUFFIXES)


def _open_clip_architectures() -> set[str]:
    """open_clip's built-in model names, read from its bundled JSON configs without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DedtError("encoder open_clip needs the package open_clip_torch; install it (pip install open_clip_torch)")
    configs = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return {path.stem for path in configs.glob("*.json")}


def _check_open_clip_arg(arg: str) -> None:
    model, _, pretrained = arg.partition(":")
    architectures = _open_clip_architectures()
    if model not in architectures:
        raise DedtError(
            f"encoder open_clip:{arg}: unknown open_clip model {model!r}; "
            f"choose one of open_clip.list_models(), e.g. ViT-B-32, ViT-S-32, RN50"
        )
    if pretrained and looks_like_path(pretrained) and not Path(pretrained).expanduser().is_file():
        raise DedtError(
            f"encoder open_clip:{arg}: pretrained weights file {pretrained} does not exist; "
            f"put the open_clip checkpoint there, or name a tag cached locally, or drop ':{pretrained}' for random init"
        )


def _check_dinov2_arg(arg: str) -> None:
    if arg not in DINOV2_SIZES:
        raise DedtError(f"encoder dinov2:{arg}: unknown size {arg!r}; choose one of {', '.join(DINOV2_SIZES)}")


ARG_CHECKS: dict[str, Callable[[str], None]] = {"open_clip": _check_open_clip_arg, "dinov2": _check_dinov2_arg}


def validate_encoder_name(name: str, *, weights: str | None = None) -> None:
    """Raise DedtError unless ``name`` names a known encoder; cheap, loads no model.

    ``weights``, when given and not "random", must be an existing file. Used by config
    validation so a typo fails before any stage starts.
    """
    family, arg = split_name(name)
    entry = ENCODERS.get(family)
    if entry is None:
        raise DedtError(f"unknown encoder {name!r}; known encoders: {known_encoders()}")
    if entry.arg_required and not arg:
        raise DedtError(f"encoder {name!r} needs an argument: {usage(family)}")
    if not entry.arg and arg is not None:
        raise DedtError(f"encoder {family!r} takes no ':' argument (got {name!r}); pass weights as the weights option")
    if arg and family in ARG_CHECKS:
        ARG_CHECKS[family](arg)
    if weights not in (None, "random") and not Path(weights).expanduser().is_file():
        raise DedtError(f"encoder {name}: weights file {weights} does not exist; put the checkpoint there or fix it")


def get_encoder(
    name: str, *, weights: str | None = None, device: str = "auto", seed: int = 0, dim: int = 256
) -> Encoder:
    """Build the encoder ``name`` (see the module docstring for the names).

    Args:
        weights: a local weights file for model encoders (overrides the default lookup), or
            "random" for a random-init network (resnet*, dinov2). Never downloaded.
        device: "auto" (CUDA with autocast when present, else CPU), "cpu", "cuda", "cuda:1", ...
        seed: fixes random projections and random-init networks.
        dim: output width of random-projection (ignored by the others).
    """
    validate_encoder_name(name, weights=weights)
    if dim < 1:
        raise DedtError(f"encoder dim must be >= 1 (got {dim})")
    family, arg = split_name(name)
    return ENCODERS[family](arg, weights=weights, device=device, seed=seed, dim=dim)
