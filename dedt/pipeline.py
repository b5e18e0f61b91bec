"""The stage graph of one pipeline: what each stage depends on, and its fingerprint.

``plan`` turns a config into nodes in dependency order, each keyed by the fingerprint of its
code version, its own config section and its inputs' fingerprints, so editing one section
recomputes exactly that stage and what depends on it. ``run_node`` computes a node once: under
a file lock, skipped when its completion marker is valid. No Prefect here: ``flows/`` orders
the same calls as tasks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dedt import stages
from dedt.artifacts import CONFIG, SUMMARY, read_summary
from dedt.config import PipelineConfig
from dedt.errors import DedtError
from dedt.remote_store import DAMAGED, IN_SYNC, remote_for
from dedt.store import CorruptArtifactWarning, StageDir, atomic_write_text, fingerprint

# Errors that mean the store cannot take the stage's files: reported as such, not as a crash.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}

StageFn = Callable[[PipelineConfig, dict[str, StageDir], StageDir], dict[str, Any]]

# Bump a stage's version when its code changes what it writes: its fingerprint changes with it.
VERSIONS = {
    "data": "1",
    "encode": "1",
    "score": "1",
    "select": "1",
    "reference": "1",
    "reweight": "1",
    "train": "1",
    "classifier": "1",
    "evaluate": "3",
    "latents": "1",
    "calibrate": "1",
    "curve": "1",
}


@dataclass(frozen=True)
class Node:
    key: str  # unique within a plan, e.g. "evaluate:reference"
    stage: str  # store folder name
    config: dict[str, Any]
    inputs: dict[str, str]  # role -> key of the input node
    run: StageFn
    out: StageDir = field(compare=False, default=None)  # type: ignore[assignment]
    reads_latents: bool = False  # a diffusion-model stage: in latent diffusion it reads the VAE latents


@dataclass
class NodeResult:
    key: str
    fingerprint: str
    path: str
    cached: bool
    seconds: float
    summary: dict[str, Any]


def _train_config(cfg: PipelineConfig, budget_kimg: float | None, *, anneals: bool = True) -> dict[str, Any]:
    """The train options that change the weights (not where they run), with the budget the model
    really gets (None: a proxy, whose budget is reweight.proxy_kimg). The VAE enters through the
    latents stage's fingerprint (its files), not its path: pixel pipelines keep their fingerprints.
    ``anneals=False``: a model that ignores train.anneal_frac (the full-data reference, the DRO proxy),
    so it is shared with pipelines that differ only there."""
    off = set() if anneals else {"anneal_frac"}
    options = cfg.train.identity(exclude={"device", "vae_path", "budget_policy", "budget_kimg"} | off)
    if budget_kimg is not None:
        options["budget_kimg"] = budget_kimg
    return {"train": options, "seed": cfg.seed}


def _keeps_all(cfg: PipelineConfig) -> bool:
    """keep_frac 1 without cleaning: the subset is the whole train split, whatever the scorer (nothing to score)."""
    return cfg.select.keep_frac == 1.0 and not cfg.select.cleans


def _dataset_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The data stage's options; contamination enters only when it changes the data (clean pipelines keep
    their fingerprints)."""
    return cfg.dataset.model_dump(exclude=set() if cfg.dataset.contaminate.active else {"contaminate"})


