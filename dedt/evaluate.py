"""The evaluate stage's logic: cached reference statistics, metric rows, the Markdown report.

For one model's samples, in every feature space (``dedt.metrics.registry``):

- against the FULL real train split and, for a model trained on a pruned subset, against the KEPT
  SUBSET: Fréchet distance overall and per class, KID, precision / recall / density / coverage.
  The two references side by side are what pruning cost the model: recall and coverage it keeps
  on the data it saw but loses on the data that was pruned away;
- the kept subset itself against the full split (``kept_data_*``): what pruning cost the data,
  the ceiling of a model trained on it;
- the memorization check: nearest-neighbour distances from the samples to the images the model
  trained on vs to held-out reals (``nn_*``), and the memorization rate (``memorized_frac``): the
  fraction of samples nearer a training image than the threshold set by held-out reals, in every
  feature space and, in the evaluate stage, in pixels; on contaminated data also restricted to
  samples whose nearest training image is duplicated (``memorized_frac_duplicated``);
- the real-data floor (``fd_real_floor``): FD of held-out reals to the train split, the value a
  perfect model would reach with that many samples.

On contaminated data (``dataset.contaminate``) the FULL reference is the uncontaminated source's train
split (``RealSource.target``), so every arm of a dirty-data benchmark, and the clean data's own model,
is measured against one real set: the images the user wanted. The kept subset and the memorization
check stay on the images the model trained on.

Reference statistics (features, mean, covariance of a split in a feature space) are the expensive
part (Inception: ~0.12 s per image on two CPU cores) and identical for every model evaluated on
the same data, so they are cached in ``<store>/refstats/<fingerprint>/``, keyed by the data
stage's fingerprint, the split and the feature space's identity (its weights), and written like a
stage: under a lock, atomically, completion marker last. The kept subset's statistics are rows of
the train split's features, so pruning choices never recompute features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dedt.artifacts import MANIFEST, read_summary
from dedt.errors import DedtError
from dedt.metrics import frechet_distance, gaussian_stats
from dedt.metrics.fidelity import kid, nn_distance_stats, prdc
from dedt.metrics.frechet import MIN_SAMPLES
from dedt.metrics.registry import FeatureSpace
from dedt.store import StageDir, atomic_path, fingerprint, read_parquet, write_parquet

REFSTATS_STAGE = "refstats"
REFSTATS_VERSION = "1"  # bump when what a refstats folder holds changes
ARRAYS = ("sample_ids", "labels", "features")  # always written; "mu" and "sigma" when n >= MIN_SAMPLES
SPLITS = ("train", "holdout")
OVERALL_METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")
MEMORIZATION_PERCENTILE = 1.0  # the threshold: only 1% of unseen reals come this close to a training image
PIXELS = "pixels"  # the feature space name of the pixel-space memorization rows

SplitLoader = Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]  # split -> (ids, images, labels)


@dataclass(frozen=True)
class Reals:
    """Real images of one split (or subset) in one feature space."""

    ids: np.ndarray  # int64 (n,)
    labels: np.ndarray  # int64 (n,)
    features: np.ndarray  # float32 (n, d)
    mu: np.ndarray | None  # float64 (d,); None when n < MIN_SAMPLES
    sigma: np.ndarray | None  # float64 (d, d)
    source: str  # the cache folder it came from, for error messages

    def take(self, ids: np.ndarray, what: str) -> Reals:
        """The rows with these sample ids, with their own Gaussian (``what`` names them in errors)."""
        mask = np.isin(self.ids, ids)
        if mask.sum() != len(np.unique(ids)):
            raise DedtError(
                f"{what} names {len(np.unique(ids)) - int(mask.sum())} samples that are not in the "
                f"train split of the manifest; re-run the select stage"
            )
        features = self.features[mask]
        mu, sigma = _gaussian(features)
        return Reals(self.ids[mask], self.labels[mask], features, mu, sigma, f"{self.source} ({what})")


@dataclass(frozen=True)
class RealSource:
    """Where an evaluation's real images come from."""

    root: Path  # the store root: reference statistics live in <root>/refstats/
    data_fingerprint: str  # the data stage's: same fingerprint, same images
    load_split: SplitLoader  # reads a split of the manifest (only on a cache miss)
    subset_ids: np.ndarray | None  # the kept subset a pruned model trained on; None = the full train split
    n_holdout: int  # held-out reals in the manifest
    duplicated_ids: np.ndarray | None = None  # train images in a duplicate group (contaminated data)
    # The reals samples should look like when they are not the train split (contaminated data: its clean source)
    target: RealSource | None = None


