"""The end of a deployment run with ``export: {to: DIR}``: the model as a diffusers folder, its card
published as a Markdown artifact (the UI shows what the folder's README.md says)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from dedt.config import PipelineConfig
from dedt.export import CARD, export_model
from tasks.artifacts import slug


@task(name="export", cache_policy=NO_CACHE, persist_result=False, retries=0)
def export_task(cfg: PipelineConfig, root: str) -> str:
    """Export ``cfg.export.model`` to ``cfg.export.to``, replacing an earlier export there; returns the folder."""
    folder = export_model(cfg, Path(root), cfg.export.model, Path(cfg.export.to), ema=cfg.export.ema, force=True)
    create_markdown_artifact(
        key=f"{slug(cfg.name)}-model-card",
        markdown=(folder / CARD).read_text(),
        description=f"Model card of the {cfg.export.model} model of {cfg.name}, in {folder}",
    )
    return str(folder)
