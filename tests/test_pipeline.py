"""The pipeline end to end through real Prefect: artifacts, cache hits, exact invalidation."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dedt.config import build_config
from dedt.pipeline import plan
from tests.helpers import TINY


def _fingerprints(overrides=()):
    cfg = build_config(TINY, "tiny", list(overrides))
    return {k: n.out.fingerprint for k, n in plan(cfg, Path("/store")).items()}


def test_changing_select_invalidates_exactly_downstream():
    before, after = _fingerprints(), _fingerprints(["select.keep_frac=0.5"])
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"select", "reweight", "train", "train:uniform", "evaluate:train", "evaluate:train:uniform"}


def test_changing_train_keeps_selection():
    before, after = _fingerprints(), _fingerprints(["train.lr=0.002"])
    unchanged = {k for k in before if before[k] == after[k]}
    # the cost calibration times steps of this model and batch; the learning rate does not change their cost
    assert unchanged == {"data", "encode", "score", "select", "classifier", "calibrate"}


def test_reference_shared_across_keep_ratios_and_scorers():
    a, b = _fingerprints(), _fingerprints(["select.keep_frac=0.1", "score.method=random"])
    assert a["reference"] == b["reference"] and a["evaluate:reference"] == b["evaluate:reference"]


def test_uniform_pipeline_has_no_dro_stages():
    fps = _fingerprints(["reweight.method=uniform"])
    assert "reweight" not in fps and "train:uniform" in fps and "evaluate:reference" in fps


def test_latent_diffusion_feeds_latents_to_the_diffusion_model_stages_only(tmp_path):
    """Node.reads_latents: the stages that train, load or time a DM read the VAE latents; the others
    (selection, classifier, metrics) keep reading the images, with or without a reference checkpoint."""
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")  # planning hashes the VAE's files, loads nothing
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text("{}")
    train = TINY["train"] | {"vae_path": str(tmp_path / "vae"), "snapshots": 1}
    for reference in ({}, {"reference_path": str(tmp_path / "ref")}):
        cfg = build_config({**TINY, "train": train, "reweight": TINY["reweight"] | reference}, "latent")
        readers = {key for key, node in plan(cfg, tmp_path / "store").items() if "latents" in node.inputs}
        assert readers == {"reference", "reweight", "train", "train:uniform", "calibrate"} - (
            {"calibrate"} if reference else set()
        )


def test_end_to_end_then_fully_cached(prefect_harness, store, pipelines_file):
    from flows.pipeline import pipeline_flow

    first = pipeline_flow("tiny", str(pipelines_file))
    assert all(s["status"] == "computed" for s in first["stages"])
    second = pipeline_flow("tiny", str(pipelines_file))
    assert all(s["status"] == "cached" for s in second["stages"])
    assert second["summary"] == first["summary"]

    by_key = {s["stage"]: s for s in first["stages"]}

    def stage_dir(key, name):
        return store / key.split(":")[0].replace("reference", "train") / by_key[key]["fingerprint"] / name

    subset = pq.read_table(stage_dir("select", "subset.parquet"))
    counts = np.bincount(subset.column("label").to_numpy())
    manifest = pq.read_table(stage_dir("data", "manifest.parquet")).to_pandas()
    train_counts = manifest[manifest.split == "train"].label.value_counts().sort_index().to_numpy()
    np.testing.assert_array_equal(counts, np.ceil(0.3 * train_counts).astype(int))
    weights = pq.read_table(stage_dir("reweight", "weights.parquet")).column("weight").to_numpy()
    assert weights.sum() == pytest.approx(1.0) and np.all(weights > 0)
    metrics = pq.read_table(stage_dir("evaluate:train", "metrics.parquet")).to_pandas()
    assert set(metrics["class"]) == {"all", *map(str, range(10))} and np.isfinite(metrics.value).all()
    assert [r["model"] for r in first["summary"]] == ["full data", "pruned", "pruned+reweighted"]
    relation = first["weights_vs_difficulty"]
    assert relation["classes"] == 10 and 0 <= relation["classes_improved"] <= 10
    assert -1.0 <= relation["spearman_weight_vs_reference_fd"] <= 1.0
    assert stage_dir("evaluate:train", "grid.png").read_bytes()[:4] == b"\x89PNG"

    # Editing one stage's config recomputes exactly that stage and what depends on it.
    third = pipeline_flow("tiny", str(pipelines_file), ["sample.steps=3"])
    recomputed = {s["stage"] for s in third["stages"] if s["status"] == "computed"}
    assert recomputed == {"evaluate:reference", "evaluate:train", "evaluate:train:uniform"}
