"""Issue 20, items 1 and 12: the DRO proxy on an explicit device, the GPU stage set, progress reports."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from dedt import progress
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.presets import build_model
from dedt.reweight import train_proxy
from tests.helpers import tiny_vae

OPTIONS = TrainOptions(preset="digits-tiny", batch_size=12, lr=1e-3)


def _data(n=30, k=3):
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), np.arange(n, dtype=np.int64) % k


def _proxy(**kwargs):
    images, labels = _data()
    torch.manual_seed(1)
    reference = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=3)
    return train_proxy(
        images, labels, labels, reference, OPTIONS, num_classes=3, budget_kimg=0.06, smoothing=1e-3, seed=0, **kwargs
    )


@pytest.mark.parametrize("timesteps", ["common", "independent"])
def test_proxy_on_explicit_cpu_device_gives_the_same_weights(one_thread, timesteps):
    plain = _proxy(timesteps=timesteps, excess="normalized")
    for device in ("cpu", torch.device("cpu")):
        explicit = _proxy(timesteps=timesteps, excess="normalized", device=device)
        np.testing.assert_array_equal(explicit.weights, plain.weights)
        np.testing.assert_array_equal(explicit.alphas, plain.alphas)
        np.testing.assert_array_equal(explicit.excess, plain.excess)


def test_proxy_reports_progress(one_thread, monkeypatch):
    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)  # every step
    calls = []
    result = _proxy(on_progress=lambda done, total, info: calls.append((done, total, info)))
    steps = len(result.alphas) - 1
    assert [c[0] for c in calls] == [12 * (i + 1) for i in range(steps)]
    assert all(total == 12 * steps and info["images_per_s"] > 0 for _, total, info in calls)


def test_gpu_stages_are_the_heavy_stages():
    from dedt.pipeline import VERSIONS
    from tasks.stages import DISPATCH_TASKS, GPU_STAGES

    heavy = {"encode", "latents", "reweight", "train", "evaluate", "curve", "calibrate"}
    assert heavy <= set(GPU_STAGES) <= set(VERSIONS)
    assert set(DISPATCH_TASKS) == set(GPU_STAGES)


def test_throttle_reports_a_bounded_number_of_times(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    calls = []
    report = progress.Throttle(lambda d, t, i: calls.append((d, i)), 10_000, every_s=10.0)
    for step in range(1, 1001):  # 1,000 steps of 10 images over 100 s
        clock[0] += 0.1
        report(10 * step, lambda: {"loss": 0.5})
    assert 10 <= len(calls) <= 11 and calls[-1][0] == 10_000  # every 10 s, and the end
    assert all(a[0] < b[0] for a, b in itertools.pairwise(calls))
    assert calls[-1][1]["images_per_s"] == pytest.approx(100.0) and calls[-1][1]["eta_s"] == 0.0
    assert calls[-1][1]["loss"] == 0.5
    progress.Throttle(None, 10)(10)  # no callback: nothing to do


def test_format_line():
    line = progress.format_line(
        "train:reference", 12_300, 57_600, {"images_per_s": 850.4, "loss": 0.04123, "eta_s": 53.2}
    )
    assert line == "train:reference 12.3k/57.6k img (21%), 850 img/s, loss 0.0412, ETA 53 s"
    assert progress.format_line("encode", 5, 10, {"images_per_s": 1.0, "eta_s": float("inf")}).endswith("ETA ?")


def test_training_reports_increasing_counts_a_bounded_number_of_times(one_thread, tmp_path, monkeypatch):
    from dedt.diffusion.train import train

    images, labels = _data(n=24)
    options = TrainOptions(preset="digits-tiny", batch_size=8, lr=1e-3, budget_kimg=0.08, checkpoint_every_kimg=0.08)
    calls = []
    train(
        images,
        labels,
        options,
        tmp_path / "a",
        num_classes=3,
        progress=False,
        on_progress=lambda done, total, info: calls.append((done, total, info)),
    )
    assert len(calls) == 1 and calls[0][0] == calls[0][1] == 80  # under 10 s: only the final report
    assert np.isfinite(calls[0][2]["loss"])

    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)
    calls.clear()
    train(
        images,
        labels,
        options,
        tmp_path / "b",
        num_classes=3,
        progress=False,
        on_progress=lambda done, total, info: calls.append(done),
    )
    assert calls == [8 * (i + 1) for i in range(10)]  # every step, increasing, capped by the budget


def test_sampling_and_encoding_report_progress(monkeypatch, tmp_path):
    from dedt.diffusion.presets import build_scheduler
    from dedt.diffusion.sample import sample
    from dedt.encoders import get_encoder
    from dedt.encoders.streaming import encode_to_parquet

    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)
    calls = []
    model = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=3)
    sample(
        model,
        build_scheduler("digits-tiny"),
        np.arange(5) % 3,
        steps=2,
        batch_size=2,
        progress=False,
        on_progress=lambda done, total, info: calls.append((done, total)),
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]
    calls.clear()
    images, _ = _data(n=10)
    encode_to_parquet(
        images,
        10,
        np.arange(10),
        get_encoder("pixels"),
        tmp_path / "e.parquet",
        tmp_path / "shards",
        batch_size=4,
        shard_size=6,
        progress=False,
        on_progress=lambda done, total, info: calls.append((done, total)),
    )
    assert calls == [(4, 10), (6, 10), (10, 10)]


def test_latent_encoding_reports_progress(monkeypatch):
    from dedt.diffusion.latents import encode_latents

    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)
    torch.manual_seed(0)
    vae = tiny_vae()
    calls = []
    images, _ = _data(n=7)
    encode_latents(images, vae, batch_size=3, on_progress=lambda done, total, info: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_a_pipeline_stage_creates_a_progress_artifact(prefect_harness, store, pipelines_file):
    """The encode stage, run as its Prefect task, reports into a progress artifact (100% at the end)."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    from dedt.config import resolve
    from dedt.pipeline import plan, run_node
    from tasks.stages import STAGE_TASKS

    cfg = resolve("tiny", Path(pipelines_file), [])
    run_node(cfg, plan(cfg, store), "data")  # the input, outside Prefect: no progress

    @flow
    def encode_only() -> dict:
        return STAGE_TASKS["encode"](cfg, "encode", str(store))

    state = encode_only(return_state=True)
    assert state.result()["cached"] is False
    run_id = state.state_details.flow_run_id

    async def progress_artifacts():  # this run's only: the test session's server holds other tests' too
        async with get_client() as client:
            only_progress = ArtifactFilter(
                type=ArtifactFilterType(any_=["progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
            return await client.read_artifacts(artifact_filter=only_progress)

    artifacts = asyncio.run(progress_artifacts())
    assert len(artifacts) == 1 and artifacts[0].data == 100.0
    assert artifacts[0].description.startswith("encode ") and "img/s" in artifacts[0].description
