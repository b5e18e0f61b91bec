"""Sweeps: a grid of overrides over a base pipeline, the stages its points share, one comparison.

A sweep in ``pipelines.yaml`` names a base pipeline and a grid (config path -> list of values);
its points are the Cartesian product, each a validated ``PipelineConfig``. Points share every
stage whose fingerprint they have in common (data, encoder and scorer across keep ratios; the
full-data reference and the classifier across everything), so ``unique_nodes`` lists each stage
once, inputs first. ``compare`` writes the comparison table and plots into the store. No Prefect
here: ``flows/sweep.py`` submits the same nodes as tasks.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dedt.artifacts import CURVE
from dedt.config import PipelineConfig, build_config, load_pipelines
from dedt.errors import DedtError
from dedt.pipeline import Node, NodeResult
from dedt.report import MODEL_LABELS, pays_for_dro, pays_for_reference, save_figure, summary_rows
from dedt.safe_yaml import load_yaml, read_yaml_text
from dedt.store import StageDir, fingerprint, read_parquet, write_parquet

VERSION = "3"  # bump when the comparison table or plots change
COMPARISON, FD_PLOT, COST_PLOT = "comparison.parquet", "fd_vs_keep_frac.png", "fd_vs_cost.png"
BRIEF_COLUMNS = ("point", "model", "images", "kimg", "cost_s", "fd", "speedup")  # what the CLI prints


MAX_SWEEP_POINTS = 1000  # the frontier sweep has 96
MAX_GRID_LIST = 16  # a list-valued grid value, e.g. evaluate.feature_spaces: [classifier, inception]
_SCALARS = (str, int, float, bool, type(None))


def _grid_value(value: Any) -> bool:
    return isinstance(value, _SCALARS) or (
        isinstance(value, list) and len(value) <= MAX_GRID_LIST and all(isinstance(v, _SCALARS) for v in value)
    )


class SweepConfig(BaseModel):
    """One entry of the ``sweeps:`` mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(description="pipeline whose config the grid overrides")
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = Field(
        description="config path -> values, e.g. select.keep_frac: [0.1, 0.3]; or a list of such grids, whose "
        "points are joined (e.g. a costly metric on one seed only)"
    )
    max_concurrency: int = Field(2, ge=1, description="stages computed at once (one worker process each)")
    cron: str | None = Field(None, description="schedule of the sweep's deployment, e.g. '0 3 * * 0'")
    work_pool: str | None = Field(None, description="pool of the sweep's deployment (default: the base pipeline's)")
    tags: list[str] = Field(default_factory=list)

    @field_validator("grid")
    @classmethod
    def _valid_grid(cls, grid: dict[str, list[Any]] | list[dict[str, list[Any]]]) -> Any:
        """Non-empty, every value a scalar or a short list of scalars, at most MAX_SWEEP_POINTS points."""
        grids = grid if isinstance(grid, list) else [grid]
        for one in grids:
            if not one:
                raise ValueError(
                    "an empty grid has no points; give at least one key, e.g. select.keep_frac: [0.1, 0.3]"
                )
            empty = [key for key, values in one.items() if not values]
            if empty:
                raise ValueError(f"grid keys {empty} have no values")
            bad = [key for key, values in one.items() if not all(map(_grid_value, values))]
            if bad:
                raise ValueError(
                    f"grid keys {bad[:3]}: each value must be a number, string, boolean or null, or a list of "
                    f"at most {MAX_GRID_LIST} of them"
                )
        if isinstance(grid, list) and not grid:
            raise ValueError("an empty list of grids has no points")
        points = sum(math.prod(len(values) for values in one.values()) for one in grids)
        if points > MAX_SWEEP_POINTS:
            raise ValueError(f"the grid has {points:,} points; a sweep runs at most {MAX_SWEEP_POINTS:,}, split it")
        return grid

    @property
    def grids(self) -> list[dict[str, list[Any]]]:
        return self.grid if isinstance(self.grid, list) else [self.grid]


@dataclass(frozen=True)
class GridPoint:
    label: str  # "select.keep_frac=0.1 score.method=gaussian"
    values: dict[str, Any]  # grid key -> value
    cfg: PipelineConfig


@dataclass(frozen=True)
class SweepNode:
    """A stage computed once for the whole sweep, by the config of the first point that needs it."""

    id: str  # "<stage>/<fingerprint>": unique across the sweep
    point: int  # index of that point
    key: str  # the node's key in that point's plan
    inputs: tuple[str, ...]  # ids of the input nodes
    depth: int  # longest path from a source: submitting by depth puts inputs first


