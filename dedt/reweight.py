"""Group DRO class weights (DoReMi, Xie et al. 2023) for diffusion models.

A proxy DM trains on the subset while a frozen reference DM scores the same noisy inputs; the
groups (classes, or k-means clusters) on which the proxy lags the reference most gain weight by
exponentiated gradient ascent. The average of the weights over all steps is the output.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from dedt.errors import DedtError

if TYPE_CHECKING:
    import torch

    from dedt.config import ReweightConfig
    from dedt.diffusion.options import TrainOptions
    from dedt.progress import ProgressFn

Excess = Literal["raw", "normalized", "log-ratio"]
Pairing = Literal["common", "independent"]
# Bands of the normalized excess: 20 of DDPM's T = 1000 steps, 50 each (our choice). The reference
# loss falls ~200x from t < 50 to t >= 700 (measured on digits), so it must be nearly flat within a band.
TIMESTEP_BANDS = 20
# eta by excess. raw: DoReMi's released 1.0. The others are scaled so that the cumulative log-weights
# spread across classes as far over a default run (250 steps) as raw excess with eta 1 (std 0.33 on
# digits; normalized 15.3 and log-ratio 11.8 at eta 1, measured with bench/dro_stability.py's data).
DEFAULT_ETA: dict[str, float] = {"raw": 1.0, "normalized": 0.02, "log-ratio": 0.03}
# collapse_warning's thresholds; DoReMi names none, so all are our choice. Collapsed: one group holds
# over 90% of the mass, or the entropy is below half of uniform's log k (as if the mass sat evenly on
# sqrt(k) groups: ~3 of 10 classes).
COLLAPSE_MAX_WEIGHT = 0.9
COLLAPSE_MIN_ENTROPY_FRAC = 0.5
# Likely causes it names. Stratified batches give each group batch_size / k samples a step: under 4, a
# group's excess (a difference of two mean losses) rests on 1-3 samples and is mostly noise.
MIN_BATCH_PER_GROUP = 4
# Above DoReMi's released step size, eta = 1.0 (the raw excess's default), the hint calls eta large.
MAX_CALM_ETA = DEFAULT_ETA["raw"]
# The weights are the mean of alpha over all steps: under 100 steps (a default run has 250, 32 kimg at
# batch 128) that mean rests on few noisy updates.
MIN_PROXY_STEPS = 100


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
    if weights.max() <= COLLAPSE_MAX_WEIGHT and entropy >= COLLAPSE_MIN_ENTROPY_FRAC * math.log(k):
        return None
    causes = []
    if batch_size < MIN_BATCH_PER_GROUP * k:
        causes.append(f"batch {batch_size} is small for {k} groups (use >= {MIN_BATCH_PER_GROUP * k})")
    if eta > MAX_CALM_ETA:
        causes.append(f"eta {eta} is large (try {MAX_CALM_ETA} or less)")
    if steps < MIN_PROXY_STEPS:
        causes.append(f"only {steps} proxy steps (raise reweight.proxy_kimg)")
    return (
        f"DRO weights collapsed: max weight {weights.max():.3f}, entropy {entropy:.3f} "
        f"(uniform {math.log(k):.3f}). Likely causes: {'; '.join(causes) or 'noisy per-group losses'}."
    )


def stratified_batch(groups: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a batch in which every group appears (when batch_size >= #groups).

    Slots are dealt round-robin over groups in a random order, then filled uniformly within
    each group, so the proxy sees every group at every step and no excess goes stale needlessly.
    """
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    order = rng.permutation(len(members))
    counts = np.full(len(members), batch_size // len(members))
    counts[order[: batch_size % len(members)]] += 1
    return np.concatenate([rng.choice(m, c, replace=True) for m, c in zip(members, counts, strict=False)])


@dataclass
class DroResult:
    weights: np.ndarray  # (k,) average of alpha_0..alpha_T; 0 for a group absent from the data
    alphas: np.ndarray  # (T + 1, k) trajectory, alpha_0 first
    excess: np.ndarray  # (T + 1, k) per-group clipped excess used at each step (zeros at step 0)
    seconds: float
    images_per_s: float
    warning: str | None


def member_slots(groups: np.ndarray) -> np.ndarray:
    """Each sample's rank among the batch's members of its own group: (B,) int64, 0 for the first."""
    order = np.argsort(groups, kind="stable")
    ordered = groups[order]
    slots = np.empty(len(groups), np.int64)
    slots[order] = np.arange(len(groups)) - np.searchsorted(ordered, ordered)
    return slots


def stratified_timesteps(n: int, num_timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n timesteps, one uniform draw in each of n equal strata of [0, T), in random order: (n,) int64.

    The order is shuffled so that an extra (n-th) member of a group does not always get the top stratum.
    """
    import torch

    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = ((torch.arange(n, dtype=torch.float64) + u) * num_timesteps / n).long().clamp_max(num_timesteps - 1)
    return t[torch.randperm(n, generator=generator)]


class ProxyTrainer:
    """The proxy DM, its optimizer and the DRO state: ``step(indices)`` is one DoReMi step.

    images float32 (N, C, H, W) in [-1, 1]; labels int64 (N,) conditioning classes of both models
    (ignored by an unconditional one); groups int (N,) in [0, num_groups). A group with no sample
    gets weight 0 and stays off the simplex. ``t_range`` = (lo, hi) fractions of T: only samples
    whose timestep falls in [lo * T, hi * T) count towards the excess (all by default).

    ``timesteps="common"`` draws one stratified pool of (t, eps) per step and gives the i-th member
    of every group the pool's i-th draw: every group's mean excess is then taken over the same noise
    levels and noises, the diffusion form of DoReMi's per-domain averaging (which averages over
    thousands of tokens per domain; here t alone explains most of a sample's excess).
    ``"independent"`` draws (t, eps) per sample (plain DoReMi).

    ``excess``: ``"raw"`` is DoReMi's l_proxy - l_ref; ``"normalized"`` divides it by the reference's
    running mean loss in the sample's timestep band (``TIMESTEP_BANDS``), so that every noise level
    counts, not only the small-t ones whose loss is two orders of magnitude larger; ``"log-ratio"`` is
    log(l_proxy / l_ref) per sample: also free of the noise level's scale, and the sample's own noise
    draw, shared by both models, cancels in the ratio (the steadiest weights, README).
    Both models run in train mode with the same dropout masks (DoReMi runs both models the same way).

    ``device``: where proxy, reference, data and the noise draws live (``resolve_device(train.device)``).
    On CUDA the forwards run under the trainer's ``precision`` autocast (with loss scaling for fp16);
    on the CPU the proxy stays in fp32 and draws from the CPU generator exactly as before.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        groups: np.ndarray,
        reference: torch.nn.Module,
        options: TrainOptions,
        *,
        num_classes: int,
        eta: float,
        smoothing: float,
        seed: int,
        t_range: tuple[float, float] = (0.0, 1.0),
        initial: np.ndarray | None = None,
        num_groups: int | None = None,
        excess: Excess = "raw",
        timesteps: Pairing = "common",
        device: str | torch.device = "cpu",
    ) -> None:
        import torch

        from dedt.diffusion.presets import build_model, build_scheduler
        from dedt.diffusion.weighting import timestep_weight_table

        if excess not in DEFAULT_ETA or timesteps not in ("common", "independent"):
            raise DedtError(
                f"excess must be one of {'|'.join(DEFAULT_ETA)} and timesteps common|independent; "
                f"got {excess!r}, {timesteps!r}"
            )
        doremi_update(np.full(2, 0.5), np.zeros(2), eta=eta, smoothing=smoothing)  # validates eta, smoothing
        self.k = int(groups.max()) + 1 if num_groups is None else num_groups
        if groups.min() < 0 or groups.max() >= self.k:
            raise DedtError(f"groups must lie in [0, {self.k}); got [{groups.min()}, {groups.max()}]")
        self.present = np.bincount(groups, minlength=self.k) > 0
        self.eta, self.smoothing, self.options = eta, smoothing, options
        self.excess_mode, self.timesteps = excess, timesteps
        torch.manual_seed(seed)  # seeds the CUDA generators too
        self.device = torch.device(device)
        self.proxy = build_model(
            options.preset,
            in_channels=images.shape[1],
            resolution=images.shape[2],
            num_classes=num_classes if options.conditional else None,
        ).to(self.device)
        self.scheduler = build_scheduler(options.preset, latent=options.latent)
        # The final training's timestep weighting (train.timestep_weighting) in the proxy's and the
        # reference's losses alike: the excess then compares the losses that training minimises.
        self.timestep_weight = timestep_weight_table(
            options.timestep_weighting, self.scheduler.alphas_cumprod, snr_gamma=options.snr_gamma
        )
        if self.timestep_weight is not None:
            self.timestep_weight = self.timestep_weight.to(self.device)
        self.reference = reference.to(self.device).train().requires_grad_(False)  # train mode: see the class docstring
        embeds = getattr(getattr(reference, "config", None), "num_class_embeds", None)
        if embeds is not None and labels.max() >= embeds:
            raise DedtError(
                f"the reference is conditioned on {embeds} classes but the labels reach {labels.max()}; "
                "condition the reference on the same classes as the proxy"
            )
        self.reference_conditional = embeds is not None
        from dedt.diffusion.optim import make_optimizer

        self.optimizer = make_optimizer(self.proxy, options)  # the same optimiser as final training
        # The trainer's mixed precision on CUDA only: CPU weights stay those of fp32 (byte-identical artifacts).
        self.amp = self.device.type == "cuda" and options.precision != "fp32"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and options.precision == "fp16")
        self.nimg = 0  # images seen, for the trainer's learning-rate warm-up
        self.x, self.y = torch.from_numpy(images).to(self.device), torch.from_numpy(labels).to(self.device)
        self.g = torch.from_numpy(groups.astype(np.int64))  # on the CPU: the draws and the DRO state read it
        T = self.scheduler.config.num_train_timesteps
        self.t_lo, self.t_hi = int(t_range[0] * T), max(int(t_range[0] * T) + 1, int(t_range[1] * T))
        # Running per-band sums and counts of the reference loss (normalized excess).
        self.band_sum, self.band_count = np.zeros(TIMESTEP_BANDS), np.zeros(TIMESTEP_BANDS)
        uniform = self.present / self.present.sum()
        self.alpha = uniform if initial is None else np.where(self.present, np.asarray(initial, np.float64), 0.0)
        self.alpha = self.alpha / self.alpha.sum()
        self.excess = np.zeros(self.k)

    def learning_rate(self) -> float:
        """The final trainer's linear warm-up (``Trainer.learning_rate``) at this proxy's images seen."""
        from dedt.diffusion.train import Trainer

        return Trainer.learning_rate(self)  # type: ignore[arg-type]  # reads options and nimg only

    def draw(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, eps) of a batch with groups g (B,): a common pool over groups, or one draw per sample."""
        import torch

        T = self.scheduler.config.num_train_timesteps
        shape = (len(g), *self.x.shape[1:])
        # t (B,) on the CPU; the noise on self.device, from that device's generator (the CPU's as before).
        if self.timesteps == "independent":
            return torch.randint(0, T, (len(g),)), torch.randn(shape, device=self.device)
        slots = torch.from_numpy(member_slots(g.numpy()))
        pool = int(slots.max()) + 1
        t = stratified_timesteps(pool, T)[slots]
        return t, torch.randn((pool, *shape[1:]), device=self.device)[slots.to(self.device)]

    def sample_excess(self, loss: torch.Tensor, ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample excess (B,), float64, of the ``excess`` mode (class docstring)."""
        import torch

        if self.excess_mode == "log-ratio":
            return loss.detach().double().log() - ref.double().log()
        gap = loss.detach().double() - ref.double()
        if self.excess_mode == "raw":
            return gap
        bands = (t.numpy() * TIMESTEP_BANDS) // self.scheduler.config.num_train_timesteps
        np.add.at(self.band_sum, bands, ref.double().numpy())  # this step first: no band is ever empty
        np.add.at(self.band_count, bands, 1.0)
        return gap / torch.from_numpy(self.band_sum[bands] / self.band_count[bands])

    def step(self, indices: np.ndarray) -> None:
        import torch

        from dedt.diffusion.train import per_sample_loss

        idx = torch.from_numpy(indices)
        g = self.g[idx]
        x0, y = self.x[idx.to(self.device)], self.y[idx.to(self.device)]
        t, noise = self.draw(g)  # one draw of (t, eps), shared by proxy and reference
        t_dev, g_dev = t.to(self.device), g.to(self.device)
        dropout = _rng_state(self.device)
        with self.autocast():
            loss = per_sample_loss(
                self.proxy, self.scheduler, x0, y if self.options.conditional else None, t_dev, noise
            )
        _set_rng_state(self.device, dropout)  # the same dropout masks for the reference
        with torch.no_grad(), self.autocast():
            ref = per_sample_loss(
                self.reference, self.scheduler, x0, y if self.reference_conditional else None, t_dev, noise
            )
        if self.timestep_weight is not None:
            loss, ref = loss * self.timestep_weight[t_dev], ref * self.timestep_weight[t_dev]
        counted = (t >= self.t_lo) & (t < self.t_hi)
        # The DRO state is k numbers: computed on the CPU from B losses (a no-op copy there).
        gap = self.sample_excess(loss.detach().cpu(), ref.cpu(), t).clamp_min(0) * counted  # DoReMi Eq. 1
        sums = torch.zeros(self.k, dtype=torch.float64).index_add_(0, g, gap)
        counts = torch.bincount(g, weights=counted.double(), minlength=self.k)
        seen = (counts > 0).numpy()
        self.excess = self.excess.copy()
        self.excess[seen] = (sums / counts.clamp_min(1)).numpy()[seen]  # absent from the batch: keep previous
        self.alpha = self.alpha.copy()
        self.alpha[self.present] = doremi_update(
            self.alpha[self.present], self.excess[self.present], eta=self.eta, smoothing=self.smoothing
        )
        # The proxy minimises the alpha-weighted mean loss of the groups in this batch.
        members = torch.bincount(g, minlength=self.k).to(self.device)
        group_mean = torch.zeros(self.k, dtype=loss.dtype, device=self.device).index_add_(0, g_dev, loss)
        group_mean = group_mean / members.clamp_min(1)
        objective = (torch.from_numpy(self.alpha).to(self.device, loss.dtype) * group_mean)[members > 0].sum()
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = self.learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()  # the scaler is a no-op unless fp16 on CUDA
        if self.options.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.proxy.parameters(), self.options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.nimg += len(indices)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The trainer's ``precision`` autocast on CUDA; nothing on the CPU."""
        import torch

        from dedt.diffusion.device import AUTOCAST

        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.options.precision])


