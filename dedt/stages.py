"""One function per stage: read the input artifacts, call the library, write this stage's files.

Each takes ``(cfg, inputs, out)``, where ``inputs`` maps a role to the input stage's folder,
writes only inside ``out.path`` (atomically) and returns a small JSON summary. The completion
marker is written by ``dedt.pipeline.run_node`` after it returns.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from dedt.config import PipelineConfig
from dedt.data.manifest import class_names, holdout_mask, load_split, prepare_images, write_manifest
from dedt.data.sources import load_source
from dedt.errors import DedtError
from dedt.store import StageDir, read_parquet, write_parquet

MANIFEST, EMBEDDINGS, SCORES, SUBSET = "manifest.parquet", "embeddings.parquet", "scores.parquet", "subset.parquet"
WEIGHTS, TRAJECTORY, METRICS, SAMPLES = "weights.parquet", "trajectory.parquet", "metrics.parquet", "samples.parquet"
GROUPS = "groups.parquet"


def run_data(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    ds = cfg.dataset
    raw = load_source(ds.source, ds.path)
    images = prepare_images(raw, ds.resolution, ds.channels)
    holdout = holdout_mask(raw.labels, ds.holdout_frac, cfg.seed)
    write_manifest(raw, images, holdout, out.file(MANIFEST), {"source": ds.source, "resize": "PIL bicubic"})
    return {"n_train": int((~holdout).sum()), "n_holdout": int(holdout.sum()), "shape": list(images.shape[1:]),
            "classes": len(raw.class_names)}


def run_encode(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.encoders import get_encoder
    from dedt.encoders.streaming import encode_to_parquet

    ids, images, _ = load_split(inputs["data"].file(MANIFEST))
    enc = cfg.encode
    encoder = get_encoder(enc.encoder, weights=enc.weights, device=enc.device, seed=cfg.seed, dim=enc.dim)
    meta = encode_to_parquet(images, len(images), ids, encoder, out.file(EMBEDDINGS), out.path / "shards",
                             batch_size=enc.batch_size, shard_size=enc.shard_size, progress=False)
    return {"n": len(ids), **meta}


def run_score(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.encoders.streaming import read_embeddings
    from dedt.scoring import score

    ids, embeddings, _ = read_embeddings(inputs["encode"].file(EMBEDDINGS))
    manifest_ids, _, labels = _train_labels(inputs["data"])
    if not np.array_equal(ids, manifest_ids):
        raise DedtError(f"{inputs['encode'].file(EMBEDDINGS)} covers other samples than the manifest; re-run encode")
    params = {"k": cfg.score.k} if cfg.score.method == "knn" else {}
    scores = score(cfg.score.method, embeddings, labels, per_class=cfg.score.per_class, seed=cfg.seed, **params)
    table = pa.table({"sample_id": ids, "label": labels.astype(np.int32), "score": scores.astype(np.float64)})
    write_parquet(table, out.file(SCORES), {"method": cfg.score.method, "params": cfg.score.model_dump()})
    return {"n": len(ids), "method": cfg.score.method}


def run_select(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.selection import kept_per_class, select

    table = read_parquet(inputs["score"].file(SCORES), ("sample_id", "label", "score"))
    ids, labels = table.column("sample_id").to_numpy(), table.column("label").to_numpy().astype(np.int64)
    scores = table.column("score").to_numpy()
    kept = select(scores, labels, cfg.select.keep_frac, per_class=cfg.select.per_class)
    order = np.lexsort((ids, -scores))  # rank 0 = highest score, ties by sample id
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    per_class = {str(k): int(v) for k, v in kept_per_class(kept, labels).items()}
    subset = pa.table({"sample_id": ids[kept], "label": labels[kept].astype(np.int32),
                       "score": scores[kept], "rank": rank[kept]})
    write_parquet(subset, out.file(SUBSET), {"keep_frac": cfg.select.keep_frac, "kept_per_class": per_class})
    return {"kept": len(kept), "of": len(ids), "kept_per_class": per_class}


def _train_labels(data: StageDir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return load_split(data.file(MANIFEST))


def _subset_arrays(inputs: dict[str, StageDir]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Images and labels of the kept subset (or the whole train split without a select input)."""
    ids, images, labels = _train_labels(inputs["data"])
    num_classes = len(class_names(inputs["data"].file(MANIFEST)))
    if "select" in inputs:
        kept = read_parquet(inputs["select"].file(SUBSET), ("sample_id",)).column("sample_id").to_numpy()
        mask = np.isin(ids, kept)
        if mask.sum() != len(kept):
            raise DedtError(f"{inputs['select'].file(SUBSET)} names samples missing from the manifest; re-run select")
        ids, images, labels = ids[mask], images[mask], labels[mask]
    return ids, images, labels, num_classes