def load_sweeps(path: Path) -> dict[str, SweepConfig]:
    """Validated sweeps by name from the ``sweeps:`` mapping of a pipelines file (may be absent)."""
    load_pipelines(path)  # the file exists and has pipelines
    raw = (load_yaml(read_yaml_text(path), str(path)) or {}).get("sweeps") or {}
    if not isinstance(raw, dict):
        raise DedtError(f"{path}: 'sweeps:' must map a sweep name to {{base, grid, ...}}")
    sweeps = {}
    for name, body in raw.items():
        try:
            sweeps[name] = SweepConfig.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise DedtError(f"sweep {name!r} in {path}: {where}: {first['msg']}") from None
    return sweeps


def resolve_sweep(name: str, path: Path) -> SweepConfig:
    sweeps = load_sweeps(path)
    if name not in sweeps:
        raise DedtError(f"no sweep {name!r} in {path}; known: {', '.join(sorted(sweeps)) or '(none)'}")
    return sweeps[name]


def expand(name: str, path: Path) -> list[GridPoint]:
    """The sweep's points in grid order (last key varies fastest; grids in list order), each config validated."""
    sweep = resolve_sweep(name, path)
    pipelines = load_pipelines(path)
    if sweep.base not in pipelines:
        raise DedtError(f"sweep {name!r}: base pipeline {sweep.base!r} is not in {path}")
    points = []
    combos = [
        dict(zip(grid, combo, strict=False)) for grid in sweep.grids for combo in itertools.product(*grid.values())
    ]
    for values in combos:
        # JSON is valid YAML: strings such as "open_clip:ViT-B-32" stay strings.
        overrides = [f"{key}={json.dumps(value)}" for key, value in values.items()]
        label = " ".join(f"{key}={value}" for key, value in values.items())
        try:
            cfg = build_config(pipelines[sweep.base], sweep.base, overrides)
        except DedtError as exc:
            raise DedtError(f"sweep {name!r}, point {label}: {exc}") from None
        points.append(GridPoint(label, values, cfg))
    return points


def node_id(node: Node) -> str:
    return f"{node.stage}/{node.out.fingerprint}"


def unique_nodes(plans: list[dict[str, Node]]) -> list[SweepNode]:
    """Every distinct stage of the points' plans once, sorted by depth (inputs before users)."""
    found: dict[str, SweepNode] = {}
    for point, planned in enumerate(plans):
        for key, node in planned.items():
            if node_id(node) in found:
                continue
            inputs = tuple(node_id(planned[k]) for k in node.inputs.values())
            depth = 1 + max((found[i].depth for i in inputs), default=-1)
            found[node_id(node)] = SweepNode(node_id(node), point, key, inputs, depth)
    return sorted(found.values(), key=lambda n: n.depth)  # stable: plan order within a depth


def comparison_rows(points: list[GridPoint], results: list[dict[str, NodeResult]]) -> list[dict[str, Any]]:
    """One row per (point, trained model): the point's knobs, images, cost, FD and speed-up, then what
    a frontier report needs: the one-off costs apart, the other metrics, per-class FD and weights."""
    rows = []
    # Columns of dirty-data sweeps only, so that other sweeps' rows stay as they were.
    cleaning = any(cleaning_label(p.cfg) for p in points)
    training = any(training_label(p.cfg) for p in points)
    posthoc = any(p.cfg.evaluate.posthoc_sigma_rels for p in points)
    dirty = any(p.cfg.dataset.contaminate.active for p in points)
    for point, point_results in zip(points, results, strict=False):
        cfg = point.cfg
        knobs = {
            "point": point.label,
            "keep_frac": cfg.select.keep_frac,
            "scorer": cfg.score.method,
            "encoder": cfg.encode.encoder,
            "reweight": cfg.reweight.method,
            "seed": cfg.seed,
        }
        knobs |= {"cleaning": cleaning_label(cfg)} if cleaning else {}
        knobs |= {"contaminated": cfg.dataset.contaminate.active} if dirty else {}
        details = {
            row["model"]: row | (_dirty_details(cfg, point_results, row["model"]) if dirty else {})
            for row in _model_details(cfg, point_results, posthoc=posthoc)
        }
        rows += [
            knobs
            | ({"training": training_label(cfg, subset=row["model"] != "full data")} if training else {})
            | {k: row[k] for k in ("model", "images", "kimg", "cost_s", "fd", "speedup", "speedup_scratch")}
            | details[row["model"]]
            for row in summary_rows(point_results, proxy_kimg=cfg.reweight.proxy_kimg * cfg.reweight.rounds)
        ]
    return rows