def _rng_state(device: torch.device) -> torch.Tensor:
    """The generator state of ``device`` (the CPU's, or that CUDA device's), for repeating dropout masks."""
    import torch

    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def train_proxy(
    images: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    reference: torch.nn.Module,
    options: TrainOptions,
    *,
    num_classes: int,
    budget_kimg: float,
    eta: float | None = None,
    smoothing: float,
    seed: int,
    t_range: tuple[float, float] = (0.0, 1.0),
    initial: np.ndarray | None = None,
    num_groups: int | None = None,
    excess: Excess = "raw",
    timesteps: Pairing = "common",
    progress: bool = False,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
) -> DroResult:
    """Group DRO as PAPER.md section 4; returns alpha averaged over all steps (alpha_0 included).

    ``eta=None`` takes ``DEFAULT_ETA[excess]``; the other arguments are ``ProxyTrainer``'s.
    ``on_progress(done, total, info)``: images seen by the proxy, a few times a minute (``dedt.progress``).
    """
    from tqdm import tqdm

    from dedt.precision import tf32
    from dedt.progress import Throttle

    eta = DEFAULT_ETA.get(excess) if eta is None else eta  # an unknown excess fails in ProxyTrainer
    trainer = ProxyTrainer(
        images,
        labels,
        groups,
        reference,
        options,
        num_classes=num_classes,
        eta=eta,
        smoothing=smoothing,
        seed=seed,
        t_range=t_range,
        initial=initial,
        num_groups=num_groups,
        excess=excess,
        timesteps=timesteps,
        device=device,
    )
    rng = np.random.default_rng(seed)
    steps = max(1, round(budget_kimg * 1000 / options.batch_size))
    report = Throttle(on_progress, steps * options.batch_size)
    alphas, excesses = [trainer.alpha], [trainer.excess]
    start = time.perf_counter()
    with tf32(options.tf32):  # the trainer's float32 precision on CUDA; no effect on the CPU
        for _ in tqdm(range(steps), desc="proxy DRO", unit="step", disable=not progress):
            trainer.step(stratified_batch(groups, options.batch_size, rng))
            alphas.append(trainer.alpha)
            excesses.append(trainer.excess)
            report(trainer.nimg)
    seconds = time.perf_counter() - start
    trajectory = np.stack(alphas)
    weights = trajectory.mean(axis=0)
    warning = collapse_warning(weights[trainer.present], batch_size=options.batch_size, eta=eta, steps=steps)
    return DroResult(weights, trajectory, np.stack(excesses), seconds, steps * options.batch_size / seconds, warning)


