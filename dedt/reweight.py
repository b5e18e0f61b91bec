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


class ProxyTrainer:
    """The proxy DM, its optimizer and the DRO state: ``step(indices)`` is one DoReMi step.

    images float32 (N, C, H, W) in [-1, 1]; labels int64 (N,) conditioning classes (ignored by an
    unconditional model); groups int (N,) in [0, k). ``t_range`` = (lo, hi) fractions of T: only
    samples whose timestep falls in [lo * T, hi * T) count towards the excess (all by default).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, groups: np.ndarray, reference: "torch.nn.Module",
                 options: "TrainOptions", *, num_classes: int, eta: float, smoothing: float, seed: int,
                 t_range: tuple[float, float] = (0.0, 1.0), initial: np.ndarray | None = None) -> None:
        import torch

        from dedt.diffusion.presets import build_model, build_scheduler

        doremi_update(np.full(2, 0.5), np.zeros(2), eta=eta, smoothing=smoothing)  # validates eta, smoothing
        self.k = int(groups.max()) + 1
        self.eta, self.smoothing, self.options = eta, smoothing, options
        torch.manual_seed(seed)
        self.proxy = build_model(options.preset, in_channels=images.shape[1], resolution=images.shape[2],
                                 num_classes=num_classes if options.conditional else None)
        self.scheduler = build_scheduler(options.preset)
        self.reference = reference.eval().requires_grad_(False)
        self.reference_conditional = getattr(reference.config, "num_class_embeds", None) is not None
        from dedt.diffusion.train import _make_optimizer

        self.optimizer = _make_optimizer(self.proxy, options)  # the same optimiser as final training
        self.x, self.y = torch.from_numpy(images), torch.from_numpy(labels)
        self.g = torch.from_numpy(groups.astype(np.int64))
        T = self.scheduler.config.num_train_timesteps
        self.t_lo, self.t_hi = int(t_range[0] * T), max(int(t_range[0] * T) + 1, int(t_range[1] * T))
        self.alpha = np.full(self.k, 1.0 / self.k) if initial is None else np.asarray(initial, np.float64)
        self.excess = np.zeros(self.k)

    def step(self, indices: np.ndarray) -> None:
        import torch

        idx = torch.from_numpy(indices)
        x0, y, g = self.x[idx], self.y[idx], self.g[idx]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),))
        noise = torch.randn_like(x0)  # one draw of (t, eps), shared by proxy and reference
        from dedt.diffusion.train import per_sample_loss

        loss = per_sample_loss(self.proxy, self.scheduler, x0, y if self.options.conditional else None, t, noise)
        with torch.no_grad():
            ref = per_sample_loss(self.reference, self.scheduler, x0, y if self.reference_conditional else None, t, noise)
        counted = (t >= self.t_lo) & (t < self.t_hi)
        gap = (loss.detach() - ref).clamp_min(0).double() * counted  # clipped excess, DoReMi Eq. 1
        sums = torch.zeros(self.k, dtype=torch.float64).index_add_(0, g, gap)
        counts = torch.bincount(g, weights=counted.double(), minlength=self.k)
        present = counts > 0
        self.excess = self.excess.copy()
        self.excess[present.numpy()] = (sums[present] / counts[present]).numpy()  # absent: keep previous
        self.alpha = doremi_update(self.alpha, self.excess, eta=self.eta, smoothing=self.smoothing)
        # The proxy minimises the alpha-weighted mean loss of the groups in this batch.
        members = torch.bincount(g, minlength=self.k)
        group_mean = torch.zeros(self.k, dtype=loss.dtype).index_add_(0, g, loss) / members.clamp_min(1)
        objective = (torch.from_numpy(self.alpha).to(loss.dtype) * group_mean)[members > 0].sum()
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.proxy.parameters(), self.options.grad_clip)
        self.optimizer.step()


def train_proxy(images: np.ndarray, labels: np.ndarray, groups: np.ndarray, reference: "torch.nn.Module",
                options: "TrainOptions", *, num_classes: int, budget_kimg: float, eta: float, smoothing: float,
                seed: int, t_range: tuple[float, float] = (0.0, 1.0), initial: np.ndarray | None = None,
                progress: bool = False) -> DroResult:
    """Group DRO as PAPER.md section 4; returns alpha averaged over all steps (alpha_0 included)."""
    from tqdm import tqdm

    trainer = ProxyTrainer(images, labels, groups, reference, options, num_classes=num_classes, eta=eta,
                           smoothing=smoothing, seed=seed, t_range=t_range, initial=initial)
    rng = np.random.default_rng(seed)
    steps = max(1, round(budget_kimg * 1000 / options.batch_size))
    alphas, excesses = [trainer.alpha], [trainer.excess]
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="proxy DRO", unit="step", disable=not progress):
        trainer.step(stratified_batch(groups, options.batch_size, rng))
        alphas.append(trainer.alpha)
        excesses.append(trainer.excess)
    seconds = time.perf_counter() - start
    trajectory = np.stack(alphas)
    weights = trajectory.mean(axis=0)
    warning = collapse_warning(weights, batch_size=options.batch_size, eta=eta, steps=steps)
    return DroResult(weights, trajectory, np.stack(excesses), seconds, steps * options.batch_size / seconds, warning)


def kmeans_groups(embeddings: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Groups for unlabelled data: FAISS k-means clusters of the embeddings, int64 (N,)."""
    import faiss

    if not 2 <= k <= len(embeddings):
        raise DedtError(f"reweight.clusters must lie in [2, {len(embeddings)}] (the number of samples); got {k}")
    x = np.ascontiguousarray(embeddings, np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    # Relabel by first appearance: group ids then do not depend on FAISS's centroid order.
    raw = assign[:, 0]
    uniq, first = np.unique(raw, return_index=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first)] = np.arange(len(uniq))
    return rank[np.searchsorted(uniq, raw)]


def load_reference(path: str, *, in_channels: int, resolution: int) -> "torch.nn.Module":
    """A reference UNet from a local diffusers folder (``google/ddpm-cifar10-32`` layout), never the hub.

    Accepts the folder of a ``UNet2DModel`` (config.json + weights) or a pipeline folder with a
    ``unet/`` sub-folder. The architecture must fit the data: channels and resolution are checked.
    """
    from pathlib import Path

    from diffusers import UNet2DModel

    root = Path(path).expanduser()
    folder = root / "unet" if (root / "unet" / "config.json").exists() else root
    if not (folder / "config.json").exists():
        raise DedtError(f"reweight.reference_path {root} holds no diffusers UNet (config.json); "
                        "point it at a UNet2DModel.save_pretrained folder or a pipeline folder with unet/")
    try:
        model = UNet2DModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DedtError(f"cannot load the reference UNet from {folder}: {exc}") from exc
    if model.config.in_channels != in_channels or model.config.sample_size != resolution:
        raise DedtError(f"reference {folder} is for {model.config.in_channels}x{model.config.sample_size}px images "
                        f"but the data is {in_channels}x{resolution}px; set dataset.resolution/channels to match")
    return model.eval()
