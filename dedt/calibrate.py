"""Per-image costs measured side by side: the exchange rate from images seen to seconds.

Time to quality is counted in images seen (exact, reproducible) and converted to seconds with the
costs measured here, in one run and interleaved (train, proxy, train, proxy, ...), so that a busy
moment of a shared machine slows both alike instead of one arm's whole run (PAPER.md section 7).

A DRO proxy step is a training step of the proxy plus one no-grad forward pass of the reference
on the same noisy batch (DoReMi's excess loss, PAPER.md section 4); the DRO update itself is a
softmax over k groups, negligible beside them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dedt.diffusion.options import TrainOptions
from dedt.diffusion.train import Trainer, per_sample_loss

WARMUP_STEPS = 3  # first steps pay for allocator growth and kernel selection: not timed


def measure_costs(
    shape: tuple[int, int, int],
    num_classes: int,
    options: TrainOptions,
    *,
    rounds: int = 5,
    steps_per_round: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per training image and per proxy image for models of ``options.preset``.

    Args:
        shape: (C, H, W) of one training image (or latent).
        rounds, steps_per_round: the interleaved schedule; each kind's cost is the median over rounds.
    Returns: {"train_s_per_img", "proxy_s_per_img", "rounds", "batch_size", "device"}.
    """
    rng = np.random.default_rng(seed)
    n = max(options.batch_size, num_classes)
    images = rng.uniform(-1.0, 1.0, (n, *shape)).astype(np.float32)
    labels = np.arange(n) % num_classes
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        trainer = Trainer(images, labels, options, num_classes=num_classes, seed=seed)
        reference = Trainer(images, labels, options, num_classes=num_classes, seed=seed + 1).ema.module

        def proxy_step() -> None:
            trainer.step()
            x0 = trainer.images[: options.batch_size]
            t = torch.randint(0, trainer.scheduler.config.num_train_timesteps, (len(x0),), device=trainer.device)
            cond = trainer.labels[: len(x0)] if options.conditional else None
            with torch.no_grad():
                per_sample_loss(reference, trainer.scheduler, x0, cond, t, torch.randn_like(x0)).sum().item()

        for _ in range(WARMUP_STEPS):
            proxy_step()
        train_s, proxy_s = [], []
        for _ in range(rounds):
            for kind, out in ((trainer.step, train_s), (proxy_step, proxy_s)):
                _sync(trainer.device)
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    kind()
                _sync(trainer.device)
                out.append((time.perf_counter() - start) / (steps_per_round * options.batch_size))
    return {
        "train_s_per_img": float(np.median(train_s)),
        "proxy_s_per_img": float(np.median(proxy_s)),
        "rounds": rounds,
        "batch_size": options.batch_size,
        "device": trainer.device.type,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
