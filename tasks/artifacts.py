"""What a user looks at in the Prefect UI: kept per class, class weights, metrics, a summary."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dedt.config import PipelineConfig
from dedt.pipeline import NodeResult
from dedt.report import markdown_table


def _png_markdown(path: Path, title: str) -> str:
    """Embed a PNG as a data URI: it renders in the UI without serving files."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"\n\n**{title}**\n\n![{title}](data:image/png;base64,{data})"


def publish_run_artifacts(cfg: PipelineConfig, results: dict[str, NodeResult], rows: list[dict[str, Any]]) -> None:
    slug = cfg.name.lower().replace("_", "-")
    if "select" in results:
        kept = results["select"].summary["kept_per_class"]
        create_table_artifact(key=f"{slug}-kept-per-class", table=[{"class": c, "kept": n} for c, n in kept.items()],
                              description="Samples kept per class")
    if "reweight" in results:
        weights = results["reweight"].summary["weights"]
        create_table_artifact(key=f"{slug}-class-weights", table=[{"group": g, "weight": w} for g, w in enumerate(weights)],
                              description="Group-DRO class weights")
    files = "\n".join(f"- `{key}`: `{r.path}`" for key, r in results.items())
    images = "".join(_png_markdown(Path(results[k].path) / "grid.png", f"samples: {k}")
                     for k in results if k.startswith("evaluate:"))
    if "reweight" in results:
        images += _png_markdown(Path(results["reweight"].path) / "weights.png", "class weights")
    create_markdown_artifact(key=f"{slug}-summary", description=f"dedt summary of {cfg.name}",
                             markdown=f"# dedt: {cfg.name}\n\n{markdown_table(rows)}\n\n## Artifacts\n{files}{images}")