@dataclass(frozen=True)
class Row:
    """One line of metrics.parquet."""

    metric: str
    feature_space: str
    reference: str  # "full" | "subset"
    cls: str  # class name or "all"
    value: float
    n_real: int
    n_fake: int


def stage_source(
    root: Path,
    data: StageDir,
    subset_ids: np.ndarray | None,
    *,
    contaminated: bool = False,
    target: StageDir | None = None,
) -> RealSource:
    """The reals of a finished data stage of the store ``root``: its manifest's splits, and on contaminated
    data (``dataset.contaminate``) its duplicated train images; ``target``, the data stage the FULL reference
    comes from when it is not ``data`` (contaminated data: the uncontaminated source's)."""
    from dedt.data.contaminate import duplicated_ids
    from dedt.data.manifest import load_split

    manifest = MANIFEST.path(data)
    return RealSource(
        root,
        data.fingerprint,
        lambda split: load_split(manifest, split),
        subset_ids,
        read_summary(data)["n_holdout"],
        duplicated_ids(manifest) if contaminated else None,
        None if target is None else stage_source(root, target, None),
    )


def refstats_dir(root: Path, data_fingerprint: str, split: str, space: FeatureSpace) -> StageDir:
    """The cache folder of one (data, split, feature space)."""
    config = {"feature_space": space.name, "identity": space.identity, "split": split}
    return StageDir(
        Path(root), REFSTATS_STAGE, fingerprint(REFSTATS_STAGE, REFSTATS_VERSION, config, {"data": data_fingerprint})
    )


