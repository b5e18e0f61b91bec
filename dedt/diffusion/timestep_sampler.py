"""Loss-aware timestep sampling: draw the noise levels whose loss is large more often, unbiasedly.

Nichol & Dhariwal 2021 ("Improved DDPM", section 3.3, ``LossSecondMomentResampler`` of
openai/improved-diffusion): p(t) is proportional to sqrt(E[L_t^2]), estimated from the last
``HISTORY`` losses seen at t, mixed with a small uniform floor; each sample's loss is scaled by
1 / (T p(t)), so E_{t~p}[L_t / (T p(t))] = (1/T) sum_t L_t, the uniform objective, while the
gradient's variance drops. Until every t holds a full history, p is uniform.
"""

from __future__ import annotations

from typing import Any

import torch

HISTORY = 10  # losses remembered per timestep: Nichol & Dhariwal's history_per_term
UNIFORM_FLOOR = 1e-3  # probability mass spread uniformly: their uniform_prob; keeps every 1/p finite


class LossAwareTimesteps:
    """Per-timestep ring buffers of recent losses, and draws of t from the probabilities they give.

    All state lives on ``device`` and is updated without a host sync, so a GPU step is not stalled.
    """

    def __init__(self, num_timesteps: int, device: torch.device | str = "cpu") -> None:
        self.num_timesteps = num_timesteps
        self.history = torch.zeros(num_timesteps, HISTORY, dtype=torch.float64, device=device)
        self.seen = torch.zeros(num_timesteps, dtype=torch.int64, device=device)  # losses ever recorded per t

    def probabilities(self) -> torch.Tensor:
        """p(t), (T,) float64: (1 - floor) * RMS_t / sum RMS + floor / T once every t is warm, else 1/T."""
        uniform = torch.full_like(self.seen, 1, dtype=torch.float64) / self.num_timesteps
        rms = self.history.square().mean(dim=1).sqrt()
        loss_aware = (1.0 - UNIFORM_FLOOR) * rms / rms.sum().clamp_min(1e-300) + UNIFORM_FLOOR * uniform
        return torch.where(self.seen.min() >= HISTORY, loss_aware, uniform)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n timesteps drawn from p, (n,) int64, and their importance weights 1 / (T p(t)), (n,) float32."""
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).to(torch.float32)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record a batch's per-sample losses (B,) at timesteps t (B,), in batch order.

        Vectorised ring-buffer writes: the k-th occurrence of t in the batch goes to slot
        (seen_t + k) mod HISTORY; only the last HISTORY occurrences are written, so no slot is
        written twice and the result does not depend on scatter order (deterministic).
        """
        t = t.to(self.seen.device)
        order = torch.argsort(t, stable=True)
        sorted_t = t[order]
        first = torch.searchsorted(sorted_t, sorted_t, side="left")
        rank = torch.arange(len(t), device=t.device) - first  # occurrence number within the batch
        count = torch.bincount(t, minlength=self.num_timesteps)
        keep = rank >= count[sorted_t] - HISTORY
        slot = (self.seen[sorted_t] + rank) % HISTORY
        self.history[sorted_t[keep], slot[keep]] = losses.to(self.history)[order][keep]
        self.seen += count

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.copy_(state["history"])
        self.seen.copy_(state["seen"])
