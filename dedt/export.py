"""Trained models out of the store: a standard diffusers pipeline folder with a generated model card.

``export_model`` writes what ``DDPMPipeline.from_pretrained(folder)`` and ``DDIMPipeline`` load with
no dedt import: ``model_index.json``, ``unet/`` (``UNet2DModel.save_pretrained``, safetensors),
``scheduler/`` (the training DDPM schedule with the "trailing" timestep spacing dedt samples with, so
diffusers' samplers reproduce dedt's images from the same noise), ``vae/`` for latent models (loaded
by ``subfolder="vae"``: ``DDPMPipeline`` has no such component, and listing one makes diffusers warn
that the folder is broken), and ``README.md``, a model card built from the stage artifacts only:
no number in it is typed by hand or recomputed differently from the run's own summary.

The weights are the run's own EMA (the default), the raw ones (``ema=False``), or the post-hoc EMA of
any sigma_rel (``ema=0.075``), rebuilt by ``dedt.diffusion.posthoc.reconstruct_ema`` from the snapshots
a run with ``train.posthoc_ema`` saves. A sweep point exports as the pipeline config it is (``sweep_point``).

The store is untrusted (README, "Security model"): only JSON, Parquet and safetensors are read.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from dedt.artifacts import MANIFEST, METRICS, read_summary
from dedt.config import PipelineConfig
from dedt.diffusion.ema import MAX_SIGMA_REL
from dedt.errors import DedtError
from dedt.pipeline import Node, NodeResult, plan
from dedt.report import MODEL_LABELS, markdown_table, summary_rows

# What a user names -> the plan keys it may mean, first present wins ("final" is the reweighted model
# when the pipeline reweights, else the pruned one, else the full-data one when nothing else is trained).
MODELS: dict[str, tuple[str, ...]] = {
    "final": ("train", "train:uniform", "reference"),
    "uniform": ("train:uniform",),
    "reference": ("reference",),
}
CARD = "README.md"
INDEX = "model_index.json"
# Sampling of the card's usage example: dedt's default DDIM steps and a small grid of images.
EXAMPLE_STEPS = 20
EXAMPLE_IMAGES = 8


@dataclass(frozen=True)
class ExportPlan:
    """What one export reads: the model's train node and the plan it belongs to."""

    cfg: PipelineConfig
    planned: dict[str, Node]
    key: str  # the plan key, e.g. "train"
    command: str  # what computes the plan's stages (run_command, or a sweep's), for messages and the card


def run_command(cfg: PipelineConfig) -> str:
    """The command that computes ``cfg``'s stages, for messages and the card."""
    return f"`dedt run {cfg.name}` (with the same --pipelines and --set options)"


def sweep_point(sweep: str, pipelines: Path, label: str) -> tuple[PipelineConfig, str]:
    """The config of point ``label`` of ``sweep`` and the command that computes its stages: a point is
    exported as the pipeline config it is. An unknown label names the valid ones."""
    from dedt.sweep import expand

    points = {p.label: p for p in expand(sweep, Path(pipelines))}
    if label not in points:
        raise DedtError(f"sweep {sweep!r} has no point {label!r}; its points: {', '.join(map(repr, points))}")
    return points[label].cfg, f"`dedt sweep {sweep}` (point `{label}`, with the same --pipelines)"


def parse_ema(text: str | None) -> bool | float:
    """``dedt export --ema``'s value: absent -> the run's own EMA (True), ``none`` -> the raw weights
    (False), a number -> the post-hoc EMA of that sigma_rel."""
    if text is None:
        return True
    if text == "none":
        return False
    try:
        return float(text)
    except ValueError:
        raise DedtError(f"--ema takes a sigma_rel such as 0.075, or none (the raw weights); got {text!r}") from None


