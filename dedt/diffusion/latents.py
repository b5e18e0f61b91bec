"""Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

The dataset is encoded once by a frozen ``diffusers.AutoencoderKL`` loaded from a local folder (never
the hub); the UNet trains on the latents and its samples are decoded back to images before they are
evaluated. Latents are the posterior *mean* (``latent_dist.mode()``), so encoding is deterministic,
scaled as diffusers' Stable Diffusion pipelines do: ``z = (mean - shift_factor) * scaling_factor``
(shift 0 when the VAE's config has none), which brings them to roughly unit variance.
Scaled latents are not bounded to [-1, 1], so a latent run (``TrainOptions.vae_path``) skips the
[-1, 1] input check, the scheduler's x0 clipping (``clip_sample=False``) and the output clamp.

This module imports torch and diffusers only inside its functions: ``check_vae_folder`` runs while
the config is validated, which must stay cheap.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dedt.errors import DedtError
from dedt.progress import ProgressFn, Throttle

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

# The latents stage's artifacts: float32 (N, c, h, w) and the int64 (N,) sample ids of its rows.
LATENTS, LATENT_IDS = "latents.npy", "latent_ids.npy"


def check_vae_folder(path: str | Path) -> Path:
    """The folder holding the VAE's ``config.json``: ``path`` itself (an ``AutoencoderKL.save_pretrained``
    folder) or its ``vae/`` sub-folder (a diffusers pipeline folder, e.g. Stable Diffusion's layout).
    A DedtError naming the path and what to put there when neither exists."""
    root = Path(path).expanduser()
    for folder in (root, root / "vae"):
        if (folder / "config.json").is_file():
            return folder
    what = "does not exist" if not root.exists() else "holds no config.json (nor vae/config.json)"
    raise DedtError(
        f"train.vae_path {root} {what}: put a diffusers AutoencoderKL there (the folder written by "
        "AutoencoderKL.save_pretrained: config.json + diffusion_pytorch_model.safetensors, e.g. a local copy of "
        "stabilityai/sd-vae-ft-mse) or a pipeline folder with a vae/ sub-folder; nothing is downloaded"
    )


def vae_identity(path: str | Path) -> dict[str, object]:
    """What the latents depend on: the SHA-256 of every file of the VAE folder (config and weights),
    not its path or mtimes, so a moved copy keeps its latents and a rewritten one never does.
    Hashing reads the weights once per plan (~0.3 s for Stable Diffusion's 335 MB VAE)."""
    from dedt.store import file_sha256

    folder = check_vae_folder(path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"files": [[p.name, p.stat().st_size, file_sha256(p)] for p in files]}


def load_vae(path: str | Path, *, device: str | torch.device = "cpu") -> AutoencoderKL:
    """A frozen ``AutoencoderKL`` in eval mode from a local folder (``local_files_only``: never the hub)."""
    from diffusers import AutoencoderKL

    folder = check_vae_folder(path)
    try:
        # low_cpu_mem_usage=False: the meta-device path needs `accelerate`, and warns without it.
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError) as exc:
        raise DedtError(f"cannot load an AutoencoderKL from {folder}: {exc}") from exc
    return vae.to(device).eval().requires_grad_(False)


def latent_scale(vae: AutoencoderKL) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE's config; the shift is 0 when it has none (SD 1.x/2.x)."""
    config = vae.config
    scale = float(getattr(config, "scaling_factor", None) or 1.0)
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    return scale, shift


def downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along each side: each encoder level but the last halves the image."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _as_vae(vae: AutoencoderKL | str | Path, device: torch.device) -> AutoencoderKL:
    if isinstance(vae, (str, Path)):
        return load_vae(vae, device=device)
    return vae.to(device).eval()


def _device(device: str | torch.device) -> torch.device:
    from dedt.diffusion.device import resolve_device

    return resolve_device(device) if isinstance(device, str) else device


def encode_latents(
    images: np.ndarray,
    vae: AutoencoderKL | str | Path,
    batch_size: int = 64,
    *,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
) -> np.ndarray:
    """Encode images to scaled latents.

    Args:
        images: float32 (N, C, H, W) in [-1, 1]; C must be the VAE's ``in_channels`` and H, W
            multiples of its downsampling factor.
        vae: an ``AutoencoderKL`` or the path of a local folder holding one (see ``check_vae_folder``).
        batch_size: images per forward pass; does not change the result beyond float rounding.
        device: "cpu", "cuda", "auto" or a torch.device; the VAE runs there in float32.
        on_progress: ``(done, total, info)`` images encoded, a few times a minute (``dedt.progress``).
    Returns: float32 (N, latent_channels, H / f, W / f), ``(posterior mean - shift) * scaling_factor``.
    """
    import torch

    images = np.asarray(images)
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise DedtError(f"encode_latents needs float images (N, C, H, W), got {images.dtype} {images.shape}")
    if batch_size < 1:
        raise DedtError(f"encode_latents needs batch_size >= 1, got {batch_size}")
    device = _device(device)
    vae = _as_vae(vae, device)
    n, channels, height, width = images.shape
    factor = downsample_factor(vae)
    if channels != vae.config.in_channels:
        raise DedtError(
            f"the VAE encodes {vae.config.in_channels}-channel images but the data has {channels} channels; "
            "set dataset.channels to match or use another VAE"
        )
    if height % factor or width % factor:
        raise DedtError(
            f"the VAE downsamples by {factor}: image size {height}x{width} must be a multiple of it; "
            "set dataset.resolution accordingly"
        )
    if n and (float(images.min()) < -1.0 - 1e-4 or float(images.max()) > 1.0 + 1e-4):
        raise DedtError(f"images to encode must be scaled to [-1, 1], got [{images.min():.4g}, {images.max():.4g}]")
    scale, shift = latent_scale(vae)
    shape = (vae.config.latent_channels, height // factor, width // factor)
    out = np.empty((n, *shape), dtype=np.float32)
    report = Throttle(on_progress, n)

    def encode(start: int, stop: int) -> None:
        x = torch.from_numpy(np.ascontiguousarray(images[start:stop], dtype=np.float32))
        mean = vae.encode(x.to(device)).latent_dist.mode()
        out[start:stop] = ((mean.float() - shift) * scale).cpu().numpy()
        report(stop)

    with torch.inference_mode():
        _in_batches(n, batch_size, encode, "encode_latents")
    return out


def decode_latents(
    latents: np.ndarray,
    vae: AutoencoderKL | str | Path,
    batch_size: int = 64,
    *,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Inverse of ``encode_latents``: float32 images (N, out_channels, h * f, w * f) clamped to [-1, 1]."""
    import torch

    latents = np.asarray(latents)
    device = _device(device)
    vae = _as_vae(vae, device)
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise DedtError(
            f"decode_latents needs latents (N, {vae.config.latent_channels}, h, w) for this VAE, got {latents.shape}"
        )
    if batch_size < 1:
        raise DedtError(f"decode_latents needs batch_size >= 1, got {batch_size}")
    scale, shift = latent_scale(vae)
    factor = downsample_factor(vae)
    n, _, height, width = latents.shape
    out = np.empty((n, vae.config.out_channels, height * factor, width * factor), dtype=np.float32)

    def decode(start: int, stop: int) -> None:
        z = torch.from_numpy(np.ascontiguousarray(latents[start:stop], dtype=np.float32))
        images = vae.decode(z.to(device) / scale + shift).sample
        out[start:stop] = images.float().clamp(-1, 1).cpu().numpy()

    with torch.inference_mode():
        _in_batches(n, batch_size, decode, "decode_latents")
    return out


def _in_batches(n: int, batch_size: int, run: Callable[[int, int], None], what: str) -> None:
    """Call ``run(start, stop)`` over [0, n) in batches; on a GPU out-of-memory error, halve the batch
    and retry (down to one image): the VAE's decoder at 256 x 256 px needs GBs of activations per
    batch, and the samples it decodes took hours to make. The batch does not change the result
    beyond float rounding."""
    import torch

    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        try:
            run(start, stop)
            start = stop
            continue
        except torch.OutOfMemoryError:
            if stop - start == 1:
                raise
        batch_size = (stop - start) // 2
        torch.cuda.empty_cache()  # outside the except block, which held the failed batch's tensors
        warnings.warn(f"{what}: out of GPU memory, retrying with batch size {batch_size}", stacklevel=3)


def write_latents(folder: Path, ids: np.ndarray, latents: np.ndarray) -> None:
    """Write the latents and their sample ids as .npy files, atomically (temp file, fsync, rename)."""
    from dedt.store import atomic_path

    for name, array in ((LATENT_IDS, np.asarray(ids, dtype=np.int64)), (LATENTS, np.asarray(latents, np.float32))):
        with atomic_path(Path(folder) / name) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def read_latents(folder: Path, ids: np.ndarray | None = None) -> np.ndarray:
    """The latents of ``folder`` (float32 (N, c, h, w)); with ``ids``, the rows of those sample ids in
    that order (a DedtError when one is missing: the latents were made from other data)."""
    folder = Path(folder)
    try:
        stored_ids = np.load(folder / LATENT_IDS, allow_pickle=False)
        latents = np.load(folder / LATENTS, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DedtError(f"artifact {exc.filename} is missing; re-run the latents stage") from exc
    except ValueError as exc:
        raise DedtError(f"latents in {folder} are corrupted ({exc}); delete the folder and re-run") from exc
    if latents.ndim != 4 or len(latents) != len(stored_ids):
        raise DedtError(f"latents in {folder} have shape {latents.shape} for {len(stored_ids)} ids; re-run the stage")
    if ids is None:
        return latents
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return latents[:0]
    missing = DedtError(f"latents in {folder} do not cover the requested samples; re-run the latents stage")
    if len(stored_ids) == 0:
        raise missing
    order = np.argsort(stored_ids, kind="stable")
    rows = order[np.searchsorted(stored_ids, ids, sorter=order).clip(max=len(order) - 1)]
    if not np.array_equal(stored_ids[rows], ids):
        raise missing
    return latents[rows]