def reference_reals(source: RealSource, split: str, space: FeatureSpace) -> Reals:
    """Features and Gaussian of a manifest split in ``space``: from the cache, else computed once and cached.

    Two evaluations racing on one folder take turns (file lock); the second finds it complete.
    A folder whose marker is missing or whose files fail their checksums is recomputed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = refstats_dir(source.root, source.data_fingerprint, split, space)
    with out.lock():
        if not out.is_complete():
            _compute_refstats(out, source.load_split(split), space, split, source.data_fingerprint)
    arrays = {
        name: np.load(out.file(f"{name}.npy")) for name in (*ARRAYS, "mu", "sigma") if out.file(f"{name}.npy").exists()
    }
    return Reals(
        arrays["sample_ids"], arrays["labels"], arrays["features"], arrays.get("mu"), arrays.get("sigma"), str(out.path)
    )


def _compute_refstats(
    out: StageDir,
    split_data: tuple[np.ndarray, np.ndarray, np.ndarray],
    space: FeatureSpace,
    split: str,
    data_fingerprint: str,
) -> None:
    ids, images, labels = split_data
    features = space.extract(images)
    arrays = {"sample_ids": ids.astype(np.int64), "labels": labels.astype(np.int64), "features": features}
    mu, sigma = _gaussian(features)
    if mu is not None:
        arrays |= {"mu": mu, "sigma": sigma}
    for name, array in arrays.items():
        with atomic_path(out.file(f"{name}.npy")) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
    out.mark_complete(
        [f"{name}.npy" for name in arrays],
        {
            "stage": REFSTATS_STAGE,
            "feature_space": space.name,
            "identity": space.identity,
            "split": split,
            "inputs": {"data": data_fingerprint},
            "n": len(ids),
            "dim": int(features.shape[1]),
        },
    )


def _gaussian(features: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    return gaussian_stats(features) if len(features) >= MIN_SAMPLES else (None, None)


def check_sample_counts(n_fake: int, n_real: dict[str, int], prdc_k: int) -> None:
    """Fail before sampling when a metric cannot be computed from this many samples.

    The covariance needs at least MIN_SAMPLES (2) rows; the k-th neighbour radii of precision /
    recall need k + 1. Per-class FD with fewer than 2 samples in a class is reported as NaN
    instead (an unconditional model may simply not draw a class).
    """
    need = max(MIN_SAMPLES, prdc_k + 1)
    for what, n in {"generated samples": n_fake, **n_real}.items():
        if n < need:
            fix = "raise sample.per_class" if what == "generated samples" else "use more data"
            raise DedtError(
                f"evaluate: {n} {what}; the covariance needs at least {MIN_SAMPLES} and precision/recall with "
                f"evaluate.prdc_k={prdc_k} need at least prdc_k + 1 = {prdc_k + 1}: {fix} or lower evaluate.prdc_k"
            )


def evaluate_samples(
    fake: np.ndarray,
    fake_labels: np.ndarray,
    spaces: Sequence[FeatureSpace],
    source: RealSource,
    class_names: Sequence[str],
    *,
    prdc_k: int,
    with_kid: bool,
    seed: int,
    pixels: bool = False,
) -> list[Row]:
    """Every metric of the module docstring, for every feature space (and the memorization rate in
    pixels when ``pixels``), as rows."""
    rows: list[Row] = []
    for space in spaces:
        fake_features = space.extract(fake)
        trained = reference_reals(source, "train", space)
        full = reference_reals(source.target, "train", space) if source.target else trained
        references = {"full": full}
        if source.subset_ids is not None:
            trained = references["subset"] = trained.take(source.subset_ids, "the kept subset")
            rows += kept_data_rows(space.name, full, references["subset"], prdc_k)
        for reference, reals in references.items():
            rows += fidelity_rows(
                space.name,
                reference,
                reals,
                fake_features,
                fake_labels,
                class_names,
                prdc_k=prdc_k,
                with_kid=with_kid,
                seed=seed,
            )
        if source.n_holdout >= MIN_SAMPLES:
            heldout = reference_reals(source, "holdout", space)
            rows.append(floor_row(space.name, full, heldout))
            rows += memorization_rows(
                space.name,
                "subset" if "subset" in references else "full",
                fake_features,
                trained,
                heldout,
                seed=seed,
                duplicated_ids=source.duplicated_ids,
            )
    if pixels and source.n_holdout >= MIN_SAMPLES:
        rows += pixel_memorization_rows(fake, source)
    return rows


def fidelity_rows(
    space: str,
    reference: str,
    reals: Reals,
    fake: np.ndarray,
    fake_labels: np.ndarray,
    class_names: Sequence[str],
    *,
    prdc_k: int,
    with_kid: bool,
    seed: int,
) -> list[Row]:
    """FD overall and per class, KID (mean and std over subsets), precision/recall/density/coverage."""
    check_dimensions(space, reals, fake)
    n_real, n_fake = len(reals.features), len(fake)
    check_sample_counts(n_fake, {f"real images in the {reference} reference": n_real}, prdc_k)
    rows = [Row("fd", space, reference, "all", frechet_to(reals, fake), n_real, n_fake)]
    for c, name in enumerate(class_names):
        r, f = reals.features[reals.labels == c], fake[fake_labels == c]
        # Too few samples of a class for a covariance: NaN, not a made-up value.
        value = (
            frechet_distance(*gaussian_stats(f), *gaussian_stats(r))
            if min(len(f), len(r)) >= MIN_SAMPLES
            else float("nan")
        )
        rows.append(Row("fd", space, reference, name, value, len(r), len(f)))
    if with_kid:
        mean, std = kid(reals.features, fake, seed=seed)
        rows += [
            Row("kid", space, reference, "all", mean, n_real, n_fake),
            Row("kid_std", space, reference, "all", std, n_real, n_fake),
        ]
    rows += [
        Row(metric, space, reference, "all", value, n_real, n_fake)
        for metric, value in prdc(reals.features, fake, k=prdc_k).items()
    ]
    return rows


def frechet_to(reals: Reals, fake: np.ndarray) -> float:
    """FD of sample features ``fake`` to the reals' Gaussian."""
    return frechet_distance(*gaussian_stats(fake), reals.mu, reals.sigma)


