"""Training loop: exact resume, rotation, EMA, weighted sampling, determinism, DDP, bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import stats

from dedt.diffusion.ema import ema_beta
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.presets import PRESETS, Preset, build_model, build_scheduler
from dedt.diffusion.sampler import BatchSampler
from dedt.diffusion.train import Trainer, World, check_inputs, load_model, per_sample_loss, train
from dedt.errors import DedtError
from tests.helpers import Kill, kill_at

NUM_CLASSES = 4
# 16 steps of batch 16 = 0.256 kimg; a checkpoint every 4 steps, a log line every 2.
TINY = dict(
    budget_kimg=0.256, batch_size=16, checkpoint_every_kimg=0.064, log_every_kimg=0.032, warmup_kimg=0.1, device="cpu"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random 1x8x8 images in [-1, 1] with labels 0..3 (class 3 is small)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32)
    labels = np.array([i % 3 for i in range(n - 4)] + [3] * 4, dtype=np.int64)
    return images, labels


def files_bytes(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("model.safetensors", "ema.safetensors")}


def log_records(run_dir: Path) -> list[dict]:
    """Log lines without the timing fields, which legitimately differ between runs."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("images_per_s", "seconds")} for x in lines]


@pytest.fixture
def dropout_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """digits-tiny with dropout, so the resume test covers the dropout RNG stream too."""
    monkeypatch.setitem(
        PRESETS,
        "tiny-dropout",
        Preset(description="test", block_out_channels=(32, 64), layers_per_block=1, dropout=0.1),
    )
    return "tiny-dropout"


