"""One function per stage: read the input artifacts, call the library, write this stage's files.

Each takes ``(cfg, inputs, out)``, where ``inputs`` maps a role to the input stage's folder,
writes only inside ``out.path`` (atomically) and returns a small JSON summary. The completion
marker is written by ``dedt.pipeline.run_node`` after it returns. The long loops (training, the
DRO proxy, sampling, encoding) report progress to ``dedt.progress.current()``, set by the caller.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from dedt import progress
from dedt.artifacts import (
    CLASSIFIER,
    CONFIG,
    CURVE,
    DUPLICATES,
    EMBEDDINGS,
    GROUPS,
    MANIFEST,
    METRICS,
    SAMPLES,
    SCORES,
    SUBSET,
    TRAJECTORY,
    WEIGHTS,
    WEIGHTS_PLOT,
    image_shape,
    read_summary,
    read_weights,
    subset_ids,
)
from dedt.config import PipelineConfig
from dedt.data.manifest import class_names, holdout_mask, load_split, prepare_images, write_manifest
from dedt.data.sources import load_source
from dedt.errors import DedtError
from dedt.store import StageDir, atomic_write_text


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
    write_manifest(raw, images, holdout, MANIFEST.path(out), meta, columns)
    return {
        "n_train": int((~holdout).sum()),
        "n_holdout": int(holdout.sum()),
        "shape": list(images.shape[1:]),
        "classes": len(raw.class_names),
        **contamination,
    }


def run_clean_data(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """A contaminated pipeline's uncontaminated source: the reals and the classifier its models are measured
    with, the same stage (and fingerprint) as a clean pipeline's data."""
    clean = cfg.dataset.model_copy(update={"contaminate": type(cfg.dataset.contaminate)()})
    return run_data(cfg.model_copy(update={"dataset": clean}), inputs, out)


