"""The CUDA paths' device-independent behaviour, checked on the CPU: RNG-free MFU probe,
checkpoint loading onto this rank's device, resume across devices, TF32 flags that every getter
reads, IEEE metric features and their cache key, the kNN GPU paths' memory and resources, DDPM
noise on the sampling device, the VAE decode's out-of-memory fallback."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from dedt import knn as knn_module
from dedt.diffusion import train as train_module
from dedt.diffusion.checkpoint import run_identity
from dedt.diffusion.device import backend_flags, forward_flops, init_world
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.presets import PRESETS, Preset, build_model
from dedt.diffusion.train import train
from dedt.precision import ieee_fp32, tf32
from dedt.store import file_sha256
from tests.helpers import Kill, kill_at, tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
# 12 steps of batch 16; a checkpoint every 4 steps.
TINY = dict(budget_kimg=0.192, batch_size=16, checkpoint_every_kimg=0.064, log_every_kimg=0.032, warmup_kimg=0.1)


@pytest.fixture
def dropout_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny preset with dropout: a forward pass in train mode draws from the RNG."""
    monkeypatch.setitem(
        PRESETS,
        "tiny-dropout",
        Preset(description="test", block_out_channels=(32, 64), layers_per_block=1, dropout=0.1),
    )
    return "tiny-dropout"


def tiny_data(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32), np.arange(n, dtype=np.int64) % 3


def ema_bytes(run_dir: Path) -> bytes:
    return (run_dir / "ema.safetensors").read_bytes()


# --- training: MFU probe, checkpoint loading, identity, process group, TF32 flags ---------------------


