"""Timestep loss weighting: how much each noise level counts in the training objective.

Ho et al.'s L_simple weights every timestep alike. Min-SNR-gamma (Hang et al., ICCV 2023) clamps
the weight of the low-noise steps, whose easy, large-SNR targets otherwise dominate the gradient
and conflict with the others; it reports 3.4x faster convergence on ImageNet-256 at gamma = 5.
"""

from __future__ import annotations

from typing import Literal

import torch

TimestepWeighting = Literal["uniform", "min-snr"]


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, in DDPM's notation), float64."""
    abar = alphas_cumprod.to(torch.float64)[timesteps.to(alphas_cumprod.device)]
    return abar / (1.0 - abar)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR(t), gamma) / SNR(t).

    Hang et al. 2023, the epsilon-loss form: the x0-loss weight min(SNR, gamma) divided by SNR,
    since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2. A weight is 1 where SNR <= gamma
    (the noisy steps) and gamma / SNR below 1 for the cleaner ones.

    Args: alphas_cumprod (T,) the training scheduler's abar_t; timesteps (B,) int64 in [0, T);
    gamma > 0. Returns: (B,) float32 weights in (0, 1].
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    ratio = snr(alphas_cumprod, timesteps)
    return (ratio.clamp(max=gamma) / ratio).to(torch.float32)


def timestep_weight_table(
    kind: TimestepWeighting, alphas_cumprod: torch.Tensor, *, snr_gamma: float
) -> torch.Tensor | None:
    """The (T,) per-timestep weights of ``kind`` on alphas_cumprod's device; None for 'uniform', so
    plain training keeps its exact arithmetic (no multiplication by ones)."""
    if kind == "uniform":
        return None
    if kind == "min-snr":
        every = torch.arange(len(alphas_cumprod), device=alphas_cumprod.device)
        return min_snr_weights(alphas_cumprod, every, snr_gamma)
    raise ValueError(f"unknown timestep weighting {kind!r}; known: uniform, min-snr")