def run_encode(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.encoders import get_encoder
    from dedt.encoders.streaming import encode_to_parquet

    ids, images, _ = load_split(MANIFEST.path(inputs["data"]))
    enc = cfg.encode
    encoder = get_encoder(enc.encoder, weights=enc.weights, device=enc.device, seed=cfg.seed, dim=enc.dim)
    meta = encode_to_parquet(
        images,
        len(images),
        ids,
        encoder,
        EMBEDDINGS.path(out),
        out.path / "shards",
        batch_size=enc.batch_size,
        shard_size=enc.shard_size,
        progress=False,
        on_progress=progress.current(),
    )
    return {"n": len(ids), **meta}


def run_score(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.encoders.streaming import read_embeddings
    from dedt.scoring import score

    by_model = "reference" in inputs  # score.method: difficulty, by the reference model (no embeddings)
    if by_model:
        ids, labels, scores = _difficulty_scores(cfg, inputs)
    else:
        ids, embeddings, _ = read_embeddings(EMBEDDINGS.path(inputs["encode"]))
        manifest_ids, _, labels = _train_labels(inputs["data"])
        if not np.array_equal(ids, manifest_ids):
            raise DedtError(
                f"{EMBEDDINGS.path(inputs['encode'])} covers other samples than the manifest; re-run encode"
            )
        sc = cfg.score
        params = {"k": sc.k, "index": sc.index, "nprobe": sc.nprobe} if sc.method == "knn" else {}
        scores = score(cfg.score.method, embeddings, labels, per_class=cfg.score.per_class, seed=cfg.seed, **params)
    table = pa.table({"sample_id": ids, "label": labels.astype(np.int32), "score": scores.astype(np.float64)})
    params = cfg.score.model_dump(exclude=set() if by_model else {"draws"})
    SCORES.write(out, table, {"method": cfg.score.method, "params": params})
    return {"n": len(ids), "method": cfg.score.method} | ({"draws": cfg.score.draws} if by_model else {})


def _difficulty_scores(cfg: PipelineConfig, inputs: dict[str, StageDir]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, labels and difficulty scores (``dedt.difficulty``: minus the mean normalised denoising loss under
    the reference, on one bank of score.draws (t, noise) pairs seeded by the pipeline's seed) of the train
    split; with a latents input the reference denoises the VAE latents, as it was trained to."""
    from dedt.difficulty import difficulty_scores
    from dedt.diffusion.presets import build_scheduler
    from dedt.diffusion.train import load_model, resolve_device
    from dedt.reweight import load_reference

    ids, images, labels, _ = _subset_arrays({r: d for r, d in inputs.items() if r in ("data", "latents")})
    device = resolve_device(cfg.train.device)
    if cfg.reweight.reference_path:
        model = load_reference(cfg.reweight.reference_path, in_channels=images.shape[1], resolution=images.shape[2])
    else:
        model = load_model(inputs["reference"].path, ema=True, device=device)
    scores = difficulty_scores(
        model,
        build_scheduler(cfg.train.preset, latent=cfg.train.latent),
        images,
        labels,
        draws=cfg.score.draws,
        seed=cfg.seed,
        per_class=cfg.score.per_class,
        batch_size=cfg.sample.batch_size,
        device=device,
        on_progress=progress.current(),
    )
    return ids, labels, scores


def run_select(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.selection import kept_per_class, select

    if "score" in inputs:
        table = SCORES.read(inputs["score"])
        ids, labels = table.column("sample_id").to_numpy(), table.column("label").to_numpy().astype(np.int64)
        scores = table.column("score").to_numpy()
    else:  # keep_frac 1: everything is kept, so nothing was scored; all scores tie (rank = sample id order)
        ids, _, labels = _train_labels(inputs["data"])
        scores = np.zeros(len(ids))
    pool, cleaning = np.arange(len(ids)), {}
    if cfg.select.cleans:  # near-duplicate removal and outlier trimming before the keep rule (dedt.dedup)
        pool, cleaning = _clean(cfg, inputs["encode"], ids, labels, scores, out)
    levers = {}
    if "score" in inputs and (cfg.select.stratifies or cfg.select.bands or "reweight" in inputs):  # dedt.stratify
        kept, levers = _stratified(cfg, inputs, ids, labels, scores, pool)
    else:
        kept = pool[select(scores[pool], labels[pool], cfg.select.keep_frac, per_class=cfg.select.per_class)]
    order = np.lexsort((ids, -scores))  # rank 0 = highest score, ties by sample id
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    per_class = {str(k): int(v) for k, v in kept_per_class(kept, labels).items()}
    subset = pa.table(
        {"sample_id": ids[kept], "label": labels[kept].astype(np.int32), "score": scores[kept], "rank": rank[kept]}
    )
    SUBSET.write(out, subset, {"keep_frac": cfg.select.keep_frac, "kept_per_class": per_class} | cleaning | levers)
    return {"kept": len(kept), "of": len(ids), "kept_per_class": per_class, **cleaning, **levers}


def _stratified(
    cfg: PipelineConfig,
    inputs: dict[str, StageDir],
    ids: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    pool: np.ndarray,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Kept rows under k-means strata (the embeddings), a score band and/or counts from the DRO class weights
    (the reweight stage, learned on the full data), and what set them."""
    from dedt.encoders.streaming import read_embeddings
    from dedt.stratify import select_stratified

    sel, embeddings, weights, levers = cfg.select, None, None, {}
    if sel.stratifies:
        emb_ids, embeddings, _ = read_embeddings(EMBEDDINGS.path(inputs["encode"]))
        if not np.array_equal(emb_ids, ids):
            raise DedtError(
                f"{EMBEDDINGS.path(inputs['encode'])} covers other samples than the scores; re-run encode and score"
            )
        embeddings = embeddings[pool]
        levers["strata"] = {"k": sel.strata_k, "within": sel.within}
    elif sel.bands:  # the band in each class (or of all)
        levers["band"] = [sel.band_low, sel.band_high]
    if "reweight" in inputs:
        weights = read_weights(inputs["reweight"])
        levers["class_weights"] = [round(float(w), 6) for w in weights]
    kept = select_stratified(
        scores[pool],
        labels[pool],
        sel.keep_frac,
        per_class=sel.per_class,
        embeddings=embeddings,
        strata_k=sel.strata_k if sel.stratifies else None,
        within=sel.within if sel.stratifies or sel.bands else "score",
        band=(sel.band_low, sel.band_high),
        class_weights=weights,
        seed=cfg.seed,
    )
    return pool[kept], levers


def _clean(
    cfg: PipelineConfig, encode: StageDir, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray, out: StageDir
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows left for the keep rule after near-duplicate removal and trimming, and what each removed; the
    near-duplicate groups go to duplicates.parquet."""
    from dedt.dedup import clean, group_table
    from dedt.encoders.streaming import read_embeddings

    emb_ids, embeddings, _ = read_embeddings(EMBEDDINGS.path(encode))
    if not np.array_equal(emb_ids, ids):
        raise DedtError(f"{EMBEDDINGS.path(encode)} covers other samples than the scores; re-run encode and score")
    sel = cfg.select
    cleaned = clean(
        embeddings,
        scores,
        labels,
        dedup_threshold=sel.dedup_threshold,
        trim_outliers_frac=sel.trim_outliers_frac,
        per_class=sel.per_class,
    )
    if sel.dedup_threshold is not None:
        DUPLICATES.write(out, pa.table(group_table(ids, cleaned)), {"threshold": sel.dedup_threshold})
    return np.flatnonzero(cleaned.kept), {
        "removed_duplicates": int(cleaned.duplicate.sum()),
        "trimmed_outliers": int(cleaned.trimmed.sum()),
    }


def _train_labels(data: StageDir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return load_split(MANIFEST.path(data))


def _subset_arrays(inputs: dict[str, StageDir]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Images and labels of the kept subset (or the whole train split without a select input); with a
    latents input (latent diffusion) the images are the VAE latents of those samples."""
    ids, images, labels = _train_labels(inputs["data"])
    if "latents" in inputs:
        from dedt.diffusion.latents import read_latents

        images = read_latents(inputs["latents"].path, ids)
    num_classes = len(class_names(MANIFEST.path(inputs["data"])))
    if "select" in inputs:
        kept = subset_ids(inputs["select"])
        mask = np.isin(ids, kept)
        if mask.sum() != len(kept):
            raise DedtError(f"{SUBSET.path(inputs['select'])} names samples missing from the manifest; re-run select")
        ids, images, labels = ids[mask], images[mask], labels[mask]
    return ids, images, labels, num_classes


def _groups_of(inputs: dict[str, StageDir], labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sampling groups of these samples: the reweight stage's clusters when it made some, else labels."""
    if "reweight" not in inputs or not GROUPS.path(inputs["reweight"]).exists():
        return labels
    table = GROUPS.read(inputs["reweight"])
    lookup = dict(zip(table.column("sample_id").to_pylist(), table.column("group").to_pylist(), strict=False))
    return np.asarray([lookup[i] for i in ids], np.int64)


def run_train(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Train a DM; a reference (no select input) trains on the full train split."""
    from dedt.diffusion.launch import launch_train

    ids, images, labels, num_classes = _subset_arrays(inputs)
    budget = cfg.subset_budget_kimg if "select" in inputs else cfg.reweight.reference_kimg
    options = cfg.train.model_copy(update={"budget_kimg": budget})
    weights = read_weights(inputs["reweight"]) if "reweight" in inputs else None
    groups = _groups_of(inputs, labels, ids)
    num_groups = num_classes if groups is labels else len(weights)
    anneal = None
    if "select" in inputs and options.anneal_frac > 0:  # prune then anneal: the full split ends the run
        _, full_images, full_labels, _ = _subset_arrays({r: d for r, d in inputs.items() if r != "select"})
        # k-means groups go with an unconditional model, and the anneal phase draws no class weights: its
        # labels are never read, so all-zero labels stand in for the groups of images outside the subset
        anneal = (full_images, full_labels if groups is labels else np.zeros_like(full_labels))
    result = launch_train(
        images,
        groups,
        options,
        out.path,
        num_classes=num_groups,
        class_weights=weights,
        seed=cfg.seed,
        progress=False,
        on_progress=progress.current(),
        anneal_data=anneal,
    )  # on train.processes
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
    return {
        "n": len(ids),
        "shape": list(latents.shape[1:]),
        "scaling_factor": scale,
        "shift_factor": shift,
        "vae_path": cfg.train.vae_path,
        "mean": round(float(latents.mean()), 4),
        "std": round(float(latents.std()), 4),
    }


def run_reference_checkpoint(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Check a local diffusers reference fits the data; the reweight stage loads it from its path."""
    from dedt.reweight import load_reference

    channels, height, _ = _model_shape(inputs)
    load_reference(cfg.reweight.reference_path, in_channels=channels, resolution=height)
    return {"reference_path": cfg.reweight.reference_path}


def run_reweight(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Group DRO (PAPER.md section 4), optionally iterated: each further round re-trains the reference
    on the full train split, drawn by the previous round's weights, then re-runs the proxy.

    Every model is conditioned on the class labels (when conditional); the groups, classes or
    k-means clusters, only say what is weighted. A group with no sample in the proxy's data gets
    weight 0.
    """
    from dedt.diffusion.train import load_model, resolve_device
    from dedt.report import plot_weights
    from dedt.reweight import DEFAULT_ETA, iterated_dro, load_reference, trajectory_table, weights_table

    ids, images, labels, num_classes = _subset_arrays(inputs)
    rw, device = cfg.reweight, resolve_device(cfg.train.device)
    eta = DEFAULT_ETA[rw.excess] if rw.eta is None else rw.eta
    groups, k, group_of = labels, num_classes, None
    if rw.groups == "kmeans":
        group_of = _kmeans_groups(cfg, inputs["encode"], ids)
        groups, k = group_of(ids), rw.clusters
        GROUPS.write(out, pa.table({"sample_id": ids, "group": groups}))
    if rw.reference_path:
        reference = load_reference(rw.reference_path, in_channels=images.shape[1], resolution=images.shape[2])
    else:
        reference = load_model(inputs["reference"].path, ema=True, device=device)

    def full_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # a further round's reference: the full split
        full_ids, full_images, full_labels, _ = _subset_arrays({r: d for r, d in inputs.items() if r != "select"})
        return full_images, full_labels, full_labels if group_of is None else group_of(full_ids)

    rounds, seconds = iterated_dro(
        images,
        labels,
        groups,
        reference,
        cfg.train,
        rw,
        full_data,
        num_classes=num_classes,
        num_groups=k,
        eta=eta,
        seed=cfg.seed,
        device=device,
        on_progress=progress.current(),
    )
    weights, warning = rounds[-1].weights, rounds[-1].warning
    WEIGHTS.write(out, weights_table(weights, groups, k), {"eta": eta, "excess": rw.excess})
    TRAJECTORY.write(out, trajectory_table(rounds, k))
    plot_weights(weights, rounds[-1].alphas, out.file(WEIGHTS_PLOT))
    if warning:
        warnings.warn(warning, stacklevel=1)
    return {
        "weights": [round(float(w), 4) for w in weights],
        "proxy_images_per_s": round(rounds[-1].images_per_s, 1),
        "proxy_seconds": round(seconds, 2),
        "warning": warning,
        "groups": rw.groups,
    }


def _kmeans_groups(cfg: PipelineConfig, encode: StageDir, ids: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """reweight.groups=kmeans: k-means clusters fitted on the embeddings of ``ids``, as the map from sorted
    train-split sample ids to their clusters."""
    from dedt.encoders.streaming import read_embeddings
    from dedt.reweight import kmeans_groups

    emb_ids, embeddings, _ = read_embeddings(EMBEDDINGS.path(encode))
    all_groups = kmeans_groups(embeddings, cfg.reweight.clusters, seed=cfg.seed, fit=np.isin(emb_ids, ids))
    return lambda some_ids: all_groups[np.isin(emb_ids, some_ids)]


def run_classifier(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    from dedt.metrics import frechet_distance, gaussian_stats
    from dedt.metrics.classifier import accuracy, features, save_classifier, train_classifier

    manifest = MANIFEST.path(inputs["data"])
    _, x_train, y_train = load_split(manifest, "train")
    _, x_hold, y_hold = load_split(manifest, "holdout")
    num_classes = len(class_names(manifest))
    model = train_classifier(x_train, y_train, num_classes, epochs=cfg.evaluate.classifier_epochs, seed=cfg.seed)
    save_classifier(model, out.file(CLASSIFIER), x_train.shape[1], num_classes)
    summary: dict[str, Any] = {"train_accuracy": round(accuracy(model, x_train, y_train), 4)}
    if len(x_hold) > 1:
        summary["holdout_accuracy"] = round(accuracy(model, x_hold, y_hold), 4)
        # The real-data floor: FD between held-out and training reals in this feature space.
        floor = frechet_distance(*gaussian_stats(features(model, x_hold)), *gaussian_stats(features(model, x_train)))
        summary["real_floor_fd"] = round(float(floor), 4)
    return summary


def run_evaluate(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """Sample per class from the EMA model, then every metric of ``dedt.evaluate`` in each feature space,
    against the full real train split (on contaminated data, a ``reals`` input: the uncontaminated one) and,
    for a model trained on the kept subset (a select input), that subset.

    Writes metrics.parquet, samples.parquet, grid.png, class_fd.png and report.md; the reference
    statistics go to the shared ``refstats`` cache of the store.
    """
    from dedt import evaluate
    from dedt.diffusion.train import load_model
    from dedt.metrics.registry import feature_space
    from dedt.report import MODEL_LABELS, write_evaluation

    names, counts = class_names(MANIFEST.path(inputs["data"])), read_summary(inputs["data"])
    kept_ids = subset_ids(inputs["select"]) if "select" in inputs else None
    ev, s = cfg.evaluate, cfg.sample
    fake_labels = np.repeat(np.arange(len(names), dtype=np.int64), s.per_class)
    evaluate.check_sample_counts(
        len(fake_labels),
        {"real train images": counts["n_train"]}
        | ({"images in the kept subset": len(kept_ids)} if kept_ids is not None else {}),
        ev.prdc_k,
    )
    classifier_file = inputs["classifier"].file(CLASSIFIER)
    spaces = [feature_space(name, classifier=classifier_file) for name in ev.feature_spaces]
    model_config = inputs["model"].read_json(CONFIG)
    preset = model_config["train"]["preset"]
    model = load_model(inputs["model"].path, ema=True)
    source = evaluate.stage_source(
        out.root, inputs["data"], kept_ids, contaminated=cfg.dataset.contaminate.active, target=inputs.get("reals")
    )
    posthoc, extra_rows = {}, []
    if ev.posthoc_sigma_rels:  # the EMA length chosen on the selection bank, then reported like any EMA
        nimg = int(read_summary(inputs["model"])["nimg"])
        choice, n_select = _posthoc_choice(
            cfg, model, preset, inputs["model"].path, nimg, len(names), classifier_file, spaces[0], source
        )
        model.load_state_dict(choice.state)
        posthoc = {"posthoc_ema": _choice_summary(choice, n_select)}
        n_real = read_summary(inputs.get("reals", inputs["data"]))["n_train"]  # the reals the FD is against
        extra_rows = evaluate.posthoc_rows(spaces[0].name, choice.sigma_rel, choice.fds, n_real, n_select)
    fake, fake_labels = generate(cfg, model, preset, fake_labels, classifier_file, s.bank_seed)
    rows = evaluate.evaluate_samples(
        fake, fake_labels, spaces, source, names, prdc_k=ev.prdc_k, with_kid=ev.kid, seed=cfg.seed, pixels=True
    )
    rows += extra_rows
    evaluate.write_metrics(rows, cfg.seed, METRICS.path(out))
    SAMPLES.write(out, evaluate.samples_table(fake, fake_labels))
    model_key = model_config.get("key", inputs["model"].fingerprint)
    write_evaluation(
        out.path,
        rows,
        fake,
        fake_labels,
        len(names),
        space=ev.feature_spaces[0],
        references=("full", "subset") if kept_ids is not None else ("full",),
        seed=cfg.seed,
        title=f"{cfg.name}, {MODEL_LABELS.get(model_key, model_key)} model",
        clean_target=source.target is not None,
    )
    return {**evaluate.summary(rows, ev.feature_spaces), "n_fake": len(fake), **posthoc}


def _posthoc_choice(
    cfg: PipelineConfig,
    model: Any,
    preset: str,
    run_dir: Any,
    nimg: int,
    num_classes: int,
    classifier_file: Any,
    space: Any,
    source: Any,
) -> tuple[Any, int]:
    """``evaluate.posthoc_sigma_rels``: the candidate whose EMA after ``nimg`` images, rebuilt from the run's
    post-hoc snapshots, has the lowest FD in ``space`` on the selection bank (``dedt.diffusion.posthoc``),
    with that bank's size. Leaves ``model`` holding the last candidate's weights."""
    from dedt import evaluate
    from dedt.diffusion.posthoc import choose_sigma_rel, list_posthoc_snapshots, selection_bank

    per_class, bank_seed = selection_bank(cfg.sample.per_class, cfg.sample.bank_seed)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)

    def fd_of(state: dict[str, Any]) -> float:
        model.load_state_dict(state)
        fake, _ = generate(cfg, model, preset, labels, classifier_file, bank_seed)
        return evaluate.selection_fd(fake, space, source)

    snapshots = list_posthoc_snapshots(run_dir)
    return choose_sigma_rel(snapshots, cfg.evaluate.posthoc_sigma_rels, nimg, fd_of), len(labels)


def _choice_summary(choice: Any, n_select: int) -> dict[str, Any]:
    """The post-hoc EMA choice as the stage summary states it."""
    return {
        "sigma_rel": choice.sigma_rel,
        "select_fd": {f"{s:g}": float(f"{fd:.6g}") for s, fd in choice.fds.items()},
        "n_select": n_select,
    }


def generate(
    cfg: PipelineConfig, model: Any, preset: str, labels: np.ndarray, classifier_file: Any, bank_seed: int
) -> tuple[np.ndarray, np.ndarray]:
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
    fake = sample(
        model,
        build_scheduler(preset, latent=latent),
        labels if conditional else None,
        num=len(labels),
        method=s.method,
        steps=s.steps,
        seed=bank_seed,
        batch_size=s.batch_size,
        device=device,
        progress=False,
        on_progress=progress.current(),
    )
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

    num_classes = len(class_names(MANIFEST.path(inputs["data"])))
    return measure_costs(_model_shape(inputs), num_classes, cfg.train, seed=cfg.seed)


def _model_shape(inputs: dict[str, StageDir]) -> tuple[int, int, int]:
    """(C, H, W) of what the diffusion model sees: the VAE latents' with a latents input (latent
    diffusion), else the images'."""
    if "latents" in inputs:
        channels, height, width = read_summary(inputs["latents"])["shape"]
        return channels, height, width
    height, width, channels = image_shape(inputs["data"])
    return channels, height, width


def run_curve(cfg: PipelineConfig, inputs: dict[str, StageDir], out: StageDir) -> dict[str, Any]:
    """The model's time-to-quality curve: FD, precision, recall and per-class FD of each EMA snapshot
    (first feature space, against the full train split, or the ``reals`` input's), every one sampled from the same noise bank
    as the evaluate stage, whose metrics give the final point; the final model is also sampled from a
    second bank, to measure the FD's own sampling noise. Writes curve.parquet.

    With ``evaluate.posthoc_sigma_rels`` each snapshot point that has post-hoc EMA snapshots uses the
    candidate chosen there (as the evaluate stage does at the end, whose choice the final point and the
    second bank use), and curve.parquet gains a ``sigma_rel`` column (null where the run's own EMA was used).

    Points already computed (``points/<nimg>.json``) are kept, so a killed stage resumes."""
    from dedt import evaluate
    from dedt.diffusion.snapshots import list_snapshots
    from dedt.diffusion.train import load_model
    from dedt.metrics.registry import feature_space

    names = class_names(MANIFEST.path(inputs["data"]))
    ev = cfg.evaluate
    classifier_file = inputs["classifier"].file(CLASSIFIER)
    space = feature_space(ev.feature_spaces[0], classifier=classifier_file)
    source = evaluate.stage_source(out.root, inputs["data"], None, target=inputs.get("reals"))
    model_dir = inputs["model"].path
    preset = inputs["model"].read_json(CONFIG)["train"]["preset"]
    labels = np.repeat(np.arange(len(names), dtype=np.int64), cfg.sample.per_class)
    train_summary = read_summary(inputs["model"])
    final = {"nimg": int(train_summary["nimg"]), "seconds": float(train_summary["seconds"])}
    points_dir = out.path / "points"
    points_dir.mkdir(exist_ok=True)

    from safetensors.torch import load_file

    from dedt.diffusion.posthoc import list_posthoc_snapshots, reconstruct_ema

    model = load_model(model_dir, ema=True)  # one UNet; each point loads its weights into it
    final_weights = {k: v.clone() for k, v in model.state_dict().items()}
    posthoc = list_posthoc_snapshots(model_dir) if ev.posthoc_sigma_rels else {}
    final_sigma_rel = None
    if ev.posthoc_sigma_rels:  # the final point is the evaluate stage's, with the EMA it chose
        final_sigma_rel = read_summary(inputs["evaluate"])["posthoc_ema"]["sigma_rel"]
        final_weights = reconstruct_ema(posthoc, final_sigma_rel, nimg=final["nimg"])
    posthoc_at = {s.nimg for snaps in posthoc.values() for s in snaps}

    def measure(weights: Any, bank_seed: int) -> dict[str, Any]:
        model.load_state_dict(weights)
        fake, fake_labels = generate(cfg, model, preset, labels, classifier_file, bank_seed)
        rows = evaluate.evaluate_samples(
            fake, fake_labels, [space], source, names, prdc_k=ev.prdc_k, with_kid=False, seed=cfg.seed
        )
        return _curve_point(rows, space.name)

    def cached(name: str, compute: Any) -> dict[str, Any]:
        path = points_dir / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        atomic_write_text(path, json.dumps(value, sort_keys=True))
        return value

    def measure_snapshot(snap: Any) -> dict[str, Any]:
        if snap.nimg not in posthoc_at:
            return measure(load_file(snap.weights), cfg.sample.bank_seed)
        choice, n_select = _posthoc_choice(
            cfg, model, preset, model_dir, snap.nimg, len(names), classifier_file, space, source
        )
        return measure(choice.state, cfg.sample.bank_seed) | {"posthoc_ema": _choice_summary(choice, n_select)}

    records = []
    for snap in list_snapshots(model_dir):
        point = cached(f"{snap.nimg:012d}", lambda snap=snap: measure_snapshot(snap))
        sigma_rel = point.pop("posthoc_ema", {}).get("sigma_rel")
        records.append(
            {"nimg": snap.nimg, "seconds": snap.seconds, **point, "fd_bank2": None, "final": False}
            | {"sigma_rel": sigma_rel}
        )
    end = _curve_point(evaluate.read_metrics(METRICS.path(inputs["evaluate"])), ev.feature_spaces[0])
    second = cached("final-bank2", lambda: measure(final_weights, cfg.sample.bank_seed + 1))
    records.append({**final, **end, "fd_bank2": second["fd"], "final": True, "sigma_rel": final_sigma_rel})

    def stage_seconds(*roles: str) -> float:
        return sum(read_summary(inputs[r])["seconds"] for r in roles if r in inputs)

    overhead = stage_seconds("encode", "score", "select", "reweight")
    reference = stage_seconds("reference")
    table = pa.table(
        {
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
        }
    )
    if ev.posthoc_sigma_rels:  # only then: other curves keep their columns
        table = table.append_column("sigma_rel", pa.array([r["sigma_rel"] for r in records], pa.float64()))
    CURVE.write(
        out, table, {"feature_space": ev.feature_spaces[0], "n_fake": len(labels), "bank_seed": cfg.sample.bank_seed}
    )
    return {
        "points": len(records),
        "kimg": table.column("kimg").to_pylist(),
        "fd": table.column("fd").to_pylist(),
        "fd_bank2": second["fd"],
        "overhead_seconds": overhead,
        "reference_seconds": reference,
    } | ({"sigma_rel": [r["sigma_rel"] for r in records]} if ev.posthoc_sigma_rels else {})


def _curve_point(rows: list[Any], space: str) -> dict[str, Any]:
    from dedt import evaluate

    def value(metric: str) -> float | None:
        found = evaluate.lookup(rows, metric, space)
        return None if found is None else float(found)

    return {
        "fd": value("fd"),
        "precision": value("precision"),
        "recall": value("recall"),
        "fd_per_class": {c: (None if v != v else float(v)) for c, v in evaluate.per_class_fd(rows, space).items()},
    }
