"""Diffusion training: budget in images seen, warm-up, clipping, EMA, weighted classes, exact resume.

The run folder (EDM2's layout, Karras et al. 2024):
    training_options.json       resolved options and the run's identity (data, seed, world size)
    log.jsonl                   one line per log interval: step, kimg, loss, lr, images_per_s, ...
    checkpoints/ckpt-<kimg>/    model + EMA(s) (safetensors), optimiser/scaler/RNG/sampler state, state.json
    model.safetensors, ema.safetensors, model_config.json   written when the budget is reached
Running the same command again continues from the newest checkpoint; every random draw is a
function of state the checkpoint holds, so an interrupted-then-resumed run ends with the same bytes
as an uninterrupted one (on CPU). Data parallel training runs under ``torchrun`` (DDP): the
sampler, timesteps and noise are drawn for the global batch and sliced per rank, so N processes
compute what one would, up to the order of the gradient all-reduce.

This module holds the loop; beside it: ``device`` (device, process group, RNG streams, FLOPs),
``checkpoint`` (the run folder's files, ``load_model``) and ``optim`` (the optimiser).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from dedt.diffusion.checkpoint import (
    RunLog,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    remove_partial_checkpoints,
    run_identity,
    state_dict,
    write_checkpoint,
    write_final,
)
from dedt.diffusion.device import (
    AUTOCAST,
    World,
    backend_flags,
    derive_seed,
    fork_rng,
    forward_flops,
    gather,
    gather_batch,
    init_world,
    peak_flops,
    resolve_device,
)
from dedt.diffusion.ema import EMA, ema_beta, power_ema_beta
from dedt.diffusion.infobatch import InfoBatch
from dedt.diffusion.optim import make_optimizer
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.posthoc import PROFILES, posthoc_points
from dedt.diffusion.presets import build_model, build_scheduler, count_parameters
from dedt.diffusion.sampler import BatchSampler, anneal_step, check_class_weights
from dedt.diffusion.snapshots import snapshot_points, write_snapshot
from dedt.diffusion.timestep_sampler import LossAwareTimesteps
from dedt.diffusion.weighting import timestep_weight_table
from dedt.errors import DedtError
from dedt.progress import ProgressFn, Throttle
from dedt.store import atomic_write_text

# Callers import these from here: the loop's module is where users look for the trained model and device.
__all__ = ["Trainer", "World", "check_inputs", "load_model", "per_sample_loss", "resolve_device", "train"]


def per_sample_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Ho et al. 2020's L_simple (Eq. 14) per sample: mean over pixels of (eps - eps_theta(x_t, t))^2.

    Args: x0 (B, C, H, W) clean images; labels (B,) int64 or None (unconditional); t (B,) int64
    timesteps; noise (B, C, H, W) the eps that forms x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Eq. 4).
    Returns: (B,) float32 losses, differentiable.
    """
    x_t = scheduler.add_noise(x0, noise, t)
    eps_hat = model(x_t, t, class_labels=labels).sample
    return (eps_hat.float() - noise.float()).square().mean(dim=tuple(range(1, x0.ndim)))


