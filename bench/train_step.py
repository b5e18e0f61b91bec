"""dedt's training step against a bare diffusers loop, side by side in one process.

The bare loop is what the diffusers examples do, minus everything dedt adds: UNet2DModel +
DDPMScheduler.add_noise + Adam, no EMA, clipping, warm-up, weighted sampling or logging. Both run
the same architecture (the preset's) on the same batch size; rounds alternate between the two so
that load from other processes hits both alike, and the table reports medians over rounds, per
wall-clock second and per CPU second of this process (the steadier of the two on shared cores).
A last row times the whole ``train()`` loop (logging, checkpoints) per image. The training levers
(Min-SNR-gamma weighting, loss-aware timestep sampling, post-hoc EMA's two extra EMAs)
each get a row, and a last column gives their cost against dedt's plain step in the same rounds.

    python bench/train_step.py                        # digits-tiny, batch 128, CPU
    python bench/train_step.py --preset cifar10-ddpm --device cuda --precision bf16
Targets: dedt >= 0.97x the bare loop's images/s; weighting and sampling cost <= 1.05x the
plain step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from dedt.diffusion.device import backend_flags
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.timestep_sampler import HISTORY
from dedt.diffusion.train import Trainer, train

# Input shape per preset: what each is meant for.
SHAPES = {"digits-tiny": (1, 8), "mnist-small": (1, 16), "cifar10-ddpm": (3, 32)}


def synthetic_data(preset: str, n: int = 2048, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random images in [-1, 1] (speed does not depend on content) and balanced labels."""
    channels, size = SHAPES[preset]
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(n, channels, size, size)).astype(np.float32)
    return images, np.arange(n) % num_classes


def bare_loop(
    model: UNet2DModel, images: torch.Tensor, labels: torch.Tensor, batch: int, precision: str, fused: bool | None
) -> Callable[[], None]:
    """One step of the plain diffusers recipe (bf16 autocast if asked); returns it as a closure."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    device = images.device

    def step() -> None:
        index = torch.randint(0, len(images), (batch,), device=device)
        x0, y = images[index], labels[index]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _bare(trainer: Trainer, args: argparse.Namespace, *, fused: bool | None) -> Callable[[], None]:
    """A bare loop on a fresh copy of the trainer's architecture and data."""
    model = UNet2DModel.from_config(trainer.model.config).to(trainer.device).train()
    return bare_loop(model, trainer.images, trainer.labels, args.batch, args.precision, fused)


def _lever_steps(images: np.ndarray, labels: np.ndarray, options: TrainOptions) -> dict[str, Callable[[], None]]:
    """dedt's step with each training lever on, one Trainer each (issues 15 and 14), and a second plain one
    whose ratio to the first shows how far two identical loops differ in one run."""
    levers = {
        "dedt step again (no lever: the noise control)": {},
        "dedt step, min-snr weighting": {"timestep_weighting": "min-snr"},
        "dedt step, loss-aware sampling (warm)": {"timestep_sampling": "loss-aware"},
        "dedt step, post-hoc EMA (2 more EMAs)": {"posthoc_ema": True},
        # a budget far beyond the bench's steps: prune_until is never reached
        "dedt step, InfoBatch (pruned epochs)": {"dynamic_pruning": "infobatch", "budget_kimg": 1e6},
    }
    steps = {}
    for name, update in levers.items():
        trainer = Trainer(images, labels, options.model_copy(update=update), num_classes=10)
        if trainer.loss_aware is not None:  # fill every history first: the bench times the loss-aware phase,
            T = trainer.loss_aware.num_timesteps  # not the uniform warm-up (~180 steps of batch 128 at T = 1000)
            trainer.loss_aware.update(torch.arange(T).repeat(HISTORY), torch.rand(T * HISTORY))
        if trainer.infobatch is not None:  # every sample scored: the first epoch timed is a pruned one too
            trainer.infobatch.score.copy_(torch.rand(len(images)))
        steps[name] = trainer.step
    return steps