def _select_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The select stage's options; dedup and trimming, stratification and weighted counts enter only when on
    (other pipelines keep their fingerprints)."""
    sel = cfg.select
    off = set() if sel.cleans else {"dedup_threshold", "trim_outliers_frac"}
    off |= set() if sel.stratifies else {"strata", "strata_k"}
    off |= set() if sel.stratifies or sel.bands else {"within", "band_low", "band_high"}
    off |= set() if sel.keep_by == "weights" else {"keep_by"}
    return sel.model_dump(exclude=off)


def _scores_by_model(cfg: PipelineConfig) -> bool:
    """score.method: difficulty (dedt.difficulty): the score stage reads the images and the reference model, not
    the embeddings, so the reference comes before it."""
    return cfg.score.method == "difficulty" and not _keeps_all(cfg)


def _select_reads_weights(cfg: PipelineConfig) -> bool:
    """select.keep_by: weights: the reweight stage (its proxy on the full data) runs before select."""
    return cfg.select.keep_by == "weights" and not _keeps_all(cfg)


def _checkpoint_identity(path: str) -> dict[str, Any]:
    """A local UNet folder's identity: names, sizes and mtimes of the files directly in it (or in its
    ``unet/``), cheap to hash. Never a walk of the tree below: for a mistaken path such as ``/`` it
    would not end; a folder without config.json has none (preflight then refuses it)."""
    root = Path(path).expanduser()
    folder = root / "unet" if (root / "unet" / "config.json").is_file() else root
    files = (
        sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if (folder / "config.json").is_file()
        else []
    )
    return {"path": str(root.resolve()), "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


def nodes(cfg: PipelineConfig) -> list[Node]:
    """The pipeline's stages in dependency order (before fingerprints are attached)."""
    data = Node("data", "data", {"dataset": _dataset_config(cfg), "seed": cfg.seed}, {}, stages.run_data)
    # On contaminated data the models are measured against the uncontaminated source (its train split, and a
    # classifier trained on it): every arm, and the clean data's own model, on one yardstick.
    contaminated = cfg.dataset.contaminate.active
    clean = Node(
        "data:clean",
        "data",
        {"dataset": cfg.dataset.model_dump(exclude={"contaminate"}), "seed": cfg.seed},
        {},
        stages.run_clean_data,
    )
    reals = {"reals": clean.key} if contaminated else {}
    encode = Node(
        "encode",
        "encode",
        {"encode": cfg.encode.model_dump(exclude={"batch_size", "shard_size", "device"}), "seed": cfg.seed},
        {"data": "data"},
        stages.run_encode,
    )
    by_model = _scores_by_model(cfg)
    score = Node(
        "score",
        "score",
        # score.draws enters only for the difficulty scorer (other pipelines keep their fingerprints)
        {"score": cfg.score.model_dump(exclude=set() if by_model else {"draws"}), "seed": cfg.seed},
        {"data": "data", "reference": "reference"} if by_model else {"data": "data", "encode": "encode"},
        stages.run_score,
        reads_latents=by_model,
    )
    if _keeps_all(cfg):  # every scorer keeps everything: one select for all of them, no encode or score
        select = Node("select", "select", {"select": {"keep_frac": 1.0}}, {"data": "data"}, stages.run_select)
    else:
        # Dedup, trimming and k-means strata read the embeddings; weighted counts, the DRO class weights.
        cleaning = {"encode": "encode"} if cfg.select.cleans or cfg.select.stratifies else {}
        cleaning |= {"reweight": "reweight"} if _select_reads_weights(cfg) else {}
        select = Node(
            "select", "select", {"select": _select_config(cfg)}, {"score": "score"} | cleaning, stages.run_select
        )
    if cfg.reweight.reference_path:
        reference = Node(
            "reference",
            "reference",
            {"reference": _checkpoint_identity(cfg.reweight.reference_path)},
            {"data": "data"},
            stages.run_reference_checkpoint,
            reads_latents=True,
        )
    else:
        reference = Node(
            "reference",
            "train",
            _train_config(cfg, cfg.reweight.reference_kimg, anneals=False) | {"subset": "full"},
            {"data": "data"},
            stages.run_train,
            reads_latents=True,
        )
    budget = cfg.subset_budget_kimg
    baseline = Node(
        "train:uniform",
        "train",
        _train_config(cfg, budget) | {"subset": "selected", "weights": "uniform"},
        {"data": "data", "select": "select"},
        stages.run_train,
        reads_latents=True,
    )
    classifier = Node(
        "classifier",
        "classifier",
        {"evaluate": {"classifier_epochs": cfg.evaluate.classifier_epochs}, "seed": cfg.seed},
        {"data": clean.key if contaminated else "data"},
        stages.run_classifier,
    )
    reads_encode = "encode" in score.inputs or "encode" in select.inputs
    needs_encode = (not _keeps_all(cfg) and reads_encode) or cfg.reweight.groups == "kmeans"
    scoring = [] if _keeps_all(cfg) else [reference, score] if by_model else [score]
    graph = [
        data,
        *([clean] if contaminated else []),
        *([encode] if needs_encode else []),
        *scoring,
        select,
        classifier,
    ]
    # Uniform on everything with the reference's budget *is* the reference: don't train it twice.
    same_as_reference = (
        _keeps_all(cfg)
        and not cfg.reweight.reference_path
        and cfg.evaluate.baselines
        and budget == cfg.reweight.reference_kimg
    )
    models = {} if same_as_reference else {"train:uniform": baseline}
    if cfg.reweight.method == "doremi":
        rw_inputs = {"data": "data", "reference": "reference"}
        rw_inputs |= {"select": "select"} if cfg.reweight.proxy_data == "subset" else {}
        rw_inputs |= {"encode": "encode"} if cfg.reweight.groups == "kmeans" else {}
        # Iterated rounds re-train the reference with the full-data budget inside this stage.
        reweight = Node(
            "reweight",
            "reweight",
            {"reweight": cfg.reweight.model_dump(exclude={"reference_path"})} | _train_config(cfg, None, anneals=False),
            rw_inputs,
            stages.run_reweight,
            reads_latents=True,
        )
        weighted = Node(
            "train",
            "train",
            _train_config(cfg, budget) | {"subset": "selected", "weights": "reweight"},
            {"data": "data", "select": "select", "reweight": "reweight"},
            stages.run_train,
            reads_latents=True,
        )
        graph += [reweight] if by_model else [reference, reweight]
        if _select_reads_weights(cfg):  # select follows the weights it reads
            graph.remove(select)
            graph.append(select)
        models = {"train": weighted, **(models if cfg.evaluate.baselines else {})}
    elif cfg.evaluate.baselines and not by_model:
        graph.append(reference)
    if cfg.evaluate.baselines and not cfg.reweight.reference_path:
        models = {"reference": reference, **models}
    graph += [m for k, m in models.items() if k != "reference"]
    metrics = cfg.evaluate.model_dump(include={"feature_spaces", "prdc_k", "kid"}) | _posthoc_config(cfg)
    for key, model in models.items():
        # A model trained on the kept subset is measured against it too: what pruning cost.
        subset = {"select": "select"} if "select" in model.inputs else {}
        graph.append(
            Node(
                f"evaluate:{key}",
                "evaluate",
                {"sample": cfg.sample.model_dump(exclude={"batch_size"}), "evaluate": metrics, "seed": cfg.seed},
                {"data": "data", "classifier": "classifier", "model": model.key} | subset | reals,
                stages.run_evaluate,
            )
        )
    graph += _curve_nodes(cfg, models, {n.key for n in graph}, reals)
    if cfg.train.vae_path:  # latent diffusion: every model (reference, proxy, final) trains on the VAE latents
        from dedt.diffusion.latents import vae_identity

        latents = Node(
            "latents", "latents", {"vae": vae_identity(cfg.train.vae_path)}, {"data": "data"}, stages.run_latents
        )
        graph = [graph[0], latents] + [
            replace(n, inputs=n.inputs | {"latents": "latents"}) if n.reads_latents else n for n in graph[1:]
        ]
    return graph