def _check_ema(cfg: PipelineConfig, ema: bool | float) -> None:
    """A post-hoc sigma_rel must be in EDM2's range and the run must have saved the snapshots it is built from."""
    if isinstance(ema, bool):
        return
    if not 0 < ema < MAX_SIGMA_REL:
        raise DedtError(f"the post-hoc EMA's sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}); got {ema:g}")
    if not cfg.train.posthoc_ema:
        raise DedtError(
            f"the post-hoc EMA of sigma_rel {ema:g} is rebuilt from snapshots that only a run with "
            f"train.posthoc_ema: true saves, and pipeline {cfg.name!r} trains without it: "
            "run it with --set train.posthoc_ema=true, then export"
        )


def plan_export(
    cfg: PipelineConfig, root: Path, model: str = "final", ema: bool | float = True, command: str | None = None
) -> ExportPlan:
    """Resolve ``model`` to a trained-model node of ``cfg``'s plan that has the ``ema`` weights; a
    DedtError when it has none. ``command`` computes the stages (default ``run_command(cfg)``)."""
    _check_ema(cfg, ema)
    if model not in MODELS:
        raise DedtError(f"unknown model {model!r} to export; choose one of {', '.join(MODELS)}")
    planned = plan(cfg, Path(root))
    key = next((k for k in MODELS[model] if k in planned), None)
    if key is None:
        raise DedtError(
            f"pipeline {cfg.name!r} trains no {model} model (evaluate.baselines=true trains it); "
            "export --model final instead"
        )
    if planned[key].stage != "train":
        raise DedtError(
            f"pipeline {cfg.name!r} takes its reference from reweight.reference_path "
            f"{cfg.reweight.reference_path}: that folder already is a diffusers model, nothing to export"
        )
    return ExportPlan(cfg, planned, key, command or run_command(cfg))


def check_target(target: Path, *, force: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder unless ``force`` and it holds an earlier
    export (``model_index.json``): ``--force`` never deletes a folder dedt did not write."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise DedtError(f"export target {target} is a file; pass a folder with --to")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise DedtError(
            f"export target {target} is not empty; pass --force to replace an earlier export there, "
            "or pick an empty folder"
        )
    if not (target / INDEX).is_file():
        raise DedtError(
            f"export target {target} is not empty and holds no earlier export ({INDEX}); "
            "--force replaces only an earlier export: pick an empty folder"
        )


def check_export(cfg: PipelineConfig, root: Path) -> None:
    """Before a run with ``export.to``: its model exists in the plan and the target may be written
    (an earlier export there is replaced, as a scheduled deployment re-exports each run)."""
    plan_export(cfg, root, cfg.export.model, cfg.export.ema)
    check_target(Path(cfg.export.to), force=True)


def stage_results(planned: dict[str, Node]) -> dict[str, NodeResult]:
    """A NodeResult per complete stage of a plan, read from its summary.json: nothing is run."""
    results = {}
    for key, node in planned.items():
        if node.out.is_complete():
            summary = read_summary(node.out)
            results[key] = NodeResult(key, node.out.fingerprint, str(node.out.path), True, summary["seconds"], summary)
    return results