def selection_fd(fake: np.ndarray, space: FeatureSpace, source: RealSource) -> float:
    """FD in ``space`` of samples (images) to the FULL reference: what a post-hoc EMA candidate is
    chosen by (``dedt.diffusion.posthoc.choose_sigma_rel``). The reals are the reported FD's own, its
    target; only the samples (another noise bank) differ, so the choice is not fitted to its noise."""
    features = space.extract(fake)
    full = reference_reals(source.target or source, "train", space)
    check_dimensions(space.name, full, features)
    if min(len(features), len(full.features)) < MIN_SAMPLES:
        raise DedtError(
            f"evaluate.posthoc_sigma_rels: {len(features)} selection samples and {len(full.features)} real train "
            f"images; the FD's covariances need at least {MIN_SAMPLES} of each: raise sample.per_class"
        )
    return frechet_to(full, features)


def posthoc_rows(space: str, sigma_rel: float, fds: dict[float, float], n_real: int, n_select: int) -> list[Row]:
    """The post-hoc EMA choice as metric rows: ``posthoc_sigma_rel`` (the chosen one) and, per candidate,
    ``posthoc_select_fd`` with class ``sigma_rel=<candidate>`` (n_fake = the selection bank's size)."""
    return [Row("posthoc_sigma_rel", space, "full", "all", sigma_rel, n_real, n_select)] + [
        Row("posthoc_select_fd", space, "full", f"sigma_rel={s:g}", fd, n_real, n_select) for s, fd in fds.items()
    ]


def kept_data_rows(space: str, full: Reals, subset: Reals, prdc_k: int) -> list[Row]:
    """The kept subset scored as if it were samples against the full split: what pruning removed."""
    n_full, n_kept = len(full.features), len(subset.features)
    rows = [
        Row(
            "kept_data_fd",
            space,
            "full",
            "all",
            frechet_distance(subset.mu, subset.sigma, full.mu, full.sigma),
            n_full,
            n_kept,
        )
    ]
    return rows + [
        Row(f"kept_data_{metric}", space, "full", "all", value, n_full, n_kept)
        for metric, value in prdc(full.features, subset.features, k=prdc_k).items()
    ]


def floor_row(space: str, full: Reals, heldout: Reals) -> Row:
    """FD of held-out reals (playing the samples) to the train split: the best a model can score."""
    return Row(
        "fd_real_floor",
        space,
        "full",
        "all",
        frechet_distance(heldout.mu, heldout.sigma, full.mu, full.sigma),
        len(full.features),
        len(heldout.features),
    )


def memorization_rows(
    space: str,
    reference: str,
    fake: np.ndarray,
    seen: Reals,
    heldout: Reals,
    *,
    seed: int,
    duplicated_ids: np.ndarray | None = None,
) -> list[Row]:
    """``nn_*`` rows of ``dedt.metrics.fidelity.nn_distance_stats`` (n_real = reals per set after subsampling)
    and the ``memorization_rate`` rows (n_real = the images the model trained on)."""
    check_dimensions(space, seen, fake)
    stats = nn_distance_stats(fake, seen.features, heldout.features, seed=seed)
    n_reference = int(stats.pop("n_reference"))
    duplicated = None if duplicated_ids is None else np.isin(seen.ids, duplicated_ids)
    rate = memorization_rate(fake, seen.features, heldout.features, seen_duplicated=duplicated)
    return [
        Row(f"nn_{key}", space, reference, "all", value, n_reference, len(fake)) for key, value in stats.items()
    ] + [Row(key, space, reference, "all", value, len(seen.features), len(fake)) for key, value in rate.items()]


