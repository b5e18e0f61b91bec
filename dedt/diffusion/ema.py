"""Exponential moving average of model weights: a half-life in images (EDM) or EDM2's power function."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

# gamma = 0 (a uniform average of the whole run) has relative std sqrt(1/12): the largest sigma_rel.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


def ema_beta(batch_size: int, *, halflife_kimg: float, decay: float | None = None) -> float:
    """Per-step EMA decay.

    With a half-life h (images), an update's weight halves after h images, so one step of B images
    decays by 0.5 ** (B / h): the rule of Karras et al.'s EDM training loop (2022), which EDM2 keeps
    in kimg units. It makes the EMA independent of the batch size, unlike a fixed decay such as
    Ho et al.'s 0.9999 per step, which ``decay`` selects instead.
    """
    if decay is not None:
        return decay
    return 0.5 ** (batch_size / (halflife_kimg * 1000.0))


class EMA:
    """A frozen copy of the model whose weights track the live ones: ema <- beta*ema + (1-beta)*live."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.module.parameters())
        self._live = list(model.parameters())
        self._ema_buffers = list(self.module.buffers())
        self._live_buffers = list(model.buffers())

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """One EMA step; lerp(ema, live, 1 - beta) is beta*ema + (1-beta)*live in one fused pass."""
        torch._foreach_lerp_(self._ema, self._live, 1.0 - beta)
        for ema_buffer, live_buffer in zip(self._ema_buffers, self._live_buffers, strict=False):
            ema_buffer.copy_(live_buffer)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of EDM2's power-function EMA profile whose relative std is ``sigma_rel``.

    The profile p(t) ~ t^gamma over [0, T] has relative std sqrt((g+1) / ((g+2)^2 (g+3))) (Karras et
    al. 2024, Eq. 3 and appendix C.1); solving for gamma is the cubic g^3 + 7g^2 + (16 - s^-2) g +
    (12 - s^-2) = 0, whose largest real root is taken (EDM2's ``std_to_exp``).
    """
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}) (gamma >= 0), got {sigma_rel}")
    inv = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())


def power_ema_beta(sigma_rel: float, images_seen: int, batch_size: int) -> float:
    """Per-step decay of EDM2's power-function EMA after ``images_seen`` images (this step included).

    beta = (1 - B / t)^(gamma + 1) (EDM2 ``power_function_beta``): the average's length grows in
    proportion to the training length, so the EMA is equally fair at every point of a run, which a
    fixed half-life is not (too short late, too long early). The first step gives beta 0: the EMA
    starts as the live weights.
    """
    if images_seen < batch_size:
        raise ValueError(f"images_seen ({images_seen}) must include the step's batch ({batch_size})")
    gamma = sigma_rel_to_gamma(sigma_rel)
    return (1.0 - batch_size / images_seen) ** (gamma + 1.0)
