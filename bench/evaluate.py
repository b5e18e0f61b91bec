"""Evaluate-stage benchmark: the whole stage on mnist5k with 1,000 samples, its parts, Inception throughput.

    python bench/evaluate.py [--per-class 100] [--steps 20] [--resolution 16] [--train-kimg 1]
                             [--inception-images 32]

Prints one Markdown table. Setup, not timed: the mnist5k pipeline up to the pruned model in a
temporary store (keep 30 % per class by the gaussian scorer on pixels; reweight uniform;
mnist-small trained for only --train-kimg kimg: evaluation cost does not depend on sample
quality, so a briefly trained model stands in for a real one). Rows:

- the evaluate stage end to end (``dedt.pipeline.run_node``, classifier feature space, against
  the full train split and the kept subset), computing the reference statistics;
- its parts timed alone: DDIM sampling; everything after sampling (``dedt.evaluate.evaluate_samples``)
  with the reference statistics computed and then from the ``refstats`` cache (what every later
  model on the same data pays), apart from sampling, whose run-to-run noise on a shared CPU is
  larger than the cache's effect in a 64-d space; decoding the manifest, classifier features, each
  metric (both references, the memorization check) in the classifier's 64-d space and, on
  synthetic ReLU-Gaussian features of the same counts, at d = 2048 (what the inception space
  costs beyond its features);
- Inception features through ``feature_space("inception")`` on the CPU (clean-fid resize to 299 +
  the FID TorchScript) on the dataset's own images, after a warm-up batch, and the feature time
  an inception-space evaluation of this data would add, projected from that rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dedt.config import build_config  # noqa: E402
from dedt.pipeline import plan, run_node  # noqa: E402

EVALUATED = "evaluate:train:uniform"


def main(argv: list[str] | None = None) -> None:
    """Set up the store, measure, print the table."""
    args = _parse(argv)
    import torch

    cfg = build_config(_pipeline(args), "bench-evaluate")
    with tempfile.TemporaryDirectory(prefix="dedt-bench-evaluate-") as tmp:
        planned = plan(cfg, Path(tmp))
        setup = time.perf_counter()
        for key in planned:
            if key != EVALUATED:
                run_node(cfg, planned, key)
        setup = time.perf_counter() - setup
        print(
            f"<!-- {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at start; "
            f"setup (data .. train, not timed below) {setup:.0f} s -->"
        )
        stage, stage_s = _timed(lambda: run_node(cfg, planned, EVALUATED))
        parts = _parts(cfg, planned)
        n_fake = stage.summary["n_fake"]
    n_real, n_subset, n_holdout = parts.pop("_counts")
    rate = _inception_rate(parts.pop("_images"), args.inception_images)

    print(
        f"| evaluate stage, mnist5k {args.resolution}x{args.resolution}, {n_fake} samples "
        f"({n_real} train reals, {n_subset} kept, {n_holdout} held out) | classifier space (d = 64) "
        "| d = 2048 (inception space) |"
    )
    print("|---|---:|---:|")
    print(f"| whole stage (sampling, reference statistics computed, metrics, report) | {stage_s:.1f} s | |")
    print(f"| sampling, DDIM {args.steps} steps, mnist-small (CPU) | {parts.pop('sampling'):.1f} s | same |")
    print(
        f"| all metrics after sampling (evaluate_samples), reference statistics computed "
        f"| {parts.pop('metrics_cold'):.1f} s | |"
    )
    print(
        f"| all metrics after sampling (evaluate_samples), reference statistics from the cache "
        f"| {parts.pop('metrics_warm'):.1f} s | |"
    )
    print(f"| decode the manifest's train PNGs (cold only) | {parts.pop('decode'):.2f} s | same |")
    feats_real, feats_fake = parts.pop("features_real"), parts.pop("features_fake")
    print(
        f"| features of the {n_real + n_holdout} reals (cold only) | {feats_real:.2f} s "
        f"| ≈ {(n_real + n_holdout) / rate:.0f} s (projected from the Inception rate) |"
    )
    print(f"| features of the {n_fake} samples | {feats_fake:.2f} s | ≈ {n_fake / rate:.0f} s (projected) |")
    for name, (small, large) in parts.items():
        print(f"| {name} | {small:.2f} s | {large:.2f} s |")
    print(
        f"| Inception features, feature_space('inception') on {args.inception_images} dataset images, CPU "
        f"| {rate:.2f} images/s | |"
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=100, help="samples per class (10 classes)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--resolution", type=int, default=16, help="mnist5k image side")
    p.add_argument("--train-kimg", type=float, default=1.0, help="training budget of the evaluated model")
    p.add_argument("--inception-images", type=int, default=32, help="images for the Inception throughput")
    return p.parse_args(argv)


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed": 0,
        "dataset": {"source": "mnist5k", "resolution": args.resolution},
        "encode": {"encoder": "pixels"},
        "score": {"method": "gaussian"},
        "select": {"keep_frac": 0.3},
        "reweight": {"method": "uniform"},
        "train": {"preset": "mnist-small", "budget_kimg": args.train_kimg, "checkpoint_every_kimg": args.train_kimg},
        "sample": {"steps": args.steps, "per_class": args.per_class},
        "evaluate": {"classifier_epochs": 2, "baselines": False},
    }


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _parts(cfg: Any, planned: dict) -> dict[str, Any]:
    """Seconds of each part of the stage, run alone on the same inputs."""
    from dedt.data.manifest import load_split
    from dedt.diffusion.presets import build_scheduler
    from dedt.diffusion.sample import sample
    from dedt.diffusion.train import load_model
    from dedt.evaluate import SPLITS, RealSource, evaluate_samples, refstats_dir
    from dedt.metrics.registry import feature_space
    from dedt.store import read_parquet

    manifest = planned["data"].out.file("manifest.parquet")
    model = load_model(planned["train:uniform"].out.path, ema=True)
    labels = np.repeat(np.arange(10, dtype=np.int64), cfg.sample.per_class)
    fake, sampling = _timed(
        lambda: sample(
            model,
            build_scheduler(cfg.train.preset),
            labels,
            num=len(labels),
            method=cfg.sample.method,
            steps=cfg.sample.steps,
            seed=cfg.seed,
            progress=False,
        )
    )
    (ids, real, real_labels), decode = _timed(lambda: load_split(manifest, "train"))
    _, holdout, _ = load_split(manifest, "holdout")
    space = feature_space("classifier", classifier=planned["classifier"].out.file("classifier.safetensors"))
    f_real, t_real = _timed(lambda: space.extract(np.concatenate([real, holdout])))
    f_fake, t_fake = _timed(lambda: space.extract(fake))
    subset_ids = read_parquet(planned["select"].out.file("subset.parquet")).column("sample_id").to_numpy()
    kept = np.isin(ids, subset_ids)
    source = RealSource(
        planned["data"].out.root,
        planned["data"].out.fingerprint,
        lambda split: load_split(manifest, split),
        subset_ids,
        len(holdout),
    )
    for split in SPLITS:
        shutil.rmtree(refstats_dir(source.root, source.data_fingerprint, split, space).path)
    metrics = [
        _timed(
            lambda: evaluate_samples(
                fake,
                labels,
                [space],
                source,
                [str(c) for c in range(10)],
                prdc_k=cfg.evaluate.prdc_k,
                with_kid=cfg.evaluate.kid,
                seed=cfg.seed,
            )
        )[1]
        for _ in ("cold", "warm")
    ]
    small = _metric_seconds(f_real[: len(real)], real_labels, kept, f_real[len(real) :], f_fake, labels, cfg.seed)
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((2048, 2048)).astype(np.float32) / np.sqrt(2048)
    wide = [
        np.maximum(rng.standard_normal((len(x), 2048)).astype(np.float32) @ mixing, 0.0) for x in (real, holdout, fake)
    ]
    large = _metric_seconds(wide[0], real_labels, kept, wide[1], wide[2], labels, cfg.seed)
    return {
        "sampling": sampling,
        "decode": decode,
        "features_real": t_real,
        "features_fake": t_fake,
        "metrics_cold": metrics[0],
        "metrics_warm": metrics[1],
        **{name: (small[name], large[name]) for name in small},
        "_counts": (len(real), int(kept.sum()), len(holdout)),
        "_images": real,
    }


def _metric_seconds(
    real: np.ndarray,
    real_labels: np.ndarray,
    kept: np.ndarray,
    holdout: np.ndarray,
    fake: np.ndarray,
    fake_labels: np.ndarray,
    seed: int,
) -> dict[str, float]:
    """Each metric of dedt.evaluate against both references, as the stage runs them."""
    from dedt.evaluate import Reals, floor_row, kept_data_rows, memorization_rows
    from dedt.metrics import frechet_distance, gaussian_stats
    from dedt.metrics.fidelity import kid, prdc

    def reals(mask: np.ndarray) -> Reals:
        return Reals(np.flatnonzero(mask), real_labels[mask], real[mask], *gaussian_stats(real[mask]), "bench")

    (full, subset), stats = _timed(lambda: (reals(np.ones(len(real), bool)), reals(kept)))
    held = Reals(np.arange(len(holdout)), np.zeros(len(holdout), np.int64), holdout, *gaussian_stats(holdout), "bench")

    def fds() -> None:
        for ref in (full, subset):
            frechet_distance(*gaussian_stats(fake), ref.mu, ref.sigma)
            for c in range(10):
                real_c = ref.features[ref.labels == c]
                frechet_distance(*gaussian_stats(fake[fake_labels == c]), *gaussian_stats(real_c))

    return {
        "Gaussian (mean, covariance) of the train split and the subset": stats,
        "FD overall + 10 per-class, both references": _timed(fds)[1],
        "KID (100 subsets of 1,000), both references": _timed(
            lambda: [kid(r.features, fake, seed=seed) for r in (full, subset)]
        )[1],
        "precision/recall/density/coverage (k = 5), both references": _timed(
            lambda: [prdc(r.features, fake, k=5) for r in (full, subset)]
        )[1],
        "kept subset vs full split (FD + PRDC)": _timed(lambda: kept_data_rows("x", full, subset, 5))[1],
        "memorization (NN to train vs held-out) + real-data floor": _timed(
            lambda: (memorization_rows("x", "subset", fake, subset, held, seed=seed), floor_row("x", full, held))
        )[1],
    }


def _inception_rate(images: np.ndarray, count: int) -> float:
    """images/s of the inception feature space on ``count`` dataset images (CPU), after a warm-up batch."""
    from dedt.metrics.registry import feature_space

    space = feature_space("inception", device="cpu")
    batch = images[:count]
    for _ in range(2):  # load, then TorchScript's profiling runs of this batch shape
        space.extract(batch)
    return count / _timed(lambda: space.extract(batch))[1]


if __name__ == "__main__":
    main()