def images_per_s(step: Callable[[], None], steps: int, batch: int, device: torch.device) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second of this process over ``steps`` calls.

    On shared cores the CPU-time rate is the steadier comparison: time other processes take from
    us is not counted. On a GPU only the wall clock (after synchronising) means anything.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images = steps * batch
    return images / (time.perf_counter() - wall), images / max(time.process_time() - cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits-tiny", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per loop")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions on CUDA (all rows)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 by default because on cores shared with other processes "
        "OpenMP threads spin against them (a 2-thread run measured ~10x slower here); 0 = torch's default",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    images, labels = synthetic_data(args.preset)
    options = TrainOptions(
        preset=args.preset,
        batch_size=args.batch,
        device=args.device,
        precision=args.precision,
        tf32=args.tf32,
        budget_kimg=1.0,
    )
    with backend_flags(options):  # the same TF32 / cuDNN settings for every row
        rates, whole = measure(images, labels, options, args)
    print(
        f"preset {args.preset}, batch {args.batch}, {args.precision}{' + TF32' if args.tf32 else ''}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}, {args.rounds} rounds x {args.steps} steps, medians over rounds"
    )
    wall_base = statistics.median(r[0] for r in rates["bare diffusers loop"])
    cpu_base = statistics.median(r[1] for r in rates["bare diffusers loop"])
    cpu_step = statistics.median(r[1] for r in rates["dedt Trainer.step"])
    print(
        f"| {'loop':<46} | {'images/s':>8} | {'ratio':>6} | {'images/CPU-s':>12} | {'ratio':>6} | "
        f"{'cost vs dedt step (CPU)':>23} |"
    )
    print(f"|{'-' * 48}|{'-' * 10}:|{'-' * 7}:|{'-' * 13}:|{'-' * 7}:|{'-' * 24}:|")
    for name, values in rates.items():
        wall = statistics.median(r[0] for r in values)
        cpu = statistics.median(r[1] for r in values)
        cost = f"{cpu_step / cpu:.3f}x" if name.startswith("dedt") else ""
        print(
            f"| {name:<46} | {wall:>8.0f} | {wall / wall_base:>5.3f}x | {cpu:>12.0f} | {cpu / cpu_base:>5.3f}x | "
            f"{cost:>23} |"
        )
    label = "dedt train() loop incl. logging, 2 checkpoints"
    print(f"| {label:<46} | {whole:>8.0f} | {whole / wall_base:>5.3f}x | {'':>12} | {'':>6} | {'':>23} |")


def measure(
    images: np.ndarray, labels: np.ndarray, options: TrainOptions, args: argparse.Namespace
) -> tuple[dict[str, list[tuple[float, float]]], float]:
    """Per-round (wall, CPU) images/s of each loop, and the images/s of a whole train() call."""
    trainer = Trainer(images, labels, options, num_classes=10)
    device = trainer.device
    # Torch's default Adam is the for-each kernel on CUDA and a per-tensor loop on CPU; dedt uses the
    # fused kernel, so the third row shows dedt's own overhead against a bare loop that does too.
    loops = {
        "bare diffusers loop": _bare(trainer, args, fused=None),
        "dedt Trainer.step": trainer.step,
        "bare diffusers loop, fused Adam": _bare(trainer, args, fused=True),
        **_lever_steps(images, labels, options),
    }
    for step in loops.values():  # warm-up: allocator, kernels, autotuning
        images_per_s(step, 3, args.batch, device)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            rates[name].append(images_per_s(step, args.steps, args.batch, device))

    end_to_end_kimg = args.steps * args.rounds * args.batch / 1000
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(
            images,
            labels,
            options.model_copy(update={"budget_kimg": end_to_end_kimg, "checkpoint_every_kimg": end_to_end_kimg / 2}),
            Path(run_dir),
            num_classes=10,
            progress=False,
        )
    return rates, result["images_per_s"]


if __name__ == "__main__":
    main()
