"""Constants and small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Minimal budgets: every stage real, the whole pipeline in well under a minute on 2 cores.
TINY = {
    "seed": 0,
    "dataset": {"source": "digits"},
    "encode": {"encoder": "pixels"},
    "score": {"method": "gaussian"},
    "select": {"keep_frac": 0.3},
    "reweight": {"method": "doremi", "reference_kimg": 1.0, "proxy_kimg": 0.5},
    "train": {"preset": "digits-tiny", "budget_kimg": 0.5, "batch_size": 64, "checkpoint_every_kimg": 0.25},
    "sample": {"steps": 2, "per_class": 8},
    "evaluate": {"classifier_epochs": 1},
}

# Trainer options of a run of 16 steps of batch 16, a checkpoint every 4 steps (tests that call train()).
TINY_RUN = dict(
    budget_kimg=0.256, batch_size=16, checkpoint_every_kimg=0.064, log_every_kimg=0.032, warmup_kimg=0.1, device="cpu"
)


def tiny_data(n: int = 48, num_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """n seeded random 1x8x8 images in [-1, 1], labels cycling over ``num_classes``."""
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32), np.arange(n) % num_classes


class Kill(Exception):
    """Raised from on_step to simulate a run killed mid-way."""


def kill_at(step: int):
    """An ``on_step`` hook that raises Kill once the run reaches ``step``."""

    def hook(current: int, nimg: int) -> None:
        if current == step:
            raise Kill

    return hook


def tiny_vae() -> Any:
    """A random-init 1-channel AutoencoderKL for 8x8 images (4 latent channels, 4x4 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=8,
    )  # fmt: skip