def _model_details(
    cfg: PipelineConfig, results: dict[str, NodeResult], *, posthoc: bool = False
) -> list[dict[str, Any]]:
    """Per trained model: budget policy, seconds by stage, metrics beyond FD, per-class FD, weights; with
    ``posthoc`` (a sweep choosing post-hoc EMAs), the sigma_rel its evaluation chose (None: its own EMA)."""
    seconds = {
        k: round(results[k].seconds, 2) if k in results else 0.0
        for k in ("encode", "score", "select", "reweight", "reference")
    }
    out = []
    for key, label in MODEL_LABELS.items():
        if f"evaluate:{key}" not in results:
            continue
        overall = results[f"evaluate:{key}"].summary.get("overall", {})
        space = results[f"evaluate:{key}"].summary.get("fd_space", "classifier")
        full = overall.get(space, {}).get("full", {})
        weights = results["reweight"].summary["weights"] if key == "train" and "reweight" in results else None
        costs = results["calibrate"].summary if "calibrate" in results else {}
        curve = results.get(f"curve:{key}")
        out.append(
            {
                "model": label,
                "policy": "images" if key == "reference" else cfg.train.budget_policy,
                "train_s": round(results[key].seconds, 2),
                "selection_s": round(seconds["encode"] + seconds["score"] + seconds["select"], 2),
                "proxy_s": seconds["reweight"],
                "reference_s": seconds["reference"],
                "fid_inception": overall.get("inception", {}).get("full", {}).get("fd"),
                "precision": full.get("precision"),
                "recall": full.get("recall"),
                "fd_per_class": json.dumps(results[f"evaluate:{key}"].summary["fd_per_class"]),
                "weights": None if weights is None else json.dumps(weights),
                "curve": str(CURVE.path(curve.path)) if curve else None,
                "train_s_per_img": costs.get("train_s_per_img"),
                "proxy_s_per_img": costs.get("proxy_s_per_img"),
                "proxy_kimg": cfg.reweight.proxy_kimg * cfg.reweight.rounds if pays_for_dro(results, key) else 0.0,
                "reference_kimg": cfg.reweight.reference_kimg if pays_for_reference(results, key) else 0.0,
                "floor_fd": results["classifier"].summary.get("real_floor_fd") if "classifier" in results else None,
            }
            | (
                {"sigma_rel": results[f"evaluate:{key}"].summary.get("posthoc_ema", {}).get("sigma_rel")}
                if posthoc
                else {}
            )
        )
    return out


def cleaning_label(cfg: PipelineConfig) -> str:
    """The select stage's options beyond keep_frac, e.g. "dedup 0.001 + trim 0.05" or "kmeans 10 random + DRO
    counts"; "" when all are off (so each lever's points form their own arm in a report)."""
    sel = cfg.select
    parts = ([f"dedup {sel.dedup_threshold:g}"] if sel.dedup_threshold is not None else []) + (
        [f"trim {sel.trim_outliers_frac:g}"] if sel.trim_outliers_frac > 0 else []
    )
    band = f" {sel.band_low:g}-{sel.band_high:g}" if sel.bands else ""
    if sel.stratifies:
        parts.append(f"{sel.strata} {sel.strata_k} {sel.within}{band}")
    elif sel.bands:
        parts.append(f"band{band}")
    parts += ["DRO counts"] if sel.keep_by == "weights" else []
    return " + ".join(parts)


def training_label(cfg: PipelineConfig, *, subset: bool = True) -> str:
    """The training levers on, e.g. "min-snr 5 + loss-aware"; "" when all are off (so each lever's points
    form their own arm in a report). They apply to every model a point trains, the full-data one too, except
    annealing to the full data, which only a model trained on a subset (``subset``) does."""
    train = cfg.train
    parts = [f"min-snr {train.snr_gamma:g}"] if train.timestep_weighting == "min-snr" else []
    parts += ["loss-aware"] if train.timestep_sampling == "loss-aware" else []
    if train.dynamic_pruning == "infobatch":
        parts.append(f"infobatch {train.prune_ratio:g} until {train.prune_until:g}")
    parts += [f"anneal {train.anneal_frac:g}"] if subset and train.anneal_frac > 0 else []
    parts += ["post-hoc EMA"] if cfg.evaluate.posthoc_sigma_rels else []  # the evaluated EMA, chosen per model
    return " + ".join(parts)


