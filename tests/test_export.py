"""`dedt export`: a trained model as a diffusers pipeline folder that diffusers alone loads and samples
as dedt's own sampler does from the same noise, with a model card whose numbers are the run's artifacts."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dedt.config import resolve
from dedt.diffusion.posthoc import list_posthoc_snapshots, reconstruct_ema
from dedt.diffusion.presets import build_scheduler
from dedt.diffusion.sample import _sample_seed, sample
from dedt.diffusion.train import load_model
from dedt.errors import DedtError
from dedt.evaluate import read_metrics
from dedt.export import check_export, export_model, run_command, sweep_point
from dedt.pipeline import plan
from dedt.report import summary_rows
from dedt.runner import run_pipeline
from flows.cli import main

# The frontier-smoke pipeline without snapshots, at half its budgets: every stage real, each model 0.25 kimg.
PIPELINES = {
    "tiny": {
        "seed": 0,
        "dataset": {"source": "digits"},
        "encode": {"encoder": "pixels"},
        "score": {"method": "gaussian"},
        "select": {"keep_frac": 0.3},
        "reweight": {"method": "doremi", "reference_kimg": 0.25, "proxy_kimg": 0.125},
        "train": {"preset": "digits-tiny", "budget_kimg": 0.25, "batch_size": 32, "ema": "power", "snapshots": 0},
        "sample": {"steps": 2, "per_class": 8},
        "evaluate": {"classifier_epochs": 1, "kid": False},
    },
    # An unconditional model on all the data, nothing else trained: the pipeline classes must run it directly.
    "tiny-uncond": {
        "seed": 0,
        "dataset": {"source": "digits"},
        "select": {"keep_frac": 1.0},
        "reweight": {"method": "none", "reference_kimg": 0.25},
        "train": {"preset": "digits-tiny", "budget_kimg": 0.25, "batch_size": 32, "conditional": False},
        "sample": {"steps": 2, "per_class": 8},
        "evaluate": {"classifier_epochs": 1, "kid": False, "baselines": False},
    },
}
# tiny-uncond's point False is the pipeline itself (its stages are shared); True trains one model more.
SWEEPS = {"posthoc": {"base": "tiny-uncond", "grid": {"train.posthoc_ema": [False, True]}}}
POSTHOC = "train.posthoc_ema=True"
UNET = "unet/diffusion_pytorch_model.safetensors"
# The first test's setup trains both pipelines: minutes when other jobs load the 2 cores.
pytestmark = pytest.mark.timeout(1200)
SEED = 7  # the noise bank both samplers draw from
TOLERANCE = 1e-5  # float32 rounding: the same operations in the same order give the same bits on one CPU


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both pipelines run once (no Prefect) into one store; their results, for the card's numbers."""
    folder = tmp_path_factory.mktemp("export")
    pipelines = folder / "pipelines.yaml"
    pipelines.write_text(yaml.safe_dump({"pipelines": PIPELINES, "sweeps": SWEEPS}))
    store = folder / "store"
    results = {name: run_pipeline(resolve(name, pipelines), store) for name in PIPELINES}
    return {"pipelines": pipelines, "store": store, "results": results}


def _snippet(card: str, **values: list[int]) -> str:
    """The card's Python example with its ``labels = [...]`` / ``seeds = [...]`` lines set to ``values``."""
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    for name, value in values.items():
        code, count = re.subn(rf"^{name} = \[.*$", f"{name} = {value}", code, flags=re.MULTILINE)
        assert count == 1, f"the card's example has no single `{name} = [...]` line"
    return code


