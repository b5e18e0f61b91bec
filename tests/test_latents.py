"""Latent diffusion: VAE round trip, training on latents, decoding samples, the latents stage, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dedt.diffusion.latents import (
    check_vae_folder,
    decode_latents,
    encode_latents,
    load_vae,
    read_latents,
    write_latents,
)
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.presets import build_scheduler
from dedt.diffusion.sample import sample
from dedt.diffusion.train import load_model, train
from dedt.errors import DedtError

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_vae(folder: Path, seed: int = 0, channels: int = 1) -> Path:
    """A random-init AutoencoderKL (8x8 -> 4 x 4x4 latents, ~20k parameters) saved like a real one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=8,
    )  # fmt: skip
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32)


def test_round_trip_shapes_and_determinism(vae_dir: Path) -> None:
    x = images()
    z = encode_latents(x, vae_dir, batch_size=4)
    assert z.dtype == np.float32 and z.shape == (6, 4, 4, 4)
    np.testing.assert_array_equal(z, encode_latents(x, vae_dir, batch_size=4))  # deterministic (posterior mean)
    np.testing.assert_allclose(z, encode_latents(x, vae_dir, batch_size=6), atol=1e-6)  # batch-size independent
    vae = load_vae(vae_dir)
    with torch.no_grad():  # the posterior mean times diffusers' scaling factor
        expected = vae.encode(torch.from_numpy(x)).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(z, expected.numpy(), atol=1e-6)
    y = decode_latents(z, vae, batch_size=4)
    assert y.dtype == np.float32 and y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    np.testing.assert_array_equal(y, decode_latents(z, vae_dir, batch_size=4))
    with torch.no_grad():
        direct = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.clamp(-1, 1)
    np.testing.assert_allclose(y, direct.numpy(), atol=1e-6)


def test_pipeline_folder_layout_and_shift_factor(tmp_path: Path) -> None:
    """A pipeline folder with vae/ loads too; a shift_factor (SD3/Flux VAEs) is subtracted before scaling."""
    save_tiny_vae(tmp_path / "pipe" / "vae")
    assert check_vae_folder(tmp_path / "pipe") == tmp_path / "pipe" / "vae"
    vae = load_vae(tmp_path / "pipe")
    x = images(2)
    plain = encode_latents(x, vae)
    vae.register_to_config(shift_factor=0.5)
    shifted = encode_latents(x, vae)
    np.testing.assert_allclose(shifted, plain - 0.5 * vae.config.scaling_factor, atol=1e-5)
    np.testing.assert_allclose(
        decode_latents(shifted, vae), decode_latents(plain, load_vae(tmp_path / "pipe")), atol=1e-5
    )


def test_missing_vae_is_a_clear_error(tmp_path: Path, vae_dir: Path) -> None:
    missing = tmp_path / "no-such-vae"
    with pytest.raises(DedtError, match=rf"{missing}.*does not exist.*AutoencoderKL.*config.json"):
        encode_latents(images(), missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DedtError, match=r"holds no config.json.*save_pretrained"):
        load_vae(tmp_path / "empty")
    with pytest.raises(ValidationError, match=r"train.vae_path .*no-such-vae.*does not exist"):
        TrainOptions(vae_path=str(missing))
    with pytest.raises(DedtError, match="3 channels"):
        encode_latents(np.zeros((1, 3, 8, 8), np.float32), vae_dir)
    with pytest.raises(DedtError, match="multiple of"):
        encode_latents(np.zeros((1, 1, 7, 7), np.float32), vae_dir)
    with pytest.raises(DedtError, match=r"\[-1, 1\]"):
        encode_latents(images() * 3, vae_dir)
    with pytest.raises(DedtError, match=r"latents \(N, 4, h, w\)"):
        decode_latents(np.zeros((1, 3, 4, 4), np.float32), vae_dir)


def test_latent_options_switch_off_range_check_and_clipping(vae_dir: Path) -> None:
    options = TrainOptions(vae_path=str(vae_dir))
    assert options.latent and not TrainOptions().latent
    assert build_scheduler("digits-tiny").config.clip_sample
    assert not build_scheduler("digits-tiny", latent=True).config.clip_sample


