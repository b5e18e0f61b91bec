"""What a user looks at in the Prefect UI: kept per class, class weights and the DRO trajectory,
training curves, metrics, sample grids, a Markdown summary of a run, and a sweep's comparison.

Images travel as ``data:`` URIs: they render in the UI without a file server. Keys are the
pipeline's (or sweep's) slug plus what the artifact is, so the UI's artifact page keeps the
history of each across runs.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from dedt.artifacts import GRID, TRAIN_LOG, WEIGHTS_PLOT
from dedt.config import PipelineConfig
from dedt.pipeline import NodeResult
from dedt.quality import Curve
from dedt.report import MODEL_LABELS, enlarged_png, markdown_table, quality_curves_png, training_curves_png
from dedt.sweep import COMPARISON, COST_PLOT, FD_PLOT


def slug(name: str) -> str:
    """An artifact key: lowercase letters, digits and dashes only (Prefect's rule)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def data_uri(png: Path | bytes) -> str:
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png_markdown(png: Path | bytes, title: str) -> str:
    return f"\n\n**{title}**\n\n![{title}]({data_uri(png)})"


def _parquet_links(results: dict[str, NodeResult]) -> str:
    """One line per stage: its folder and a ``file://`` link to each Parquet file in it."""
    lines = []
    for key, r in results.items():
        files = sorted(Path(r.path).glob("*.parquet"))
        links = ", ".join(f"[{f.name}]({f.as_uri()})" for f in files) or "(checkpoint files)"
        lines.append(f"- **{key}** `{r.path}`: {links}")
    return "\n".join(lines)


def publish_run_artifacts(cfg: PipelineConfig, results: dict[str, NodeResult], rows: list[dict[str, Any]]) -> None:
    """Every artifact of one pipeline run, keyed ``<pipeline>-<what>``; ``rows`` is the summary table."""
    s = slug(cfg.name)
    if "select" in results:
        kept = results["select"].summary["kept_per_class"]
        create_table_artifact(
            key=f"{s}-kept-per-class",
            table=[{"class": c, "kept": n} for c, n in kept.items()],
            description="Samples kept per class",
        )
    weights_png = Path(results["reweight"].path) / WEIGHTS_PLOT if "reweight" in results else None
    if weights_png:
        weights = results["reweight"].summary["weights"]
        create_table_artifact(
            key=f"{s}-class-weights",
            table=[{"group": g, "weight": w} for g, w in enumerate(weights)],
            description="Group-DRO class weights",
        )
        create_image_artifact(
            image_url=data_uri(weights_png),
            key=f"{s}-dro-trajectory",
            description="DRO trajectory of the class weights (left) and the averaged weights (right)",
        )
    logs = {
        MODEL_LABELS.get(k, k): Path(r.path) / TRAIN_LOG
        for k, r in results.items()
        if Path(r.path).parent.name == "train" and (Path(r.path) / TRAIN_LOG).exists()
    }
    curve = training_curves_png(logs) if logs else None
    if curve:
        create_image_artifact(
            image_url=data_uri(curve), key=f"{s}-training-curve", description="Loss vs kimg per model"
        )
    curves = {
        MODEL_LABELS.get(k.removeprefix("curve:"), k): Curve(r.summary["kimg"], r.summary["fd"])
        for k, r in results.items()
        if k.startswith("curve:")
    }
    quality = quality_curves_png(curves, results["calibrate"].summary["train_s_per_img"]) if curves else None
    if quality:
        create_image_artifact(
            image_url=data_uri(quality),
            key=f"{s}-time-to-quality",
            description="FD vs images seen and vs calibrated seconds (each model's curve)",
        )
        create_table_artifact(
            key=f"{s}-curves",
            description="FD at each evaluated point of each model's training",
            table=[
                {"model": label, "kimg": round(float(k), 3), "fd": round(float(f), 4)}
                for label, c in curves.items()
                for k, f in zip(c.kimg, c.fd, strict=False)
            ],
        )
    models = {k.removeprefix("evaluate:"): r for k, r in results.items() if k.startswith("evaluate:")}
    grids = {k: enlarged_png(Path(r.path) / GRID) for k, r in models.items()}
    if models:
        create_table_artifact(
            key=f"{s}-metrics",
            description="Fréchet distance in the classifier's feature space",
            table=[
                {"model": MODEL_LABELS.get(k, k), "all": r.summary["fd"], **r.summary["fd_per_class"]}
                for k, r in models.items()
            ],
        )
        memorization = [
            {
                "model": MODEL_LABELS.get(k, k),
                "space": space,
                "trained on": ref,
                **{m: values.get(m) for m in ("memorized_frac", "memorized_frac_duplicated", "memorization_threshold")},
            }
            for k, r in models.items()
            for space, refs in r.summary.get("overall", {}).items()
            for ref, values in refs.items()
            if "memorized_frac" in values
        ]
        if memorization:
            create_table_artifact(
                key=f"{s}-memorization",
                table=memorization,
                description="Memorization rate: samples nearer a training image than the 1st "
                "percentile of held-out reals' distances (~0.01 without copying)",
            )
    for k, png in grids.items():
        create_image_artifact(
            image_url=data_uri(png),
            key=f"{s}-samples-{slug(k)}",
            description=f"Samples of {MODEL_LABELS.get(k, k)} (8 per class)",
        )
    images = "".join(_png_markdown(png, f"samples: {MODEL_LABELS.get(k, k)}") for k, png in grids.items())
    images += _png_markdown(weights_png, "class weights") if weights_png else ""
    images += _png_markdown(curve, "training curves") if curve else ""
    images += _png_markdown(quality, "time to quality") if quality else ""
    create_markdown_artifact(
        key=f"{s}-summary",
        description=f"dedt summary of {cfg.name}",
        markdown=f"# dedt: {cfg.name}\n\n{markdown_table(rows)}\n\n"
        f"## Artifacts (Parquet files in the store)\n{_parquet_links(results)}{images}",
    )


def publish_sweep_artifacts(
    name: str, folder: Path, rows: list[dict[str, Any]], time_to_quality: list[dict[str, Any]]
) -> None:
    """The sweep's comparison table, its time-to-quality table, its two plots, and a summary linking
    the Parquet file."""
    s = slug(name)
    if time_to_quality:
        create_table_artifact(
            key=f"{s}-time-to-quality",
            table=time_to_quality,
            description=f"Sweep {name}: speed-up to each target of the full-data curve "
            "[95% interval over seeds], per arm and setting",
        )
    create_table_artifact(key=f"{s}-comparison", table=rows, description=f"Sweep {name}: one row per point and model")
    for png in (FD_PLOT, COST_PLOT):
        create_image_artifact(
            image_url=data_uri(folder / png),
            key=f"{s}-{slug(png.removesuffix('.png'))}",
            description=f"Sweep {name}: {png.removesuffix('.png').replace('_', ' ')}",
        )
    table = folder / COMPARISON
    create_markdown_artifact(
        key=f"{s}-summary",
        description=f"dedt sweep {name}",
        markdown=f"# dedt sweep: {name}\n\n{markdown_table(rows)}\n\n"
        f"Table: [{table.name}]({table.as_uri()}) (`{table}`)"
        + _png_markdown(folder / FD_PLOT, "FD vs keep_frac")
        + _png_markdown(folder / COST_PLOT, "FD vs cost"),
    )


def publish_report_artifact(name: str, report: Path) -> None:
    """The frontier report as a Markdown artifact, its plots inlined (the UI cannot read local files)."""
    from dedt.frontier import plots_dir

    text = report.read_text()
    for png in sorted(plots_dir(report).glob("*.png")):
        text = text.replace(f"]({png.parent.name}/{png.name})", f"]({data_uri(png)})")
    create_markdown_artifact(key=f"{slug(name)}-report", markdown=text, description=f"Frontier report of sweep {name}")