def _in_fresh_interpreter(code: str, tmp_path: Path) -> dict[str, np.ndarray]:
    """Run ``code`` (which leaves arrays in ``images``/``ddpm``) with ``python -c``; dedt is never imported."""
    out = tmp_path / "images.npz"
    epilogue = f"""
import sys, numpy
assert not any(m == "dedt" or m.startswith("dedt.") for m in sys.modules), "dedt was imported"
arrays = {{"images": numpy.asarray(images)}}
if "ddpm" in globals():
    arrays["ddpm"] = numpy.asarray(ddpm)
numpy.savez({str(out)!r}, **arrays)
"""
    # the same intra-op thread count as this process: a reduction split differently rounds differently, and
    # x0 clipping over 20 steps of a barely trained model turns that into visible differences
    prologue = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", prologue + code + epilogue],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as arrays:
        return dict(arrays)


def _dedt_images(
    trained: dict, name: str, key: str, labels: list[int] | None, *, n: int, method: str, steps: int
) -> np.ndarray:
    """dedt's sampler on the stored EMA model, as diffusers returns images: [0, 1]."""
    cfg = resolve(name, trained["pipelines"])
    node = plan(cfg, trained["store"])[key]
    x = sample(
        load_model(node.out.path),
        build_scheduler(cfg.train.preset),
        None if labels is None else np.asarray(labels),
        num=n,
        method=method,
        steps=steps,
        seed=SEED,
        progress=False,
    )
    return x / 2 + 0.5


def test_unconditional_export_runs_in_ddim_and_ddpm_pipelines_like_dedt(trained, tmp_path):
    cfg = resolve("tiny-uncond", trained["pipelines"])
    folder = export_model(cfg, trained["store"], "final", tmp_path / "uncond")
    assert {p.name for p in folder.iterdir()} == {"model_index.json", "unet", "scheduler", "README.md"}
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    seeds = [_sample_seed(SEED, i) for i in range(4)]
    code = (
        _snippet((folder / "README.md").read_text(), seeds=seeds)
        + """
from diffusers import DDPMPipeline
ddpm = DDPMPipeline.from_pretrained(folder)(batch_size=4, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                            num_inference_steps=5, output_type="np").images
"""
    )
    got = _in_fresh_interpreter(code, tmp_path)
    nhwc = (0, 2, 3, 1)
    ddim = _dedt_images(trained, "tiny-uncond", "train:uniform", None, n=4, method="ddim", steps=20).transpose(nhwc)
    ddpm = _dedt_images(trained, "tiny-uncond", "train:uniform", None, n=4, method="ddpm", steps=5).transpose(nhwc)
    assert got["images"].shape == ddim.shape == (4, 8, 8, 1)
    assert np.abs(got["images"] - ddim).max() <= TOLERANCE
    assert np.abs(got["ddpm"] - ddpm).max() <= TOLERANCE
    assert ddim.std() > 0.01  # real images, not a constant


def test_conditional_export_follows_the_card_loop_with_class_labels(trained, tmp_path):
    cfg = resolve("tiny", trained["pipelines"])
    folder = export_model(cfg, trained["store"], "final", tmp_path / "final")
    labels = [3, 1, 4, 1, 5, 9]
    seeds = [_sample_seed(SEED, i) for i in range(len(labels))]
    got = _in_fresh_interpreter(_snippet((folder / "README.md").read_text(), labels=labels, seeds=seeds), tmp_path)
    want = _dedt_images(trained, "tiny", "train", labels, n=len(labels), method="ddim", steps=20)
    assert got["images"].shape == want.shape == (6, 1, 8, 8)
    assert np.abs(got["images"] - want).max() <= TOLERANCE
    other = _dedt_images(trained, "tiny", "train", [0] * len(labels), n=len(labels), method="ddim", steps=20)
    assert np.abs(got["images"] - other).max() > 1e-3  # the label reached the UNet


def _tables(card: str) -> dict[tuple[str, ...], list[list[str]]]:
    """The card's Markdown tables: header cells -> body rows of cells."""
    tables: dict[tuple[str, ...], list[list[str]]] = {}
    header = None
    for line in card.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = tuple(cells)
            tables.setdefault(header, [])
        elif set("".join(cells)) != {"-"}:
            tables[header].append(cells)
    return tables


