"""A training run's files: resumable checkpoints, the run log, the final weights and ``load_model``.

    checkpoints/ckpt-<kimg>/    model + EMA(s) (safetensors), training_state.pt (optimiser, scaler, RNG,
                                timestep sampler, InfoBatch), state.json (written last: step, images
                                seen, identity, each file's SHA-256)
    log.jsonl                   one line per log interval, never past the newest checkpoint
    model.safetensors, ema.safetensors, model_config.json   the trained model, at the budget

A checkpoint is written into a temp folder and renamed into place, so a kill leaves either the whole
checkpoint or a ``.tmp-ckpt-*`` folder that the next run removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from dedt.diffusion.options import TrainOptions
from dedt.errors import DedtError
from dedt.store import atomic_path, atomic_write_text, file_sha256

# Options that may change between a run and its resumption: they don't change what is computed.
RESUMABLE_CHANGES = frozenset({"budget_kimg", "checkpoint_every_kimg", "keep_checkpoints", "log_every_kimg"})
CHECKPOINT_FORMAT = 1


def run_identity(
    images: np.ndarray,
    labels: np.ndarray,
    options: TrainOptions,
    num_classes: int,
    class_weights: np.ndarray | None,
    seed: int,
    world_size: int,
    anneal_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: options (but the budget, intervals and device), data
    (and the full split a subset anneals to), seed. The device is left out, as in the stage fingerprint:
    a run cut on one device resumes on another."""
    digest = _data_digest(images, labels)
    if class_weights is not None:
        digest.update(np.asarray(class_weights, dtype=np.float64).tobytes())
    fixed = options.identity(exclude=set(RESUMABLE_CHANGES | {"device"}))
    identity = {
        "format": CHECKPOINT_FORMAT,
        "options": fixed,
        "data_sha256": digest.hexdigest(),
        "num_classes": num_classes,
        "seed": seed,
        "world_size": world_size,
    }
    if anneal_data is not None:
        identity["anneal_data_sha256"] = _data_digest(*anneal_data).hexdigest()
    return identity


def _data_digest(images: np.ndarray, labels: np.ndarray) -> Any:
    """SHA-256 over the shapes and bytes of images and their int64 labels."""
    digest = hashlib.sha256()
    for array in (images, np.asarray(labels, dtype=np.int64)):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest


def state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, as safetensors needs (channels_last weights are not contiguous)."""
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the most images seen (state.json is written last) whose files
    still have the SHA-256 recorded in its state.json: a damaged one is reported and skipped, so the
    run resumes from the one before (or from scratch) rather than from corrupted weights."""
    found = [p for p in checkpoints.glob("ckpt-*") if p.is_dir() and (p / "state.json").exists()]
    for path in sorted(found, key=lambda p: float(p.name.removeprefix("ckpt-")), reverse=True):
        damaged = _damaged_files(path)
        if not damaged:
            return path
        warnings.warn(
            f"checkpoint {path} is damaged ({', '.join(damaged)} failed the SHA-256 check); "
            "resuming from an earlier checkpoint",
            stacklevel=2,
        )
    return None


def remove_partial_checkpoints(checkpoints: Path) -> None:
    """Drop the temp folders a killed run left while writing a checkpoint."""
    for partial in checkpoints.glob(".tmp-ckpt-*"):
        shutil.rmtree(partial, ignore_errors=True)