def read_weights(reweight: StageDir) -> np.ndarray:
    weights = read_parquet(reweight.file(WEIGHTS), ("group", "weight")).column("weight").to_numpy()
    if np.any(weights < 0) or abs(weights.sum() - 1.0) > 1e-6:
        raise DedtError(f"{reweight.file(WEIGHTS)}: weights are not on the simplex (sum {weights.sum():.6f})")
    return weights


def _groups_of(inputs: dict[str, StageDir], labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sampling groups of these samples: the reweight stage's clusters when it made some, else labels."""
    if "reweight" not in inputs or not inputs["reweight"].file(GROUPS).exists():
        return labels
    table = read_parquet(inputs["reweight"].file(GROUPS), ("sample_id", "group"))
    lookup = dict(zip(table.column("sample_id").to_pylist(), table.column("group").to_pylist()))
    return np.asarray([lookup[i] for i in ids], np.int64)


def run_train(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Train a DM; a reference (no select input) trains on the full train split."""
    from dedt.diffusion.train import train

    ids, images, labels, num_classes = _subset_arrays(inputs)
    options = cfg.train
    if "select" not in inputs:
        options = options.model_copy(update={"budget_kimg": cfg.reweight.reference_kimg})
    weights = read_weights(inputs["reweight"]) if "reweight" in inputs else None
    groups = _groups_of(inputs, labels, ids)
    num_groups = num_classes if groups is labels else len(weights)
    result = train(images, groups, options, out.path, num_classes=num_groups, class_weights=weights,
                   seed=cfg.seed, progress=False)
    return {"n_images": len(images), **result}


def run_reference_checkpoint(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Check a local diffusers reference fits the data; the reweight stage loads it from its path."""
    from dedt.reweight import load_reference

    shape = json.loads(inputs["data"].file("summary.json").read_text())["shape"]
    load_reference(cfg.reweight.reference_path, in_channels=shape[2], resolution=shape[0])
    return {"reference_path": cfg.reweight.reference_path}


def run_reweight(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Group DRO (PAPER.md section 4), optionally iterated: each round's reference is re-trained
    on the same data with the previous round's weights."""
    from dedt.diffusion.train import load_model, train
    from dedt.reweight import kmeans_groups, load_reference, train_proxy

    ids, images, labels, num_classes = _subset_arrays(inputs)
    rw = cfg.reweight
    groups = labels
    if rw.groups == "kmeans":
        from dedt.encoders.streaming import read_embeddings

        emb_ids, embeddings, _ = read_embeddings(inputs["encode"].file(EMBEDDINGS))
        groups = kmeans_groups(embeddings[np.isin(emb_ids, ids)], rw.clusters, seed=cfg.seed)
        write_parquet(pa.table({"sample_id": ids, "group": groups}), out.file(GROUPS))
    k = int(groups.max()) + 1
    if rw.reference_path:
        reference = load_reference(rw.reference_path, in_channels=images.shape[1], resolution=images.shape[2])
    else:
        reference = load_model(inputs["reference"].path, ema=True)
    rounds, weights, seconds = [], None, 0.0
    for r in range(rw.rounds):
        if r > 0:
            ref_options = cfg.train.model_copy(update={"budget_kimg": rw.reference_kimg})
            ref_dir = out.path / f"round{r}-reference"
            seconds += train(images, groups, ref_options, ref_dir, num_classes=k, class_weights=weights,
                             seed=cfg.seed + r, progress=False)["seconds"]
            reference = load_model(ref_dir, ema=True)
        result = train_proxy(images, labels, groups, reference, cfg.train, num_classes=num_classes,
                             budget_kimg=rw.proxy_kimg, eta=rw.eta, smoothing=rw.smoothing, seed=cfg.seed + r,
                             t_range=(rw.t_min_frac, rw.t_max_frac))
        weights, seconds = result.weights, seconds + result.seconds
        rounds.append(result)
    counts = np.bincount(groups, minlength=k)
    write_parquet(pa.table({"group": np.arange(k, dtype=np.int32), "weight": weights,
                            "samples_in_subset": counts.astype(np.int64)}), out.file(WEIGHTS), {"eta": rw.eta})
    steps = np.concatenate([np.repeat(np.arange(len(res.alphas), dtype=np.int64), k) for res in rounds])
    write_parquet(pa.table({
        "round": np.concatenate([np.full(res.alphas.size, r, np.int32) for r, res in enumerate(rounds)]),
        "step": steps, "group": np.tile(np.arange(k, dtype=np.int32), len(steps) // k),
        "alpha": np.concatenate([res.alphas.ravel() for res in rounds]),
        "excess": np.concatenate([res.excess.ravel() for res in rounds])}), out.file(TRAJECTORY))
    from dedt.report import plot_weights

    plot_weights(weights, rounds[-1].alphas, out.file("weights.png"))
    warning = rounds[-1].warning
    if warning:
        import warnings

        warnings.warn(warning, stacklevel=1)
    return {"weights": [round(float(w), 4) for w in weights], "proxy_images_per_s": round(rounds[-1].images_per_s, 1),
            "proxy_seconds": round(seconds, 2), "warning": warning, "groups": rw.groups}


def run_classifier(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.metrics import frechet_distance, gaussian_stats
    from dedt.metrics.classifier import accuracy, features, save_classifier, train_classifier

    manifest = inputs["data"].file(MANIFEST)
    _, x_train, y_train = load_split(manifest, "train")
    _, x_hold, y_hold = load_split(manifest, "holdout")
    num_classes = len(class_names(manifest))
    model = train_classifier(x_train, y_train, num_classes, epochs=cfg.evaluate.classifier_epochs, seed=cfg.seed)
    save_classifier(model, out.file("classifier.safetensors"), x_train.shape[1], num_classes)
    summary: dict[str, Any] = {"train_accuracy": round(accuracy(model, x_train, y_train), 4)}
    if len(x_hold) > 1:
        summary["holdout_accuracy"] = round(accuracy(model, x_hold, y_hold), 4)
        # The real-data floor: FD between held-out and training reals in this feature space.
        floor = frechet_distance(*gaussian_stats(features(model, x_hold)), *gaussian_stats(features(model, x_train)))
        summary["real_floor_fd"] = round(float(floor), 4)
    return summary


def run_evaluate(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Sample per class from the EMA model, then FD to the full real train split, overall and per class."""
    from dedt.data.manifest import encode_png
    from dedt.diffusion.presets import build_scheduler
    from dedt.diffusion.sample import sample, save_grid
    from dedt.diffusion.train import load_model
    from dedt.metrics import frechet_distance, gaussian_stats
    from dedt.metrics.classifier import features, load_classifier
    from dedt.metrics.classifier import predict as classifier_predict

    manifest = inputs["data"].file(MANIFEST)
    _, real, real_labels = load_split(manifest, "train")
    names = class_names(manifest)
    model = load_model(inputs["model"].path, ema=True)
    preset = json.loads(inputs["model"].file("config.json").read_text())["train"]["preset"]
    s = cfg.sample
    fake_labels = np.repeat(np.arange(len(names), dtype=np.int64), s.per_class)
    conditional = model.config.num_class_embeds is not None
    fake = sample(model, build_scheduler(preset), fake_labels if conditional else None,
                  num=len(fake_labels), method=s.method, steps=s.steps, seed=cfg.seed, batch_size=s.batch_size,
                  progress=False)
    classifier = load_classifier(inputs["classifier"].file("classifier.safetensors"))
    if not conditional:  # unconditional samples are bucketed into classes by the classifier
        fake_labels = classifier_predict(classifier, fake)
    save_grid(fake[np.concatenate([np.flatnonzero(fake_labels == c)[:8] for c in range(len(names))])],
              out.file("grid.png"), nrow=8)
    f_real, f_fake = features(classifier, real), features(classifier, fake)
    rows = [("fd", "classifier", "all", frechet_distance(*gaussian_stats(f_fake), *gaussian_stats(f_real)),
             len(f_real), len(f_fake))]
    for c, name in enumerate(names):
        r, f = f_real[real_labels == c], f_fake[fake_labels == c]
        # Too few bucketed samples for a covariance: reported as NaN rather than a made-up value.
        value = frechet_distance(*gaussian_stats(f), *gaussian_stats(r)) if min(len(f), len(r)) > 1 else float("nan")
        rows.append(("fd", "classifier", name, value, len(r), len(f)))
    metric, space, cls, value, n_real, n_fake = zip(*rows)
    write_parquet(pa.table({"metric": list(metric), "feature_space": list(space), "class": list(cls),
                            "value": np.asarray(value, np.float64), "n_real": np.asarray(n_real, np.int64),
                            "n_fake": np.asarray(n_fake, np.int64), "seed": np.full(len(rows), cfg.seed, np.int64)}),
                  out.file(METRICS))
    pixels = np.clip(np.rint((fake + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    write_parquet(pa.table({"sample_id": np.arange(len(fake), dtype=np.int64), "label": fake_labels.astype(np.int32),
                            "image": pa.array([encode_png(p) for p in pixels], pa.binary())}), out.file(SAMPLES))
    per_class = {name: round(float(v), 4) for name, v in zip(cls[1:], value[1:])}
    return {"fd": round(float(value[0]), 4), "fd_per_class": per_class, "n_fake": len(fake)}
