"""Reference-model difficulty: how well the full-data diffusion model denoises each image (``score.method:
difficulty``).

Density scores of surrogate embeddings say nothing about what the diffusion model finds hard; its own
denoising loss does (difficulty-aware selection with a trained diffusion model, D2C 2025). The loss of
one (t, noise) draw is mostly the noise level's (the loss falls ~200x from small to large t) and the
draw's: compared across images on different draws it would rank draws, not images. So every image is
scored on ONE bank of ``draws`` (t, noise) pairs shared by all images (t stratified over the T steps),
each draw's loss is divided by the mean loss of the images at that draw (every noise level then counts
equally, and any per-t loss weighting cancels), and the ratios are averaged over the draws: the image's
difficulty, 1 for an image as hard as its group's average.

Sign: dedt's scores are "higher = keep first", so the score is minus the difficulty. The denoising loss
bounds the negative log-likelihood, so minus it reads like the density scorers' log-likelihoods: the
easiest, most typical images score highest. ``select.within: band`` with ``band_low`` > 0 drops the
hardest images, ``band_high`` < 1 the easiest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dedt.errors import DedtError
from dedt.progress import ProgressFn, Throttle

if TYPE_CHECKING:
    import torch
    from diffusers import DDPMScheduler


def draw_bank(draws: int, shape: Sequence[int], num_timesteps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bank: t (draws,) int64, one uniform draw in each of ``draws`` equal strata of [0, T) in
    random order, and noise (draws, *shape) float32 standard normal; the same for every image, a function of
    ``seed`` only (CPU generator)."""
    import torch

    from dedt.reweight import stratified_timesteps

    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise DedtError(f"score.draws must be a positive integer; got {draws!r}")
    generator = torch.Generator().manual_seed(int(seed))
    t = stratified_timesteps(draws, num_timesteps, generator)
    return t, torch.randn((draws, *shape), generator=generator, dtype=torch.float32)


def draw_losses(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: np.ndarray,
    labels: np.ndarray | None,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
) -> np.ndarray:
    """Each image's denoising loss on each draw of the bank: float64 (N, draws).

    Image i on draw d is noised to x_t = sqrt(abar_t) x_i + sqrt(1 - abar_t) eps_d with (t, eps_d) the
    bank's d-th pair; the loss is ``per_sample_loss``'s (L_simple). ``labels`` condition the model when it
    is conditional (``config.num_class_embeds``) and are ignored otherwise. The model runs in eval mode,
    without gradients.
    """
    import torch

    from dedt.diffusion.train import per_sample_loss

    if images.ndim != 4 or tuple(noise.shape[1:]) != images.shape[1:]:
        raise DedtError(f"images {images.shape} and the bank's noise {tuple(noise.shape)} must share (C, H, W)")
    device = torch.device(device)
    model = model.to(device).eval()
    embeds = getattr(getattr(model, "config", None), "num_class_embeds", None)
    if embeds is not None and (labels is None or labels.max() >= embeds):
        raise DedtError(
            f"the reference is conditioned on {embeds} classes but the labels are "
            f"{'missing' if labels is None else f'up to {labels.max()}'}; score with the reference trained on this data"
        )
    n, draws = len(images), len(t)
    out = np.empty((n, draws))
    report = Throttle(on_progress, n * draws)
    noise = noise.to(device)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x0 = torch.from_numpy(np.ascontiguousarray(images[start:stop], np.float32)).to(device)
            y = None if embeds is None else torch.from_numpy(labels[start:stop].astype(np.int64)).to(device)
            for d in range(draws):
                td = torch.full((stop - start,), int(t[d]), dtype=torch.int64, device=device)
                eps = noise[d].expand_as(x0)
                out[start:stop, d] = per_sample_loss(model, scheduler, x0, y, td, eps).double().cpu().numpy()
                report(start * draws + (stop - start) * (d + 1))
    return out


def normalise(losses: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Each draw's losses divided by their mean over the image's group (all images when ``groups`` is None):
    every column then averages 1 in every group, so every noise level weighs the same."""
    losses = np.asarray(losses, np.float64)
    keys = np.zeros(len(losses), np.int64) if groups is None else np.unique(groups, return_inverse=True)[1]
    sums = np.zeros((keys.max() + 1, losses.shape[1]))
    np.add.at(sums, keys, losses)
    means = sums / np.bincount(keys)[:, None]
    if not (means > 0).all():
        raise DedtError("a draw's mean denoising loss is 0 (a model that denoises perfectly?); no difficulty to rank")
    return losses / means[keys]


def difficulty_scores(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    draws: int,
    seed: int,
    per_class: bool = True,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
) -> np.ndarray:
    """Scores (N,) float64, higher = easier = keep first: minus each image's mean normalised loss over one
    shared bank of ``draws`` (t, noise) pairs (``draw_bank(draws, ..., seed)``). ``per_class``: normalise
    each draw by the mean of the image's class (True, needs labels) or of all images."""
    t, noise = draw_bank(draws, images.shape[1:], scheduler.config.num_train_timesteps, seed)
    losses = draw_losses(
        model, scheduler, images, labels, t, noise, batch_size=batch_size, device=device, on_progress=on_progress
    )
    return -normalise(losses, labels if per_class else None).mean(axis=1)
