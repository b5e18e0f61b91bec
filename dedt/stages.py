"""One function per stage: read the input artifacts, call the library, write this stage's files.

Each takes ``(cfg, inputs, out)``, where ``inputs`` maps a role to the input stage's folder,
writes only inside ``out.path`` (atomically) and returns a small JSON summary. The completion
marker is written by ``dedt.pipeline.run_node`` after it returns. The long loops (training, the
DRO proxy, sampling, encoding) report progress to ``dedt.progress.current()``, set by the caller.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from dedt import progress
from dedt.config import PipelineConfig
from dedt.data.manifest import class_names, holdout_mask, load_split, prepare_images, write_manifest
from dedt.data.sources import load_source
from dedt.errors import DedtError
from dedt.store import StageDir, atomic_write_text, read_parquet, write_parquet

MANIFEST, EMBEDDINGS, SCORES, SUBSET = "manifest.parquet", "embeddings.parquet", "scores.parquet", "subset.parquet"
WEIGHTS, TRAJECTORY, METRICS, SAMPLES = "weights.parquet", "trajectory.parquet", "metrics.parquet", "samples.parquet"
GROUPS, CURVE, DUPLICATES = "groups.parquet", "curve.parquet", "duplicates.parquet"


def run_data(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    ds = cfg.dataset
    raw = load_source(ds.source, ds.path)
    holdout = holdout_mask(raw.labels, ds.holdout_frac, cfg.seed)
    columns, contamination = {}, {}
    if ds.contaminate.active:  # dirty data on purpose, with its ground truth columns (dedt.data.contaminate)
        from dedt.data.contaminate import contaminate

        dirty = contaminate(raw, holdout, ds.contaminate)
        raw, holdout, columns = dirty.raw, dirty.holdout, dirty.columns()
        contamination = {"contaminants": dirty.counts()}
    images = prepare_images(raw, ds.resolution, ds.channels)
    meta = {"source": ds.source, "resize": "PIL bicubic"} | contamination
    write_manifest(raw, images, holdout, out.file(MANIFEST), meta, columns)
    return {"n_train": int((~holdout).sum()), "n_holdout": int(holdout.sum()), "shape": list(images.shape[1:]),
            "classes": len(raw.class_names), **contamination}


def run_encode(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.encoders import get_encoder
    from dedt.encoders.streaming import encode_to_parquet

    ids, images, _ = load_split(inputs["data"].file(MANIFEST))
    enc = cfg.encode
    encoder = get_encoder(enc.encoder, weights=enc.weights, device=enc.device, seed=cfg.seed, dim=enc.dim)
    meta = encode_to_parquet(images, len(images), ids, encoder, out.file(EMBEDDINGS), out.path / "shards",
                             batch_size=enc.batch_size, shard_size=enc.shard_size, progress=False,
                             on_progress=progress.current())
    return {"n": len(ids), **meta}


def run_score(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.encoders.streaming import read_embeddings
    from dedt.scoring import score

    ids, embeddings, _ = read_embeddings(inputs["encode"].file(EMBEDDINGS))
    manifest_ids, _, labels = _train_labels(inputs["data"])
    if not np.array_equal(ids, manifest_ids):
        raise DedtError(f"{inputs['encode'].file(EMBEDDINGS)} covers other samples than the manifest; re-run encode")
    sc = cfg.score
    params = {"k": sc.k, "index": sc.index, "nprobe": sc.nprobe} if sc.method == "knn" else {}
    scores = score(cfg.score.method, embeddings, labels, per_class=cfg.score.per_class, seed=cfg.seed, **params)
    table = pa.table({"sample_id": ids, "label": labels.astype(np.int32), "score": scores.astype(np.float64)})
    write_parquet(table, out.file(SCORES), {"method": cfg.score.method, "params": cfg.score.model_dump()})
    return {"n": len(ids), "method": cfg.score.method}


def run_select(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.selection import kept_per_class, select

    if "score" in inputs:
        table = read_parquet(inputs["score"].file(SCORES), ("sample_id", "label", "score"))
        ids, labels = table.column("sample_id").to_numpy(), table.column("label").to_numpy().astype(np.int64)
        scores = table.column("score").to_numpy()
    else:  # keep_frac 1: everything is kept, so nothing was scored; all scores tie (rank = sample id order)
        ids, _, labels = _train_labels(inputs["data"])
        scores = np.zeros(len(ids))
    pool, cleaning = np.arange(len(ids)), {}
    if cfg.select.cleans:  # near-duplicate removal and outlier trimming before the keep rule (dedt.dedup)
        pool, cleaning = _clean(cfg, inputs["encode"], ids, labels, scores, out)
    levers = {}
    if "score" in inputs and (cfg.select.stratifies or "reweight" in inputs):  # dedt.stratify
        kept, levers = _stratified(cfg, inputs, ids, labels, scores, pool)
    else:
        kept = pool[select(scores[pool], labels[pool], cfg.select.keep_frac, per_class=cfg.select.per_class)]
    order = np.lexsort((ids, -scores))  # rank 0 = highest score, ties by sample id
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    per_class = {str(k): int(v) for k, v in kept_per_class(kept, labels).items()}
    subset = pa.table({"sample_id": ids[kept], "label": labels[kept].astype(np.int32),
                       "score": scores[kept], "rank": rank[kept]})
    write_parquet(subset, out.file(SUBSET), {"keep_frac": cfg.select.keep_frac, "kept_per_class": per_class}
                  | cleaning | levers)
    return {"kept": len(kept), "of": len(ids), "kept_per_class": per_class, **cleaning, **levers}


def _stratified(cfg: PipelineConfig, inputs: dict[str, StageDir], ids: np.ndarray, labels: np.ndarray,
                scores: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Kept rows under k-means strata (the embeddings) and/or counts from the DRO class weights (the reweight
    stage, learned on the full data), and what set them."""
    from dedt.encoders.streaming import read_embeddings
    from dedt.stratify import select_stratified

    sel, embeddings, weights, levers = cfg.select, None, None, {}
    if sel.stratifies:
        emb_ids, embeddings, _ = read_embeddings(inputs["encode"].file(EMBEDDINGS))
        if not np.array_equal(emb_ids, ids):
            raise DedtError(f"{inputs['encode'].file(EMBEDDINGS)} covers other samples than the scores; re-run "
                            "encode and score")
        embeddings = embeddings[pool]
        levers["strata"] = {"k": sel.strata_k, "within": sel.within}
    if "reweight" in inputs:
        weights = read_weights(inputs["reweight"])
        levers["class_weights"] = [round(float(w), 6) for w in weights]
    kept = select_stratified(scores[pool], labels[pool], sel.keep_frac, per_class=sel.per_class,
                             embeddings=embeddings, strata_k=sel.strata_k if sel.stratifies else None,
                             within=sel.within if sel.stratifies else "score", band=(sel.band_low, sel.band_high),
                             class_weights=weights, seed=cfg.seed)
    return pool[kept], levers


