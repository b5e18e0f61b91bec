"""Checks that run before any stage, so bad input fails in seconds instead of hours in.

``preflight(cfg, root)`` reads what a run will read and writes nothing (no store folder, no
lock): the store root must be a writable folder; the dataset is loaded and validated (unless the
data stage is already in the store); the encoder's weights file and the reference checkpoint must
exist and fit the data; every finished stage that an unfinished one will read must hold
artifacts of the right schema, for the same samples (embeddings of the encoder's width, scores
and a subset of the manifest's samples, class weights on the simplex: ``dedt.artifacts``'s
checks). Any failure is a ``DedtError`` naming the field or file and the fix: the CLI prints it
as one line, exit code 2.

The Prefect flow and ``dedt.runner`` call the same stage functions, which check their inputs
again; preflight only moves those failures to before the first stage starts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from dedt import artifacts
from dedt.config import PipelineConfig
from dedt.errors import DedtError
from dedt.pipeline import Node, plan
from dedt.remote_store import remote_for

PREFECT_RESULTS = "_prefect_results"  # where earlier dedt versions let Prefect persist task results
MAX_RESOLUTION = 1024  # the largest dataset.resolution: a native size above it must be resized
NATIVE_SHAPES = {"digits": (8, 8, 1), "mnist5k": (28, 28, 1)}  # (H, W, C) of the built-in sources


def preflight(cfg: PipelineConfig, root: Path) -> None:
    """Raise a DedtError for the first bad input a run of ``cfg`` on the store ``root`` would hit."""
    root = Path(root)
    planned = plan(cfg, root)
    check_store(root, {node.stage for node in planned.values()})
    remote = remote_for(root)
    if remote is not None:  # an s3:// store: reachable, then the stages finished there are in the cache
        remote.check()
        for node in planned.values():
            remote.pull_input(node.out)
    if (root / PREFECT_RESULTS).exists():
        print(
            f"dedt: warning: {root / PREFECT_RESULTS} is ignored (a Prefect result file can carry code, so "
            "dedt never reads one); delete it",
            file=sys.stderr,
        )
    complete = {key: node.out.is_complete() for key, node in planned.items()}
    if all(complete.values()):
        return  # nothing will run, nothing will be read
    shape = artifacts.image_shape(planned["data"].out) if complete["data"] else check_dataset(cfg)
    if not complete.get("encode", True):
        check_encoder(cfg)
    if cfg.reweight.reference_path and not all(complete.get(k, True) for k in ("reference", "reweight")):
        check_reference(cfg, shape)
    check_inputs(cfg, planned, complete, shape)


def check_store(root: Path, stages: set[str] = frozenset()) -> None:
    """The store root (``$DEDT_HOME``) is a folder, or can be created as one, and is writable; none of
    the ``stages`` folders in it is a file."""
    root = Path(root).absolute()
    existing = root
    while not existing.exists():
        if existing.is_symlink():  # a dangling link
            raise DedtError(f"store root {root}: {existing} is a broken symlink; point DEDT_HOME at a folder")
        existing = existing.parent
    if not existing.is_dir():
        raise DedtError(f"store root {root}: {existing} is a file, not a folder; point DEDT_HOME at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DedtError(f"store root {root}: {existing} is not writable; fix its permissions or change DEDT_HOME")
    for stage in sorted(stages):
        if (root / stage).exists() and not (root / stage).is_dir():
            raise DedtError(f"store {root}: {root / stage} is a file where a stage folder belongs; remove it")


def check_dataset(cfg: PipelineConfig) -> tuple[int, int, int]:
    """Load and validate the dataset as the data stage will (nothing is written); returns (H, W, C).

    The built-in sources cost nothing to check; a path source is read once here (every file opened
    and decoded, so an unreadable image, a NaN pixel or an empty class stops the run before it starts).
    """
    from dedt.data.manifest import holdout_mask
    from dedt.data.sources import load_source

    ds = cfg.dataset
    try:
        raw = load_source(ds.source, ds.path)
    except DedtError as exc:  # some checks (labels, counts) don't know the file: name it here
        if ds.path and ds.path not in str(exc) and str(Path(ds.path).expanduser()) not in str(exc):
            raise DedtError(f"dataset.path {ds.path}: {exc}") from None
        raise
    sizes = {tuple(img.shape[:2]) for img in raw.images}
    if ds.resolution is None and len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        raise DedtError(
            f"dataset.path {ds.path}: images have mixed sizes ({shown}, ...); "
            "set dataset.resolution to resize them all to one size"
        )
    channels = {img.shape[2] for img in raw.images}
    if ds.channels is None and len(channels) > 1:
        raise DedtError(f"dataset.path {ds.path} mixes grayscale and colour images; set dataset.channels to 1 or 3")
    holdout = holdout_mask(raw.labels, ds.holdout_frac, cfg.seed)
    train_labels = raw.labels[~holdout]
    empty = [raw.class_names[c] for c in range(len(raw.class_names)) if not np.any(train_labels == c)]
    where = f"dataset.path {ds.path}" if ds.path else f"dataset.source {ds.source}"
    if empty:
        raise DedtError(
            f"{where}: classes {empty[:5]} have no training images; add images, remove the "
            "class, or lower dataset.holdout_frac"
        )
    height, width = next(iter(sizes)) if ds.resolution is None else (ds.resolution, ds.resolution)
    if max(height, width) > MAX_RESOLUTION:
        raise DedtError(
            f"{where}: images are {height}x{width}, too large to train on; set dataset.resolution "
            f"(at most {MAX_RESOLUTION}) to resize them"
        )
    if not holdout.any():
        raise DedtError(
            f"{where}: dataset.holdout_frac={ds.holdout_frac} holds out no image (floor(frac x images) "
            f"is 0 for every class, the smallest has {np.bincount(raw.labels).min()}); raise it, or add "
            "images: the classifier and the real-data floor need held-out images"
        )
    return height, width, ds.channels or next(iter(channels))


def check_encoder(cfg: PipelineConfig) -> None:
    """The encoder exists and its weights file (``encode.weights``) is there."""
    from dedt.encoders import validate_encoder_name

    enc = cfg.encode
    if enc.weights not in (None, "random") and not Path(enc.weights).expanduser().is_file():
        raise DedtError(
            f"encode.weights {enc.weights} does not exist; put the encoder's weights file there, "
            "or drop encode.weights to use the default local weights"
        )
    validate_encoder_name(enc.encoder, weights=enc.weights)
    if enc.encoder == "inception":  # a TorchScript file runs code: only the known FID weights, by hash
        from dedt.encoders.torch_models import inception_weights

        inception_weights(enc.weights)


def check_reference(cfg: PipelineConfig, shape: tuple[int, int, int]) -> None:
    """``reweight.reference_path`` holds a diffusers UNet for images of the data's size and channels."""
    from dedt.reweight import load_reference

    path = Path(cfg.reweight.reference_path).expanduser()
    if not path.exists():
        raise DedtError(
            f"reweight.reference_path {path} does not exist; point it at a local diffusers UNet "
            "folder (UNet2DModel.save_pretrained) or drop it to train a reference"
        )
    if cfg.train.vae_path:  # a latent reference's size is the VAE's latent size: the stage checks it
        return
    height, _, channels = shape
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    try:  # the architecture first, from config.json alone (no weights read, no diffusers import)
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None  # load_reference names what is missing
    if isinstance(config, dict) and (config.get("in_channels"), config.get("sample_size")) != (channels, height):
        raise DedtError(
            f"reweight.reference_path {folder} is a UNet for {config.get('in_channels')}-channel "
            f"{config.get('sample_size')}px images but the data is {channels}-channel {height}px; point "
            "it at a reference trained on this data, or drop it to train one"
        )
    load_reference(str(path), in_channels=channels, resolution=height)


def check_inputs(
    cfg: PipelineConfig, planned: dict[str, Node], complete: dict[str, bool], shape: tuple[int, int, int]
) -> None:
    """Every finished stage that an unfinished one reads holds artifacts that fit this pipeline."""
    needed = {
        role_key
        for key, node in planned.items()
        if not complete[key]
        for role_key in node.inputs.values()
        if complete[role_key]
    }
    manifest_ids: np.ndarray | None = None
    for key in sorted(needed, key=list(planned).index):
        out = planned[key].out
        if out.stage not in ("encode", "score", "select", "reweight"):
            continue
        if manifest_ids is None:
            manifest_ids = artifacts.train_ids(planned["data"].out)
        if out.stage == "encode":
            expected = {"pixels": math.prod(shape), "random-projection": cfg.encode.dim}.get(cfg.encode.encoder)
            artifacts.check_embeddings(out, manifest_ids, cfg.encode.encoder, expected)
        elif out.stage == "score":
            artifacts.check_scores(out, manifest_ids)
        elif out.stage == "select":
            artifacts.check_subset(out, manifest_ids)
        else:
            classes = artifacts.read_summary(planned["data"].out)["classes"] if cfg.reweight.groups == "class" else None
            artifacts.check_weights(out, classes)