def _posthoc_config(cfg: PipelineConfig) -> dict[str, Any]:
    """evaluate.posthoc_sigma_rels, in the evaluate and curve stages' configs only when set (other pipelines
    keep their fingerprints)."""
    sigma_rels = cfg.evaluate.posthoc_sigma_rels
    return {"posthoc_sigma_rels": sigma_rels} if sigma_rels else {}


def _curve_nodes(cfg: PipelineConfig, models: dict[str, Node], present: set[str], reals: dict[str, str]) -> list[Node]:
    """Time to quality: the calibration of per-image costs (whenever a full-data model is measured, the
    yardstick of every equal-quality speed-up) and, with train.snapshots > 0, each model's curve (measured
    against the ``reals`` input when there is one, as its evaluation is)."""
    out = []
    if "reference" in models:
        speed = cfg.train.model_dump(
            include={
                "preset",
                "batch_size",
                "precision",
                "channels_last",
                "compile",
                "tf32",
                "conditional",
                "optimizer",
                "device",
            }
        )
        out.append(
            Node("calibrate", "calibrate", {"train": speed}, {"data": "data"}, stages.run_calibrate, reads_latents=True)
        )
    if cfg.train.snapshots == 0:
        return out
    for key, model in models.items():
        if cfg.evaluate.curves == "full" and key != "reference":
            continue
        # The one-off costs a model carries: what selected its data and, reweighted (or its data selected by the
        # DRO weights), the proxy and its reference; scored by the reference's difficulty, that reference.
        costs = [r for r in ("encode", "score", "select") if r in present and "select" in model.inputs]
        dro = "reweight" in model.inputs or ("select" in model.inputs and _select_reads_weights(cfg))
        pays_reference = dro or ("score" in costs and _scores_by_model(cfg))
        costs += (["reweight"] if dro else []) + (["reference"] if pays_reference else [])
        out.append(
            Node(
                f"curve:{key}",
                "curve",
                {
                    "sample": cfg.sample.model_dump(exclude={"batch_size"}),
                    "evaluate": cfg.evaluate.model_dump(include={"feature_spaces", "prdc_k"}) | _posthoc_config(cfg),
                    "seed": cfg.seed,
                },
                {"data": "data", "classifier": "classifier", "model": model.key, "evaluate": f"evaluate:{key}"}
                | {r: r for r in costs}
                | reals,
                stages.run_curve,
            )
        )
    return out


