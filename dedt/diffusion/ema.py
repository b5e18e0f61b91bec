"""Exponential moving average of model weights, with the decay set by a half-life in images."""

from __future__ import annotations

import copy

import torch


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
        for ema_buffer, live_buffer in zip(self._ema_buffers, self._live_buffers):
            ema_buffer.copy_(live_buffer)