def memorization_rate(
    fake: np.ndarray, seen: np.ndarray, heldout: np.ndarray, *, seen_duplicated: np.ndarray | None = None
) -> dict[str, float]:
    """The fraction of samples that copy a training image: nearer their nearest training image than the
    threshold, the MEMORIZATION_PERCENTILE-th percentile of held-out reals' nearest-training-image distances.

    An unseen real image so counts ~1% of the time and an exact copy always (distance 0); Carlini et al.
    2023 and Somepalli et al. 2023 flag replication by the same nearest-neighbour distance.

    Args:
        fake: (n, d) samples; seen: (m, d) the images the model trained on; heldout: (h, d) unseen reals;
            all in one space (features or flattened pixels).
        seen_duplicated: bool (m,), training images in a duplicate group (contaminated data).

    Returns:
        ``memorization_threshold`` (distance units), ``memorized_frac``; with a duplicated training image,
        ``memorized_frac_duplicated`` (among samples whose nearest training image is duplicated, NaN when
        none is) and ``nearest_duplicated_frac`` (the share of such samples).
    """
    threshold = float(np.percentile(_nearest(seen, heldout)[0], MEMORIZATION_PERCENTILE))
    distance, nearest = _nearest(seen, fake)
    memorized = distance <= threshold
    out = {"memorization_threshold": threshold, "memorized_frac": float(memorized.mean())}
    if seen_duplicated is not None and seen_duplicated.any():
        near_duplicated = seen_duplicated[nearest]
        out["memorized_frac_duplicated"] = (
            float(memorized[near_duplicated].mean()) if near_duplicated.any() else float("nan")
        )
        out["nearest_duplicated_frac"] = float(near_duplicated.mean())
    return out


def _nearest(reference: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 distance, row) of each query's nearest reference row; the distance recomputed in float64, so
    an exact copy is at 0 (the GEMM expansion leaves rounding of the order of the norms)."""
    from dedt.knn import knn

    _, index = knn(reference, 1, queries=queries, exclude_self=False, index="exact")
    rows = index[:, 0]
    return np.linalg.norm(queries.astype(np.float64) - reference[rows].astype(np.float64), axis=1), rows


def pixel_memorization_rows(fake: np.ndarray, source: RealSource) -> list[Row]:
    """``memorization_rate`` rows in pixel space (feature space ``pixels``), against the images the model
    trained on (the kept subset for a pruned model)."""
    ids, train, _ = source.load_split("train")
    _, heldout, _ = source.load_split("holdout")
    reference = "full"
    if source.subset_ids is not None:
        mask = np.isin(ids, source.subset_ids)
        ids, train, reference = ids[mask], train[mask], "subset"
    if train.shape[1:] != fake.shape[1:]:
        raise DedtError(
            f"samples are {fake.shape[1:]} but the real images {train.shape[1:]}; the manifest and the "
            "model disagree: re-run the pipeline from the data stage"
        )
    duplicated = None if source.duplicated_ids is None else np.isin(ids, source.duplicated_ids)
    flat = [a.reshape(len(a), -1).astype(np.float32) for a in (fake, train, heldout)]
    rate = memorization_rate(*flat, seen_duplicated=duplicated)
    return [Row(key, PIXELS, reference, "all", value, len(train), len(fake)) for key, value in rate.items()]


def check_dimensions(space: str, reals: Reals, fake: np.ndarray) -> None:
    """Cached reference features and fresh sample features must live in the same space."""
    if reals.features.shape[1] != fake.shape[1]:
        raise DedtError(
            f"feature space {space}: the reference features in {reals.source} are {reals.features.shape[1]}-d but "
            f"the samples' are {fake.shape[1]}-d; the cached statistics are stale: delete that folder and re-run"
        )


def write_metrics(rows: Iterable[Row], seed: int, path: Path) -> None:
    """metrics.parquet: metric, feature_space, reference, class, value, n_real, n_fake, seed."""
    rows = list(rows)
    write_parquet(
        pa.table(
            {
                "metric": [r.metric for r in rows],
                "feature_space": [r.feature_space for r in rows],
                "reference": [r.reference for r in rows],
                "class": [r.cls for r in rows],
                "value": np.asarray([r.value for r in rows], np.float64),
                "n_real": np.asarray([r.n_real for r in rows], np.int64),
                "n_fake": np.asarray([r.n_fake for r in rows], np.int64),
                "seed": np.full(len(rows), seed, np.int64),
            }
        ),
        path,
    )


def samples_table(fake: np.ndarray, labels: np.ndarray) -> pa.Table:
    """samples.parquet's rows: sample_id, label and the image as PNG bytes (uint8, as the metrics saw it)."""
    from dedt.data.manifest import encode_png
    from dedt.metrics.registry import to_uint8

    return pa.table(
        {
            "sample_id": np.arange(len(fake), dtype=np.int64),
            "label": labels.astype(np.int32),
            "image": pa.array([encode_png(p) for p in to_uint8(fake)], pa.binary()),
        }
    )


