"""Diffusion training: budget in images seen, warm-up, clipping, EMA, weighted classes, exact resume.

The run folder (EDM2's layout, Karras et al. 2024):
    training_options.json       resolved options and the run's identity (data, seed, world size)
    log.jsonl                   one line per log interval: step, kimg, loss, lr, images_per_s, ...
    checkpoints/ckpt-<kimg>/    model + EMA(s) (safetensors), optimiser/scaler/RNG/timestep-sampler state, state.json
    model.safetensors, ema.safetensors, model_config.json   written when the budget is reached
Running the same command again continues from the newest checkpoint; every random draw is a
function of state the checkpoint holds, so an interrupted-then-resumed run ends with the same bytes
as an uninterrupted one (on CPU). Data parallel training runs under ``torchrun`` (DDP): the
sampler, timesteps and noise are drawn for the global batch and sliced per rank, so N processes
compute what one would, up to the order of the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from dedt.diffusion.ema import EMA, ema_beta, power_ema_beta
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.posthoc import PROFILES, posthoc_points
from dedt.diffusion.presets import build_model, build_scheduler, count_parameters
from dedt.diffusion.sampler import BatchSampler, check_class_weights
from dedt.diffusion.snapshots import snapshot_points, write_snapshot
from dedt.diffusion.timestep_sampler import LossAwareTimesteps
from dedt.diffusion.weighting import timestep_weight_table
from dedt.errors import DedtError
from dedt.precision import tf32
from dedt.progress import ProgressFn, Throttle
from dedt.store import atomic_path, atomic_write_text, file_sha256

# Options that may change between a run and its resumption: they don't change what is computed.
RESUMABLE_CHANGES = frozenset({"budget_kimg", "checkpoint_every_kimg", "keep_checkpoints", "log_every_kimg"})
CHECKPOINT_FORMAT = 1
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Dense peak throughput (FLOP/s) of SXM parts by compute precision, from NVIDIA's data sheets;
# H200 has H100's compute. Used for model-FLOPs utilisation (MFU) as in nanoGPT and PaLM.
_PEAK_FLOPS = {
    "H100": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
    "H200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
}


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


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available; 'cuda' without a GPU is a DedtError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DedtError("train.device is 'cuda' but no CUDA GPU is visible; use 'cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def peak_flops(device: torch.device, precision: str, tf32: bool) -> float | None:
    """The GPU's dense peak FLOP/s at the precision in use, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = precision if precision != "fp32" else ("tf32" if tf32 else "fp32")
    return next((table[key] for gpu, table in _PEAK_FLOPS.items() if gpu in name), None)