class Trainer:
    """Model, EMA, optimiser, scaler, sampler and RNG of one run: what a checkpoint holds, and a step.

    Construction seeds torch's global RNG (weight initialisation, then dropout); ``train`` wraps it
    so the caller's RNG is left alone.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        options: TrainOptions,
        *,
        num_classes: int,
        class_weights: np.ndarray | None = None,
        seed: int = 0,
        world: World | None = None,
        anneal_data: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        world = world or World()  # one process, without torchrun
        check_inputs(images, labels, options, num_classes=num_classes, class_weights=class_weights, world=world)
        if anneal_data is not None:
            check_inputs(*anneal_data, options, num_classes=num_classes, class_weights=None, world=world)
        self.options = options
        self.world = world
        self.device = resolve_device(options.device, world.local_rank)
        if options.precision == "fp16" and self.device.type != "cuda":
            raise DedtError("train.precision 'fp16' needs CUDA (loss scaling); use 'bf16' or 'fp32' on CPU")
        _, channels, resolution, _ = images.shape

        torch.manual_seed(derive_seed(seed, "init"))  # same weights on every rank
        self.model = build_model(
            options.preset,
            in_channels=channels,
            resolution=resolution,
            num_classes=num_classes if options.conditional else None,
        ).to(self.device)
        if options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.ema = EMA(self.model)
        self.ema_beta = ema_beta(options.batch_size, halflife_kimg=options.ema_halflife_kimg, decay=options.ema_decay)
        # Post-hoc EMA (EDM2): the tracked power-function profiles, by snapshot name.
        self.posthoc = {name: EMA(self.model) for name in PROFILES} if options.posthoc_ema else {}
        self.scheduler = build_scheduler(options.preset, latent=options.latent)
        self.timestep_weight = timestep_weight_table(
            options.timestep_weighting, self.scheduler.alphas_cumprod.to(self.device), snr_gamma=options.snr_gamma
        )
        self.loss_aware = (
            LossAwareTimesteps(self.scheduler.config.num_train_timesteps, self.device)
            if options.timestep_sampling == "loss-aware"
            else None
        )
        self.optimizer = make_optimizer(self.model, options)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=options.precision == "fp16")
        torch.manual_seed(derive_seed(seed, "dropout", world.rank))
        # One generator draws t, eps and flips for the global batch, identically on every rank.
        self.generator = torch.Generator(self.device).manual_seed(derive_seed(seed, "noise"))

        self.forward_model: torch.nn.Module = self.model
        if world.size > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if options.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        sampling = class_weights is not None and options.weighting == "sampling"
        self.sampler = BatchSampler(
            labels,
            batch_size=options.batch_size,
            num_classes=num_classes,
            class_weights=class_weights if sampling else None,
            seed=derive_seed(seed, "sampler"),
        )
        self.loss_weight: torch.Tensor | None = None
        if class_weights is not None and options.weighting == "loss":
            # k * w_y: uniform weights give 1 for every sample, so the loss scale matches plain training.
            weights = check_class_weights(class_weights, labels, num_classes)
            self.loss_weight = torch.tensor(num_classes * weights, dtype=torch.float32, device=self.device)
        # Data schedules (dedt.diffusion.infobatch; prune then anneal): the first draws the subset's epochs,
        # the second moves to the full train split for the last anneal_frac of the budget.
        budget_nimg = math.ceil(options.budget_kimg * 1000)
        self.infobatch = (
            InfoBatch(
                len(labels),
                batch_size=options.batch_size,
                num_timesteps=self.scheduler.config.num_train_timesteps,
                prune_ratio=options.prune_ratio,
                prune_until_nimg=options.prune_until * budget_nimg,
                seed=derive_seed(seed, "sampler"),
                device=self.device,
            )
            if options.dynamic_pruning == "infobatch"
            else None
        )
        self.anneal_step: int | None = None
        if anneal_data is not None and options.anneal_frac > 0:
            self.anneal_step = anneal_step(budget_nimg, options.batch_size, options.anneal_frac)
            self.anneal_images = torch.from_numpy(np.ascontiguousarray(anneal_data[0], dtype=np.float32)).to(
                self.device
            )
            self.anneal_labels = torch.from_numpy(np.asarray(anneal_data[1], dtype=np.int64)).to(self.device)
            self.anneal_sampler = BatchSampler(
                anneal_data[1], batch_size=options.batch_size, num_classes=num_classes, seed=derive_seed(seed, "anneal")
            )

        self.local_batch = options.batch_size // world.size
        self.step_count = 0
        self.nimg = 0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.last_lr = 0.0
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_steps = 0

    def learning_rate(self) -> float:
        """Linear warm-up to ``lr`` over ``warmup_kimg``, counting the batch being trained on."""
        warmup_nimg = self.options.warmup_kimg * 1000.0
        if warmup_nimg <= 0:
            return self.options.lr
        return self.options.lr * min(1.0, (self.nimg + self.options.batch_size) / warmup_nimg)

    def step(self) -> None:
        """One optimiser step on the global batch number ``step_count`` (this rank's slice of it)."""
        options, device = self.options, self.device
        rows = slice(self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch)
        images, all_labels, batch, batch_weight = self._draw()
        index = torch.from_numpy(batch[rows]).to(device, non_blocking=True)
        x0 = images.index_select(0, index)
        labels = all_labels.index_select(0, index)
        full = (options.batch_size, *x0.shape[1:])
        steps = self.scheduler.config.num_train_timesteps
        if self.loss_aware is None:
            t, t_scale = torch.randint(0, steps, full[:1], generator=self.generator, device=device), None
        else:
            t, t_scale = self.loss_aware.sample(options.batch_size, self.generator)
        t_all = t
        noise = torch.randn(full, generator=self.generator, device=device)
        t, noise = t[rows], noise[rows]
        if options.hflip:
            flip = torch.rand(full[:1], generator=self.generator, device=device)[rows] < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        if options.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)

        with torch.autocast(device.type, dtype=AUTOCAST.get(options.precision), enabled=options.precision != "fp32"):
            losses = per_sample_loss(
                self.forward_model, self.scheduler, x0, labels if options.conditional else None, t, noise
            )
        if batch_weight is not None and self.infobatch is not None:  # scores from the plain losses, then rescaling
            self.infobatch.update(batch, t_all, gather_batch(losses.detach(), self.world))
            losses = losses * batch_weight[rows]
        if self.timestep_weight is not None:  # Min-SNR-gamma (dedt.diffusion.weighting)
            losses = losses * self.timestep_weight[t]
        if self.loss_aware is not None and t_scale is not None:  # the weighted losses feed the history
            self.loss_aware.update(t_all, gather_batch(losses.detach(), self.world))
            losses = losses * t_scale[rows]  # 1 / (T p(t)): the uniform objective in expectation
        class_weighted = self.loss_weight is not None and not self.annealing
        loss = (losses * self.loss_weight[labels]).mean() if class_weighted else losses.mean()

        self.last_lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if options.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.options.ema == "power":  # the decay depends on how far the run is (EDM2)
            self.ema.update(power_ema_beta(options.ema_sigma_rel, self.nimg + options.batch_size, options.batch_size))
        else:
            self.ema.update(self.ema_beta)
        for name, ema in self.posthoc.items():
            ema.update(power_ema_beta(PROFILES[name], self.nimg + options.batch_size, options.batch_size))

        self._loss_sum += loss.detach()
        self._loss_steps += 1
        self.step_count += 1
        self.nimg += options.batch_size

    @property
    def annealing(self) -> bool:
        """True from the step where prune then anneal trains on the full train split."""
        return self.anneal_step is not None and self.step_count >= self.anneal_step

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor | None]:
        """The global batch: the images and labels it indexes, its indices (B,), and InfoBatch's loss
        weights (B,) on the device (None: all 1)."""
        if self.annealing:  # uniform epochs over the full split, from the switch on
            assert self.anneal_step is not None
            return (
                self.anneal_images,
                self.anneal_labels,
                self.anneal_sampler.batch(self.step_count - self.anneal_step),
                None,
            )
        if self.infobatch is not None:
            index, weight = self.infobatch.next_batch(self.nimg)
            return self.images, self.labels, index, torch.from_numpy(weight).to(self.device, non_blocking=True)
        return self.images, self.labels, self.sampler.batch(self.step_count), None

    def pop_mean_loss(self) -> float:
        """Mean training loss since the last call, over all ranks (the one sync of a log interval)."""
        total = self._loss_sum.clone()
        if self.world.size > 1:
            dist.all_reduce(total)
            total /= self.world.size
        mean = total.item() / max(self._loss_steps, 1)
        self._loss_sum.zero_()
        self._loss_steps = 0
        return mean

    def training_state(self) -> dict[str, Any]:
        """Optimiser, grad scaler and RNG states (the model and EMA go to safetensors)."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": gather(torch.get_rng_state(), self.world),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = gather(torch.cuda.get_rng_state(self.device), self.world)
        if self.loss_aware is not None:
            state["timestep_sampler"] = self.loss_aware.state_dict()
        if self.infobatch is not None:
            state["infobatch"] = self.infobatch.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``training_state``: each rank takes its own dropout RNG stream back."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"][self.world.rank])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"][self.world.rank], self.device)
        if self.loss_aware is not None:
            self.loss_aware.load_state_dict(state["timestep_sampler"])
        if self.infobatch is not None:
            self.infobatch.load_state_dict(state["infobatch"])

    def weights(self) -> dict[str, torch.nn.Module]:
        """The modules a checkpoint saves, by file stem: the model, its EMA and the post-hoc EMAs."""
        return {"model": self.model, "ema": self.ema.module, **{name: ema.module for name, ema in self.posthoc.items()}}

    def resume(self, path: Path, identity: dict[str, Any]) -> tuple[float, float]:
        """Restore from the checkpoint ``path``; returns (seconds trained, last logged loss).

        A checkpoint of another device type resumes with the RNG streams re-seeded from (seed, step):
        CPU and CUDA generator states differ.
        """
        state, training_state = load_checkpoint(path, identity, self.weights())
        step, on_cuda = int(state["step"]), self.device.type == "cuda"
        if ("cuda_rng" in training_state) != on_cuda:  # only a CUDA run saves the CUDA RNG
            warnings.warn(
                f"{path} was written on another device type: resuming with the random streams re-seeded "
                "from the seed and step (the run differs from an uninterrupted one)",
                stacklevel=2,
            )
            self.generator.manual_seed(derive_seed(identity["seed"], "noise", "resumed", step))
            torch.manual_seed(derive_seed(identity["seed"], "dropout", self.world.rank, "resumed", step))
            training_state = {
                k: v for k, v in training_state.items() if k not in ("generator", "torch_rng", "cuda_rng")
            }
            training_state["generator"] = self.generator.get_state()
            training_state["torch_rng"] = [torch.get_rng_state()] * self.world.size  # each rank its own
            if on_cuda:
                training_state["cuda_rng"] = [torch.cuda.get_rng_state(self.device)] * self.world.size
        self.load_training_state(training_state)
        self.step_count, self.nimg = step, int(state["nimg"])
        return float(state["seconds"]), float(state["loss"])


def check_inputs(
    images: np.ndarray,
    labels: np.ndarray,
    options: TrainOptions,
    *,
    num_classes: int,
    class_weights: np.ndarray | None,
    world: World,
) -> None:
    """Fail before any work on bad shapes, dtypes, ranges or an indivisible batch."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.float32:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DedtError(f"training images must be a float32 array (N, C, H, W), got {got}")
    n, _, height, width = images.shape
    if n == 0 or height != width:
        raise DedtError(f"training images must be a non-empty batch of square images, got shape {images.shape}")
    lo, hi = float(images.min()), float(images.max())
    if options.latent:  # VAE latents: unbounded, but a NaN or inf would poison every step
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DedtError("training latents hold NaN or inf values; re-run the latents stage or check the VAE")
    elif not (-1.0 - 1e-4 <= lo and hi <= 1.0 + 1e-4):
        raise DedtError(f"training images must be scaled to [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DedtError(f"labels must be an integer array of shape ({n},), got {labels.dtype} {labels.shape}")
    if num_classes < 1 or labels.min() < 0 or labels.max() >= num_classes:
        raise DedtError(f"labels must lie in [0, num_classes={num_classes}), got [{labels.min()}, {labels.max()}]")
    if class_weights is not None:
        check_class_weights(class_weights, labels, num_classes)
    if options.dynamic_pruning == "infobatch" and class_weights is not None and options.weighting == "sampling":
        raise DedtError(
            "train.dynamic_pruning 'infobatch' prunes uniform epochs, but class weights with train.weighting "
            "'sampling' draw a class mixture; use train.weighting 'loss' or dynamic_pruning 'none'"
        )
    if options.batch_size % world.size:
        raise DedtError(
            f"train.batch_size {options.batch_size} is not divisible by the world size {world.size} "
            f"(processes); use a multiple of {world.size}"
        )


def train(
    images: np.ndarray,
    labels: np.ndarray,
    options: TrainOptions,
    run_dir: Path,
    *,
    num_classes: int,
    class_weights: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    on_progress: ProgressFn | None = None,
    anneal_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train a diffusion model until ``options.budget_kimg`` thousand images have been seen.

    Args:
        images: float32 (N, C, H, W) in [-1, 1], square; or scaled VAE latents when
            ``options.vae_path`` is set (``dedt.diffusion.latents.encode_latents``), any finite values.
        labels: int (N,) in [0, num_classes).
        class_weights: (num_classes,) probabilities. With ``weighting="sampling"`` class g is drawn
            with probability w_g (uniform within the class); with ``"loss"`` batches are uniform and
            sample i's loss is scaled by num_classes * w_{y_i}. None = plain uniform training.
        run_dir: the run folder; a checkpoint there is resumed (a checkpoint of another config is
            a DedtError).
        on_step: called as on_step(step, nimg) after every step and the checkpoint it may write;
            raising from it stops the run (tests use it to simulate a kill).
        on_progress: ``(nimg, budget_nimg, info)`` with images/s, ETA and the last logged loss, a few
            times a minute on rank 0 (``dedt.progress``).
        anneal_data: (images, labels) of the full train split, for ``options.anneal_frac`` > 0 (prune
            then anneal): the last anneal_frac of the budget trains on it, in uniform epochs without
            class weights. None (or anneal_frac 0): the run never leaves ``images``.
    Returns: {"steps", "nimg", "seconds", "images_per_s", "final_loss", "parameters"}, with "infobatch"
    (epochs, pruned epochs, skipped fraction) and "anneal" (switch step and kimg) when those are on;
    seconds and images_per_s cover the whole run, resumed parts included.
    Under torchrun every process calls this; rank 0 writes the files.
    """
    run_dir = Path(run_dir)
    world, created_group = init_world(options.device)
    try:
        with fork_rng(options.device, world), backend_flags(options):
            return _run(
                images,
                labels,
                options,
                run_dir,
                num_classes,
                class_weights,
                seed,
                world,
                progress,
                on_step,
                on_progress,
                anneal_data,
            )
    finally:
        if created_group:
            dist.destroy_process_group()


def _run(
    images: np.ndarray,
    labels: np.ndarray,
    options: TrainOptions,
    run_dir: Path,
    num_classes: int,
    class_weights: np.ndarray | None,
    seed: int,
    world: World,
    progress: bool,
    on_step: Callable[[int, int], None] | None,
    on_progress: ProgressFn | None = None,
    anneal_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The loop of ``train``, inside its RNG and precision guards (EDM2's ``training_loop``)."""
    # Setup: model, EMA, optimiser and data on the device (validates the inputs first).
    is_main = world.rank == 0
    if anneal_data is None or options.anneal_frac == 0:  # nothing to anneal to: a plain run, a plain identity
        options, anneal_data = options.model_copy(update={"anneal_frac": 0.0}), None
    trainer = Trainer(
        images,
        labels,
        options,
        num_classes=num_classes,
        class_weights=class_weights,
        seed=seed,
        world=world,
        anneal_data=anneal_data,
    )

    # Resume from the newest intact checkpoint of this run, if any.
    identity = run_identity(images, labels, options, num_classes, class_weights, seed, world.size, anneal_data)
    checkpoints = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    seconds, last_loss = 0.0, float("nan")
    if latest is not None:
        seconds, last_loss = trainer.resume(latest, identity)
    if is_main:
        remove_partial_checkpoints(checkpoints)
        atomic_write_text(
            run_dir / "training_options.json",
            json.dumps({"options": options.model_dump(), "identity": identity}, indent=2, sort_keys=True),
        )
    log = RunLog(run_dir / "log.jsonl", keep_until_step=trainer.step_count)

    # Schedule, in images seen: log lines, checkpoints, snapshots; the FLOPs of a step for MFU.
    batch = options.batch_size
    budget_nimg = math.ceil(options.budget_kimg * 1000)
    every_log = max(1, round(options.log_every_kimg * 1000))
    every_ckpt = max(1, round(options.checkpoint_every_kimg * 1000))
    snapshot_at = set(snapshot_points(budget_nimg, batch, options.snapshots))
    posthoc_at = snapshot_at | set(posthoc_points(budget_nimg, batch, options.posthoc_snapshots))
    peak = peak_flops(trainer.device, options.precision, options.tf32)
    train_flops = None
    if peak is not None:  # backward ~ 2x forward, so a step costs ~3x the forward FLOPs (Kaplan et al. 2020)
        probe = trainer.images[:1]
        train_flops = 3 * forward_flops(trainer.model, probe, trainer.labels[:1] if options.conditional else None)
    bar = tqdm(
        total=budget_nimg, initial=min(trainer.nimg, budget_nimg), unit="img", unit_scale=True,
        disable=not (progress and is_main), dynamic_ncols=True,
    )  # fmt: skip
    report = Throttle(on_progress if is_main else None, budget_nimg, initial=min(trainer.nimg, budget_nimg))
    interval_start, interval_nimg = time.perf_counter(), trainer.nimg
    session_start = interval_start
    try:
        while trainer.nimg < budget_nimg:
            # Train: one optimiser step on the global batch.
            trainer.step()
            bar.update(batch)
            done = trainer.nimg >= budget_nimg
            save = done or _crossed(trainer.nimg, batch, every_ckpt)

            # Report: the mean loss since the last line, throughput and MFU.
            if save or _crossed(trainer.nimg, batch, every_log):
                last_loss = trainer.pop_mean_loss()
                now = time.perf_counter()
                rate = (trainer.nimg - interval_nimg) / max(now - interval_start, 1e-9)
                record = {
                    "step": trainer.step_count,
                    "kimg": trainer.nimg / 1000,
                    "loss": last_loss,
                    "lr": trainer.last_lr,
                    "images_per_s": rate,
                    "seconds": seconds + now - session_start,
                }
                if train_flops is not None and peak is not None:
                    record["mfu"] = rate * train_flops / (peak * world.size)
                log.append(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                interval_start, interval_nimg = now, trainer.nimg

            # Snapshots: the EMA (time-to-quality curve) and the post-hoc EMAs at their points.
            if trainer.nimg in snapshot_at and is_main:
                write_snapshot(
                    run_dir, trainer.nimg, seconds + time.perf_counter() - session_start, state_dict(trainer.ema.module)
                )
            if trainer.nimg in posthoc_at and is_main:
                for name, ema in trainer.posthoc.items():
                    write_snapshot(
                        run_dir,
                        trainer.nimg,
                        seconds + time.perf_counter() - session_start,
                        state_dict(ema.module),
                        name=name,
                    )

            # Checkpoint: the log up to here, then the resumable state.
            if save:
                elapsed = seconds + time.perf_counter() - session_start
                state = trainer.training_state()  # collective under DDP: every rank calls it
                if is_main:
                    log.flush()
                    write_checkpoint(
                        checkpoints,
                        step=trainer.step_count,
                        nimg=trainer.nimg,
                        weights=trainer.weights(),
                        training_state=state,
                        identity=identity,
                        seconds=elapsed,
                        loss=last_loss,
                        keep=options.keep_checkpoints,
                    )
            report(min(trainer.nimg, budget_nimg), {"loss": last_loss})  # the last logged mean loss: no sync
            if on_step is not None:
                on_step(trainer.step_count, trainer.nimg)
    finally:
        bar.close()

    # Done: the final weights and the config that rebuilds the model.
    seconds += time.perf_counter() - session_start
    if is_main:
        write_final(
            run_dir,
            trainer.model,
            trainer.ema.module,
            trainer.scheduler,
            options,
            channels=images.shape[1],
            resolution=images.shape[2],
            num_classes=num_classes,
        )
    if world.size > 1:
        dist.barrier()
    schedules: dict[str, Any] = {}
    if trainer.infobatch is not None:
        schedules["infobatch"] = trainer.infobatch.summary()
    if trainer.anneal_step is not None:
        schedules["anneal"] = {"switch_step": trainer.anneal_step, "switch_kimg": trainer.anneal_step * batch / 1000}
    return {
        "steps": trainer.step_count,
        "nimg": trainer.nimg,
        "seconds": seconds,
        "images_per_s": trainer.nimg / seconds if seconds > 0 else float("nan"),
        "final_loss": last_loss,
        "parameters": count_parameters(trainer.model),
        **schedules,
    }


def _crossed(nimg: int, batch: int, every: int) -> bool:
    """True when the last batch crossed a multiple of ``every`` images."""
    return nimg // every > (nimg - batch) // every