def _dirty_details(cfg: PipelineConfig, results: dict[str, NodeResult], model: str) -> dict[str, Any]:
    """In a dirty-data sweep: where the ground truth (contaminated points; else None) and the kept subset are
    (None: the model saw the whole train split), and the memorization rates in the first feature space and in
    pixels."""
    from dedt.artifacts import MANIFEST, SUBSET
    from dedt.evaluate import PIXELS

    key = next(k for k, label in MODEL_LABELS.items() if label == model)
    overall = results[f"evaluate:{key}"].summary.get("overall", {})
    seen = "full" if key == "reference" else "subset"
    contaminated = cfg.dataset.contaminate.active
    out: dict[str, Any] = {
        "manifest": str(MANIFEST.path(results["data"].path)) if contaminated else None,
        "subset": None if key == "reference" or not contaminated else str(SUBSET.path(results["select"].path)),
    }
    for suffix, space in (("", cfg.evaluate.feature_spaces[0]), ("_pixels", PIXELS)):
        values = overall.get(space, {}).get(seen, {})
        for metric in ("memorized_frac", "memorized_frac_duplicated"):
            out[f"{metric}{suffix}"] = values.get(metric)
    return out


def _mean_fd(rows: list[dict[str, Any]], **match: Any) -> list[tuple[float, float]]:
    """(keep_frac, mean FD) over the rows matching ``match`` (seeds and encoders averaged)."""
    by_keep: dict[float, list[float]] = {}
    for row in rows:
        if all(row[k] == v for k, v in match.items()):
            by_keep.setdefault(row["keep_frac"], []).append(row["fd"])
    return [(keep, statistics.fmean(fds)) for keep, fds in sorted(by_keep.items())]


def plot_comparison(rows: list[dict[str, Any]], fd_path: Path, cost_path: Path) -> None:
    """FD vs keep_frac per scorer, pruned (dashed) and pruned+reweighted (solid), full data dotted;
    and FD vs calibrated cost, one marker per model, labelled by keep_frac."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = sorted({row["scorer"] for row in rows})
    styles = {"pruned": ("--", "o"), "pruned+reweighted": ("-", "^")}
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, scorer in enumerate(scorers):
        for model, (line, marker) in styles.items():
            points = _mean_fd(rows, scorer=scorer, model=model)
            if points:
                ax.plot(*zip(*points, strict=False), line, marker=marker, color=f"C{i}", label=f"{scorer}, {model}")
    full = [row["fd"] for row in rows if row["model"] == "full data"]
    if full:
        ax.axhline(statistics.fmean(full), color="k", ls=":", lw=1, label="full data")
    ax.set(xlabel="keep_frac", ylabel="FD (classifier features)", title="FD vs keep ratio")
    ax.legend(fontsize=7)
    save_figure(fig, fd_path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, scorer in enumerate(scorers):
        for model, (_, marker) in styles.items():
            chosen = [r for r in rows if r["scorer"] == scorer and r["model"] == model and r["cost_s"] is not None]
            ax.scatter(
                [r["cost_s"] for r in chosen],
                [r["fd"] for r in chosen],
                marker=marker,
                color=f"C{i}",
                label=f"{scorer}, {model}" if chosen else None,
            )
            for r in chosen:
                ax.annotate(
                    f"{r['keep_frac']:g}", (r["cost_s"], r["fd"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    full = [r for r in rows if r["model"] == "full data" and r["cost_s"] is not None]
    ax.scatter([r["cost_s"] for r in full], [r["fd"] for r in full], marker="*", color="k", label="full data")
    if any(r["cost_s"] for r in rows):  # no full-data model measured: no calibrated cost, nothing to plot
        ax.set_xscale("log")
    ax.set(xlabel="cost (calibrated seconds)", ylabel="FD (classifier features)", title="FD vs cost")
    ax.legend(fontsize=7)
    save_figure(fig, cost_path)


def comparison_dir(root: Path, name: str, points: list[GridPoint], plans: list[dict[str, Node]]) -> StageDir:
    """The store folder of the sweep's comparison: a function of its points and all their stages."""
    inputs = {
        f"{p.label} {key}": node.out.fingerprint
        for p, planned in zip(points, plans, strict=False)
        for key, node in planned.items()
    }
    return StageDir(Path(root), "sweep", fingerprint("sweep", VERSION, {"name": name}, inputs))


def compare(out: StageDir, points: list[GridPoint], results: list[dict[str, NodeResult]]) -> list[dict[str, Any]]:
    """Write ``comparison.parquet`` and the two plots into ``out`` unless complete; return the rows."""
    with out.lock():
        if not out.is_complete():
            rows = comparison_rows(points, results)
            write_parquet(pa.Table.from_pylist(rows), out.file(COMPARISON), {"points": [p.label for p in points]})
            plot_comparison(rows, out.file(FD_PLOT), out.file(COST_PLOT))
            out.mark_complete([COMPARISON, FD_PLOT, COST_PLOT], {"points": [p.label for p in points]})
    return read_parquet(out.file(COMPARISON)).to_pylist()
