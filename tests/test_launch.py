"""train.processes: a train stage launches the DDP run of tests/test_diffusion_train.py's torchrun test
itself (dedt.diffusion.launch), with the same losses, resume, fingerprints, and clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dedt.diffusion.checkpoint import run_identity
from dedt.diffusion.launch import launch_train, resolve_processes
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.train import train
from dedt.errors import DedtError

# 8 steps of batch 16 = 0.128 kimg (4 per rank of 2); a checkpoint every 4 steps, a log line every 2.
TINY = dict(
    budget_kimg=0.128, batch_size=16, checkpoint_every_kimg=0.064, log_every_kimg=0.032, warmup_kimg=0.1, device="cpu"
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32)
    return images, np.array([i % 4 for i in range(n)], dtype=np.int64)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def test_two_gloo_processes_match_one_process_and_resume(tmp_path: Path) -> None:
    """A launch that stops at half the budget, then one that resumes its checkpoint to the end: the
    losses of one uninterrupted process (up to the all-reduce's rounding), no log line repeated."""
    images, labels = tiny_data()
    options = TrainOptions(**TINY, processes=2)
    reports: list[tuple[int, int]] = []
    half = options.model_copy(update={"budget_kimg": 0.064})
    launch_train(
        images,
        labels,
        half,
        tmp_path / "ddp",
        num_classes=4,
        seed=5,
        on_progress=lambda d, t, _: reports.append((d, t)),
    )
    assert reports[-1] == (64, 64)  # rank 0's progress, forwarded from the child
    result = launch_train(images, labels, options, tmp_path / "ddp", num_classes=4, seed=5)
    train(images, labels, TrainOptions(**TINY), tmp_path / "single", num_classes=4, seed=5, progress=False)

    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [step for step, _ in ddp] == [2, 4, 6, 8]  # the resumed launch kept the first one's lines
    assert [loss for _, loss in ddp] == pytest.approx([loss for _, loss in single], rel=1e-4)
    assert (result["steps"], result["nimg"]) == (8, 128)
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "ckpt-000000.128" / "state.json").read_text())
    assert state["identity"]["world_size"] == 2 and "processes" not in state["identity"]["options"]


def test_a_failing_child_is_a_dedt_error(tmp_path: Path) -> None:
    """A child's DedtError comes back with its message; a crash comes back with the end of the log."""
    images, labels = tiny_data()
    options = TrainOptions(**TINY, processes=2)
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000.064"
    ckpt.mkdir(parents=True)
    other = run_identity(images, labels, options.model_copy(update={"lr": 0.5}), 4, None, 5, 2)
    (ckpt / "state.json").write_text(
        json.dumps({"step": 4, "nimg": 64, "seconds": 1.0, "loss": 1.0, "identity": other})
    )
    with pytest.raises(DedtError, match=r"checkpoint of another configuration \(differs in: train.lr\)"):
        launch_train(images, labels, options, tmp_path / "run", num_classes=4, seed=5)

    # This run's identity but no weights beside state.json: the children crash loading them.
    identity = run_identity(images, labels, options, 4, None, 5, 2)
    (ckpt / "state.json").write_text(
        json.dumps({"step": 4, "nimg": 64, "seconds": 1.0, "loss": 1.0, "identity": identity})
    )
    with pytest.raises(DedtError, match=r"(?s)torchrun \(2 processes\) failed with exit status \d+.*load_checkpoint"):
        launch_train(images, labels, options, tmp_path / "run", num_classes=4, seed=5)


def test_processes_option_validates_and_resolves() -> None:
    for bad in (0, -1, "x", 1.5, True):
        with pytest.raises(ValidationError, match="whole number of processes >= 1 or 'auto'"):
            TrainOptions(processes=bad)
    assert TrainOptions(processes="auto").processes == "auto"
    assert resolve_processes("auto") == max(1, torch.cuda.device_count())
    assert resolve_processes(3) == 3
    with pytest.raises(DedtError, match=r"batch_size 16 is not divisible by train.processes \(3\)"):
        launch_train(*tiny_data(), TrainOptions(**TINY, processes=3), Path("unused"), num_classes=4)


def test_processes_stay_out_of_fingerprints_and_a_bad_value_names_the_key(pipelines_file: Path, tmp_path: Path) -> None:
    from dedt.config import resolve
    from dedt.pipeline import plan

    plain = plan(resolve("tiny", pipelines_file), tmp_path)
    launched = plan(resolve("tiny", pipelines_file, ["train.processes=2"]), tmp_path)
    assert {k: n.out.fingerprint for k, n in plain.items()} == {k: n.out.fingerprint for k, n in launched.items()}
    for bad in ("0", "x"):
        with pytest.raises(DedtError, match=r"pipeline 'tiny': train.processes: .*whole number of processes"):
            resolve("tiny", pipelines_file, [f"train.processes={bad}"])


def test_two_gloo_processes_prune_and_anneal_as_one_process_does(tmp_path: Path) -> None:
    """InfoBatch scores from the gathered global batch and the anneal data sent to the children: the
    same plans, switch and losses as one process."""
    full, full_labels = tiny_data(96)
    options = dict(TINY, dynamic_pruning="infobatch", anneal_frac=0.25)
    run = dict(num_classes=4, seed=5, anneal_data=(full, full_labels))
    ddp = launch_train(full[:48], full_labels[:48], TrainOptions(**options, processes=2), tmp_path / "ddp", **run)
    single = train(full[:48], full_labels[:48], TrainOptions(**options), tmp_path / "single", progress=False, **run)
    assert ddp["infobatch"] == single["infobatch"] and ddp["anneal"] == single["anneal"] == {
        "switch_step": 6, "switch_kimg": 0.096
    }  # fmt: skip
    assert [loss for _, loss in losses(tmp_path / "ddp")] == pytest.approx(
        [loss for _, loss in losses(tmp_path / "single")], rel=1e-4
    )