def test_flop_probe_leaves_rng_and_train_mode_alone(dropout_preset: str) -> None:
    model = build_model(dropout_preset, in_channels=1, resolution=8, num_classes=None).train()
    state = torch.get_rng_state()
    flops = forward_flops(model, torch.zeros(1, 1, 8, 8), None)
    assert flops > 0 and model.training
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_with_a_known_peak_is_byte_identical(
    tmp_path: Path, dropout_preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a GPU's peak known, the MFU probe runs after the checkpoint is restored; it must not
    move the dropout stream the resumed steps continue (here on the CPU, with a pretend peak)."""
    monkeypatch.setattr(train_module, "peak_flops", lambda *args: 1e12)
    images, labels = tiny_data()
    options = TrainOptions(preset=dropout_preset, device="cpu", **TINY)
    train(images, labels, options, tmp_path / "whole", num_classes=3, progress=False)
    with pytest.raises(Kill):
        train(images, labels, options, tmp_path / "cut", num_classes=3, progress=False, on_step=kill_at(6))
    train(images, labels, options, tmp_path / "cut", num_classes=3, progress=False)
    assert ema_bytes(tmp_path / "cut") == ema_bytes(tmp_path / "whole")
    assert "mfu" in (tmp_path / "whole" / "log.jsonl").read_text()


def test_every_torch_load_maps_to_an_explicit_device() -> None:
    """Without map_location, tensors saved from cuda:0 load onto cuda:0 on every torchrun rank."""
    missing = []
    for path in [*REPO.glob("dedt/**/*.py"), *REPO.glob("tasks/**/*.py"), *REPO.glob("flows/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) in ("torch.load", "torch.jit.load")
                and not any(k.arg == "map_location" for k in node.keywords)
            ):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, missing


def test_resume_loads_the_training_state_onto_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = tiny_data()
    options = TrainOptions(device="cpu", **TINY)
    with pytest.raises(Kill):
        train(images, labels, options, tmp_path, num_classes=3, progress=False, on_step=kill_at(6))
    seen: list[object] = []
    real_load = torch.load

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    train(images, labels, options, tmp_path, num_classes=3, progress=False)
    assert seen == ["cpu"]  # the optimiser moves its state to the parameters' device itself


@pytest.mark.parametrize("other", ["cuda", "auto"])
def test_checkpoint_identity_ignores_the_device(other: str) -> None:
    images, labels = tiny_data()
    here = run_identity(images, labels, TrainOptions(device="cpu", **TINY), 3, None, 0, 1)
    there = run_identity(images, labels, TrainOptions(device=other, **TINY), 3, None, 0, 1)
    assert here == there
    assert "device" not in here["options"] and "device_type" not in here


def _as_if_saved_on_cuda(checkpoint: Path) -> None:
    """Rewrite a CPU checkpoint as a GPU run writes it: a Philox generator state (16 bytes), a CUDA
    RNG state per rank, and the identity of the format that named the device; checksums updated."""
    state_path = checkpoint / "training_state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    state["generator"] = torch.zeros(16, dtype=torch.uint8)
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)]
    torch.save(state, state_path)
    meta = json.loads((checkpoint / "state.json").read_text())
    meta["identity"]["options"]["device"] = "cuda"
    meta["identity"]["device_type"] = "cuda"
    meta["sha256"]["training_state.pt"] = file_sha256(state_path)
    (checkpoint / "state.json").write_text(json.dumps(meta))


def test_a_run_interrupted_on_a_gpu_resumes_on_the_cpu(tmp_path: Path, dropout_preset: str) -> None:
    """The model, EMA, optimiser and step carry over; the device-specific RNG streams are re-seeded
    from (seed, step), so two resumptions of one checkpoint still agree."""
    images, labels = tiny_data()
    options = TrainOptions(preset=dropout_preset, device="cpu", **TINY)
    with pytest.raises(Kill):
        train(images, labels, options, tmp_path / "a", num_classes=3, progress=False, on_step=kill_at(6))
    (checkpoint,) = (tmp_path / "a" / "checkpoints").glob("ckpt-*")
    _as_if_saved_on_cuda(checkpoint)
    shutil.copytree(checkpoint, tmp_path / "b" / "checkpoints" / checkpoint.name)
    with pytest.warns(UserWarning, match="re-seeded"):
        first = train(images, labels, options, tmp_path / "a", num_classes=3, progress=False)
    with pytest.warns(UserWarning, match="re-seeded"):
        train(images, labels, options, tmp_path / "b", num_classes=3, progress=False)
    assert first["steps"] == 12 and ema_bytes(tmp_path / "a") == ema_bytes(tmp_path / "b")
    lines = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8, 10, 12]  # resumed at step 4, not from scratch


def test_a_caller_initialised_process_group_still_binds_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        world, created = init_world("cuda")
    finally:
        dist.destroy_process_group()
    assert bound == [3] and not created and world.local_rank == 3


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_flags_keep_the_legacy_getters_working(enabled: bool) -> None:
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    cpu_flags = (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision)
    with backend_flags(TrainOptions(tf32=enabled, device="cpu")):
        # inductor reads these; a mix of the legacy and new APIs makes them raise
        assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.backends.cudnn.allow_tf32 is enabled
        assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if enabled else "ieee")
        assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is enabled
        assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision) == cpu_flags
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
    assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cudnn.allow_tf32


def test_ieee_fp32_turns_off_tf32_and_autocast() -> None:
    with tf32(True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
        with ieee_fp32():
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32


# --- kNN on a GPU: the torch path's memory, FAISS's resources -----------------------------------------


class _LargeOutputs(TorchDispatchMode):
    """Records (op, shape, data pointer) of every op output with at least ``floor`` elements."""

    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor, self.seen = floor, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= self.floor:
                self.seen.append((str(func.overloadpacket), tuple(tensor.shape), tensor.data_ptr()))
        return out


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_knn_writes_each_score_block_once_within_the_budget(metric: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One preallocated (rows, N) score block, filled by one fused addmm per query block: the memory
    bound computed from the shapes is the memory used (no (rows, N) temporaries besides it)."""
    n, d, k = 600, 32, 5
    monkeypatch.setattr(knn_module, "GPU_SCORE_BYTES", 200 * 4 * (n + d + 3 * k + 1))
    rows = knn_module.torch_block_rows(n, d, k)
    assert rows == 200 and knn_module.torch_block_bytes(n, d, k, rows) <= knn_module.GPU_SCORE_BYTES
    x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    opt = knn_module._Options(metric, None, 8, 128, 0)
    with _LargeOutputs(floor=rows * n // 2) as mode:
        got = knn_module._torch_topk(x, x, k, opt, device="cpu")
    ops = [op for op, _, _ in mode.seen if op not in ("aten.empty", "aten.slice")]  # the buffer and views of it
    assert ops == ["aten.addmm"] * 3  # 600 queries in blocks of 200
    assert {shape for _, shape, _ in mode.seen} == {(rows, n)} and len({ptr for *_, ptr in mode.seen}) == 1
    ref = knn_module._cpu_exact(x, x, k, opt)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-3)


def test_faiss_gpu_makes_one_resource_set_per_device_and_uses_the_current_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scoring calls knn once per class: the GPU resources are made once, on this process's device
    (torchrun binds rank r to GPU r), not on a hard-coded GPU 0. The "GPU" index here is the CPU one."""
    faiss = knn_module.faiss
    made, placed = [], []

    class Resources:
        def __init__(self) -> None:
            made.append(self)

    def to_gpu(resources: Resources, device: int, index: object) -> object:
        placed.append((resources, device))
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(knn_module, "_cuda_device", lambda: 1)
    knn_module._gpu_resources.cache_clear()
    try:
        x = np.random.default_rng(2).normal(size=(300, 8)).astype(np.float32)
        for part in (x[:150], x[150:]):
            gpu = knn_module.knn(part, 3, device="cuda")
            np.testing.assert_array_equal(gpu[1], knn_module.knn(part, 3, device="cpu")[1])
        knn_module.knn(x, 3, device="cuda", index="ivf")
    finally:
        knn_module._gpu_resources.cache_clear()
    assert len(made) == 1 and placed == [(made[0], 1)] * 3


# --- evaluation features: IEEE fp32, cached per device class and precision -----------------------------


def test_reference_statistics_are_cached_per_device_class_and_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dedt.evaluate import refstats_dir
    from dedt.metrics.registry import FEATURE_PRECISION, feature_space

    on_cpu = feature_space("inception", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = feature_space("inception", device="auto")  # a GPU worker's default
    assert on_cpu.identity["device"] == "cpu" and on_gpu.identity["device"] == "cuda"
    assert on_cpu.identity["precision"] == on_gpu.identity["precision"] == FEATURE_PRECISION
    assert (
        refstats_dir(tmp_path, "f" * 64, "train", on_cpu).path != refstats_dir(tmp_path, "f" * 64, "train", on_gpu).path
    )
    weights = tmp_path / "classifier.safetensors"
    weights.write_bytes(b"weights")
    assert feature_space("classifier", classifier=weights).identity["device"] == "cpu"  # always on the CPU


def test_inception_features_are_ieee_fp32_whatever_the_caller_enabled() -> None:
    from dedt.metrics.inception import FEATURE_DIM, inception_features

    seen = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(
            (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.is_autocast_enabled("cpu"),
                x.dtype,
            )
        )
        return torch.zeros(len(x), FEATURE_DIM)

    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with tf32(True), torch.autocast("cpu", dtype=torch.bfloat16):
        inception_features(images, model)
    assert seen == [(False, False, False, torch.float32)]


def test_clip_and_dinov2_metric_features_run_without_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The encode stage's encoders autocast to bf16 on CUDA; as a metric's feature space they must not."""
    import dedt.encoders
    from dedt.encoders.torch_models import TorchEncoder
    from dedt.metrics.registry import _encoder_extractor

    seen = []

    def network(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled("cpu")))
        return x.flatten(1)[:, :4]

    encoder = TorchEncoder("clip:test", 4, "none", network, lambda x: x, torch.device("cpu"), autocast=True)
    monkeypatch.setattr(dedt.encoders, "get_encoder", lambda *args, **kwargs: encoder)
    extract = _encoder_extractor("open_clip:test", None, "cpu")
    with tf32(True), torch.autocast("cpu", dtype=torch.bfloat16):
        features = extract(np.zeros((3, 3, 4, 4), dtype=np.float32))
    assert features.shape == (3, 4) and not encoder.autocast and seen == [(False, False)]