def train_reference(
    images: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    weights: np.ndarray,
    options: TrainOptions,
    *,
    num_classes: int,
    seed: int,
) -> torch.nn.Module:
    """A reference for a further DRO round: the final trainer's model and steps for ``options.budget_kimg``,
    with batches drawn from the group mixture ``weights`` (P(group g) = w_g, uniform inside a group).

    Conditioned on ``labels`` (classes) like the proxy and the first reference, whatever the groups
    (classes or clusters): the excess then compares models that see the same conditioning.
    Returns the EMA model on the CPU.
    """
    from dedt.diffusion.device import World, derive_seed, fork_rng
    from dedt.diffusion.sampler import BatchSampler
    from dedt.diffusion.train import Trainer

    with fork_rng(options.device, World()):
        trainer = Trainer(images, labels, options, num_classes=num_classes, seed=seed)
        trainer.infobatch = None  # the group mixture below is not uniform epochs: no dynamic pruning
        trainer.sampler = BatchSampler(
            groups,
            batch_size=options.batch_size,
            num_classes=len(weights),
            class_weights=weights,
            seed=derive_seed(seed, "sampler"),
        )
        while trainer.nimg < options.budget_kimg * 1000:
            trainer.step()
    return trainer.ema.module.cpu()


def iterated_dro(
    images: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    reference: torch.nn.Module,
    options: TrainOptions,
    rw: ReweightConfig,
    full_data: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    num_classes: int,
    num_groups: int,
    eta: float,
    seed: int,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
) -> tuple[list[DroResult], float]:
    """``rw.rounds`` rounds of group DRO (PAPER.md section 4): every round after the first re-trains the
    reference on ``full_data()`` (images, labels, groups of the full train split), drawn by the previous
    round's weights, then runs the proxy again. Returns each round's result and the seconds spent on
    proxies and re-trained references; the last round's weights are the output."""
    rounds: list[DroResult] = []
    weights, seconds = None, 0.0
    for r in range(rw.rounds):
        if r > 0:  # the reference's data is the full train split, as in the first round
            start = time.perf_counter()
            full_images, full_labels, full_groups = full_data()
            ref_options = options.model_copy(update={"budget_kimg": rw.reference_kimg})
            reference = train_reference(
                full_images, full_labels, full_groups, weights, ref_options, num_classes=num_classes, seed=seed + r
            )
            seconds += time.perf_counter() - start
        result = train_proxy(
            images,
            labels,
            groups,
            reference,
            options,
            num_classes=num_classes,
            budget_kimg=rw.proxy_kimg,
            eta=eta,
            smoothing=rw.smoothing,
            seed=seed + r,
            t_range=(rw.t_min_frac, rw.t_max_frac),
            num_groups=num_groups,
            excess=rw.excess,
            timesteps=rw.timesteps,
            device=device,
            on_progress=on_progress,
        )
        weights, seconds = result.weights, seconds + result.seconds
        rounds.append(result)
    return rounds, seconds