def _close(text: str, value: float) -> bool:
    return math.isnan(value) if text == "n/a" else math.isclose(float(text), value, rel_tol=1e-5)


def test_model_card_numbers_are_the_artifacts(trained, tmp_path):
    cfg = resolve("tiny", trained["pipelines"])
    results = trained["results"]["tiny"]
    folder = export_model(cfg, trained["store"], "final", tmp_path / "card", ema=False)
    card = (folder / "README.md").read_text()
    tables = _tables(card)
    overall = {
        tuple(r[:3]): r[3:] for r in tables["metric", "feature space", "reference", "value", "real images", "generated"]
    }
    memorization = {
        tuple(r[:3]): r[3:]
        for r in tables["metric", "feature space", "trained on", "value", "real images", "generated"]
    }
    per_class = {r[0]: r[1:] for r in tables["class", "FD", "real images", "generated"]}
    metrics = read_metrics(Path(results["evaluate:train"].path) / "metrics.parquet")
    for r in metrics:
        if r.cls == "all":
            cells = (memorization if r.metric.startswith("nn_") else overall)[r.metric, r.feature_space, r.reference]
        elif r.metric == "fd" and r.reference == "full":
            cells = per_class[r.cls]
        else:
            continue
        assert _close(cells[0], r.value) and cells[1:] == [str(r.n_real), str(r.n_fake)], (r, cells)
    assert memorization and len(overall) == sum(r.cls == "all" and not r.metric.startswith("nn_") for r in metrics)
    weights = results["reweight"].summary["weights"]
    kept = results["select"].summary["kept_per_class"]
    assert tables["class index", "class", "kept images", "weight"] == [
        [str(c), str(c), str(kept[str(c)]), f"{w:g}"] for c, w in enumerate(weights)
    ]  # digits' names are 0-9
    training = dict(tables["", ""])
    train = results["train"].summary
    assert training["images seen"] == f"{train['nimg']:,}" and training["wall-clock"] == f"{train['seconds']:.1f} s"
    expected = summary_rows(results, proxy_kimg=cfg.reweight.proxy_kimg * cfg.reweight.rounds)
    speedups = [dict(zip(expected[0], row, strict=True)) for row in tables[tuple(expected[0])]]
    assert speedups == [{k: "" if v is None else str(v) for k, v in row.items()} for row in expected]
    assert any(row["model"] == "pruned+reweighted" and row["speedup"] for row in speedups)
    for key in ("data", "select", "reweight", "train", "evaluate:train"):
        assert results[key].fingerprint in card
    assert "raw, not EMA" in card and "dedt 0.1.0" in card and "  select:\n    keep_frac: 0.3" in card