def forward_flops(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> int:
    """FLOPs of one forward pass on the batch ``x`` (counted by torch's FlopCounterMode).

    In eval mode and a forked RNG: training probes after restoring a checkpoint, and a dropout draw
    here would shift the random stream the resumed steps continue.
    """
    t = torch.zeros(len(x), dtype=torch.long, device=x.device)
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()
        try:
            model(x, t, class_labels=labels)
        finally:
            model.train(was_training)
    return counter.get_total_flops()


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
        world: World = World(),
    ) -> None:
        check_inputs(images, labels, options, num_classes=num_classes, class_weights=class_weights, world=world)
        self.options = options
        self.world = world
        self.device = resolve_device(options.device, world.local_rank)
        if options.precision == "fp16" and self.device.type != "cuda":
            raise DedtError("train.precision 'fp16' needs CUDA (loss scaling); use 'bf16' or 'fp32' on CPU")
        _, channels, resolution, _ = images.shape

        torch.manual_seed(_derive_seed(seed, "init"))  # same weights on every rank
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
        self.optimizer = _make_optimizer(self.model, options)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=options.precision == "fp16")
        torch.manual_seed(_derive_seed(seed, "dropout", world.rank))
        # One generator draws t, eps and flips for the global batch, identically on every rank.
        self.generator = torch.Generator(self.device).manual_seed(_derive_seed(seed, "noise"))

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
            seed=_derive_seed(seed, "sampler"),
        )
        self.loss_weight: torch.Tensor | None = None
        if class_weights is not None and options.weighting == "loss":
            # k * w_y: uniform weights give 1 for every sample, so the loss scale matches plain training.
            weights = check_class_weights(class_weights, labels, num_classes)
            self.loss_weight = torch.tensor(num_classes * weights, dtype=torch.float32, device=self.device)

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
        index = torch.from_numpy(self.sampler.batch(self.step_count)[rows]).to(device, non_blocking=True)
        x0 = self.images.index_select(0, index)
        labels = self.labels.index_select(0, index)
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

        with torch.autocast(device.type, dtype=_AUTOCAST.get(options.precision), enabled=options.precision != "fp32"):
            losses = per_sample_loss(
                self.forward_model, self.scheduler, x0, labels if options.conditional else None, t, noise
            )
        if self.timestep_weight is not None:  # Min-SNR-gamma (dedt.diffusion.weighting)
            losses = losses * self.timestep_weight[t]
        if self.loss_aware is not None and t_scale is not None:  # the weighted losses feed the history
            self.loss_aware.update(t_all, _gather_batch(losses.detach(), self.world))
            losses = losses * t_scale[rows]  # 1 / (T p(t)): the uniform objective in expectation
        loss = (losses * self.loss_weight[labels]).mean() if self.loss_weight is not None else losses.mean()

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
            "torch_rng": _gather(torch.get_rng_state(), self.world),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = _gather(torch.cuda.get_rng_state(self.device), self.world)
        if self.loss_aware is not None:
            state["timestep_sampler"] = self.loss_aware.state_dict()
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
    Returns: {"steps", "nimg", "seconds", "images_per_s", "final_loss", "parameters"}; seconds and
    images_per_s cover the whole run, resumed parts included.
    Under torchrun every process calls this; rank 0 writes the files.
    """
    run_dir = Path(run_dir)
    world, created_group = _init_world(options.device)
    try:
        with _fork_rng(options.device, world), backend_flags(options):
            return _run(images, labels, options, run_dir, num_classes, class_weights, seed, world, progress, on_step,
                        on_progress)
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
) -> dict[str, Any]:
    """The loop of ``train``, inside its RNG and precision guards."""
    is_main = world.rank == 0
    trainer = Trainer(
        images, labels, options, num_classes=num_classes, class_weights=class_weights, seed=seed, world=world
    )  # validates the inputs first
    identity = _identity(images, labels, options, num_classes, class_weights, seed, world)
    checkpoints = run_dir / "checkpoints"
    latest = _latest_checkpoint(checkpoints)
    seconds, last_loss = 0.0, float("nan")
    if latest is not None:
        seconds, last_loss = _load_checkpoint(trainer, latest, identity)
    if is_main:
        _remove_partial_checkpoints(checkpoints)
        atomic_write_text(
            run_dir / "training_options.json",
            json.dumps({"options": options.model_dump(), "identity": identity}, indent=2, sort_keys=True),
        )
    log = _RunLog(run_dir / "log.jsonl", keep_until_step=trainer.step_count)

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
            trainer.step()
            bar.update(batch)
            done = trainer.nimg >= budget_nimg
            save = done or _crossed(trainer.nimg, batch, every_ckpt)
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
            if trainer.nimg in snapshot_at and is_main:
                write_snapshot(run_dir, trainer.nimg, seconds + time.perf_counter() - session_start,
                               _state_dict(trainer.ema.module))
            if trainer.nimg in posthoc_at and is_main:
                for name, ema in trainer.posthoc.items():
                    write_snapshot(run_dir, trainer.nimg, seconds + time.perf_counter() - session_start,
                                   _state_dict(ema.module), name=name)
            if save:
                elapsed = seconds + time.perf_counter() - session_start
                state = trainer.training_state()  # collective under DDP: every rank calls it
                if is_main:
                    log.flush()
                    keep = options.keep_checkpoints
                    _write_checkpoint(trainer, state, checkpoints, identity, elapsed, last_loss, keep)
            report(min(trainer.nimg, budget_nimg), {"loss": last_loss})  # the last logged mean loss: no sync
            if on_step is not None:
                on_step(trainer.step_count, trainer.nimg)
    finally:
        bar.close()
    seconds += time.perf_counter() - session_start
    if is_main:
        _write_final(trainer, run_dir, options, images.shape[1], images.shape[2], num_classes)
    if world.size > 1:
        dist.barrier()
    return {
        "steps": trainer.step_count,
        "nimg": trainer.nimg,
        "seconds": seconds,
        "images_per_s": trainer.nimg / seconds if seconds > 0 else float("nan"),
        "final_loss": last_loss,
        "parameters": count_parameters(trainer.model),
    }


def load_model(run_dir: Path, *, ema: bool = True, device: str | torch.device = "cpu") -> UNet2DModel:
    """The trained UNet of ``run_dir`` (EMA weights by default), in eval mode on ``device``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "model_config.json"
    weights = run_dir / ("ema.safetensors" if ema else "model.safetensors")
    if not config_path.exists() or not weights.exists():
        raise DedtError(f"{run_dir} holds no trained model (model_config.json, {weights.name}); run training first")
    config = json.loads(config_path.read_text())
    model = UNet2DModel.from_config(config["unet"])
    model.load_state_dict(load_file(weights))
    return model.to(device).eval()