@pytest.mark.parametrize("weighting", ["sampling", "loss"])
def test_interrupted_then_resumed_run_is_byte_identical(tmp_path: Path, dropout_preset: str, weighting: str) -> None:
    images, labels = tiny_data()
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    options = TrainOptions(preset=dropout_preset, weighting=weighting, hflip=True, **{**TINY, "budget_kimg": 0.192})
    run = dict(num_classes=NUM_CLASSES, class_weights=weights, seed=3, progress=False)

    straight = train(images, labels, options, tmp_path / "straight", **run)
    with pytest.raises(Kill):  # killed at step 7, three steps after the step-4 checkpoint
        train(images, labels, options, tmp_path / "resumed", on_step=kill_at(7), **run)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train(images, labels, options, tmp_path / "resumed", **run)

    assert files_bytes(tmp_path / "straight") == files_bytes(tmp_path / "resumed")
    assert log_records(tmp_path / "straight") == log_records(tmp_path / "resumed")
    assert straight["steps"] == resumed["steps"] == 12 and resumed["nimg"] == 192
    assert straight["final_loss"] == resumed["final_loss"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    images, labels = tiny_data()
    options = TrainOptions(**{**TINY, "budget_kimg": 0.064})
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(images, labels, options, tmp_path / name, num_classes=NUM_CLASSES, seed=seed, progress=False)
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")
    assert files_bytes(tmp_path / "a") != files_bytes(tmp_path / "c")


def test_checkpoints_rotate_and_a_finished_run_is_not_retrained(tmp_path: Path) -> None:
    images, labels = tiny_data()
    options = TrainOptions(keep_checkpoints=2, **TINY)
    result = train(images, labels, options, tmp_path, num_classes=NUM_CLASSES, progress=False)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["ckpt-000000.192", "ckpt-000000.256"]  # steps 12 and 16 of 4, 8, 12, 16
    assert [r["step"] for r in log_records(tmp_path)] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert {"model.safetensors", "ema.safetensors", "model_config.json", "training_options.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert result["parameters"] == 652_321 + NUM_CLASSES * 128 - 10 * 128  # digits-tiny, 4 class embeddings

    before = files_bytes(tmp_path)
    steps: list[int] = []
    record = dict(num_classes=NUM_CLASSES, progress=False, on_step=lambda step, nimg: steps.append(step))
    again = train(images, labels, options, tmp_path, **record)
    assert steps == [] and again["steps"] == 16 and files_bytes(tmp_path) == before

    longer = options.model_copy(update={"budget_kimg": 0.32})  # a larger budget continues the run
    train(images, labels, longer, tmp_path, **record)
    assert steps == [17, 18, 19, 20]


def test_resuming_a_checkpoint_of_another_config_is_an_error(tmp_path: Path) -> None:
    images, labels = tiny_data()
    options = TrainOptions(**TINY)
    with pytest.raises(Kill):
        train(images, labels, options, tmp_path, num_classes=NUM_CLASSES, progress=False, on_step=kill_at(5))
    with pytest.raises(DedtError, match="train.lr"):
        other = options.model_copy(update={"lr": 2e-4})
        train(images, labels, other, tmp_path, num_classes=NUM_CLASSES, progress=False)
    with pytest.raises(DedtError, match="data_sha256"):
        train(images[::-1].copy(), labels, options, tmp_path, num_classes=NUM_CLASSES, progress=False)


def test_ema_matches_a_hand_computed_average() -> None:
    images, labels = tiny_data()
    options = TrainOptions(**{**TINY, "ema_halflife_kimg": 0.05})
    trainer = Trainer(images, labels, options, num_classes=NUM_CLASSES)
    beta = 0.5 ** (16 / 50)  # half-life 50 images, batch 16
    assert trainer.ema_beta == pytest.approx(beta)
    expected = {k: v.double().clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(3):
        trainer.step()
        for name, live in trainer.model.state_dict().items():
            expected[name] = beta * expected[name] + (1 - beta) * live.double()
    for name, value in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)
    assert not torch.equal(trainer.ema.module.conv_in.weight, trainer.model.conv_in.weight)


def test_ema_half_life_and_fixed_decay() -> None:
    beta = ema_beta(128, halflife_kimg=2.0)
    assert beta ** (2000 / 128) == pytest.approx(0.5)  # an update's weight halves after 2 kimg
    assert ema_beta(128, halflife_kimg=2.0, decay=0.9999) == 0.9999
    with pytest.raises(ValidationError, match="not both"):
        TrainOptions(ema_decay=0.999, ema_halflife_kimg=1.0)


def test_class_mixture_frequencies_match_the_weights() -> None:
    labels = np.repeat(np.arange(5), [50, 10, 30, 5, 1])
    weights = np.array([0.1, 0.4, 0.25, 0.25, 0.0])
    sampler = BatchSampler(labels, batch_size=64, num_classes=5, class_weights=weights, seed=7)
    drawn = np.concatenate([sampler.batch(step) for step in range(300)])
    counts = np.bincount(labels[drawn], minlength=5)
    assert counts[4] == 0  # weight 0: never drawn
    _, p_classes = stats.chisquare(counts[:4], weights[:4] * len(drawn))
    assert p_classes > 1e-3
    within = np.bincount(drawn[labels[drawn] == 0], minlength=50)[:50]  # uniform inside class 0
    _, p_within = stats.chisquare(within)
    assert p_within > 1e-3
    again = BatchSampler(labels, batch_size=64, num_classes=5, class_weights=weights, seed=7)
    np.testing.assert_array_equal(sampler.batch(123), again.batch(123))  # a pure function of (seed, step)


def test_uniform_sampler_visits_every_image_once_per_epoch() -> None:
    labels = np.arange(30) % 3
    sampler = BatchSampler(labels, batch_size=8, num_classes=3, seed=1)
    stream = np.concatenate([sampler.batch(step) for step in range(15)])  # 120 = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * 30 : (epoch + 1) * 30]) == list(range(30))
    assert not np.array_equal(stream[:30], stream[30:60])


def test_loss_weighting_scales_each_sample_by_k_times_its_class_weight() -> None:
    images, labels = tiny_data()
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    options = TrainOptions(weighting="loss", **TINY)
    trainer = Trainer(images, labels, options, num_classes=NUM_CLASSES, class_weights=weights)
    torch.testing.assert_close(trainer.loss_weight, torch.tensor([0.4, 0.8, 1.2, 1.6]))
    assert trainer.sampler.weights is None  # batches stay uniform


def test_per_sample_loss_is_the_pixel_mean_squared_error() -> None:
    torch.manual_seed(0)
    scheduler = build_scheduler("digits-tiny")
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    t, noise = torch.tensor([0, 500, 999]), torch.randn(3, 1, 8, 8)
    for labels in (torch.tensor([0, 1, 2]), None):
        model = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=None if labels is None else 3)
        losses = per_sample_loss(model, scheduler, x0, labels, t, noise)
        abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps_hat = model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, class_labels=labels).sample
        assert losses.shape == (3,)
        torch.testing.assert_close(losses, ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)))


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValidationError, match="known presets: cifar10-ddpm, digits-tiny, mnist-small"):
        TrainOptions(preset="resnet")
    for bad in ({"budget_kimg": 0}, {"budget_kimg": -1}, {"batch_size": 0}, {"keep_checkpoints": 0}, {"epochs": 3}):
        with pytest.raises(ValidationError):
            TrainOptions(**bad)
    images, labels = tiny_data()
    options = TrainOptions(batch_size=10, device="cpu")
    with pytest.raises(DedtError, match="not divisible by the world size 3"):
        check_inputs(images, labels, options, num_classes=NUM_CLASSES, class_weights=None, world=World(0, 3, 0))
    cases = [
        (images * 2, labels, None, r"\[-1, 1\]"),
        (images.astype(np.float64), labels, None, "float32"),
        (images, labels + 1, None, "num_classes"),
        (images, labels, np.array([0.5, 0.5, 0.5, 0.5]), "sum to 1"),
        (images, labels % 3, np.array([0.25, 0.25, 0.25, 0.25]), r"classes \[3\] have positive weight"),
    ]
    for bad_images, bad_labels, weights, message in cases:
        with pytest.raises(DedtError, match=message):
            check_inputs(bad_images, bad_labels, options, num_classes=NUM_CLASSES, class_weights=weights, world=World())
    with pytest.raises(DedtError, match="fp16"):
        Trainer(images, labels, TrainOptions(precision="fp16", device="cpu"), num_classes=NUM_CLASSES)


