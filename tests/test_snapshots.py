"""EMA snapshots: with the power-function EMA the snapshot after n images is the model a run of
budget n ends with (so the full-data curve is the 'trained for less time' control), and a killed
run resumes to the same snapshot bytes."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from dedt.diffusion.options import TrainOptions
from dedt.diffusion.snapshots import list_snapshots
from dedt.diffusion.train import train


def _data():
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (96, 1, 8, 8)).astype(np.float32), np.arange(96) % 3


def _options(budget_kimg: float, **extra) -> TrainOptions:
    return TrainOptions(
        budget_kimg=budget_kimg, batch_size=32, ema="power", warmup_kimg=0.1, checkpoint_every_kimg=0.128, **extra
    )


def test_snapshot_equals_the_end_of_a_shorter_run(tmp_path, one_thread):
    images, labels = _data()
    train(images, labels, _options(0.512, snapshots=2), tmp_path / "long", num_classes=3, progress=False)
    snaps = list_snapshots(tmp_path / "long")
    assert [s.nimg for s in snaps] == [128, 256]
    assert all(s.seconds > 0 for s in snaps) and snaps[0].seconds <= snaps[1].seconds
    train(images, labels, _options(0.256), tmp_path / "short", num_classes=3, progress=False)
    short, snap = load_file(tmp_path / "short" / "ema.safetensors"), load_file(snaps[1].weights)
    assert short.keys() == snap.keys()
    for name in short:
        np.testing.assert_array_equal(short[name], snap[name])


def test_killed_run_resumes_to_the_same_snapshots(tmp_path, one_thread):
    images, labels = _data()
    options = _options(0.512, snapshots=2)
    train(images, labels, options, tmp_path / "whole", num_classes=3, progress=False)

    def kill(step: int, nimg: int) -> None:
        if nimg >= 192:  # after the first snapshot and the first checkpoint (128)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(images, labels, options, tmp_path / "resumed", num_classes=3, progress=False, on_step=kill)
    assert [s.nimg for s in list_snapshots(tmp_path / "resumed")] == [128]
    train(images, labels, options, tmp_path / "resumed", num_classes=3, progress=False)
    for a, b in zip(list_snapshots(tmp_path / "whole"), list_snapshots(tmp_path / "resumed"), strict=True):
        assert a.nimg == b.nimg and a.weights.read_bytes() == b.weights.read_bytes()


def test_power_ema_rejects_half_life_options():
    with pytest.raises(ValueError, match="ema_sigma_rel"):
        TrainOptions(ema="power", ema_halflife_kimg=4.0)


@pytest.mark.parametrize(
    "options",
    [
        dict(ema="power"),
        dict(ema_decay=0.9999),
        dict(timestep_weighting="min-snr"),
        dict(posthoc_ema=True, ema="power"),
    ],
)
def test_options_validate_again_from_a_full_dump(options):
    """A GPU worker receives the resolved config as a full dump (every field given): it must validate."""
    resolved = TrainOptions(**options)
    assert TrainOptions.model_validate(resolved.model_dump()) == resolved
