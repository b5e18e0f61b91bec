"""Stability of the DRO class weights: plain DoReMi DRO (independent timesteps, raw excess) against the diffusion-aware DRO, in one run.

One reference is trained on the full train split and one subset is kept (gaussian scores of the
pixels, per class), as the pipeline does; then every arm runs the proxy with 3 seeds on that same
data and reference. Two numbers per arm:
- Spearman: the mean over seed pairs of the rank correlation of the final weights (1 = the seeds agree
  on the order of the classes; noise gives ~0);
- SNR of the cumulative log-weights: log alpha_g moves by eta * x_g each step (x_g the excess less
  its mean over classes, which the softmax ignores), so after S steps its class-dependent part is
  eta * S * mean_s(x_g) and its noise eta * sqrt(S) * sd_s(x_g); SNR = std over classes of
  mean_s(x_g) * sqrt(S) / sqrt(mean over classes of var_s(x_g)) (eta cancels), averaged over
  seeds. Above ~1 the weights say more about the classes than about the draws.
Also: the weights' range, and the spread of the cumulative log-weights (std over classes of
eta * sum_s x_g, the scale eta is calibrated to) averaged over seeds.

    python bench/dro_stability.py --jobs 4                    # sklearn digits: ~15 CPU minutes
    python bench/dro_stability.py --dataset mnist5k --jobs 4  # mnist5k at 8x8, the same UNet
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dedt.data.manifest import holdout_mask, prepare_images
from dedt.data.sources import load_source
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.train import load_model, train
from dedt.reweight import DEFAULT_ETA, train_proxy
from dedt.scoring import score
from dedt.selection import select

# name -> (train_proxy arguments, whether the proxy gets the trainer's warm-up); eta = DEFAULT_ETA[excess]
ARMS: dict[str, tuple[dict, bool]] = {
    "before: independent t, raw excess, eta 1, no warm-up": ({"timesteps": "independent", "excess": "raw"}, False),
    "after (default): common t, raw excess, eta 1": ({"timesteps": "common", "excess": "raw"}, True),
    "common t, normalized excess": ({"timesteps": "common", "excess": "normalized"}, True),
    "common t, log-ratio excess": ({"timesteps": "common", "excess": "log-ratio"}, True),
}
RESOLUTION = {"digits": None, "mnist5k": 8}  # mnist5k at 8x8 as the frontier-mnist5k pipeline
OPTIONS = TrainOptions(preset="digits-tiny", batch_size=128)  # digits-demo's model and batch


def snr(excess: np.ndarray) -> float:
    """SNR of the cumulative log-weights from a (S, k) excess trajectory (see the module docstring).

    Each step's excess is centred over the classes first: the softmax ignores what all classes share.
    """
    centred = excess - excess.mean(axis=1, keepdims=True)
    signal = centred.mean(axis=0).std()
    noise = np.sqrt(centred.var(axis=0).mean())
    return float(signal * np.sqrt(len(excess)) / noise)


def mean_spearman(weights: list[np.ndarray]) -> float:
    """Mean rank correlation of the weights over all pairs of seeds."""
    return float(np.mean([spearmanr(a, b).statistic for a, b in itertools.combinations(weights, 2)]))


def prepare(dataset: str, keep_frac: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train split (images (N, C, H, W) in [-1, 1], labels) and the kept rows: per-class gaussian
    scores of the pixels, as the pipeline's default scorer on the pixels encoder."""
    raw = load_source(dataset, None)
    images = prepare_images(raw, RESOLUTION[dataset], None).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    labels = np.asarray(raw.labels, np.int64)
    train_rows = ~holdout_mask(labels, 0.1, 0)  # dataset.holdout_frac default
    images, labels = images[train_rows], labels[train_rows]
    return images, labels, select(score("gaussian", images.reshape(len(images), -1), labels), labels, keep_frac)


def run_arm(
    args: argparse.Namespace, reference_dir: Path, arm: str, seed: int
) -> tuple[np.ndarray, float, float, float]:
    """One proxy run (in a worker process): (weights, SNR, log-weight spread, seconds)."""
    torch.set_num_threads(args.threads)
    images, labels, kept = prepare(args.dataset, args.keep_frac)
    kwargs, warmup = ARMS[arm]
    options = OPTIONS if warmup else OPTIONS.model_copy(update={"warmup_kimg": 0.0})
    eta = DEFAULT_ETA[kwargs["excess"]]
    run = train_proxy(
        images[kept],
        labels[kept],
        labels[kept],
        load_model(reference_dir, ema=True),
        options,
        num_classes=int(labels.max()) + 1,
        num_groups=int(labels.max()) + 1,
        budget_kimg=args.proxy_kimg,
        eta=eta,
        smoothing=1e-3,
        seed=seed,
        **kwargs,
    )
    return run.weights, snr(run.excess[1:]), float((eta * run.excess[1:].sum(axis=0)).std()), run.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(RESOLUTION))
    parser.add_argument("--keep-frac", type=float, default=0.3, help="digits-demo's 0.3")
    parser.add_argument("--reference-kimg", type=float, default=64.0, help="reweight.reference_kimg default")
    parser.add_argument("--proxy-kimg", type=float, default=32.0, help="reweight.proxy_kimg default")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="proxy runs in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--reference-dir",
        type=Path,
        default=None,
        help="train the reference here, or reuse the one it holds (default: a temporary folder)",
    )
    args = parser.parse_args()

    images, labels, kept = prepare(args.dataset, args.keep_frac)
    with tempfile.TemporaryDirectory() as temporary:
        reference_dir = args.reference_dir or Path(temporary)
        start = time.perf_counter()
        torch.set_num_threads(args.threads)
        train(
            images,
            labels,
            OPTIONS.model_copy(update={"budget_kimg": args.reference_kimg}),
            reference_dir,
            num_classes=int(labels.max()) + 1,
            seed=0,
            progress=False,
        )  # resumes, or returns at once when done
        print(
            f"{args.dataset}: {len(images)} train images, {len(kept)} kept ({args.keep_frac:.0%} per class), "
            f"reference {args.reference_kimg:g} kimg ({time.perf_counter() - start:.0f} s), proxy "
            f"{args.proxy_kimg:g} kimg = {round(args.proxy_kimg * 1000 / OPTIONS.batch_size)} steps of "
            f"{OPTIONS.batch_size}, {args.seeds} seeds, eta {DEFAULT_ETA}\n",
            flush=True,
        )
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                (arm, seed): pool.submit(run_arm, args, reference_dir, arm, seed)
                for arm in ARMS
                for seed in range(args.seeds)
            }
            print(
                "| setting | Spearman between seeds | SNR of log-weights | weights min-max | log-weight spread | s/run |"
            )
            print("|---|--:|--:|--:|--:|--:|")
            for arm in ARMS:
                runs = [futures[arm, seed].result() for seed in range(args.seeds)]
                weights = [w for w, *_ in runs]
                print(
                    f"| {arm} | {mean_spearman(weights):.2f} | {np.mean([r[1] for r in runs]):.2f} | "
                    f"{min(w.min() for w in weights):.3f}-{max(w.max() for w in weights):.3f} | "
                    f"{np.mean([r[2] for r in runs]):.2f} | {np.mean([r[3] for r in runs]):.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