def test_load_model_returns_ema_or_live_weights(tmp_path: Path) -> None:
    images, labels = tiny_data()
    options = TrainOptions(**{**TINY, "budget_kimg": 0.064})
    train(images, labels, options, tmp_path, num_classes=NUM_CLASSES, progress=False)
    ema, live = load_model(tmp_path), load_model(tmp_path, ema=False)
    assert not ema.training and ema.config.num_class_embeds == NUM_CLASSES
    assert not torch.equal(ema.conv_out.weight, live.conv_out.weight)
    with pytest.raises(DedtError, match="run training first"):
        load_model(tmp_path / "missing")


DDP_SCRIPT = """
import sys, numpy as np
from pathlib import Path
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.train import train
data = np.load(sys.argv[1])
options = TrainOptions(**{json_options})
train(data["images"], data["labels"], options, Path(sys.argv[2]), num_classes=4, seed=5, progress=False)
"""


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes on gloo: the global batch split in two gives one process's run."""
    images, labels = tiny_data()
    options = {**TINY, "budget_kimg": 0.128}
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT).replace("{json_options}", repr(options)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    arguments = [str(tmp_path / "data.npz"), str(tmp_path / "ddp")]
    done = subprocess.run([*command, *arguments], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    train(images, labels, TrainOptions(**options), tmp_path / "single", num_classes=4, seed=5, progress=False)
    # Same global batches, timesteps and noise: the losses agree up to the all-reduce's rounding.
    ddp_loss = [r["loss"] for r in log_records(tmp_path / "ddp")]
    assert ddp_loss == pytest.approx([r["loss"] for r in log_records(tmp_path / "single")], rel=1e-4)
    ddp, single = load_model(tmp_path / "ddp", ema=False), load_model(tmp_path / "single", ema=False)
    # Adam turns rounding noise in near-zero gradients (biases right before a GroupNorm) into steps of
    # up to ~lr, so weights can differ by a few lr; a wrong slice or a missing all-reduce moves the
    # losses above far more.
    for (name, a), b in zip(ddp.state_dict().items(), single.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=8 * TrainOptions().lr, msg=name)  # 8 steps
    state = json.loads(next((tmp_path / "ddp" / "checkpoints").glob("ckpt-*/state.json")).read_text())
    assert state["identity"]["world_size"] == 2