# --- sampling and decoding ------------------------------------------------------------------------------


def test_ddpm_on_the_cpu_keeps_each_samples_own_stream() -> None:
    """On the CPU the per-step noise continues each sample's start-noise generator (what the
    artifacts of CPU runs hold); a GPU draws it from per-sample generators on the GPU instead."""
    from diffusers.utils.torch_utils import randn_tensor

    from dedt.diffusion.presets import build_scheduler
    from dedt.diffusion.sample import _sample_seed, make_sampling_scheduler, sample

    torch.manual_seed(0)
    model = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=None).eval()
    scheduler = build_scheduler("digits-tiny")
    got = sample(model, scheduler, None, num=3, method="ddpm", steps=4, seed=5, batch_size=2, progress=False)
    sampler = make_sampling_scheduler(scheduler, "ddpm", 4)
    expected = []
    with torch.inference_mode():
        for i in range(3):
            generator = [torch.Generator("cpu").manual_seed(_sample_seed(5, i))]
            x = randn_tensor((1, 1, 8, 8), generator=generator, device=torch.device("cpu"))
            for t in sampler.timesteps:
                x = sampler.step(model(x, t).sample, t, x, generator=generator).prev_sample
            expected.append(x.clamp(-1, 1).numpy())
    np.testing.assert_allclose(got, np.concatenate(expected), atol=1e-5)