def _crossed(nimg: int, batch: int, every: int) -> bool:
    """True when the last batch crossed a multiple of ``every`` images."""
    return nimg // every > (nimg - batch) // every


def _derive_seed(seed: int, *keys: str | int) -> int:
    """An independent 63-bit seed per purpose (and rank), from numpy's SeedSequence."""
    words = [seed] + [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _make_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """Adam or AdamW with the fused kernel: one pass over all parameters, ~4x faster than torch's
    default per-tensor loop for digits-tiny on CPU, and one launch on CUDA."""
    kind = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
    return kind(
        model.parameters(),
        lr=options.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=options.weight_decay,
        fused=True,
    )


def _init_world(device: str) -> tuple[World, bool]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (world, whether we created it)."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:  # NCCL needs each process bound to its own GPU first
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    if not dist.is_initialized():
        return World(), created
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not created and device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # the caller's process group: still one GPU per process
    return World(dist.get_rank(), dist.get_world_size(), local_rank), created


def _gather_batch(values: torch.Tensor, world: World) -> torch.Tensor:
    """The global batch's values from every rank's slice, in rank order (the slices' order)."""
    if world.size == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world.size)]
    dist.all_gather(parts, values)
    return torch.cat(parts)


def _gather(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's copy of a small CPU tensor (an RNG state), in rank order."""
    if world.size == 1:
        return [tensor]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, tensor)
    return gathered


@contextlib.contextmanager
def _fork_rng(device: str, world: World) -> Iterator[None]:
    """Leave the caller's global RNG as it was: training seeds and consumes its own."""
    devices = [world.local_rank] if device != "cpu" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def backend_flags(options: TrainOptions) -> Iterator[None]:
    """Within: TF32 on for ``tf32`` and off otherwise, so 'fp32' means IEEE fp32 (cuDNN convolutions
    default to TF32), set through ``dedt.precision.tf32`` so the legacy getters inductor reads keep
    working; cuDNN autotuning on CUDA, as the shapes are fixed. Restored on exit."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = options.device != "cpu" and torch.cuda.is_available()
    try:
        with tf32(options.tf32):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _identity(
    images: np.ndarray,
    labels: np.ndarray,
    options: TrainOptions,
    num_classes: int,
    class_weights: np.ndarray | None,
    seed: int,
    world: World,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: options (but the budget, intervals and device), data,
    seed. The device is left out, as in the stage fingerprint: a run cut on one device resumes on another."""
    digest = hashlib.sha256()
    for array in (images, np.asarray(labels, dtype=np.int64)):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).data)
    if class_weights is not None:
        digest.update(np.asarray(class_weights, dtype=np.float64).tobytes())
    fixed = options.identity(exclude=set(RESUMABLE_CHANGES | {"device"}))
    return {
        "format": CHECKPOINT_FORMAT,
        "options": fixed,
        "data_sha256": digest.hexdigest(),
        "num_classes": num_classes,
        "seed": seed,
        "world_size": world.size,
    }