def weights_table(weights: np.ndarray, groups: np.ndarray, num_groups: int) -> pa.Table:
    """weights.parquet's rows: group, weight, and samples_in_subset (the proxy's samples of the group)."""
    counts = np.bincount(groups, minlength=num_groups)
    return pa.table(
        {
            "group": np.arange(num_groups, dtype=np.int32),
            "weight": weights,
            "samples_in_subset": counts.astype(np.int64),
        }
    )


def trajectory_table(rounds: list[DroResult], num_groups: int) -> pa.Table:
    """trajectory.parquet's rows: one per round, proxy step and group, with alpha and the clipped excess."""
    k = num_groups
    steps = np.concatenate([np.repeat(np.arange(len(res.alphas), dtype=np.int64), k) for res in rounds])
    return pa.table(
        {
            "round": np.concatenate([np.full(res.alphas.size, r, np.int32) for r, res in enumerate(rounds)]),
            "step": steps,
            "group": np.tile(np.arange(k, dtype=np.int32), len(steps) // k),
            "alpha": np.concatenate([res.alphas.ravel() for res in rounds]),
            "excess": np.concatenate([res.excess.ravel() for res in rounds]),
        }
    )


def kmeans_groups(embeddings: np.ndarray, k: int, *, seed: int, fit: np.ndarray | None = None) -> np.ndarray:
    """Groups for unlabelled data: FAISS k-means clusters of the embeddings, int64 (N,).

    ``fit`` (bool (N,)) picks the rows the centroids are fitted on (default all); every row is then
    assigned to its nearest centroid, so samples outside the subset get groups too (iterated DRO).
    Group ids are numbered by first appearance among the fitted rows.
    """
    import faiss

    fit = np.ones(len(embeddings), bool) if fit is None else np.asarray(fit, bool)
    if not 2 <= k <= fit.sum():
        raise DedtError(f"reweight.clusters must lie in [2, {fit.sum()}] (the number of samples); got {k}")
    x = np.ascontiguousarray(embeddings, np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(x[fit])
    _, assign = km.index.search(x, 1)
    # Relabel by first appearance: group ids then do not depend on FAISS's centroid order.
    raw = assign[:, 0]
    first = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(first, raw[fit], np.flatnonzero(fit))
    rank = np.empty(k, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(k)
    return rank[raw]


def load_reference(path: str, *, in_channels: int, resolution: int) -> torch.nn.Module:
    """A reference UNet from a local diffusers folder (``google/ddpm-cifar10-32`` layout), never the hub.

    Accepts the folder of a ``UNet2DModel`` (config.json + weights) or a pipeline folder with a
    ``unet/`` sub-folder. The architecture must fit the data: channels and resolution are checked.
    """
    from pathlib import Path

    from diffusers import UNet2DModel

    root = Path(path).expanduser()
    folder = root / "unet" if (root / "unet" / "config.json").exists() else root
    if not (folder / "config.json").exists():
        raise DedtError(
            f"reweight.reference_path {root} holds no diffusers UNet (config.json); "
            "point it at a UNet2DModel.save_pretrained folder or a pipeline folder with unet/"
        )
    try:
        model = UNet2DModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DedtError(f"cannot load the reference UNet from {folder}: {exc}") from exc
    if model.config.in_channels != in_channels or model.config.sample_size != resolution:
        raise DedtError(
            f"reference {folder} is for {model.config.in_channels}x{model.config.sample_size}px images "
            f"but the data is {in_channels}x{resolution}px; set dataset.resolution/channels to match"
        )
    return model.eval()
