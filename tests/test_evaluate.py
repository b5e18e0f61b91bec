"""The evaluate stage's library: cached reference statistics, full vs subset references, errors, report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dedt.config import build_config
from dedt.errors import DedtError
from dedt.evaluate import (
    RealSource,
    check_sample_counts,
    evaluate_samples,
    lookup,
    per_class_fd,
    refstats_dir,
    report_markdown,
    summary,
    write_metrics,
)
from dedt.metrics.inception import WEIGHTS_ENV, WEIGHTS_FILE
from dedt.metrics.registry import FeatureSpace, feature_space, to_uint8, validate_feature_space
from dedt.pipeline import plan
from tests.helpers import TINY

torch.set_num_threads(1)

SIDE = 4  # 4x4 grey images: 16-d pixel features


def clusters(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two well separated classes: class 0 around -0.5, class 1 around +0.5 (float32 (N, 1, 4, 4))."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n_per_class)
    images = (labels[:, None, None, None] - 0.5) + 0.1 * rng.standard_normal((len(labels), 1, SIDE, SIDE))
    return np.clip(images, -1, 1).astype(np.float32), labels.astype(np.int64)


class Splits:
    """A manifest stand-in: train and holdout splits, counting reads."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        train, train_labels = clusters(30, seed=0)
        holdout, holdout_labels = clusters(6, seed=1)
        self.data = {
            "train": (np.arange(60), train, train_labels),
            "holdout": (np.arange(60, 72), holdout, holdout_labels),
        }

    def __call__(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.reads.append(split)
        return self.data[split]


class CountingPixels:
    """A feature space's extractor: flattened pixels, counting the images it saw."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.images += len(images)
        return images.reshape(len(images), -1)


def pixel_space(extractor: CountingPixels, identity: dict | None = None) -> FeatureSpace:
    return FeatureSpace("pixels", identity or {"test": 1}, lambda: extractor)


def source(root: Path, splits: Splits, subset_ids: np.ndarray | None) -> RealSource:
    return RealSource(root, "datafp", splits, subset_ids, n_holdout=12)


def run(
    root: Path,
    splits: Splits,
    extractor: CountingPixels,
    fake: np.ndarray,
    fake_labels: np.ndarray,
    subset_ids: np.ndarray | None = None,
    identity: dict | None = None,
) -> list:
    return evaluate_samples(
        fake,
        fake_labels,
        [pixel_space(extractor, identity)],
        source(root, splits, subset_ids),
        ["zero", "one"],
        prdc_k=3,
        with_kid=True,
        seed=0,
    )


def test_second_evaluation_reuses_reference_statistics(tmp_path):
    splits, extractor = Splits(), CountingPixels()
    fake, fake_labels = clusters(10, seed=2)
    first = run(tmp_path, splits, extractor, fake, fake_labels)
    assert splits.reads == ["train", "holdout"] and extractor.images == 60 + 20 + 12
    folder = refstats_dir(tmp_path, "datafp", "train", pixel_space(extractor))
    assert folder.is_complete() and folder.path.parent.name == "refstats"
    assert {p.name for p in folder.path.glob("*.npy")} == {
        "sample_ids.npy",
        "labels.npy",
        "features.npy",
        "mu.npy",
        "sigma.npy",
    }
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.path.iterdir() if p.name != ".lock"}

    second = run(tmp_path, splits, CountingPixels(), fake, fake_labels)  # a new extractor: only the samples
    assert splits.reads == ["train", "holdout"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.path.iterdir() if p.name != ".lock"} == mtimes
    assert [(r.metric, r.reference, r.cls, r.value) for r in second] == [
        (r.metric, r.reference, r.cls, r.value) for r in first
    ]

    run(tmp_path, splits, CountingPixels(), fake, fake_labels, identity={"test": 2})  # other weights: recomputed
    assert splits.reads == ["train", "holdout"] * 2


def test_full_and_subset_references_differ_in_recall(tmp_path):
    # The model covers class 0 only; the kept subset is class 0 only. Against the subset it misses
    # nothing, against the full split it misses the pruned-away class 1: the cost of pruning.
    splits = Splits()
    fake, _ = clusters(20, seed=3)
    fake, fake_labels = fake[:20], np.zeros(20, np.int64)
    rows = run(tmp_path, splits, CountingPixels(), fake, fake_labels, subset_ids=np.arange(30))
    # The classes are far apart, so every k-NN ball of a class-0 image is the same in both references
    # and the full split's class-1 half is never reached: exactly half the recall and coverage.
    recall, coverage = (lookup(rows, m, "pixels", "subset") for m in ("recall", "coverage"))
    assert recall > 0.8 and coverage > 0.8
    assert lookup(rows, "recall", "pixels", "full") == pytest.approx(recall / 2)
    assert lookup(rows, "coverage", "pixels", "full") == pytest.approx(coverage / 2)
    assert lookup(rows, "fd", "pixels", "full") > 10 * lookup(rows, "fd", "pixels", "subset")
    assert lookup(rows, "kept_data_recall", "pixels") == pytest.approx(0.5, abs=0.05)
    assert lookup(rows, "kept_data_precision", "pixels") == 1.0
    # The model trained on the subset: the memorization check compares with the subset.
    assert {r.reference for r in rows if r.metric.startswith("nn_")} == {"subset"}
    assert np.isnan(per_class_fd(rows, "pixels", "full")["one"])  # no class-1 samples: NaN, not a number
    assert per_class_fd(rows, "pixels", "subset").keys() == {"zero", "one"}


def test_metrics_file_summary_report_and_plot(tmp_path):
    import pyarrow.parquet as pq

    from dedt.report import plot_class_fd

    fake, fake_labels = clusters(10, seed=4)
    rows = run(tmp_path, Splits(), CountingPixels(), fake, fake_labels, subset_ids=np.arange(0, 60, 2))
    write_metrics(rows, 7, tmp_path / "metrics.parquet")
    table = pq.read_table(tmp_path / "metrics.parquet").to_pandas()
    assert list(table.columns) == ["metric", "feature_space", "reference", "class", "value", "n_real", "n_fake", "seed"]
    assert set(table.reference) == {"full", "subset"} and set(table.seed) == {7}
    assert {
        "fd",
        "kid",
        "kid_std",
        "precision",
        "recall",
        "density",
        "coverage",
        "fd_real_floor",
        "kept_data_fd",
        "nn_median_ratio",
        "nn_closer_to_train",
    } <= set(table.metric)
    assert np.isfinite(table.value).all()
    info = summary(rows, ["pixels"])
    assert info["fd"] == pytest.approx(lookup(rows, "fd", "pixels"), rel=1e-5)
    assert set(info["fd_per_class"]) == {"zero", "one"} and "subset" in info["overall"]["pixels"]
    text = report_markdown(rows, title="t", seed=7, images={"samples": "grid.png"})
    for heading in ("## Overall", "## What pruning cost", "## Per-class FD", "## Memorization", "## Real-data floor"):
        assert heading in text
    assert "![samples](grid.png)" in text
    plot_class_fd(info["fd_per_class"], {"zero": 1.0, "one": float("nan")}, tmp_path / "fd.png")
    assert (tmp_path / "fd.png").read_bytes()[:4] == b"\x89PNG"


def test_too_few_samples_state_the_minimum(tmp_path):
    with pytest.raises(DedtError, match=r"1 generated samples; the covariance needs at least 2 .* prdc_k \+ 1 = 6"):
        check_sample_counts(1, {"real train images": 100}, prdc_k=5)
    with pytest.raises(DedtError, match=r"4 images in the kept subset.*at least prdc_k \+ 1 = 6"):
        check_sample_counts(50, {"images in the kept subset": 4}, prdc_k=5)
    fake, fake_labels = clusters(1, seed=5)
    with pytest.raises(DedtError, match="2 generated samples.*at least prdc_k \\+ 1 = 4.*sample.per_class"):
        run(tmp_path, Splits(), CountingPixels(), fake, fake_labels)


def test_stale_reference_features_of_another_dimension(tmp_path):
    splits = Splits()
    fake, fake_labels = clusters(10, seed=6)
    run(tmp_path, splits, CountingPixels(), fake, fake_labels)
    pooled = FeatureSpace("pixels", {"test": 1}, lambda: lambda x: x.reshape(len(x), -1)[:, :8])  # same key, 8-d
    with pytest.raises(DedtError, match=r"refstats/.* are 16-d but the samples' are 8-d.*delete that folder"):
        evaluate_samples(
            fake,
            fake_labels,
            [pooled],
            source(tmp_path, splits, None),
            ["zero", "one"],
            prdc_k=3,
            with_kid=False,
            seed=0,
        )


# ---------------------------------------------------------------------------------------------
# Feature-space registry


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vgg16", "unknown feature space 'vgg16'; known: classifier"),
        ("classifier:x", "takes no ':' argument"),
        ("inception:/x.pt", f"set \\${WEIGHTS_ENV}"),
        ("clip", "needs an argument: .*clip:<model>"),
        ("dinov2:tiny", "choose one of small, base, large, giant"),
    ],
)
def test_bad_feature_space_names(name, message):
    with pytest.raises(DedtError, match=message):
        validate_feature_space(name)


def test_config_validates_feature_spaces():
    cfg = build_config(TINY, "tiny")
    assert cfg.evaluate.feature_spaces == ["classifier"] and cfg.evaluate.prdc_k == 5 and cfg.evaluate.kid
    with pytest.raises(DedtError, match="evaluate.feature_spaces.*listed twice"):
        build_config(TINY, "tiny", ["evaluate.feature_spaces=[classifier, classifier]"])
    with pytest.raises(DedtError, match="evaluate.feature_spaces.*unknown feature space"):
        build_config(TINY, "tiny", ["evaluate.feature_spaces=[fid]"])


def test_metric_options_change_only_the_evaluate_stages():
    def fingerprints(overrides):
        return {k: n.out.fingerprint for k, n in plan(build_config(TINY, "tiny", overrides), Path("/s")).items()}

    before, after = fingerprints([]), fingerprints(["evaluate.prdc_k=3"])
    assert {k for k in before if before[k] != after[k]} == {
        "evaluate:reference",
        "evaluate:train",
        "evaluate:train:uniform",
    }
    nodes = plan(build_config(TINY, "tiny"), Path("/s"))
    assert "select" in nodes["evaluate:train"].inputs and "select" not in nodes["evaluate:reference"].inputs


def test_missing_inception_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / WEIGHTS_FILE
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(DedtError, match=rf"{missing}.*does not exist.*{WEIGHTS_FILE}.*{WEIGHTS_ENV}"):
        validate_feature_space("inception")
    with pytest.raises(DedtError, match=rf"evaluate.feature_spaces.*{missing}"):  # before any stage runs
        build_config(TINY, "tiny", ["evaluate.feature_spaces=[classifier, inception]"])


def test_missing_dinov2_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(
        DedtError,
        match=r"torch/hub/checkpoints/dinov2_vits14_pretrain\.pth.*"
        r"model\.safetensors.*dinov2:small:/path/to/weights\.pth",
    ):
        validate_feature_space("dinov2:small")
    missing = tmp_path / "dino.pth"
    with pytest.raises(DedtError, match=rf"{missing} does not exist; put Meta's dinov2_vitb14_pretrain\.pth"):
        validate_feature_space(f"dinov2:base:{missing}")


def test_missing_clip_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip
    with pytest.raises(
        DedtError,
        match=r"open_clip_model\.safetensors.*\.cache/clip/ViT-B-32\.pt.*"
        r"as a feature space: clip:ViT-B-32:/path/to/weights\.safetensors",
    ):
        validate_feature_space("clip:ViT-B-32")  # the default tag: openai
    missing = tmp_path / "clip.safetensors"
    with pytest.raises(DedtError, match=str(missing)):
        validate_feature_space(f"clip:ViT-B-32:{missing}")


def test_classifier_space_is_keyed_by_the_weights(tmp_path):
    from dedt.metrics.classifier import build_classifier, save_classifier

    path = tmp_path / "classifier.safetensors"
    torch.manual_seed(0)
    save_classifier(build_classifier(1, 2), path, 1, 2)
    space = feature_space("classifier", classifier=path)
    assert space.extract(np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 64)
    save_classifier(build_classifier(1, 2), path, 1, 2)  # retrained: other weights, other cache key
    assert feature_space("classifier", classifier=path).identity != space.identity
    with pytest.raises(DedtError, match="run the classifier stage first"):
        feature_space("classifier", classifier=tmp_path / "missing.safetensors")
    with pytest.raises(DedtError, match="float32 \\(N, C, H, W\\)"):
        space.extract(np.zeros((3, 8, 8), np.float32))


def test_inception_space_quantises_like_a_png_and_replicates_grey():
    from dedt.metrics.inception import inception_features, load_inception

    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    images = (pixels / 127.5 - 1.0).astype(np.float32)  # what load_split gives for the manifest's PNGs
    np.testing.assert_array_equal(to_uint8(images), pixels.transpose(0, 2, 3, 1))
    space = feature_space("inception", device="cpu")
    ours = space.extract(images)
    reference = inception_features(np.repeat(pixels, 3, axis=1), load_inception())
    assert ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