def _checkpoint_name(nimg: int) -> str:
    return f"ckpt-{nimg / 1000:010.3f}"


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the most images seen (state.json is written last) whose files
    still have the SHA-256 recorded in its state.json: a damaged one is reported and skipped, so the
    run resumes from the one before (or from scratch) rather than from corrupted weights."""
    found = [p for p in checkpoints.glob("ckpt-*") if p.is_dir() and (p / "state.json").exists()]
    for path in sorted(found, key=lambda p: float(p.name.removeprefix("ckpt-")), reverse=True):
        damaged = _damaged_checkpoint_files(path)
        if not damaged:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({', '.join(damaged)} failed the SHA-256 check); "
                      "resuming from an earlier checkpoint", stacklevel=2)
    return None


def _damaged_checkpoint_files(path: Path) -> list[str]:
    """Names of the checkpoint's files whose SHA-256 differs from state.json's (none recorded: trusted)."""
    try:
        recorded = json.loads((path / "state.json").read_text()).get("sha256", {})
    except (OSError, ValueError):
        return ["state.json"]
    bad = []
    for name, digest in recorded.items():
        try:
            if file_sha256(path / name) != digest:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


def _remove_partial_checkpoints(checkpoints: Path) -> None:
    """Drop the temp folders a killed run left while writing a checkpoint."""
    for partial in checkpoints.glob(".tmp-ckpt-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, as safetensors needs (channels_last weights are not contiguous)."""
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _write_checkpoint(
    trainer: Trainer,
    training_state: dict[str, Any],
    checkpoints: Path,
    identity: dict[str, Any],
    seconds: float,
    loss: float,
    keep: int,
) -> None:
    """Write ckpt-<kimg>/ into a temp folder, rename it into place, then drop the oldest beyond ``keep``."""
    final = checkpoints / _checkpoint_name(trainer.nimg)
    if final.exists():
        if (final / "state.json").exists() and not _damaged_checkpoint_files(final):
            return
        shutil.rmtree(final)  # damaged (skipped on resume): write it again
    partial = checkpoints / f".tmp-{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with atomic_path(partial / "model.safetensors") as tmp:
        save_file(_state_dict(trainer.model), str(tmp))
    with atomic_path(partial / "ema.safetensors") as tmp:
        save_file(_state_dict(trainer.ema.module), str(tmp))
    for name, ema in trainer.posthoc.items():
        with atomic_path(partial / f"{name}.safetensors") as tmp:
            save_file(_state_dict(ema.module), str(tmp))
    with atomic_path(partial / "training_state.pt") as tmp:
        torch.save(training_state, tmp)
    files = ("model.safetensors", "ema.safetensors", *(f"{name}.safetensors" for name in trainer.posthoc),
             "training_state.pt")
    state = {"step": trainer.step_count, "nimg": trainer.nimg, "seconds": seconds, "loss": loss, "identity": identity,
             "sha256": {name: file_sha256(partial / name) for name in files}}
    atomic_write_text(partial / "state.json", json.dumps(state, indent=2, sort_keys=True))
    os.replace(partial, final)
    complete = sorted(
        (p for p in checkpoints.glob("ckpt-*") if (p / "state.json").exists()),
        key=lambda p: float(p.name.removeprefix("ckpt-")),
    )
    for old in complete[:-keep]:
        shutil.rmtree(old)


