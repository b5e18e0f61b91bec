"""Sampling: determinism, batch-size independence, shapes and ranges, grids, bad arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dedt.diffusion.presets import build_model, build_scheduler
from dedt.diffusion.sample import make_sampling_scheduler, sample, save_grid
from dedt.errors import DedtError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conditional() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("digits-tiny", in_channels=1, resolution=8, num_classes=3)


SCHEDULER = build_scheduler("digits-tiny")
LABELS = np.array([0, 1, 2, 0, 1])


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_same_seed_same_samples_in_any_batch_size(conditional: torch.nn.Module, method: str) -> None:
    run = dict(method=method, steps=4, progress=False)
    first = sample(conditional, SCHEDULER, LABELS, seed=1, batch_size=5, **run)
    assert first.shape == (5, 1, 8, 8) and first.dtype == np.float32
    assert first.min() >= -1 and first.max() <= 1
    np.testing.assert_array_equal(first, sample(conditional, SCHEDULER, LABELS, seed=1, batch_size=5, **run))
    # Per-sample generators: only the rounding of batched convolutions may differ.
    np.testing.assert_allclose(first, sample(conditional, SCHEDULER, LABELS, seed=1, batch_size=2, **run), atol=1e-4)
    assert not np.allclose(first, sample(conditional, SCHEDULER, LABELS, seed=2, batch_size=5, **run), atol=1e-2)


def test_ddim_and_ddpm_differ_and_labels_matter(conditional: torch.nn.Module) -> None:
    ddim = sample(conditional, SCHEDULER, LABELS, steps=4, progress=False)
    ddpm = sample(conditional, SCHEDULER, LABELS, method="ddpm", steps=4, progress=False)
    other = sample(conditional, SCHEDULER, (LABELS + 1) % 3, steps=4, progress=False)
    assert not np.allclose(ddim, ddpm) and not np.allclose(ddim, other)


def test_unconditional_sampling_takes_num() -> None:
    torch.manual_seed(0)
    model = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=None)
    images = sample(model, SCHEDULER, None, num=3, steps=2, progress=False)
    assert images.shape == (3, 1, 8, 8)
    assert model.training  # the caller's mode is restored


def test_trailing_timesteps_start_from_pure_noise() -> None:
    ddim = make_sampling_scheduler(SCHEDULER, "ddim", 20)
    assert ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 49 and len(ddim.timesteps) == 20
    assert make_sampling_scheduler(SCHEDULER, "ddpm", 1000).timesteps.tolist() == list(range(999, -1, -1))


def test_bad_sampling_arguments_are_clear_errors(conditional: torch.nn.Module) -> None:
    with pytest.raises(DedtError, match="class-conditional"):
        sample(conditional, SCHEDULER, None, num=2, progress=False)
    with pytest.raises(DedtError, match=r"\[0, 3\)"):
        sample(conditional, SCHEDULER, np.array([3]), progress=False)
    with pytest.raises(DedtError, match="unknown sampling method"):
        sample(conditional, SCHEDULER, LABELS, method="euler", progress=False)
    with pytest.raises(DedtError, match=r"\[1, 1000\]"):
        sample(conditional, SCHEDULER, LABELS, steps=0, progress=False)


def test_save_grid_writes_a_png_with_the_pixels(tmp_path: Path) -> None:
    images = np.stack([np.full((3, 4, 4), v, dtype=np.float32) for v in (-1.0, 0.0, 1.0)])
    save_grid(images, tmp_path / "grid.png", nrow=2)
    picture = np.asarray(Image.open(tmp_path / "grid.png"))
    assert picture.shape == (2 * 6 + 2, 2 * 6 + 2, 3)  # 2 rows x 2 columns of 4 px with 2 px gaps
    assert picture[2, 2, 0] == 0 and picture[2, 8, 0] == 128 and picture[8, 2, 0] == 255
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left
    save_grid(images[:, :1], tmp_path / "grey.png", nrow=3)
    assert Image.open(tmp_path / "grey.png").mode == "L"
    with pytest.raises(DedtError, match="non-empty"):
        save_grid(images[:, :2], tmp_path / "bad.png", nrow=2)
