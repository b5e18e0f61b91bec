"""Model presets: parameter counts, attention placement, conditioning, the DDPM schedule."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from dedt.diffusion.presets import PRESETS, build_model, build_scheduler, count_parameters
from dedt.errors import DedtError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_tiny_is_the_prototype_model() -> None:
    model = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=10)
    assert count_parameters(model) == 652_321  # PAPER.md Sec. 8: ~0.65M
    assert model.config.down_block_types == ("DownBlock2D", "DownBlock2D")


def test_cifar10_ddpm_matches_ho_et_al() -> None:
    model = build_model("cifar10-ddpm", in_channels=3, resolution=32, num_classes=None)
    assert count_parameters(model) == 35_746_307  # Ho et al. 2020: 35.7M
    # Feature maps 32, 16, 8, 4: attention only on the 16x16 level (and the middle block).
    assert model.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert model.config.up_block_types == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert model.config.block_out_channels == (128, 256, 256, 256) and model.config.dropout == 0.1
    assert model.class_embedding is None


@pytest.mark.parametrize("resolution", [16, 32])
def test_mnist_small_runs_at_16_and_32(resolution: int) -> None:
    model = build_model("mnist-small", in_channels=1, resolution=resolution, num_classes=10)
    x = torch.zeros(2, 1, resolution, resolution)
    out = model(x, torch.tensor([0, 999]), class_labels=torch.tensor([0, 9])).sample
    assert out.shape == x.shape and isinstance(model, UNet2DModel)


def test_class_conditioning_is_an_embedding_per_class() -> None:
    model = build_model("digits-tiny", in_channels=3, resolution=8, num_classes=7)
    assert model.class_embedding.num_embeddings == 7 and model.config.in_channels == 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_uses_the_ho_et_al_schedule(name: str) -> None:
    scheduler = build_scheduler(name)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.beta_schedule == "linear"
    assert scheduler.betas[0].item() == pytest.approx(1e-4) and scheduler.betas[-1].item() == pytest.approx(0.02)


def test_bad_preset_or_resolution_is_a_clear_error() -> None:
    with pytest.raises(DedtError, match="known presets: cifar10-ddpm, digits-tiny, mnist-small"):
        build_model("unet-xl", in_channels=1, resolution=8, num_classes=None)
    with pytest.raises(DedtError, match="divisible by 8"):
        build_model("cifar10-ddpm", in_channels=3, resolution=28, num_classes=None)
    with pytest.raises(DedtError, match="num_classes"):
        build_model("digits-tiny", in_channels=1, resolution=8, num_classes=0)
