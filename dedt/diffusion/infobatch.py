"""InfoBatch dynamic pruning (Qin et al., ICLR 2024): skip part of the well-learned samples each epoch,
rescale the rest so the epoch's expected gradient is the full epoch's.

A sample's score is its last loss divided by the running mean loss of its timestep band, because a
diffusion loss depends mostly on t (a sample drawn at small t looks easy whatever it is); samples
never seen are never well-learned. At the start of each epoch the well-learned samples (score below
the mean score) lose a random subset: exactly floor(r m + u) of the m of them, u ~ U[0, 1), so each
is dropped with probability r exactly; the kept ones' losses are multiplied by 1 / (1 - r), so
E[sum over the epoch of weight * loss] equals the full epoch's sum (the paper's Eq. 3). Epochs that
start after ``prune_until_nimg`` images are plain (the paper's annealing, delta). The budget stays in
images seen: a pruned epoch is simply shorter.

Every draw is a function of (seed, epoch) and of the scores, which the checkpoint holds, so a resumed
run draws what an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

BANDS = 20  # our choice: 50 timesteps per band at T = 1000, ~6 samples per band in a batch of 128
BAND_MOMENTUM = 0.95  # our choice: a band's mean follows its last ~20 steps (~130 losses at batch 128)
_STREAM = 2  # SeedSequence stream id, apart from dedt.diffusion.sampler's 0 and 1


def plan_epoch(scores: np.ndarray, prune_ratio: float, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One pruned epoch: (order, weight), the visiting order (int64, kept samples only, permuted) and each
    visit's loss weight (float32: 1 / (1 - prune_ratio) for kept well-learned samples, else 1).

    ``scores`` (N,) float: a sample's normalised last loss, inf = never seen (never well-learned).
    """
    n = len(scores)
    rng = np.random.default_rng([seed, _STREAM, epoch])
    seen = np.isfinite(scores)
    well = seen & (scores < scores[seen].mean()) if seen.any() else np.zeros(n, bool)
    candidates = np.flatnonzero(well)
    count = math.floor(prune_ratio * len(candidates) + rng.random())  # E[count] = r m exactly
    keep = np.ones(n, bool)
    keep[rng.permutation(candidates)[:count]] = False
    order = rng.permutation(np.flatnonzero(keep))
    weight = np.where(well[order], 1.0 / (1.0 - prune_ratio), 1.0).astype(np.float32)
    return order, weight


def plain_epoch(n: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """An epoch without pruning: every sample once, in a seeded order, weight 1."""
    return np.random.default_rng([seed, _STREAM, epoch]).permutation(n), np.ones(n, np.float32)


class InfoBatch:
    """Per-sample scores, per-band running means and the current epoch's plan; draws global batches.

    The scores and band means live on ``device`` and are updated without a host sync; an epoch's
    plan is made on the host (one copy of the scores per epoch).
    """

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        num_timesteps: int,
        prune_ratio: float,
        prune_until_nimg: float,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n, self.batch_size, self.num_timesteps = n, batch_size, num_timesteps
        self.prune_ratio, self.prune_until_nimg, self.seed = prune_ratio, prune_until_nimg, seed
        self.bands = min(BANDS, num_timesteps)
        self.score = torch.full((n,), math.inf, dtype=torch.float32, device=device)
        self.band_mean = torch.zeros(self.bands, dtype=torch.float64, device=device)
        self.band_steps = torch.zeros(self.bands, dtype=torch.int64, device=device)
        # The current epoch: its number, plan and how far it has been read; then the run's tallies.
        self.epoch, self.offset = -1, 0
        self.order, self.weight = np.zeros(0, np.int64), np.zeros(0, np.float32)
        self.epochs, self.pruned_epochs, self.slots, self.skipped = 0, 0, 0, 0

    def next_batch(self, nimg: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch that starts after ``nimg`` images seen: dataset indices (int64, (B,)) and
        their loss weights (float32, (B,)); a batch may span the end of one epoch and the next."""
        indices, weights, taken = [], [], 0
        while taken < self.batch_size:
            if self.offset == len(self.order):
                self._start_epoch(nimg + taken)
            take = min(self.batch_size - taken, len(self.order) - self.offset)
            indices.append(self.order[self.offset : self.offset + take])
            weights.append(self.weight[self.offset : self.offset + take])
            self.offset += take
            taken += take
        return np.concatenate(indices), np.concatenate(weights)

    def _start_epoch(self, nimg: int) -> None:
        self.epoch += 1
        if nimg < self.prune_until_nimg:
            self.order, self.weight = plan_epoch(self.score.cpu().numpy(), self.prune_ratio, self.seed, self.epoch)
        else:
            self.order, self.weight = plain_epoch(self.n, self.seed, self.epoch)
        self.offset = 0
        self.epochs += 1
        self.pruned_epochs += int(nimg < self.prune_until_nimg)
        self.slots += self.n
        self.skipped += self.n - len(self.order)

    @torch.no_grad()
    def update(self, index: np.ndarray, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the global batch's per-sample losses (B,) at timesteps t (B,) for the indices (B,).

        Band sums go through a one-hot product (deterministic, unlike a scatter-add on CUDA); a sample
        twice in one batch keeps its last loss."""
        band = t * self.bands // self.num_timesteps
        onehot = F.one_hot(band, self.bands).to(torch.float64)
        sums, counts = losses.to(torch.float64) @ onehot, onehot.sum(dim=0)
        batch_mean = sums / counts.clamp_min(1)
        moved = BAND_MOMENTUM * self.band_mean + (1 - BAND_MOMENTUM) * batch_mean
        present = counts > 0
        self.band_mean = torch.where(present, torch.where(self.band_steps > 0, moved, batch_mean), self.band_mean)
        self.band_steps += present.to(torch.int64)
        score = losses.to(torch.float64) / self.band_mean[band].clamp_min(1e-12)
        _, first_of_reversed = np.unique(index[::-1], return_index=True)
        last = len(index) - 1 - first_of_reversed
        rows = torch.from_numpy(last).to(self.score.device)
        self.score[torch.from_numpy(index[last]).to(self.score.device)] = score[rows].to(torch.float32)

    def summary(self) -> dict[str, Any]:
        """What pruning did: epochs begun, of them pruned, and the fraction of their sample visits skipped."""
        return {
            "epochs": self.epochs,
            "pruned_epochs": self.pruned_epochs,
            "skipped_frac": round(self.skipped / self.slots, 6) if self.slots else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "score": self.score.cpu(),
            "band_mean": self.band_mean.cpu(),
            "band_steps": self.band_steps.cpu(),
            "order": torch.from_numpy(self.order),
            "weight": torch.from_numpy(self.weight),
            "counters": torch.tensor(
                [self.epoch, self.offset, self.epochs, self.pruned_epochs, self.slots, self.skipped]
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score.copy_(state["score"])
        self.band_mean.copy_(state["band_mean"])
        self.band_steps.copy_(state["band_steps"])
        self.order, self.weight = state["order"].numpy().copy(), state["weight"].numpy().copy()
        self.epoch, self.offset, self.epochs, self.pruned_epochs, self.slots, self.skipped = (
            int(v) for v in state["counters"].tolist()
        )