def read_metrics(path: Path) -> list[Row]:
    """The rows ``write_metrics`` wrote."""
    return [
        Row(r["metric"], r["feature_space"], r["reference"], r["class"], r["value"], r["n_real"], r["n_fake"])
        for r in read_parquet(path).to_pylist()
    ]


def lookup(rows: Iterable[Row], metric: str, space: str, reference: str = "full", cls: str = "all") -> float | None:
    """The value of one metric row, None when absent."""
    return next(
        (r.value for r in rows if (r.metric, r.feature_space, r.reference, r.cls) == (metric, space, reference, cls)),
        None,
    )


def per_class_fd(rows: Iterable[Row], space: str, reference: str = "full") -> dict[str, float]:
    return {
        r.cls: r.value
        for r in rows
        if r.metric == "fd" and r.feature_space == space and r.reference == reference and r.cls != "all"
    }


def summary(rows: Sequence[Row], spaces: Sequence[str]) -> dict[str, Any]:
    """The stage's summary.json: ``fd``/``fd_per_class`` in the first feature space against the full
    split (what ``dedt.report.summary_rows`` reads), plus every overall value by space and reference."""
    overall: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        if r.cls == "all":
            overall.setdefault(r.feature_space, {}).setdefault(r.reference, {})[r.metric] = _round(r.value)
    return {
        "fd": _round(lookup(rows, "fd", spaces[0])),
        "fd_space": spaces[0],
        "fd_per_class": {c: _round(v) for c, v in per_class_fd(rows, spaces[0]).items()},
        "overall": overall,
    }


def _round(value: float | None) -> float | None:
    """Six significant digits: FDs in the hundreds and KIDs of 1e-5 both stay readable."""
    return None if value is None else float(f"{value:.6g}")