def _load_checkpoint(trainer: Trainer, path: Path, identity: dict[str, Any]) -> tuple[float, float]:
    """Restore ``trainer`` from ``path``; returns (seconds trained, last logged loss).

    The training state is read onto the CPU (the optimiser moves its state to the parameters'
    device), so no torchrun rank materialises it on GPU 0. A checkpoint of another device type
    resumes with the RNG streams re-seeded from (seed, step): CPU and CUDA generator states differ.
    """
    state = json.loads((path / "state.json").read_text())
    saved = _without_device(state.get("identity", {}))  # checkpoints from before the device left the identity
    if saved != identity:
        keys = sorted({*saved, *identity} - {"options"})
        differ = [k for k in keys if saved.get(k) != identity.get(k)]
        saved_options, options = saved.get("options", {}), identity["options"]
        differ += [f"train.{k}" for k in sorted({*saved_options, *options}) if saved_options.get(k) != options.get(k)]
        raise DedtError(
            f"{path} is a checkpoint of another configuration (differs in: {', '.join(differ)}); "
            f"use a new run folder or delete {path.parent} to start over"
        )
    trainer.model.load_state_dict(load_file(path / "model.safetensors"))
    trainer.ema.module.load_state_dict(load_file(path / "ema.safetensors"))
    for name, ema in trainer.posthoc.items():
        ema.module.load_state_dict(load_file(path / f"{name}.safetensors"))
    training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    step, on_cuda = int(state["step"]), trainer.device.type == "cuda"
    if ("cuda_rng" in training_state) != on_cuda:  # only a CUDA run saves the CUDA RNG
        warnings.warn(f"{path} was written on another device type: resuming with the random streams re-seeded "
                      "from the seed and step (the run differs from an uninterrupted one)", stacklevel=2)
        trainer.generator.manual_seed(_derive_seed(identity["seed"], "noise", "resumed", step))
        torch.manual_seed(_derive_seed(identity["seed"], "dropout", trainer.world.rank, "resumed", step))
        training_state = {k: v for k, v in training_state.items() if k not in ("generator", "torch_rng", "cuda_rng")}
        training_state["generator"] = trainer.generator.get_state()
        training_state["torch_rng"] = [torch.get_rng_state()] * trainer.world.size  # each rank its own
        if on_cuda:
            training_state["cuda_rng"] = [torch.cuda.get_rng_state(trainer.device)] * trainer.world.size
    trainer.load_training_state(training_state)
    trainer.step_count, trainer.nimg = step, int(state["nimg"])
    return float(state["seconds"]), float(state["loss"])


def _without_device(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` without the device fields that earlier checkpoints recorded in it."""
    options = {k: v for k, v in identity.get("options", {}).items() if k != "device"}
    return {k: v for k, v in identity.items() if k != "device_type"} | {"options": options}


def _write_final(
    trainer: Trainer, run_dir: Path, options: TrainOptions, channels: int, resolution: int, num_classes: int
) -> None:
    """The trained weights and the config that rebuilds the UNet (``load_model``)."""
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(_state_dict(trainer.model), str(tmp))
    with atomic_path(run_dir / "ema.safetensors") as tmp:
        save_file(_state_dict(trainer.ema.module), str(tmp))
    config = {
        "preset": options.preset,
        "in_channels": channels,
        "resolution": resolution,
        "num_classes": num_classes if options.conditional else None,
        "vae_path": options.vae_path,  # samples are VAE latents to decode when set
        "unet": {k: v for k, v in trainer.model.config.items() if not k.startswith("_")},
        "scheduler": {k: v for k, v in trainer.scheduler.config.items() if not k.startswith("_")},
    }
    atomic_write_text(run_dir / "model_config.json", json.dumps(config, indent=2, sort_keys=True))


class _RunLog:
    """log.jsonl: lines are kept in memory and written (temp file + rename) with each checkpoint,
    so the file never holds steps past the newest checkpoint and a resumed run doesn't repeat lines."""

    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = path
        self.lines: list[str] = []
        if keep_until_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    if json.loads(line)["step"] <= keep_until_step:
                        self.lines.append(line)

    def append(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record, sort_keys=True))

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(line + "\n" for line in self.lines))