def _clean(cfg: PipelineConfig, encode: StageDir, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray,
           out: StageDir) -> tuple[np.ndarray, dict[str, int]]:
    """Rows left for the keep rule after near-duplicate removal and trimming, and what each removed; the
    near-duplicate groups go to duplicates.parquet."""
    from dedt.dedup import clean, group_table
    from dedt.encoders.streaming import read_embeddings

    emb_ids, embeddings, _ = read_embeddings(encode.file(EMBEDDINGS))
    if not np.array_equal(emb_ids, ids):
        raise DedtError(f"{encode.file(EMBEDDINGS)} covers other samples than the scores; re-run encode and score")
    sel = cfg.select
    cleaned = clean(embeddings, scores, labels, dedup_threshold=sel.dedup_threshold,
                    trim_outliers_frac=sel.trim_outliers_frac, per_class=sel.per_class)
    if sel.dedup_threshold is not None:
        write_parquet(pa.table(group_table(ids, cleaned)), out.file(DUPLICATES), {"threshold": sel.dedup_threshold})
    return np.flatnonzero(cleaned.kept), {"removed_duplicates": int(cleaned.duplicate.sum()),
                                          "trimmed_outliers": int(cleaned.trimmed.sum())}


def _train_labels(data: StageDir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return load_split(data.file(MANIFEST))


def _subset_arrays(inputs: dict[str, StageDir]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Images and labels of the kept subset (or the whole train split without a select input); with a
    latents input (latent diffusion) the images are the VAE latents of those samples."""
    ids, images, labels = _train_labels(inputs["data"])
    if "latents" in inputs:
        from dedt.diffusion.latents import read_latents

        images = read_latents(inputs["latents"].path, ids)
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
    budget = cfg.subset_budget_kimg if "select" in inputs else cfg.reweight.reference_kimg
    options = cfg.train.model_copy(update={"budget_kimg": budget})
    weights = read_weights(inputs["reweight"]) if "reweight" in inputs else None
    groups = _groups_of(inputs, labels, ids)
    num_groups = num_classes if groups is labels else len(weights)
    result = train(images, groups, options, out.path, num_classes=num_groups, class_weights=weights,
                   seed=cfg.seed, progress=False, on_progress=progress.current())
    return {"n_images": len(images), **result}


def run_latents(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Latent diffusion: encode the train split once with the VAE of ``train.vae_path`` (posterior mean,
    scaled); writes latents.npy (float32 (N, c, h, w)) and latent_ids.npy (int64 sample ids)."""
    from dedt.diffusion.latents import encode_latents, latent_scale, load_vae, write_latents
    from dedt.diffusion.train import resolve_device

    ids, images, _ = _train_labels(inputs["data"])
    device = resolve_device(cfg.train.device)
    vae = load_vae(cfg.train.vae_path, device=device)
    latents = encode_latents(images, vae, cfg.encode.batch_size, device=device, on_progress=progress.current())
    write_latents(out.path, ids, latents)
    scale, shift = latent_scale(vae)
    return {"n": len(ids), "shape": list(latents.shape[1:]), "scaling_factor": scale, "shift_factor": shift,
            "vae_path": cfg.train.vae_path, "mean": round(float(latents.mean()), 4), "std": round(float(latents.std()), 4)}


def run_reference_checkpoint(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Check a local diffusers reference fits the data; the reweight stage loads it from its path."""
    from dedt.reweight import load_reference

    shape = json.loads(inputs["data"].file("summary.json").read_text())["shape"]
    if "latents" in inputs:  # a latent-space UNet: (c, h, w) of the latents as (h, w, c)
        c, h, w = json.loads(inputs["latents"].file("summary.json").read_text())["shape"]
        shape = [h, w, c]
    load_reference(cfg.reweight.reference_path, in_channels=shape[2], resolution=shape[0])
    return {"reference_path": cfg.reweight.reference_path}


def run_reweight(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Group DRO (PAPER.md section 4), optionally iterated: each further round re-trains the reference
    on the full train split, drawn by the previous round's weights, then re-runs the proxy.

    Every model is conditioned on the class labels (when conditional); the groups, classes or
    k-means clusters, only say what is weighted. A group with no sample in the proxy's data gets
    weight 0.
    """
    import time

    from dedt.diffusion.train import load_model, resolve_device
    from dedt.reweight import DEFAULT_ETA, kmeans_groups, load_reference, train_proxy, train_reference

    ids, images, labels, num_classes = _subset_arrays(inputs)
    rw, device = cfg.reweight, resolve_device(cfg.train.device)
    eta = DEFAULT_ETA[rw.excess] if rw.eta is None else rw.eta
    groups, k = labels, num_classes
    if rw.groups == "kmeans":
        from dedt.encoders.streaming import read_embeddings

        emb_ids, embeddings, _ = read_embeddings(inputs["encode"].file(EMBEDDINGS))
        all_groups = kmeans_groups(embeddings, rw.clusters, seed=cfg.seed, fit=np.isin(emb_ids, ids))
        groups, k = all_groups[np.isin(emb_ids, ids)], rw.clusters
        write_parquet(pa.table({"sample_id": ids, "group": groups}), out.file(GROUPS))
    if rw.reference_path:
        reference = load_reference(rw.reference_path, in_channels=images.shape[1], resolution=images.shape[2])
    else:
        reference = load_model(inputs["reference"].path, ema=True, device=device)
    rounds, weights, seconds = [], None, 0.0
    for r in range(rw.rounds):
        if r > 0:  # the reference's data is the full train split, as in the first round
            start = time.perf_counter()
            full_ids, full_images, full_labels, _ = _subset_arrays({role: stage for role, stage in inputs.items()
                                                                        if role != "select"})
            full_groups = full_labels if rw.groups == "class" else all_groups[np.isin(emb_ids, full_ids)]
            ref_options = cfg.train.model_copy(update={"budget_kimg": rw.reference_kimg})
            reference = train_reference(full_images, full_labels, full_groups, weights, ref_options,
                                        num_classes=num_classes, seed=cfg.seed + r)
            seconds += time.perf_counter() - start
        result = train_proxy(images, labels, groups, reference, cfg.train, num_classes=num_classes,
                             budget_kimg=rw.proxy_kimg, eta=eta, smoothing=rw.smoothing, seed=cfg.seed + r,
                             t_range=(rw.t_min_frac, rw.t_max_frac), num_groups=k,
                             excess=rw.excess, timesteps=rw.timesteps, device=device,
                             on_progress=progress.current())
        weights, seconds = result.weights, seconds + result.seconds
        rounds.append(result)
    counts = np.bincount(groups, minlength=k)
    write_parquet(pa.table({"group": np.arange(k, dtype=np.int32), "weight": weights,
                            "samples_in_subset": counts.astype(np.int64)}), out.file(WEIGHTS),
                  {"eta": eta, "excess": rw.excess})
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
    """Sample per class from the EMA model, then every metric of ``dedt.evaluate`` in each feature space,
    against the full real train split and, for a model trained on the kept subset (a select input), that subset.

    Writes metrics.parquet, samples.parquet, grid.png, class_fd.png and report.md; the reference
    statistics go to the shared ``refstats`` cache of the store.
    """
    from dedt import evaluate
    from dedt.data.manifest import encode_png
    from dedt.diffusion.sample import save_grid
    from dedt.diffusion.train import load_model
    from dedt.metrics.registry import feature_space, to_uint8
    from dedt.report import MODEL_LABELS, plot_class_bars
    from dedt.store import atomic_write_text

    manifest = inputs["data"].file(MANIFEST)
    names = class_names(manifest)
    counts = json.loads(inputs["data"].file("summary.json").read_text())
    subset_ids = (read_parquet(inputs["select"].file(SUBSET), ("sample_id",)).column("sample_id").to_numpy()
                  if "select" in inputs else None)
    ev, s = cfg.evaluate, cfg.sample
    fake_labels = np.repeat(np.arange(len(names), dtype=np.int64), s.per_class)
    evaluate.check_sample_counts(len(fake_labels), {"real train images": counts["n_train"]} | (
        {"images in the kept subset": len(subset_ids)} if subset_ids is not None else {}), ev.prdc_k)
    classifier_file = inputs["classifier"].file("classifier.safetensors")
    spaces = [feature_space(name, classifier=classifier_file) for name in ev.feature_spaces]
    model_config = json.loads(inputs["model"].file("config.json").read_text())
    model = load_model(inputs["model"].path, ema=True)
    fake, fake_labels = generate(cfg, model, model_config["train"]["preset"], fake_labels, classifier_file,
                                 s.bank_seed)
    save_grid(fake[np.concatenate([np.flatnonzero(fake_labels == c)[:8] for c in range(len(names))])],
              out.file("grid.png"), nrow=8)
    from dedt.data.contaminate import duplicated_ids

    source = evaluate.RealSource(out.root, inputs["data"].fingerprint, lambda split: load_split(manifest, split),
                                 subset_ids, counts["n_holdout"],
                                 duplicated_ids(manifest) if cfg.dataset.contaminate.active else None)
    rows = evaluate.evaluate_samples(fake, fake_labels, spaces, source, names, prdc_k=ev.prdc_k, with_kid=ev.kid,
                                     seed=cfg.seed, pixels=True)
    evaluate.write_metrics(rows, cfg.seed, out.file(METRICS))
    write_parquet(pa.table({"sample_id": np.arange(len(fake), dtype=np.int64), "label": fake_labels.astype(np.int32),
                            "image": pa.array([encode_png(p) for p in to_uint8(fake)], pa.binary())}),
                  out.file(SAMPLES))
    references = ("full", "subset") if subset_ids is not None else ("full",)
    plot_class_bars({f"vs {ref}": evaluate.per_class_fd(rows, ev.feature_spaces[0], ref) for ref in references},
                    out.file("class_fd.png"), title=f"per-class FD, {ev.feature_spaces[0]} features")
    model_key = model_config.get("key", inputs["model"].fingerprint)
    title = f"{cfg.name}, {MODEL_LABELS.get(model_key, model_key)} model"
    atomic_write_text(out.file("report.md"), evaluate.report_markdown(
        rows, title=title, seed=cfg.seed, images={"samples": "grid.png", "per-class FD": "class_fd.png"}))
    return {**evaluate.summary(rows, ev.feature_spaces), "n_fake": len(fake)}


def generate(cfg: PipelineConfig, model: Any, preset: str, labels: np.ndarray, classifier_file: Any,
             bank_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples of ``model`` from the noise bank ``bank_seed`` (sample i's start noise depends on (seed, i)
    only: every model drawing from one bank sees the same noises), as images with their class labels;
    an unconditional model's samples are labelled by the classifier."""
    from dedt.diffusion.presets import build_scheduler
    from dedt.diffusion.sample import sample
    from dedt.diffusion.train import resolve_device
    from dedt.metrics.classifier import load_classifier
    from dedt.metrics.classifier import predict as classifier_predict

    s, device = cfg.sample, resolve_device(cfg.train.device)
    conditional = model.config.num_class_embeds is not None
    latent = cfg.train.latent  # latent diffusion: unclipped latents, decoded to images before any metric
    fake = sample(model, build_scheduler(preset, latent=latent), labels if conditional else None, num=len(labels),
                  method=s.method, steps=s.steps, seed=bank_seed, batch_size=s.batch_size, device=device,
                  progress=False, on_progress=progress.current())
    if latent:
        from dedt.diffusion.latents import decode_latents

        fake = decode_latents(fake, cfg.train.vae_path, s.batch_size, device=device)
    if not conditional:
        labels = classifier_predict(load_classifier(classifier_file), fake)
    return fake, labels


def run_calibrate(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Seconds per training image and per DRO proxy image, measured side by side (``dedt.calibrate``):
    the exchange rate from images seen to seconds of every time-to-quality figure."""
    from dedt.calibrate import measure_costs

    shape = json.loads(inputs["data"].file("summary.json").read_text())["shape"]
    if "latents" in inputs:
        shape = json.loads(inputs["latents"].file("summary.json").read_text())["shape"]
    else:  # the manifest's (h, w, c) -> (c, h, w)
        shape = [shape[2], shape[0], shape[1]]
    num_classes = len(class_names(inputs["data"].file(MANIFEST)))
    return measure_costs(tuple(shape), num_classes, cfg.train, seed=cfg.seed)


def run_curve(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """The model's time-to-quality curve: FD, precision, recall and per-class FD of each EMA snapshot
    (first feature space, against the full train split), every one sampled from the same noise bank
    as the evaluate stage, whose metrics give the final point; the final model is also sampled from a
    second bank, to measure the FD's own sampling noise. Writes curve.parquet.

    Points already computed (``points/<nimg>.json``) are kept, so a killed stage resumes."""
    from dedt import evaluate
    from dedt.diffusion.snapshots import list_snapshots
    from dedt.diffusion.train import load_model
    from dedt.metrics.registry import feature_space

    manifest = inputs["data"].file(MANIFEST)
    names = class_names(manifest)
    counts = json.loads(inputs["data"].file("summary.json").read_text())
    ev = cfg.evaluate
    classifier_file = inputs["classifier"].file("classifier.safetensors")
    space = feature_space(ev.feature_spaces[0], classifier=classifier_file)
    source = evaluate.RealSource(out.root, inputs["data"].fingerprint, lambda split: load_split(manifest, split),
                                 None, counts["n_holdout"])
    model_dir = inputs["model"].path
    preset = json.loads(inputs["model"].file("config.json").read_text())["train"]["preset"]
    labels = np.repeat(np.arange(len(names), dtype=np.int64), cfg.sample.per_class)
    train_summary = json.loads(inputs["model"].file("summary.json").read_text())
    final = {"nimg": int(train_summary["nimg"]), "seconds": float(train_summary["seconds"])}
    points_dir = out.path / "points"
    points_dir.mkdir(exist_ok=True)

    from safetensors.torch import load_file

    model = load_model(model_dir, ema=True)  # one UNet; each point loads its weights into it
    final_weights = {k: v.clone() for k, v in model.state_dict().items()}

    def measure(weights: Any, bank_seed: int) -> dict[str, Any]:
        model.load_state_dict(final_weights if weights is None else load_file(weights))
        fake, fake_labels = generate(cfg, model, preset, labels, classifier_file, bank_seed)
        rows = evaluate.evaluate_samples(fake, fake_labels, [space], source, names, prdc_k=ev.prdc_k,
                                         with_kid=False, seed=cfg.seed)
        return _curve_point(rows, space.name)

    def cached(name: str, compute: Any) -> dict[str, Any]:
        path = points_dir / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        atomic_write_text(path, json.dumps(value, sort_keys=True))
        return value

    records = []
    for snap in list_snapshots(model_dir):
        point = cached(f"{snap.nimg:012d}", lambda snap=snap: measure(snap.weights, cfg.sample.bank_seed))
        records.append({"nimg": snap.nimg, "seconds": snap.seconds, **point, "fd_bank2": None, "final": False})
    end = _curve_point(evaluate.read_metrics(inputs["evaluate"].file(METRICS)), ev.feature_spaces[0])
    second = cached("final-bank2", lambda: measure(None, cfg.sample.bank_seed + 1))
    records.append({**final, **end, "fd_bank2": second["fd"], "final": True})

    def stage_seconds(*roles: str) -> float:
        return sum(json.loads(inputs[r].file("summary.json").read_text())["seconds"] for r in roles if r in inputs)

    overhead = stage_seconds("encode", "score", "select", "reweight")
    reference = stage_seconds("reference")
    table = pa.table({
        "kimg": [r["nimg"] / 1000 for r in records],
        "train_seconds": [r["seconds"] for r in records],
        "overhead_seconds": [overhead] * len(records),
        "reference_seconds": [reference] * len(records),
        "fd": [r["fd"] for r in records],
        "precision": [r["precision"] for r in records],
        "recall": [r["recall"] for r in records],
        "fd_per_class": [json.dumps(r["fd_per_class"]) for r in records],
        "fd_bank2": pa.array([r["fd_bank2"] for r in records], pa.float64()),
        "final": [r["final"] for r in records],
    })
    write_parquet(table, out.file(CURVE), {"feature_space": ev.feature_spaces[0], "n_fake": len(labels),
                                           "bank_seed": cfg.sample.bank_seed})
    return {"points": len(records), "kimg": table.column("kimg").to_pylist(), "fd": table.column("fd").to_pylist(),
            "fd_bank2": second["fd"], "overhead_seconds": overhead, "reference_seconds": reference}


def _curve_point(rows: list[Any], space: str) -> dict[str, Any]:
    from dedt import evaluate

    def value(metric: str) -> float | None:
        found = evaluate.lookup(rows, metric, space)
        return None if found is None else float(found)

    return {"fd": value("fd"), "precision": value("precision"), "recall": value("recall"),
            "fd_per_class": {c: (None if v != v else float(v)) for c, v in evaluate.per_class_fd(rows, space).items()}}