def report_markdown(
    rows: Sequence[Row], *, title: str, seed: int, images: dict[str, str], clean_target: bool = False
) -> str:
    """report.md: overall table, what pruning cost, per-class FD, memorization, floor, images;
    ``clean_target``: the full reference is the uncontaminated source's train split (``RealSource.target``)."""
    spaces = list(dict.fromkeys(r.feature_space for r in rows if r.metric == "fd"))
    references = list(dict.fromkeys(r.reference for r in rows if r.metric == "fd"))
    n_fake = next(r.n_fake for r in rows if r.metric == "fd")
    n_real = {
        ref: next(r.n_real for r in rows if r.metric == "fd" and r.reference == ref and r.cls == "all")
        for ref in references
    }
    described = {
        "full": "the uncontaminated data's full train split" if clean_target else "the full real train split",
        "subset": "the kept subset the model trained on",
    }
    lines = [
        f"# Evaluation: {title}",
        "",
        f"{n_fake} generated samples, seed {seed}. References: "
        + "; ".join(f"**{ref}** = {described[ref]} ({n_real[ref]} images)" for ref in references)
        + ".",
        "",
        "## Overall",
        "",
        _table(
            ["feature space", "reference", *(m.upper() if m in ("fd", "kid") else m for m in OVERALL_METRICS)],
            [[s, ref, *(_fmt(lookup(rows, m, s, ref)) for m in OVERALL_METRICS)] for s in spaces for ref in references],
        ),
    ]
    if "subset" in references:
        lines += [
            "",
            "## What pruning cost",
            "",
            "The model against the data it saw (subset) and against all of it (full): recall and coverage "
            "it loses on the full split are the pruned-away regions it does not generate. (k-NN radii grow "
            "as a reference shrinks; compare models on the same reference.)",
            "",
            _table(
                ["feature space", "recall full", "recall subset", "coverage full", "coverage subset"],
                [
                    [s, *(_fmt(lookup(rows, m, s, ref)) for m in ("recall", "coverage") for ref in ("full", "subset"))]
                    for s in spaces
                ],
            ),
            "",
            "The kept subset itself scored against the full split (the ceiling of a model trained on it):",
            "",
            _table(
                ["feature space", *(f"kept {'FD' if m == 'fd' else m}" for m in OVERALL_METRICS if m != "kid")],
                [
                    [s, *(_fmt(lookup(rows, f"kept_data_{m}", s)) for m in OVERALL_METRICS if m != "kid")]
                    for s in spaces
                ],
            ),
        ]
    classes = list(dict.fromkeys(r.cls for r in rows if r.metric == "fd" and r.cls != "all"))
    columns = [(s, ref) for s in spaces for ref in references]
    lines += [
        "",
        "## Per-class FD",
        "",
        _table(
            ["class", *(f"{s} / {ref}" for s, ref in columns)],
            [[c, *(_fmt(lookup(rows, "fd", s, ref, c)) for s, ref in columns)] for c in classes],
        ),
    ]
    nn_rows = [r for r in rows if r.metric == "nn_median_ratio"]
    if nn_rows:
        lines += [
            "",
            "## Memorization",
            "",
            "Nearest-neighbour distances from samples to the images the model trained on vs to held-out "
            "reals (equal-size sets). Copies show as a ratio well below 1 and a closer-to-train fraction "
            "well above 0.5.",
            "",
            _table(
                [
                    "feature space",
                    "trained on",
                    "median NN to train",
                    "median NN to held-out",
                    "ratio",
                    "closer to train",
                ],
                [
                    [
                        r.feature_space,
                        r.reference,
                        *(
                            _fmt(lookup(rows, m, r.feature_space, r.reference))
                            for m in ("nn_train_q50", "nn_heldout_q50", "nn_median_ratio", "nn_closer_to_train")
                        ),
                    ]
                    for r in nn_rows
                ],
            ),
            "",
            "Memorization rate: the fraction of samples nearer a training image than the 1st percentile of "
            "held-out reals' distances to their nearest training image (~0.01 without memorization).",
            "",
            _table(
                ["space", "trained on", "threshold", "memorized", "memorized, nearest image duplicated"],
                [
                    [
                        r.feature_space,
                        r.reference,
                        _fmt(lookup(rows, "memorization_threshold", r.feature_space, r.reference)),
                        _fmt(r.value),
                        _fmt(lookup(rows, "memorized_frac_duplicated", r.feature_space, r.reference)),
                    ]
                    for r in rows
                    if r.metric == "memorized_frac"
                ],
            ),
            "",
            "## Real-data floor",
            "",
            "FD of held-out reals to the train split: what a perfect model scores with that many samples.",
            "",
            _table(["feature space", "FD floor"], [[s, _fmt(lookup(rows, "fd_real_floor", s))] for s in spaces]),
        ]
    chosen = next((r for r in rows if r.metric == "posthoc_sigma_rel"), None)
    if chosen is not None:
        lines += [
            "",
            "## Post-hoc EMA",
            "",
            f"These samples come from the EMA of sigma_rel {chosen.value:g}, rebuilt from the run's post-hoc "
            f"snapshots: of the candidates, the one with the lowest FD ({chosen.feature_space}, against the full "
            f"split) on a selection bank of {chosen.n_fake} samples from other start noises than these.",
            "",
            _table(
                ["sigma_rel", "selection FD"],
                [[r.cls.removeprefix("sigma_rel="), _fmt(r.value)] for r in rows if r.metric == "posthoc_select_fd"],
            ),
        ]
    for caption, file in images.items():
        lines += ["", f"![{caption}]({file})"]
    return "\n".join(lines) + "\n"


def _table(header: list[str], body: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in body]
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if math.isnan(value):
        return "n/a"
    return f"{value:.4g}"