def test_bad_input_exits_2_with_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEDT_HOME", str(trained["store"]))
    base = ["--pipelines", str(trained["pipelines"])]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    cases = [
        (["export", "nope", "--to", str(tmp_path / "a")], "no pipeline 'nope'"),
        (["export", "tiny", "--model", "best", "--to", str(tmp_path / "a")], "unknown model 'best'"),
        (["export", "tiny-uncond", "--model", "reference", "--to", str(tmp_path / "a")], "trains no reference model"),
        (["export", "tiny", "--set", "seed=3", "--to", str(tmp_path / "a")], "has not run"),
        (["export", "tiny", "--set", "seed=3", "--to", str(tmp_path / "a")], "`dedt run tiny`"),
        (["export", "tiny", "--to", str(occupied)], "pass --force"),
        (["export", "tiny", "--to", str(occupied), "--force"], "holds no earlier export"),
        (["export", "tiny", "--to", str(occupied / "notes.txt")], "is a file"),
    ]
    for args, needle in cases:
        assert main(args + base) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (args, err)
    assert (occupied / "notes.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    # An earlier export is replaced with --force, and only then.
    target = tmp_path / "model"
    assert main(["export", "tiny", "--model", "uniform", "--to", str(target)] + base) == 0
    assert main(["export", "tiny", "--to", str(target)] + base) == 2
    assert main(["export", "tiny", "--model", "reference", "--to", str(target), "--force"] + base) == 0
    assert "the full data model" in (target / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_pipeline_export_option_fails_before_any_stage(trained, tmp_path):
    cfg = resolve("tiny-uncond", trained["pipelines"], [f"export.to={tmp_path / 'x'}", "export.model=reference"])
    with pytest.raises(DedtError, match="trains no reference model"):
        check_export(cfg, trained["store"])


def test_pipeline_run_ends_by_exporting(trained, tmp_path, prefect_harness):
    from flows.pipeline import pipeline_flow

    target = tmp_path / "deployed"
    result = pipeline_flow("tiny", str(trained["pipelines"]), [f"export.to={target}"], root=str(trained["store"]))
    assert result["exported"] == str(target) and (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert all(s["status"] == "cached" for s in result["stages"])
    # A scheduled deployment runs again: the earlier export is replaced.
    assert pipeline_flow("tiny", str(trained["pipelines"]), [f"export.to={target}"], root=str(trained["store"]))[
        "exported"
    ] == str(target)


def test_latent_export_ships_the_vae_and_the_card_decodes_like_dedt(tmp_path):
    from dedt.diffusion.latents import decode_latents
    from tests.test_latents import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")
    raw = {
        **PIPELINES["tiny-uncond"],
        "select": {"keep_frac": 0.3},
        "score": {"method": "random"},
        "train": {"preset": "digits-tiny", "budget_kimg": 0.128, "batch_size": 32, "vae_path": str(vae)},
    }
    pipelines = tmp_path / "pipelines.yaml"
    pipelines.write_text(yaml.safe_dump({"pipelines": {"latent": raw}}))
    cfg = resolve("latent", pipelines)
    results = run_pipeline(cfg, tmp_path / "store")
    folder = export_model(cfg, tmp_path / "store", "final", tmp_path / "latent")
    assert (folder / "vae" / "config.json").is_file()
    assert "vae" not in json.loads((folder / "model_index.json").read_text())  # not a DDPMPipeline component
    labels = [2, 7, 0]
    seeds = [_sample_seed(SEED, i) for i in range(len(labels))]
    got = _in_fresh_interpreter(_snippet((folder / "README.md").read_text(), labels=labels, seeds=seeds), tmp_path)
    model = load_model(Path(results["train:uniform"].path))
    z = sample(
        model,
        build_scheduler("digits-tiny", latent=True),
        np.asarray(labels),
        method="ddim",
        steps=20,
        seed=SEED,
        progress=False,
    )
    want = decode_latents(z, str(vae), 256) / 2 + 0.5
    assert got["images"].shape == want.shape == (3, 1, 8, 8)
    assert np.abs(got["images"] - want).max() <= TOLERANCE


@pytest.fixture(scope="module")
def posthoc(trained: dict) -> Path:
    """The sweep point trained with train.posthoc_ema run once (one more 0.25 kimg model): its train folder."""
    cfg, _ = sweep_point("posthoc", trained["pipelines"], POSTHOC)
    return Path(run_pipeline(cfg, trained["store"])["train:uniform"].path)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_sweep_point_exports_as_its_pipeline_with_the_same_overrides(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DEDT_HOME", str(trained["store"]))
    base = ["--pipelines", str(trained["pipelines"])]
    label = "train.posthoc_ema=False"
    point, pipeline = tmp_path / "point", tmp_path / "pipeline"
    assert main(["export", "--sweep", "posthoc", "--point", label, "--to", str(point)] + base) == 0
    assert main(["export", "tiny-uncond", "--set", "train.posthoc_ema=false", "--to", str(pipeline)] + base) == 0
    got, want = _files(point), _files(pipeline)
    assert UNET in got and "scheduler/scheduler_config.json" in got
    cards = got.pop("README.md").decode(), want.pop("README.md").decode()
    assert got == want
    # The cards differ only in the folder of the usage example and the command that computes the stages.
    sweep = f"`dedt sweep posthoc` (point `{label}`, with the same --pipelines)"
    assert sweep in cards[0]
    assert (
        cards[0]
        .replace(str(point), str(pipeline))
        .replace(sweep, run_command(resolve("tiny-uncond", trained["pipelines"])))
        == cards[1]
    )


def test_ema_none_exports_the_raw_weights_and_the_default_the_runs_ema(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DEDT_HOME", str(trained["store"]))
    base = ["tiny-uncond", "--pipelines", str(trained["pipelines"])]
    run = Path(trained["results"]["tiny-uncond"]["train:uniform"].path)
    for flags, weights in [(["--ema", "none"], "model"), (["--no-ema"], "model"), ([], "ema"), (["--ema"], "ema")]:
        folder = tmp_path / "-".join(["x", *flags])
        assert main(["export", *base, *flags, "--to", str(folder)]) == 0, flags
        assert _same_tensors(load_file(folder / UNET), load_file(run / f"{weights}.safetensors")), flags
        assert ("raw, not EMA weights" in (folder / "README.md").read_text()) == (weights == "model")


def test_ema_sigma_rel_exports_the_posthoc_reconstruction(trained, posthoc, tmp_path, monkeypatch):
    monkeypatch.setenv("DEDT_HOME", str(trained["store"]))
    folder = tmp_path / "posthoc"
    assert (
        main(
            [
                "export",
                "--sweep",
                "posthoc",
                "--point",
                POSTHOC,
                "--ema",
                "0.075",
                "--to",
                str(folder),
                "--pipelines",
                str(trained["pipelines"]),
            ]
        )
        == 0
    )
    want = reconstruct_ema(list_posthoc_snapshots(posthoc), 0.075)
    assert _same_tensors(load_file(folder / UNET), want)
    assert not _same_tensors(want, load_file(posthoc / "ema.safetensors"))  # not the run's own EMA
    assert "post-hoc EMA weights of sigma_rel 0.075" in (folder / "README.md").read_text()


def test_bad_sweep_point_or_ema_exits_2_with_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEDT_HOME", str(trained["store"]))
    to = ["--to", str(tmp_path / "a"), "--pipelines", str(trained["pipelines"])]
    cases = [
        (
            ["--sweep", "posthoc", "--point", "seed=1"],
            "has no point 'seed=1'; its points: 'train.posthoc_ema=False', 'train.posthoc_ema=True'",
        ),
        (["--sweep", "nope", "--point", "seed=1"], "no sweep 'nope'"),
        (["--sweep", "posthoc"], "--sweep SWEEP with --point LABEL"),
        (["tiny", "--point", POSTHOC], "--sweep SWEEP with --point LABEL"),
        (["tiny", "--sweep", "posthoc", "--point", POSTHOC], "--sweep SWEEP with --point LABEL"),
        (["--sweep", "posthoc", "--point", POSTHOC, "--set", "seed=1"], "--set applies to a pipeline"),
        (["tiny", "--ema", "0.075"], "--set train.posthoc_ema=true"),
        (["tiny", "--ema", "0.5"], "sigma_rel must be in (0, 0.2887)"),
        (["tiny", "--ema", "half"], "--ema takes a sigma_rel"),
    ]
    for args, needle in cases:
        assert main(["export", *args, *to]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "a").exists()
    cfg = resolve("tiny", trained["pipelines"], [f"export.to={tmp_path / 'a'}", "export.ema=0.075"])
    with pytest.raises(DedtError, match="train.posthoc_ema: true"):
        check_export(cfg, trained["store"])  # before a deployment run trains anything
