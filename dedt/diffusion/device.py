"""Where training runs: the device, the data-parallel world under ``torchrun``, precision flags,
random streams and FLOP counting (for model-FLOPs utilisation), beside the loop of ``train.py``.

Imports neither the options nor the loop at run time, so ``latents`` and ``options`` can use it
without an import circle.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from dedt.errors import DedtError
from dedt.precision import tf32

if TYPE_CHECKING:
    from dedt.diffusion.options import TrainOptions

# Autocast dtype of each reduced train.precision ('fp32' runs without autocast).
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Dense peak throughput (FLOP/s) of SXM parts by compute precision, from NVIDIA's data sheets;
# H200 has H100's compute. Used for model-FLOPs utilisation (MFU) as in nanoGPT and PaLM.
PEAK_FLOPS = {
    "H100": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
    "H200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
}


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


def init_world(device: str) -> tuple[World, bool]:
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


def gather_batch(values: torch.Tensor, world: World) -> torch.Tensor:
    """The global batch's values from every rank's slice, in rank order (the slices' order)."""
    if world.size == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world.size)]
    dist.all_gather(parts, values)
    return torch.cat(parts)


def gather(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's copy of a small CPU tensor (an RNG state), in rank order."""
    if world.size == 1:
        return [tensor]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, tensor)
    return gathered


def derive_seed(seed: int, *keys: str | int) -> int:
    """An independent 63-bit seed per purpose (and rank), from numpy's SeedSequence."""
    words = [seed] + [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def fork_rng(device: str, world: World) -> Iterator[None]:
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


def peak_flops(device: torch.device, precision: str, tf32: bool) -> float | None:
    """The GPU's dense peak FLOP/s at the precision in use, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = precision if precision != "fp32" else ("tf32" if tf32 else "fp32")
    return next((table[key] for gpu, table in PEAK_FLOPS.items() if gpu in name), None)


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