def export_model(
    cfg: PipelineConfig,
    root: Path,
    model: str,
    target: Path,
    *,
    ema: bool | float = True,
    force: bool = False,
    command: str | None = None,
) -> Path:
    """Write ``model`` (final | uniform | reference) of ``cfg``'s run in store ``root`` to ``target`` as a
    diffusers pipeline folder with a model card; returns the folder. ``ema``: True the run's EMA, False
    the raw weights, a number the post-hoc EMA of that sigma_rel; ``command`` as in ``plan_export``.

    The model's train stage (and its evaluate stage, when the pipeline has one) must be complete. The
    folder appears whole or not at all: it is written beside ``target`` and renamed into place.
    """
    job = plan_export(cfg, root, model, ema, command)
    target = Path(target).absolute()
    check_target(target, force=force)
    results = stage_results(job.planned)
    needed = [job.key] + [k for k in (f"evaluate:{job.key}",) if k in job.planned]
    missing = [k for k in needed if k not in results]
    if missing:
        raise DedtError(
            f"stage {missing[0]} of pipeline {cfg.name!r} has not run ({job.planned[missing[0]].out.path} "
            f"is not complete): {job.command} computes it, then export"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(job, results, tmp, target, ema=ema)
        _replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_folder(
    job: ExportPlan, results: dict[str, NodeResult], folder: Path, target: Path, *, ema: bool | float
) -> None:
    """unet/, scheduler/, model_index.json (DDPMPipeline.save_pretrained), vae/ when latent, README.md."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from dedt.diffusion.presets import build_scheduler
    from dedt.diffusion.train import load_model

    cfg = job.cfg
    run = Path(results[job.key].path)
    unet = load_model(run, ema=ema is not False)
    if not isinstance(ema, bool):
        from dedt.diffusion.posthoc import list_posthoc_snapshots, reconstruct_ema

        unet.load_state_dict(reconstruct_ema(list_posthoc_snapshots(run), ema))
    trained = build_scheduler(job.planned[job.key].config["train"]["preset"], latent=cfg.train.latent)
    # dedt.diffusion.sample samples with "trailing" spacing; training only reads the betas.
    scheduler = DDPMScheduler.from_config(trained.config, timestep_spacing="trailing")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    if cfg.train.latent:
        from dedt.diffusion.latents import load_vae

        load_vae(cfg.train.vae_path).save_pretrained(folder / "vae", safe_serialization=True)
    card = model_card(job, results, folder=target, ema=ema, parameters=sum(p.numel() for p in unet.parameters()))
    (folder / CARD).write_text(card)


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished folder to ``target``; an earlier export there (checked) is removed after."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# -- the model card ---------------------------------------------------------------------------------


def model_card(
    job: ExportPlan, results: dict[str, NodeResult], *, folder: Path, ema: bool | float, parameters: int
) -> str:
    """The README.md of an exported model: what data, budget and cost made it, what it scored, how to
    use it and how to reproduce it, every number read from the stage artifacts in ``results``."""
    from dedt.data.manifest import class_names

    cfg, key = job.cfg, job.key
    names = class_names(MANIFEST.path(results["data"].path))
    conditional = cfg.train.conditional
    label = MODEL_LABELS.get(key, key)
    train = results[key].summary
    tags = (
        ["dedt", "diffusers", "ddpm"]
        + (["class-conditional"] if conditional else [])
        + (["latent-diffusion"] if cfg.train.latent else [])
    )
    kind = f"class-conditional on {len(names)} classes" if conditional else "unconditional"
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: unconditional-image-generation",
        f"tags: [{', '.join(tags)}]",
        "---",
        "",
        f"# {cfg.name}: the {label} model",
        "",
        f"A `{job.planned[key].config['train']['preset']}` UNet ({parameters:,} parameters, "
        f"{_shape_text(job, results)}, {kind}) trained by dedt {_dedt_version()} on {cfg.dataset.source} "
        f"({_weights_text(ema)}). Exported from `{results[key].path}`.",
        "",
        "## Using it",
        "",
        _usage(cfg, folder, names),
        "",
        *_data_section(job, results, names),
        "",
        *_training_section(job, results, train),
        "",
        *_metrics_section(job, results),
        "",
        *_cost_section(job, results),
        "",
        *_reproduce_section(job, results),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _weights_text(ema: bool | float) -> str:
    if isinstance(ema, bool):
        return "EMA weights" if ema else "raw, not EMA weights"
    return f"post-hoc EMA weights of sigma_rel {ema:g}, rebuilt from the run's `train.posthoc_ema` snapshots"


def _dedt_version() -> str:
    try:
        return version("dedt")
    except PackageNotFoundError:  # run from a checkout without installing it
        return "(not installed)"


def _shape_text(job: ExportPlan, results: dict[str, NodeResult]) -> str:
    h, w, c = results["data"].summary["shape"]
    if job.cfg.train.latent:
        lc, lh, lw = results["latents"].summary["shape"]
        return f"{lc}x{lh}x{lw} VAE latents of {w}x{h} images with {c} channel(s)"
    return f"{w}x{h} images with {c} channel(s)"


def _usage(cfg: PipelineConfig, folder: Path, names: list[str]) -> str:
    """Runnable example: an unconditional pixel model runs as the pipeline itself; a class-conditional
    or latent one through its own short loop (diffusers' DDIMPipeline passes no class label and
    decodes no latents). Image i starts from the noise of ``torch.Generator().manual_seed(seeds[i])``."""
    n = min(EXAMPLE_IMAGES, len(names)) if cfg.train.conditional else 4
    imports = "from diffusers import DDIMPipeline" + (", AutoencoderKL" if cfg.train.latent else "")
    head = [
        "```python",
        "import torch",
        imports,
        "",
        f"folder = {str(folder)!r}",
        "pipe = DDIMPipeline.from_pretrained(folder)  # DDPMPipeline loads it too",
    ]
    seeds = f"seeds = {list(range(n))}  # one start-noise seed per image"
    if not cfg.train.conditional and not cfg.train.latent:
        body = [
            seeds,
            "images = pipe(batch_size=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],",
            f'              num_inference_steps={EXAMPLE_STEPS}, output_type="np").images  # (N, H, W, C) in [0, 1]',
            "```",
            "",
            "`DDPMPipeline.from_pretrained(folder)` samples ancestrally instead (1,000 steps by default).",
        ]
        return "\n".join(head + body)
    body = []
    if cfg.train.conditional:
        body.append(f"labels = {list(range(n))}  # one class index per image (table under Data)")
    body += [
        seeds,
        "unet, scheduler = pipe.unet, pipe.scheduler",
        f"scheduler.set_timesteps({EXAMPLE_STEPS})",
        "shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)",
        "x = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])",
        "y = torch.tensor(labels)" if cfg.train.conditional else "y = None",
        "with torch.no_grad():",
        "    for t in scheduler.timesteps:",
        "        x = scheduler.step(unet(x, t, class_labels=y).sample, t, x).prev_sample",
    ]
    if cfg.train.latent:
        body += [
            '    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")',
            "    x = vae.decode(x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample",
        ]
    body += ["images = (x / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]", "```", ""]
    if cfg.train.conditional:
        body.append(
            "The UNet is class-conditional and `DDIMPipeline.__call__` passes no class label, so this is "
            "the pipeline's own DDIM loop (eta 0) with a label per image (`class_labels`)."
        )
    if cfg.train.latent:
        body.append("The UNet generates VAE latents; the `vae/` sub-folder (not a pipeline component) decodes them.")
    return "\n".join(head + body)


def _data_section(job: ExportPlan, results: dict[str, NodeResult], names: list[str]) -> list[str]:
    from dedt.reweight import DEFAULT_ETA

    cfg, key = job.cfg, job.key
    data = results["data"].summary
    source = cfg.dataset.source + (f" (`{cfg.dataset.path}`)" if cfg.dataset.path else "")
    lines = [
        "## Data",
        "",
        f"- source: {source}; {data['n_train']} training images, {data['n_holdout']} held out "
        f"(`dataset.holdout_frac` {cfg.dataset.holdout_frac}), images {data['shape'][1]}x{data['shape'][0]}",
    ]
    pruned = "select" in job.planned[key].inputs
    kept = results["select"].summary["kept_per_class"] if pruned else _train_counts(results)
    if pruned:
        scorer = (
            "every image kept"
            if cfg.select.keep_frac == 1
            else (
                f"scored by `{cfg.score.method}` on `{cfg.encode.encoder}` embeddings"
                f"{' per class' if cfg.score.per_class else ''}"
            )
        )
        lines.append(
            f"- selection: {scorer}, `select.keep_frac` {cfg.select.keep_frac} "
            f"{'of each class' if cfg.select.per_class else 'of all'}: kept "
            f"{results['select'].summary['kept']} of {results['select'].summary['of']}"
        )
    else:
        lines.append("- selection: none, the whole train split (the full-data model)")
    weights = None
    if "reweight" in job.planned[key].inputs:
        rw, summary = cfg.reweight, results["reweight"].summary
        applied = "sampling (P(class g) = w_g)" if cfg.train.weighting == "sampling" else "per-sample loss weights"
        lines.append(
            f"- weighting: group DRO (DoReMi) over {summary['groups']} groups, applied by {applied}; "
            f"proxy {rw.proxy_kimg} kimg x {rw.rounds} round(s), {rw.excess} excess, "
            f"eta {DEFAULT_ETA[rw.excess] if rw.eta is None else rw.eta}, smoothing {rw.smoothing}"
        )
        if summary["groups"] == "class":
            weights = summary["weights"]
        else:
            lines.append("- cluster weights: " + ", ".join(f"{w:g}" for w in summary["weights"]))
    else:
        lines.append("- weighting: none (every kept image equally likely)")
    header = ["class index", "class", "kept images"] + (["weight"] if weights else [])
    body = [
        [str(i), name, str(kept.get(str(i), 0))] + ([f"{weights[i]:g}"] if weights else [])
        for i, name in enumerate(names)
    ]
    return lines + ["", _table(header, body)]


def _train_counts(results: dict[str, NodeResult]) -> dict[str, int]:
    """Images per class of the train split, from the manifest's label and split columns only."""
    import pyarrow.parquet as pq

    table = pq.read_table(MANIFEST.path(results["data"].path), columns=["label", "split"])
    counts: dict[str, int] = {}
    for label, split in zip(table.column("label").to_pylist(), table.column("split").to_pylist(), strict=False):
        if split == "train":
            counts[str(label)] = counts.get(str(label), 0) + 1
    return counts


def _training_section(job: ExportPlan, results: dict[str, NodeResult], train: dict[str, Any]) -> list[str]:
    options = job.planned[job.key].config["train"]
    rows = [
        ["budget", f"{options['budget_kimg']:g} kimg (`train.budget_policy` {job.cfg.train.budget_policy})"],
        ["images seen", f"{train['nimg']:,}"],
        ["optimiser steps", f"{train['steps']:,}"],
        ["batch size", str(options["batch_size"])],
        ["wall-clock", f"{train['seconds']:.1f} s"],
        ["throughput", f"{train['images_per_s']:.1f} images/s"],
        ["final loss", f"{train['final_loss']:.6g}"],
        ["EMA", f"`{options['ema']}`"],
    ]
    return ["## Training", "", _table(["", ""], rows)]


def _metrics_section(job: ExportPlan, results: dict[str, NodeResult]) -> list[str]:
    """Every overall metric row of metrics.parquet, the first space's per-class FD, memorization."""
    from dedt.evaluate import read_metrics

    key = f"evaluate:{job.key}"
    if key not in results:
        return [
            "## Metrics",
            "",
            "Not evaluated: the pipeline has no evaluate stage for this model (`evaluate.baselines` false).",
        ]
    rows = read_metrics(METRICS.path(results[key].path))
    s, ev = job.cfg.sample, job.cfg.evaluate
    overall = [r for r in rows if r.cls == "all" and not r.metric.startswith("nn_")]
    space = ev.feature_spaces[0]
    per_class = [
        r for r in rows if r.metric == "fd" and r.cls != "all" and r.feature_space == space and r.reference == "full"
    ]
    memorization = [r for r in rows if r.metric.startswith("nn_")]
    lines = [
        "## Metrics",
        "",
        f"From `{METRICS.path(results[key].path)}`: {s.method.upper()}-{s.steps} samples, {s.per_class} per class, "
        f"noise bank {s.bank_seed}. Reference `full` = the whole real train split, `subset` = the kept images "
        "the model trained on; `kept_data_*` scores the kept subset itself against the full split, "
        "`fd_real_floor` held-out reals (what a perfect model scores). Feature spaces: "
        + ", ".join(f"`{f}`" for f in ev.feature_spaces)
        + ".",
        "",
        _table(
            ["metric", "feature space", "reference", "value", "real images", "generated"],
            [[r.metric, r.feature_space, r.reference, _num(r.value), str(r.n_real), str(r.n_fake)] for r in overall],
        ),
        "",
        f"Per-class FD (`{space}` features, against the full split):",
        "",
        _table(
            ["class", "FD", "real images", "generated"],
            [[r.cls, _num(r.value), str(r.n_real), str(r.n_fake)] for r in per_class],
        ),
    ]
    if memorization:
        lines += [
            "",
            "Memorization: nearest-neighbour distances from the samples to the images the model trained "
            "on vs to held-out reals (copies show as `nn_median_ratio` well below 1 and `nn_closer_to_train` "
            "well above 0.5):",
            "",
            _table(
                ["metric", "feature space", "trained on", "value", "real images", "generated"],
                [
                    [r.metric, r.feature_space, r.reference, _num(r.value), str(r.n_real), str(r.n_fake)]
                    for r in memorization
                ],
            ),
        ]
    return lines


def _cost_section(job: ExportPlan, results: dict[str, NodeResult]) -> list[str]:
    """The run's summary table (``dedt.report.summary_rows``, as ``dedt run`` prints it)."""
    rw = job.cfg.reweight
    rows = summary_rows(results, proxy_kimg=rw.proxy_kimg * rw.rounds)
    if not rows:
        return ["## Cost and equal-quality speed-up", "", "Not measured: no model of this run was evaluated."]
    return [
        "## Cost and equal-quality speed-up",
        "",
        f"This model is the **{MODEL_LABELS.get(job.key, job.key)}** row. speedup = the time the full-data model "
        "needs to reach this model's FD on its own curve / this model's cost (calibrated seconds: images seen x "
        "the measured seconds per image, plus selection and, reweighted, the DRO proxy); below 1x, training on "
        "all the data for less time was better. speedup_scratch also counts training the DRO's reference. "
        "Empty cells: the run measured no full-data model or no calibration.",
        "",
        markdown_table(rows),
    ]


def _reproduce_section(job: ExportPlan, results: dict[str, NodeResult]) -> list[str]:
    """The resolved config and the fingerprints of the model, its evaluation and everything upstream."""
    keys = _upstream(job.planned, job.key) + [k for k in (f"evaluate:{job.key}",) if k in job.planned]
    config = yaml.safe_dump({job.cfg.name: job.cfg.model_dump(mode="json")}, sort_keys=False).rstrip()
    return [
        "## Reproducing it",
        "",
        f"dedt {_dedt_version()}. {job.command} with this config computes the same stage folders "
        "(`<stage>/<fingerprint>` under `$DEDT_HOME`); a finished one is reused, not recomputed.",
        "",
        _table(
            ["stage", "folder", "seconds"],
            [
                [k, f"`{job.planned[k].stage}/{job.planned[k].out.fingerprint}`", f"{results[k].seconds:g}"]
                for k in keys
            ],
        ),
        "",
        "```yaml",
        config,
        "```",
    ]


def _upstream(planned: dict[str, Node], key: str) -> list[str]:
    """``key`` and every node it reads from, in plan order."""
    seen, todo = set(), [key]
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo += planned[k].inputs.values()
    return [k for k in planned if k in seen]


def _num(value: float) -> str:
    """Six significant digits, as the stages' summaries round; NaN (too few samples) as n/a."""
    return "n/a" if value != value else f"{value:.6g}"


def _table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table; a class name from the data cannot break out of its cell."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(" ".join(c.replace("|", "\\|").split()) for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in body])