def write_checkpoint(
    checkpoints: Path,
    *,
    step: int,
    nimg: int,
    weights: dict[str, torch.nn.Module],
    training_state: dict[str, Any],
    identity: dict[str, Any],
    seconds: float,
    loss: float,
    keep: int,
) -> None:
    """Write ckpt-<kimg>/ (``weights``: file stem -> module) into a temp folder, rename it into place,
    then drop the oldest beyond ``keep``."""
    final = checkpoints / _checkpoint_name(nimg)
    if final.exists():
        if (final / "state.json").exists() and not _damaged_files(final):
            return
        shutil.rmtree(final)  # damaged (skipped on resume): write it again
    partial = checkpoints / f".tmp-{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, module in weights.items():
        with atomic_path(partial / f"{name}.safetensors") as tmp:
            save_file(state_dict(module), str(tmp))
    with atomic_path(partial / "training_state.pt") as tmp:
        torch.save(training_state, tmp)
    files = (*(f"{name}.safetensors" for name in weights), "training_state.pt")
    state = {
        "step": step,
        "nimg": nimg,
        "seconds": seconds,
        "loss": loss,
        "identity": identity,
        "sha256": {name: file_sha256(partial / name) for name in files},
    }
    atomic_write_text(partial / "state.json", json.dumps(state, indent=2, sort_keys=True))
    os.replace(partial, final)
    complete = sorted(
        (p for p in checkpoints.glob("ckpt-*") if (p / "state.json").exists()),
        key=lambda p: float(p.name.removeprefix("ckpt-")),
    )
    for old in complete[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(
    path: Path, identity: dict[str, Any], weights: dict[str, torch.nn.Module]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check ``path`` is a checkpoint of this run (``identity``, else a DedtError naming what differs),
    load its weights into ``weights`` (file stem -> module); returns (state.json, training state).

    The training state is read onto the CPU (the optimiser moves its state to the parameters'
    device), so no torchrun rank materialises it on GPU 0.
    """
    state = json.loads((path / "state.json").read_text())
    saved = _without_device(state.get("identity", {}))  # checkpoints from before the device left the identity
    if saved != identity:
        keys = sorted({*saved, *identity} - {"options"})
        differ = [k for k in keys if saved.get(k) != identity.get(k)]
        saved_options, options = saved.get("options", {}), identity["options"]
        differ += [f"train.{k}" for k in sorted({*saved_options, *options}) if saved_options.get(k) != options.get(k)]
        raise DedtError(
            f"{path} is a checkpoint of another configuration (differs in: {', '.join(differ)}); "
            f"use a new run folder or delete {path.parent} to start over"
        )
    for name, module in weights.items():
        module.load_state_dict(load_file(path / f"{name}.safetensors"))
    return state, torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)


def write_final(
    run_dir: Path,
    model: UNet2DModel,
    ema: torch.nn.Module,
    scheduler: DDPMScheduler,
    options: TrainOptions,
    *,
    channels: int,
    resolution: int,
    num_classes: int,
) -> None:
    """The trained weights and the config that rebuilds the UNet (``load_model``)."""
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(state_dict(model), str(tmp))
    with atomic_path(run_dir / "ema.safetensors") as tmp:
        save_file(state_dict(ema), str(tmp))
    config = {
        "preset": options.preset,
        "in_channels": channels,
        "resolution": resolution,
        "num_classes": num_classes if options.conditional else None,
        "vae_path": options.vae_path,  # samples are VAE latents to decode when set
        "unet": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
    }
    atomic_write_text(run_dir / "model_config.json", json.dumps(config, indent=2, sort_keys=True))


def load_model(run_dir: Path, *, ema: bool = True, device: str | torch.device = "cpu") -> UNet2DModel:
    """The trained UNet of ``run_dir`` (EMA weights by default), in eval mode on ``device``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "model_config.json"
    weights = run_dir / ("ema.safetensors" if ema else "model.safetensors")
    if not config_path.exists() or not weights.exists():
        raise DedtError(f"{run_dir} holds no trained model (model_config.json, {weights.name}); run training first")
    config = json.loads(config_path.read_text())
    model = UNet2DModel.from_config(config["unet"])
    model.load_state_dict(load_file(weights))
    return model.to(device).eval()


class RunLog:
    """log.jsonl: lines are kept in memory and written (temp file + rename) with each checkpoint,
    so the file never holds steps past the newest checkpoint and a resumed run doesn't repeat lines."""

    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = path
        self.lines: list[str] = []
        if keep_until_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    if json.loads(line)["step"] <= keep_until_step:
                        self.lines.append(line)

    def append(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record, sort_keys=True))

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(line + "\n" for line in self.lines))


def _checkpoint_name(nimg: int) -> str:
    return f"ckpt-{nimg / 1000:010.3f}"


def _damaged_files(path: Path) -> list[str]:
    """Names of the checkpoint's files whose SHA-256 differs from state.json's (none recorded: trusted)."""
    try:
        recorded = json.loads((path / "state.json").read_text()).get("sha256", {})
    except (OSError, ValueError):
        return ["state.json"]
    bad = []
    for name, digest in recorded.items():
        try:
            if file_sha256(path / name) != digest:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


def _without_device(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` without the device fields that earlier checkpoints recorded in it."""
    options = {k: v for k, v in identity.get("options", {}).items() if k != "device"}
    return {k: v for k, v in identity.items() if k != "device_type"} | {"options": options}
