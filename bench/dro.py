"""Cost of one DRO proxy step against a plain training step of the same model and batch.

The proxy step (dedt.reweight.ProxyTrainer.step) is the proxy's forward and backward pass plus
the reference's forward pass on the same noisy batch, plus the DoReMi bookkeeping; the plain step
is dedt's own training step (dedt.diffusion.train.Trainer.step). Rounds alternate so that load
from other processes hits both alike; medians over rounds, per wall-clock and per CPU second.

    python bench/dro.py                      # digits-tiny, batch 128, 1 thread
    python bench/dro.py --preset mnist-small --threads 2
Target: proxy step <= 1.5x the plain step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dedt.diffusion.options import TrainOptions
from dedt.diffusion.presets import build_model
from dedt.diffusion.train import Trainer
from dedt.reweight import ProxyTrainer, stratified_batch

SHAPES = {"digits-tiny": (1, 8), "mnist-small": (1, 16), "cifar10-ddpm": (3, 32)}


def timed(step, n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per call of ``step`` over ``n`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits-tiny", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channels, size = SHAPES[args.preset]
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2048, channels, size, size)).astype(np.float32)
    labels = np.arange(2048, dtype=np.int64) % 10
    options = TrainOptions(preset=args.preset, batch_size=args.batch)
    plain = Trainer(images, labels, options, num_classes=10)
    reference = build_model(args.preset, in_channels=channels, resolution=size, num_classes=10)
    proxy = ProxyTrainer(images, labels, labels, reference, options, num_classes=10, eta=1.0, smoothing=1e-3, seed=0)
    batches = np.random.default_rng(1)
    runs = {
        "plain Trainer.step": plain.step,
        "DRO ProxyTrainer.step": lambda: proxy.step(stratified_batch(labels, args.batch, batches)),
    }
    for step in runs.values():  # warm-up
        timed(step, 2)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, step in runs.items():
            results[name].append(timed(step, args.steps))
    base_wall = statistics.median(w for w, _ in results["plain Trainer.step"])
    base_cpu = statistics.median(c for _, c in results["plain Trainer.step"])
    print(
        f"preset {args.preset}, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps\n"
    )
    print("| step | ms/step | images/s | cost vs plain (wall) | cost vs plain (CPU) |")
    print("|---|--:|--:|--:|--:|")
    for name, times in results.items():
        wall = statistics.median(w for w, _ in times)
        cpu = statistics.median(c for _, c in times)
        print(
            f"| {name} | {wall * 1000:.1f} | {args.batch / wall:.0f} | {wall / base_wall:.2f}x | {cpu / base_cpu:.2f}x |"
        )


if __name__ == "__main__":
    main()
