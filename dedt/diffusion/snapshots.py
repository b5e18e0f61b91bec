"""EMA snapshots at log-spaced points of a run: the points of a model's time-to-quality curve.

A run with ``snapshots = n`` keeps the EMA weights after budget/2, budget/4, ..., budget/2^n images
(rounded up to whole batches), each as ``snapshots/ema-<nimg>.safetensors`` with a JSON record of
the images seen and the training seconds up to that point. Doublings, because the FD of a small
diffusion model falls roughly as a power of the images seen (PAPER.md section 7): log-spaced points
sample such a curve evenly. With the power-function EMA (``train.ema: power``) and a constant
learning rate after warm-up, the snapshot after n images *is* the model a run of budget n would
have ended with, so the full-data curve doubles as the control "full data, trained for less time".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dedt.store import atomic_path, atomic_write_text

FOLDER = "snapshots"


@dataclass(frozen=True)
class Snapshot:
    nimg: int  # images seen when the EMA was saved
    seconds: float  # the run's own training wall-clock up to then (resumed parts included)
    weights: Path  # ema safetensors


def snapshot_points(budget_nimg: int, batch_size: int, count: int) -> list[int]:
    """The images-seen counts after which a snapshot is saved: the first whole batch at or past
    budget / 2^j for j = count..1, ascending, without repeats (the end itself is the final model)."""
    points = {math.ceil(budget_nimg / 2**j / batch_size) * batch_size for j in range(1, count + 1)}
    return sorted(p for p in points if 0 < p < budget_nimg)


def write_snapshot(
    run_dir: Path, nimg: int, seconds: float, ema_state: dict[str, torch.Tensor], *, name: str = "ema"
) -> None:
    """Weights first, then the record that vouches for them (a killed write leaves no record).
    ``name`` tells EMA profiles apart: post-hoc EMA's tracked ones (``dedt.diffusion.posthoc``)."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}-{nimg:012d}.safetensors") as tmp:
        save_file(ema_state, str(tmp))
    atomic_write_text(folder / f"{name}-{nimg:012d}.json", json.dumps({"nimg": nimg, "seconds": seconds}))


def list_snapshots(run_dir: Path, *, name: str = "ema") -> list[Snapshot]:
    """The run's complete snapshots of EMA ``name``, fewest images first."""
    found = []
    for record in sorted((Path(run_dir) / FOLDER).glob(f"{name}-*.json")):
        weights = record.with_suffix(".safetensors")
        if weights.is_file():
            info = json.loads(record.read_text())
            found.append(Snapshot(int(info["nimg"]), float(info["seconds"]), weights))
    return sorted(found, key=lambda s: s.nimg)
