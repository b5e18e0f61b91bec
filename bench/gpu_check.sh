#!/usr/bin/env bash
# GPU check (<= 5 minutes on one H100/H200): training images/s and model-FLOPs utilisation (MFU)
# of cifar10-ddpm at batch 128 in fp32 (IEEE), TF32 and bf16 autocast, eager and torch.compile'd,
# then DDIM-100 sampling images/s. Prints one Markdown table for the README.
#
#   bash bench/gpu_check.sh                     # defaults below
#   DEVICE=cpu PRESET=digits-tiny STEPS=2 COMPILE=0 bash bench/gpu_check.sh   # CPU smoke test
#
# MFU = images/s x training FLOPs per image / the GPU's dense peak at that precision, with training
# FLOPs = 3 x forward FLOPs (backward ~ 2x forward; Kaplan et al. 2020), forward FLOPs counted by
# torch's FlopCounterMode, peaks from dedt.diffusion.train.peak_flops (NVIDIA's SXM data sheets).
# Compiled rows run last and are skipped once BUDGET_S seconds have passed (each compile ~1 min).
set -euo pipefail
cd "$(dirname "$0")/.."
export PRESET="${PRESET:-cifar10-ddpm}" BATCH="${BATCH:-128}" STEPS="${STEPS:-30}" DEVICE="${DEVICE:-cuda}"
export COMPILE="${COMPILE:-1}" BUDGET_S="${BUDGET_S:-240}" SAMPLE_STEPS="${SAMPLE_STEPS:-100}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
exec "${PYTHON:-python3}" - <<'EOF'
import os
import time

import numpy as np
import torch

from bench.train_step import SHAPES, synthetic_data
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.sample import sample
from dedt.diffusion.train import Trainer, backend_flags, forward_flops, peak_flops

preset, batch, steps, device = os.environ["PRESET"], int(os.environ["BATCH"]), int(os.environ["STEPS"]), os.environ["DEVICE"]
compile_rows, budget_s, sample_steps = os.environ["COMPILE"] == "1", float(os.environ["BUDGET_S"]), int(os.environ["SAMPLE_STEPS"])
start = time.perf_counter()
images, labels = synthetic_data(preset)
print(f"torch {torch.__version__}, preset {preset}, batch {batch}, {steps} timed steps per row")


def sync() -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Seconds per call of fn, after the caller's warm-up."""
    sync()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - begin) / repeats


def train_row(precision: str, tf32: bool, compiled: bool) -> str:
    options = TrainOptions(
        preset=preset, batch_size=batch, precision=precision, tf32=tf32, compile=compiled,
        conditional=False, hflip=True, device=device,
    )  # fmt: skip
    name = f"train, {precision}{' + TF32' if tf32 else ''}{', compiled' if compiled else ''}"
    with backend_flags(options):
        trainer = Trainer(images, labels, options, num_classes=10)
        flops = 3 * forward_flops(trainer.model, trainer.images[:1], None)
        warm = time.perf_counter()
        for _ in range(3):  # allocator, cuDNN autotuning, compilation
            trainer.step()
        sync()
        warm = time.perf_counter() - warm
        rate = batch / timed(trainer.step, steps)
    peak = peak_flops(trainer.device, precision, tf32)
    mfu = f"{rate * flops / peak:.1%}" if peak else "n/a"
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return f"| {name:<32} | {rate:>9.0f} | {mfu:>6} | {flops / 1e9:>8.2f} | {warm:>6.1f} |"


def sample_row(precision: str) -> str:
    options = TrainOptions(preset=preset, conditional=False, tf32=True, device=device)
    with backend_flags(options):
        trainer = Trainer(images, labels, options, num_classes=10)
        model, scheduler = trainer.ema.module, trainer.scheduler
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        with torch.autocast(trainer.device.type, dtype=dtype, enabled=precision == "bf16"):
            run = lambda: sample(  # noqa: E731
                model, scheduler, None, num=256, steps=sample_steps, batch_size=256, device=trainer.device, progress=False
            )
            run()  # warm-up
            rate = 256 / timed(run, 1)
    return f"| sample DDIM-{sample_steps}, batch 256, {precision:<5} | {rate:>9.0f} |        |          |        |"


rows = ["| row                              | images/s |    MFU | GFLOP/img | warm-up s |", "|---|---:|---:|---:|---:|"]
for precision, tf32 in (("fp32", False), ("fp32", True), ("bf16", False)):
    rows.append(train_row(precision, tf32, False))
    print(rows[-1], flush=True)
for precision in ("tf32", "bf16"):
    rows.append(sample_row(precision))
    print(rows[-1], flush=True)
if compile_rows:
    for precision, tf32 in (("bf16", False), ("fp32", True), ("fp32", False)):
        if time.perf_counter() - start > budget_s:
            rows.append(f"| train, {precision}{' + TF32' if tf32 else ''}, compiled | skipped: past BUDGET_S |  |  |  |")
        else:
            rows.append(train_row(precision, tf32, True))
        print(rows[-1], flush=True)
name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
print(f"\n{name}, {time.perf_counter() - start:.0f} s in all; GFLOP/img = training FLOPs (3x forward)\n")
print("\n".join(rows))
EOF