def test_train_on_latents_then_decode_samples(tmp_path: Path, vae_dir: Path) -> None:
    x = images(24)
    labels = np.arange(24, dtype=np.int64) % 2
    z = encode_latents(x, vae_dir) * 20  # scaled well outside [-1, 1]: latents are unbounded
    assert np.abs(z).max() > 1
    common = dict(
        preset="digits-tiny",
        budget_kimg=0.032,
        batch_size=8,
        checkpoint_every_kimg=0.016,
        log_every_kimg=0.016,
        warmup_kimg=0.0,
        device="cpu",
    )
    with pytest.raises(DedtError, match=r"\[-1, 1\]"):  # a pixel run still rejects them
        train(z, labels, TrainOptions(**common), tmp_path / "pixels", num_classes=2, progress=False)
    options = TrainOptions(**common, vae_path=str(vae_dir))
    result = train(z, labels, options, tmp_path / "run", num_classes=2, progress=False)
    assert result["steps"] == 4 and np.isfinite(result["final_loss"])
    config = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert config["vae_path"] == str(vae_dir) and config["scheduler"]["clip_sample"] is False
    with pytest.raises(DedtError, match="NaN or inf"):
        bad = z.copy()
        bad[0, 0, 0, 0] = np.nan
        train(bad, labels, options, tmp_path / "nan", num_classes=2, progress=False)

    model = load_model(tmp_path / "run")
    scheduler = build_scheduler("digits-tiny", latent=True)
    fake = sample(model, scheduler, np.array([0, 1, 1]), steps=3, seed=1, progress=False)
    assert fake.shape == (3, 4, 4, 4)
    assert np.abs(fake).max() > 1  # not clamped: the start noise alone exceeds 1
    again = sample(model, scheduler, np.array([0, 1, 1]), steps=3, seed=1, batch_size=2, progress=False)
    np.testing.assert_allclose(fake, again, rtol=1e-4, atol=1e-4)  # batch-size independent
    decoded = decode_latents(fake, vae_dir)
    assert decoded.shape == (3, 1, 8, 8) and decoded.min() >= -1 and decoded.max() <= 1
    pixels = sample(model, build_scheduler("digits-tiny"), np.array([0]), steps=3, seed=1, progress=False)
    assert np.abs(pixels).max() <= 1  # a pixel schedule still clamps


def test_latent_artifact_round_trip(tmp_path: Path) -> None:
    z = np.random.default_rng(0).normal(size=(5, 4, 2, 2)).astype(np.float32)
    ids = np.array([10, 3, 7, 1, 4])
    write_latents(tmp_path, ids, z)
    np.testing.assert_array_equal(read_latents(tmp_path), z)
    np.testing.assert_array_equal(read_latents(tmp_path, np.array([7, 10, 4])), z[[2, 0, 4]])
    with pytest.raises(DedtError, match="do not cover"):
        read_latents(tmp_path, np.array([10, 99]))
    with pytest.raises(DedtError, match="missing"):
        read_latents(tmp_path / "nowhere")


def test_latents_stage_in_the_pipeline(tmp_path: Path) -> None:
    """With train.vae_path: a latents stage keyed by (data, VAE files) feeds training; samples are
    decoded before evaluation. Without it the plan has no latents stage."""
    from dedt.config import build_config
    from dedt.pipeline import plan, run_node
    from tests.helpers import TINY

    vae = save_tiny_vae(tmp_path / "vae")
    small = {
        **TINY,
        "reweight": {"method": "uniform"},
        "evaluate": {"classifier_epochs": 1, "baselines": False, "kid": False},
        "train": {**TINY["train"], "budget_kimg": 0.128, "vae_path": str(vae)},
    }
    cfg = build_config(small, "latent")
    root = tmp_path / "store"
    planned = plan(cfg, root)
    assert list(planned)[:2] == ["data", "latents"]
    assert planned["train:uniform"].inputs["latents"] == "latents"
    pixel = plan(build_config({**small, "train": TINY["train"] | {"budget_kimg": 0.128}}, "pixels"), root)
    assert "latents" not in pixel and "latents" not in pixel["train:uniform"].inputs
    assert pixel["data"].out.fingerprint == planned["data"].out.fingerprint
    assert pixel["train:uniform"].out.fingerprint != planned["train:uniform"].out.fingerprint

    results = {key: run_node(cfg, planned, key) for key in planned}
    latents = results["latents"].summary
    assert latents["shape"] == [4, 4, 4] and latents["n"] == results["data"].summary["n_train"]
    assert results["train:uniform"].summary["n_images"] == results["select"].summary["kept"]
    run_dir = Path(results["train:uniform"].path)
    assert json.loads((run_dir / "model_config.json").read_text())["in_channels"] == 4
    evaluate = Path(results["evaluate:train:uniform"].path)
    assert (evaluate / "grid.png").exists() and results["evaluate:train:uniform"].summary["n_fake"] == 80

    save_tiny_vae(vae, seed=1)  # another VAE in the same folder: new latents, new model
    replanned = plan(build_config(small, "latent"), root)
    assert replanned["data"].out.fingerprint == planned["data"].out.fingerprint
    assert replanned["latents"].out.fingerprint != planned["latents"].out.fingerprint
    assert replanned["train:uniform"].out.fingerprint != planned["train:uniform"].out.fingerprint
