"""Sampling with DDIM or DDPM, seeded per sample so the batch size does not change the images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from dedt.errors import DedtError
from dedt.progress import ProgressFn, Throttle
from dedt.store import atomic_path

METHODS = ("ddim", "ddpm")


def make_sampling_scheduler(scheduler: DDPMScheduler, method: str, steps: int) -> DDIMScheduler | DDPMScheduler:
    """The sampler for ``method`` with ``steps`` steps, sharing the training schedule's betas.

    Timesteps are spaced "trailing" (999, 949, ..., 49 for 20 steps) so the first step starts from
    pure noise at t = T - 1; Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Table 2) show the default "leading" spacing skips the noisiest steps.
    """
    if method not in METHODS:
        raise DedtError(f"unknown sampling method {method!r}; use one of {', '.join(METHODS)}")
    total = scheduler.config.num_train_timesteps
    if not 1 <= steps <= total:
        raise DedtError(f"sampling steps must be in [1, {total}], got {steps}")
    kind = DDIMScheduler if method == "ddim" else DDPMScheduler
    sampler = kind.from_config(scheduler.config, timestep_spacing="trailing")
    sampler.set_timesteps(steps)
    return sampler


def sample(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    labels: np.ndarray | None,
    *,
    num: int | None = None,
    method: str = "ddim",
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> np.ndarray:
    """Generate images by reversing the diffusion from Gaussian noise.

    Args:
        model: the denoiser (use the EMA weights); class-conditional iff it has class embeddings.
        scheduler: the training schedule (betas); the sampler is derived from it.
        labels: int (M,) class of each sample for a conditional model; None for an unconditional
            one, with ``num`` = M.
        method: "ddim" (Song et al. 2021, eta = 0: deterministic given the start noise) or "ddpm"
            (Ho et al. 2020 ancestral sampling, posterior variance beta-tilde).
        on_progress: ``(done, total, info)`` images sampled, a few times a minute (``dedt.progress``).
    Returns: float32 (M, C, H, W), clamped to [-1, 1] when the schedule clips x0 (pixel space,
    ``clip_sample=True``); a latent schedule (``build_scheduler(..., latent=True)``) returns the
    latents unclamped, for ``dedt.diffusion.latents.decode_latents``. ``model`` is moved to
    ``device``; its train/eval mode is restored afterwards.
    Sample i draws its start noise from its own CPU generator seeded from (seed, i), so DDIM's
    results don't depend on batch_size or device, up to float rounding. DDPM's per-step noise comes
    from the sample's own generator on the sampling device (on the CPU, the same generator):
    independent of batch_size and deterministic, drawn where it is used (no host-to-device copy at
    each of up to 1,000 steps), but a GPU's random stream is not the CPU's.
    """
    conditional = model.config.num_class_embeds is not None
    if labels is None:
        if conditional:
            raise DedtError("the model is class-conditional: pass one label per sample")
        if num is None or num < 1:
            raise DedtError(f"an unconditional model needs num >= 1 samples, got {num}")
        total, class_labels = num, None
    else:
        class_labels = np.asarray(labels, dtype=np.int64)
        if not conditional:
            raise DedtError("the model is unconditional: pass labels=None and num")
        if class_labels.ndim != 1 or (num is not None and num != len(class_labels)):
            raise DedtError(f"labels must be 1-D with one entry per sample, got shape {class_labels.shape}")
        if len(class_labels) and (class_labels.min() < 0 or class_labels.max() >= model.config.num_class_embeds):
            raise DedtError(f"labels must lie in [0, {model.config.num_class_embeds}) (the model's classes)")
        total = len(class_labels)
    if batch_size < 1:
        raise DedtError(f"sampling batch_size must be >= 1, got {batch_size}")
    sampler = make_sampling_scheduler(scheduler, method, steps)
    clamp = bool(sampler.config.clip_sample)  # pixels live in [-1, 1]; latents are unbounded
    device = torch.device(device)
    channels, size = model.config.in_channels, model.config.sample_size
    was_training = model.training
    model.to(device).eval()
    out = []
    report = Throttle(on_progress, total)
    try:
        with torch.inference_mode(), tqdm(total=total, unit="img", disable=not progress) as bar:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                generators = [torch.Generator("cpu").manual_seed(_sample_seed(seed, i)) for i in range(start, stop)]
                step_generators = generators if device.type == "cpu" else [
                    torch.Generator(device).manual_seed(_sample_seed(seed, i)) for i in range(start, stop)
                ]  # fmt: skip
                y = None if class_labels is None else torch.from_numpy(class_labels[start:stop]).to(device)
                x = randn_tensor((stop - start, channels, size, size), generator=generators, device=device)
                x = x * sampler.init_noise_sigma
                for t in sampler.timesteps:
                    eps = model(x, t.to(device), class_labels=y).sample
                    x = sampler.step(eps, t, x, generator=step_generators).prev_sample
                out.append((x.clamp(-1, 1) if clamp else x).float().cpu().numpy())
                bar.update(stop - start)
                report(stop)
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, channels, size, size), dtype=np.float32)
    return np.concatenate(out)


def save_grid(images: np.ndarray, path: Path, nrow: int) -> None:
    """Write images (M, C, H, W) in [-1, 1] as one PNG grid, ``nrow`` images per row, 2 px gaps."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise DedtError(f"save_grid needs a non-empty (M, 1 or 3, H, W) array, got shape {images.shape}")
    if nrow < 1:
        raise DedtError(f"save_grid needs nrow >= 1, got {nrow}")
    count, channels, height, width = images.shape
    pad = 2
    rows = math.ceil(count / nrow)
    grid = np.zeros((rows * (height + pad) + pad, nrow * (width + pad) + pad, channels), dtype=np.uint8)
    pixels = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for i, image in enumerate(pixels):
        top, left = pad + (i // nrow) * (height + pad), pad + (i % nrow) * (width + pad)
        grid[top : top + height, left : left + width] = image
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    with atomic_path(Path(path)) as tmp:
        picture.save(tmp, format="PNG")


def _sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index``'s generator: independent streams from numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