def test_vae_decode_halves_its_batch_when_the_gpu_runs_out_of_memory(tmp_path: Path) -> None:
    from dedt.diffusion.latents import decode_latents, encode_latents

    torch.manual_seed(0)
    vae = tiny_vae()
    latents = encode_latents(np.random.default_rng(0).uniform(-1, 1, (7, 1, 8, 8)).astype(np.float32), vae)
    expected = decode_latents(latents, vae, batch_size=7)
    real_decode, batches = vae.decode, []

    def decode(z: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        batches.append(len(z))
        if len(z) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_decode(z, *args, **kwargs)

    vae.decode = decode
    with pytest.warns(UserWarning, match="retrying with batch size 2"):
        got = decode_latents(latents, vae, batch_size=4)
    assert batches == [4, 2, 2, 2, 1]  # the failed batch of 4 again as two of 2, then the rest at 2
    np.testing.assert_allclose(got, expected, atol=1e-5)
    vae.decode = lambda z, *args, **kwargs: (_ for _ in ()).throw(torch.OutOfMemoryError("always"))
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning):
        decode_latents(latents[:2], vae, batch_size=2)  # down to one image, then the error stands


# --- the CUDA worker's install --------------------------------------------------------------------------


def test_cuda_image_has_a_c_compiler_and_installs_no_cuda12_faiss() -> None:
    """torch.compile's Triton backend builds a C launcher on first use; faiss-gpu 1.15.1 links CUDA 12
    while torch 2.14.1 brings CUDA 13, so GPU workers use CPU FAISS and dedt's torch CUDA kNN."""
    import tomllib

    dockerfile = (REPO / "docker" / "Dockerfile.cuda").read_text()
    assert any("apt-get install" in line and "gcc" in line for line in dockerfile.splitlines())
    assert "580" in dockerfile  # the driver the CUDA 13.0 wheels need is named
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith("faiss-gpu") for dep in extras["gpu"]) and extras["gpu"] == extras["cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_gpu_check_script_parses_and_says_so_without_a_gpu(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = REPO / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert "No CUDA GPU: nothing measured" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "not run" in line]
    assert len(rows) == 11 and any(line.startswith("| knn |") for line in rows)
    assert "No CUDA GPU" in (tmp_path / "gpu_check.log").read_text()  # the log a device run brings back
