"""Group DRO class weights (DoReMi, Xie et al. 2023) for diffusion models.

A proxy DM trains on the subset while a frozen reference DM scores the same noisy inputs; the
groups (classes, or k-means clusters) on which the proxy lags the reference most gain weight by
exponentiated gradient ascent. The average of the weights over all steps is the output.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dedt.errors import DedtError

if TYPE_CHECKING:
    import torch

    from dedt.diffusion.options import TrainOptions

COLLAPSE_MAX_WEIGHT = 0.9


def doremi_update(alpha: np.ndarray, excess: np.ndarray, *, eta: float, smoothing: float) -> np.ndarray:
    """One DoReMi step: (1 - c) * softmax(log alpha + eta * excess) + c / k.

    Computed in log space with the max subtracted, so eta * excess of any size stays finite.
    alpha (k,) on the simplex, excess (k,) >= 0 (clipped excess losses); returns (k,).
    """
    alpha = np.asarray(alpha, np.float64)
    excess = np.asarray(excess, np.float64)
    if alpha.shape != excess.shape or alpha.ndim != 1:
        raise DedtError(f"alpha {alpha.shape} and excess {excess.shape} must be equal 1-D shapes")
    if eta <= 0:
        raise DedtError(f"reweight.eta must be > 0; got {eta}")
    if not 0 <= smoothing < 1:
        raise DedtError(f"reweight.smoothing must lie in [0, 1); got {smoothing}")
    logits = np.log(np.maximum(alpha, 1e-300)) + eta * excess
    logits -= logits.max()
    mixed = np.exp(logits)
    mixed /= mixed.sum()
    return (1.0 - smoothing) * mixed + smoothing / len(alpha)


def collapse_warning(weights: np.ndarray, *, batch_size: int, eta: float, steps: int) -> str | None:
    """A message when the weights collapsed onto few groups (DoReMi's known failure), else None."""
    k = len(weights)
    entropy = float(-(weights * np.log(np.maximum(weights, 1e-300))).sum())
    if weights.max() <= COLLAPSE_MAX_WEIGHT and entropy >= 0.5 * math.log(k):
        return None
    causes = []
    if batch_size < 4 * k:
        causes.append(f"batch {batch_size} is small for {k} groups (use >= {4 * k})")
    if eta > 1.0:
        causes.append(f"eta {eta} is large (try 1.0 or less)")
    if steps < 100:
        causes.append(f"only {steps} proxy steps (raise reweight.proxy_kimg)")
    return (f"DRO weights collapsed: max weight {weights.max():.3f}, entropy {entropy:.3f} "
            f"(uniform {math.log(k):.3f}). Likely causes: {'; '.join(causes) or 'noisy per-group losses'}.")


def stratified_batch(groups: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a batch in which every group appears (when batch_size >= #groups).

    Slots are dealt round-robin over groups in a random order, then filled uniformly within
    each group, so the proxy sees every group at every step and no excess goes stale needlessly.
    """
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    order = rng.permutation(len(members))
    counts = np.full(len(members), batch_size // len(members))
    counts[order[: batch_size % len(members)]] += 1
    return np.concatenate([rng.choice(m, c, replace=True) for m, c in zip(members, counts)])


@dataclass
class DroResult:
    weights: np.ndarray  # (k,) average of alpha_0..alpha_T
    alphas: np.ndarray  # (T + 1, k) trajectory, alpha_0 first
    excess: np.ndarray  # (T + 1, k) per-group clipped excess used at each step (zeros at step 0)
    seconds: float
    images_per_s: float
    warning: str | None


def train_proxy(
    images: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    reference: "torch.nn.Module",
    options: "TrainOptions",
    *,
    num_classes: int,
    budget_kimg: float,
    eta: float,
    smoothing: float,
    seed: int,
    progress: bool = False,
) -> DroResult:
    """Train a proxy DM on (images, labels) with group-DRO weights against ``reference``.

    images float32 (N, C, H, W) in [-1, 1]; labels int64 (N,) conditioning classes; groups int
    (N,) in [0, k). Implements PAPER.md section 4: one (t, eps) draw shared by proxy and
    reference, per-group clipped excess, stale excess for absent groups, log-space update.
    """
    import torch
    from tqdm import tqdm

    from dedt.diffusion.presets import build_model, build_scheduler
    from dedt.diffusion.train import per_sample_loss

    k = int(groups.max()) + 1
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    proxy = build_model(options.preset, in_channels=images.shape[1], resolution=images.shape[2],
                        num_classes=num_classes if options.conditional else None)
    scheduler = build_scheduler(options.preset)
    reference.eval().requires_grad_(False)
    optimizer = torch.optim.Adam(proxy.parameters(), lr=options.lr)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    g_all = torch.from_numpy(groups.astype(np.int64))
    steps = max(1, round(budget_kimg * 1000 / options.batch_size))
    alpha, excess = np.full(k, 1.0 / k), np.zeros(k)
    alphas, excesses = [alpha], [excess]
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="proxy DRO", unit="step", disable=not progress):
        idx = torch.from_numpy(stratified_batch(groups, options.batch_size, rng))
        x0, y, g = x_all[idx], y_all[idx], g_all[idx]
        cond = y if options.conditional else None
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),))
        noise = torch.randn_like(x0)  # the same (t, eps) for proxy and reference
        loss_proxy = per_sample_loss(proxy, scheduler, x0, cond, t, noise)
        with torch.no_grad():
            loss_ref = per_sample_loss(reference, scheduler, x0, cond, t, noise)
        gap = (loss_proxy.detach() - loss_ref).clamp_min(0).double()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, g, gap)
        counts = torch.bincount(g, minlength=k)
        present = (counts > 0).numpy()
        excess = excess.copy()
        excess[present] = (sums[counts > 0] / counts[counts > 0]).numpy()  # absent groups keep theirs
        alpha = doremi_update(alpha, excess, eta=eta, smoothing=smoothing)
        group_mean = torch.zeros(k, dtype=loss_proxy.dtype).index_add_(0, g, loss_proxy) / counts.clamp_min(1)
        weighted = (torch.from_numpy(alpha).to(loss_proxy.dtype) * group_mean)[torch.from_numpy(present)].sum()
        optimizer.zero_grad(set_to_none=True)
        weighted.backward()
        torch.nn.utils.clip_grad_norm_(proxy.parameters(), options.grad_clip)
        optimizer.step()
        alphas.append(alpha)
        excesses.append(excess)
    seconds = time.perf_counter() - start
    trajectory = np.stack(alphas)
    weights = trajectory.mean(axis=0)
    warning = collapse_warning(weights, batch_size=options.batch_size, eta=eta, steps=steps)
    return DroResult(weights, trajectory, np.stack(excesses), seconds, steps * options.batch_size / seconds, warning)