def plan(cfg: PipelineConfig, root: Path) -> dict[str, Node]:
    """Nodes by key, in dependency order, each with its fingerprinted store folder."""
    planned: dict[str, Node] = {}
    for node in nodes(cfg):
        input_fps = {role: planned[key].out.fingerprint for role, key in node.inputs.items()}
        fp = fingerprint(node.stage, VERSIONS[node.stage], node.config, input_fps)
        planned[node.key] = replace(node, out=StageDir(Path(root), node.stage, fp))
    return planned


def run_node(cfg: PipelineConfig, planned: dict[str, Node], key: str) -> NodeResult:
    """Compute one node unless its store folder is complete; two processes never both write it."""
    node = planned[key]
    out = node.out
    inputs = {role: planned[k].out for role, k in node.inputs.items()}
    remote = remote_for(out.root)  # an s3:// store: the stage is pulled first and pushed when new
    with out.lock(), contextlib.ExitStack() as reading:
        synced = remote.pull(out) if remote else None
        cached = out.is_complete()
        if not cached:
            for role, stage_dir in inputs.items():
                if remote:
                    remote.pull_input(stage_dir)
                # A reader's lock: an input being (re)computed by another process is waited for.
                reading.enter_context(stage_dir.lock(shared=True))
                if not stage_dir.is_complete():
                    damaged = ", ".join(map(str, stage_dir.damaged())) or "no completion marker"
                    raise DedtError(
                        f"{key}: input {role} in {stage_dir.path} is not finished or is damaged "
                        f"({damaged}); run the whole pipeline so that {node.inputs[role]} is computed "
                        "again first"
                    )
            damaged = out.damaged()
            if damaged:
                warnings.warn(
                    f"{key}: {', '.join(map(str, damaged))} failed its SHA-256 check (corrupted or "
                    "changed since the stage finished); computing the stage again",
                    CorruptArtifactWarning,
                    stacklevel=2,
                )
            out.invalidate()  # a stale marker must never vouch for files being rewritten
            out.remove_temp_files()  # what a killed writer left
            start = time.perf_counter()
            try:
                summary = node.run(cfg, inputs, out)
            except OSError as exc:
                if exc.errno not in _STORAGE_ERRNOS:
                    raise
                raise DedtError(
                    f"{key}: cannot write in {out.path}: {exc.strerror} ({exc.filename}); free disk "
                    "space or fix permissions, then re-run: finished work is kept"
                ) from exc
            summary["seconds"] = round(time.perf_counter() - start, 3)
            atomic_write_text(out.file(SUMMARY), json.dumps(summary, indent=2, sort_keys=True))
            files = sorted(
                p.name
                for p in out.path.iterdir()
                if p.is_file() and not p.name.startswith((".", "_")) and p.name != CONFIG
            )
            out.mark_complete(
                files,
                {
                    "key": key,
                    "stage": node.stage,
                    **node.config,
                    "inputs": {r: i.fingerprint for r, i in inputs.items()},
                },
            )
        if remote and (not cached or synced != IN_SYNC):
            remote.push(out, replace=synced == DAMAGED)
    summary = read_summary(out)
    return NodeResult(key, out.fingerprint, str(out.path), cached, summary["seconds"], summary)
