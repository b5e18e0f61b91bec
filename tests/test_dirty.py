"""Dirty data: the contaminated benchmark's generator, near-duplicate removal and trimming, the
memorization rate and the confusion table of what each selection removed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dedt.config import ContaminateConfig, PipelineConfig, build_config
from dedt.data.contaminate import KINDS, contaminate, duplicated_ids, read_contaminants
from dedt.data.manifest import holdout_mask
from dedt.data.sources import RawDataset
from dedt.dedup import best_of_groups, clean, duplicate_groups, group_table
from dedt.errors import DedtError
from dedt.pipeline import plan, run_node

K, PER_CLASS, SIDE = 4, 50, 12


def _raw(channels: int = 1, seed: int = 0) -> RawDataset:
    """Distinct random images, PER_CLASS of each of K classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (K * PER_CLASS, SIDE, SIDE, channels), dtype=np.uint8)
    return RawDataset(images, np.repeat(np.arange(K), PER_CLASS), [f"c{c}" for c in range(K)])


def _find(images: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Row of each image in ``original`` (-1 when it is none of them)."""
    lookup = {img.tobytes(): i for i, img in enumerate(original)}
    return np.asarray([lookup.get(img.tobytes(), -1) for img in images])


ALL = ContaminateConfig(
    duplicate_frac=0.1, near_duplicate_frac=0.1, off_domain_frac=0.05, mislabel_frac=0.05, max_copies=8, seed=3
)


def test_each_kind_is_generated_as_declared() -> None:
    raw = _raw()
    holdout = holdout_mask(raw.labels, 0.1, 0)
    dirty = contaminate(raw, holdout, ALL)
    n = int((~holdout).sum())  # 180 train rows, no imbalance
    kinds, of, images, labels = dirty.kinds, dirty.duplicate_of, dirty.raw.images, dirty.raw.labels
    counts = dirty.counts()
    assert counts["mislabel"] == round(0.05 * n) == 9 and counts["off-domain"] == 9
    origin = _find(images, raw.images)
    # Held-out rows: the same images, clean, labels unchanged.
    assert sorted(origin[dirty.holdout]) == sorted(np.flatnonzero(holdout)) and set(kinds[dirty.holdout]) == {"none"}
    # Mislabels: an original train image with another class's label.
    mis = kinds == "mislabel"
    assert np.all(origin[mis] >= 0) and np.all(labels[mis] != raw.labels[origin[mis]])
    clean_rows = kinds == "none"
    assert np.array_equal(labels[clean_rows], raw.labels[origin[clean_rows]])
    # Exact duplicates: byte copies of round(0.1 n) = 18 distinct clean originals, 1..8 copies each, same label.
    for kind, exact in (("duplicate", True), ("near-duplicate", False)):
        rows = np.flatnonzero(kinds == kind)
        sources = of[rows]
        assert len(np.unique(sources)) == 18 and np.all(kinds[sources] == "none")
        assert np.bincount(np.unique(sources, return_counts=True)[1]).nonzero()[0].max() <= 8
        assert np.array_equal(labels[rows], labels[sources])
        same = [np.array_equal(images[r], images[s]) for r, s in zip(rows, sources, strict=True)]
        assert all(same) if exact else not any(same)
        if not exact:  # near: small changes (12 px images are not shifted), far below two random images' gap
            gap = np.abs(images[rows].astype(int) - images[sources].astype(int)).mean()
            assert gap < 20 < np.abs(images[0].astype(int) - images[1].astype(int)).mean()
    assert np.all(of[~np.isin(kinds, ("duplicate", "near-duplicate"))] == -1)
    # Off-domain: new images (none of the originals), labels in range; every other row an original.
    off = kinds == "off-domain"
    assert np.all(origin[off] == -1) and np.all((labels[off] >= 0) & (labels[off] < K))
    assert np.all(origin[clean_rows | mis] >= 0)
    assert len(images) == len(raw.images) + counts["duplicate"] + counts["near-duplicate"] + 9
    assert set(kinds) <= set(KINDS)


def test_contamination_is_deterministic_from_its_seed() -> None:
    raw = _raw()
    holdout = holdout_mask(raw.labels, 0.1, 0)
    a, b = contaminate(raw, holdout, ALL), contaminate(raw, holdout, ALL)
    for x, y in (
        (a.raw.images, b.raw.images),
        (a.raw.labels, b.raw.labels),
        (a.kinds, b.kinds),
        (a.duplicate_of, b.duplicate_of),
        (a.holdout, b.holdout),
    ):
        assert np.array_equal(x, y)
    other = contaminate(raw, holdout, ALL.model_copy(update={"seed": 4}))
    assert not np.array_equal(a.kinds, other.kinds)


def test_heavy_tailed_copies_and_class_imbalance() -> None:
    raw = _raw()
    holdout = np.zeros(len(raw.labels), bool)
    many = contaminate(raw, holdout, ContaminateConfig(duplicate_frac=0.5, copies_exponent=1.5, max_copies=30))
    copies = np.unique(many.duplicate_of[many.duplicate_of >= 0], return_counts=True)[1]
    assert len(copies) == 100 and copies.min() == 1 and 5 < copies.max() <= 30  # most once, a few many times
    assert np.bincount(copies).argmax() == 1  # P(1) = 1 / zeta(1.5) = 0.38 is the mode
    skewed = contaminate(raw, holdout, ContaminateConfig(imbalance=10.0))
    expected = [math.ceil(PER_CLASS * 10.0 ** (-c / (K - 1))) for c in range(K)]  # 50, 24, 11, 5
    assert np.bincount(skewed.raw.labels).tolist() == expected
    assert set(skewed.kinds) == {"none"}


@pytest.mark.parametrize("off_domain", ["patches", "textures"])
@pytest.mark.parametrize("channels", [1, 3])
def test_off_domain_images_fit_the_source(off_domain: str, channels: int) -> None:
    raw = _raw(channels)
    dirty = contaminate(
        raw, np.zeros(len(raw.labels), bool), ContaminateConfig(off_domain_frac=0.1, off_domain=off_domain)
    )
    off = dirty.raw.images[dirty.kinds == "off-domain"]
    assert off.shape == (20, SIDE, SIDE, channels) and off.dtype == np.uint8 and off.std() > 5


def test_contamination_is_off_by_default_and_keeps_fingerprints() -> None:
    clean_cfg = PipelineConfig()
    assert not clean_cfg.dataset.contaminate.active and not clean_cfg.select.cleans
    planned = plan(clean_cfg, Path("/store"))
    assert "contaminate" not in planned["data"].config["dataset"]
    assert set(planned["select"].config["select"]) == {"keep_frac", "per_class"}
    # Zero fractions change nothing: same fingerprint whatever the seed.
    idle = build_config({"dataset": {"contaminate": {"seed": 7}}}, "x")
    assert (
        plan(idle, Path("/store"))["data"].out.fingerprint
        == plan(build_config({}, "x"), Path("/store"))["data"].out.fingerprint
    )
    dirty = build_config(
        {"dataset": {"contaminate": {"duplicate_frac": 0.1}}, "select": {"dedup_threshold": 0.01}}, "x"
    )
    dirty_plan = plan(dirty, Path("/store"))
    assert dirty_plan["data"].config["dataset"]["contaminate"]["duplicate_frac"] == 0.1
    assert dirty_plan["select"].inputs == {"score": "score", "encode": "encode"}


def test_a_contaminated_pipeline_is_measured_on_its_clean_source() -> None:
    dirty = build_config({"dataset": {"contaminate": {"off_domain_frac": 0.1}}, "train": {"snapshots": 3}}, "x")
    clean = build_config({"train": {"snapshots": 3}}, "x")
    dirty_plan, clean_plan = plan(dirty, Path("/store")), plan(clean, Path("/store"))
    # The clean source is the clean pipeline's own data stage, and the classifier (the feature space) its own.
    assert dirty_plan["data:clean"].out == clean_plan["data"].out
    assert dirty_plan["classifier"].out == clean_plan["classifier"].out
    assert dirty_plan["data"].out != clean_plan["data"].out
    for key in ("evaluate:reference", "curve:reference", "evaluate:train:uniform", "curve:train:uniform"):
        assert dirty_plan[key].inputs["reals"] == "data:clean" and dirty_plan[key].inputs["data"] == "data"
        assert "reals" not in clean_plan[key].inputs
    assert "data:clean" not in clean_plan


def test_the_clean_source_shares_the_held_out_images(tmp_path: Path) -> None:
    from dedt.data.manifest import load_split
    from dedt.store import read_parquet

    _, planned = _dirty_pipeline(tmp_path)
    cfg = build_config({"dataset": {"source": "digits"}}, "clean")
    run_node(cfg, plan(cfg, tmp_path), "data")
    dirty = planned["data"].out.file("manifest.parquet")
    clean = planned["data:clean"].out.file("manifest.parquet")
    assert planned["data:clean"].out.is_complete()  # the clean pipeline's data stage is the dirty one's source
    assert "contaminant" not in read_parquet(clean).column_names

    def rows(manifest: Path, split: str) -> list[bytes]:
        _, images, labels = load_split(manifest, split)
        return sorted(img.tobytes() + bytes([label]) for img, label in zip(images, labels, strict=True))

    assert rows(dirty, "holdout") == rows(clean, "holdout")
    assert len(rows(dirty, "train")) > len(rows(clean, "train"))


def test_samples_are_measured_against_the_target_and_memorization_against_the_trained_on() -> None:
    import tempfile

    from dedt.evaluate import RealSource, evaluate_samples, lookup
    from dedt.metrics import frechet_distance, gaussian_stats
    from dedt.metrics.registry import FeatureSpace

    rng = np.random.default_rng(2)
    trained = rng.uniform(-1, 1, (120, 1, 8, 8)).astype(np.float32)  # the dirty train split
    target = rng.uniform(-0.5, 0.5, (100, 1, 8, 8)).astype(np.float32)  # its clean source, another spread
    heldout = rng.uniform(-1, 1, (60, 1, 8, 8)).astype(np.float32)
    held = (np.arange(500, 560), heldout, np.repeat([0, 1], 30))
    dirty = {"train": (np.arange(120), trained, np.repeat([0, 1], 60)), "holdout": held}
    clean = {"train": (np.arange(100), target, np.repeat([0, 1], 50)), "holdout": held}
    space = FeatureSpace("flat", {"test": 2}, lambda: lambda x: x.reshape(len(x), -1))
    flat = [a.reshape(len(a), -1) for a in (trained, target, heldout)]
    fake = trained[:40]  # copies of trained-on images
    subset = np.arange(0, 120, 2)

    def fd(a: np.ndarray, b: np.ndarray) -> float:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))

    with tempfile.TemporaryDirectory() as root:
        goal = RealSource(Path(root), "clean-fp", clean.__getitem__, None, 60)
        source = RealSource(Path(root), "dirty-fp", dirty.__getitem__, subset, 60, target=goal)
        rows = evaluate_samples(
            fake, np.repeat([0, 1], 20), [space], source, ["a", "b"], prdc_k=3, with_kid=False, seed=0
        )
    assert lookup(rows, "fd", "flat", "full") == pytest.approx(fd(flat[0][:40], flat[1]), rel=1e-4)
    assert lookup(rows, "fd", "flat", "subset") == pytest.approx(fd(flat[0][:40], flat[0][subset]), rel=1e-4)
    assert lookup(rows, "kept_data_fd", "flat") == pytest.approx(fd(flat[0][subset], flat[1]), rel=1e-4)
    assert lookup(rows, "fd_real_floor", "flat") == pytest.approx(fd(flat[2], flat[1]), rel=1e-4)
    # Half the samples copy a kept image (the even rows), all of them a trained-on one: memorization reads the
    # kept subset (the other half count like unseen images, ~1% of the time each), never the target.
    assert 0.5 <= lookup(rows, "memorized_frac", "flat", "subset") <= 0.6


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["dataset.contaminate.duplicate_frac=1.5"], "dataset.contaminate.duplicate_frac"),
        (["dataset.contaminate.imbalance=0.5"], "dataset.contaminate.imbalance"),
        (["dataset.contaminate.off_domain=noise"], "dataset.contaminate.off_domain"),
        (["dataset.contaminate.dupes=0.1"], "dataset.contaminate.dupes"),
        (["dataset.contaminate.mislabel_frac=0.5", "dataset.contaminate.duplicate_frac=0.6"], "dataset.contaminate"),
        (["select.dedup_threshold=2.5"], "select.dedup_threshold"),
        (["select.trim_outliers_frac=1"], "select.trim_outliers_frac"),
    ],
)
def test_bad_options_give_one_clear_error(overrides: list[str], field: str) -> None:
    with pytest.raises(DedtError) as info:
        build_config({}, "p", overrides)
    message = str(info.value)
    assert "\n" not in message and f"'p': {field}:" in message


def test_duplicate_groups_are_found() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 32)).astype(np.float32)
    sizes = [1] * 20 + [2] * 10 + [5] * 5 + [12] * 5  # 40 originals, some with copies
    rows, truth = [], []
    for i, size in enumerate(sizes):
        for j in range(size):
            scale = rng.uniform(0.5, 2.0)  # cosine ignores scale: a brighter copy is still a copy
            rows.append(scale * (base[i] + (0 if j == 0 else 0.01) * rng.normal(size=32)))
            truth.append(i)
    x, truth = np.asarray(rows, np.float32), np.asarray(truth)
    order = rng.permutation(len(x))
    x, truth = x[order], truth[order]
    groups = duplicate_groups(x, 0.01)
    first = {t: np.flatnonzero(truth == t).min() for t in np.unique(truth)}
    assert groups.tolist() == [first[t] for t in truth]  # exactly the constructed groups, named by lowest row
    scores = rng.random(len(x))
    keep = best_of_groups(groups, scores)
    assert keep.sum() == 40
    for t in np.unique(truth):
        members = np.flatnonzero(truth == t)
        assert np.flatnonzero(keep[members]).tolist() == [np.argmax(scores[members])]
    cleaned = clean(x, scores, None, dedup_threshold=0.01, trim_outliers_frac=0.0)
    table = group_table(np.arange(len(x)) + 100, cleaned)
    assert len(table["sample_id"]) == len(x) - 20 and table["kept"].sum() == 20  # groups of 2+ only
    assert np.array_equal(keep, cleaned.kept)


def test_trimming_drops_only_the_lowest_density_tail() -> None:
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(95, 8)) * 0.05 + np.eye(8)[0]  # a tight cluster around one direction
    far = rng.normal(size=(5, 8))  # 5 scattered directions
    x = np.vstack([dense, far]).astype(np.float32)
    labels = np.zeros(100, np.int64)
    cleaned = clean(x, np.zeros(100), labels, dedup_threshold=None, trim_outliers_frac=0.05)
    assert np.flatnonzero(cleaned.trimmed).tolist() == [95, 96, 97, 98, 99]
    assert not cleaned.duplicate.any() and (cleaned.groups == -1).all()
    # Per class: floor(0.05 x 50) = 2 of each class.
    per_class = clean(x, np.zeros(100), np.repeat([0, 1], 50), dedup_threshold=None, trim_outliers_frac=0.05)
    assert per_class.trimmed[:50].sum() == 2 and per_class.trimmed[50:].sum() == 2


def _dirty_pipeline(tmp_path: Path, **select: object) -> tuple[PipelineConfig, dict]:
    cfg = build_config(
        {
            "dataset": {
                "source": "digits",
                "contaminate": {
                    "duplicate_frac": 0.05,
                    "near_duplicate_frac": 0.05,
                    "off_domain_frac": 0.05,
                    "mislabel_frac": 0.05,
                },
            },
            "score": {"method": "random"},
            "select": {"keep_frac": 1.0, **select},
        },
        "dirty",
    )
    planned = plan(cfg, tmp_path)
    for key in ("data", "encode", "score", "select"):
        if key in planned:  # keep_frac 1 without cleaning: no encode or score
            run_node(cfg, planned, key)
    return cfg, planned


def test_a_contaminated_pipeline_removes_its_constructed_duplicates(tmp_path: Path) -> None:
    from dedt.store import read_parquet

    _, planned = _dirty_pipeline(tmp_path, dedup_threshold=1e-6)
    manifest = planned["data"].out.file("manifest.parquet")
    ids, split, kinds, of = read_contaminants(manifest)
    assert {"duplicate", "near-duplicate", "off-domain", "mislabel"} <= set(kinds[split == "train"])
    assert set(kinds[split == "holdout"]) == {"none"}
    summary = planned["data"].out.read_json("summary.json")
    assert summary["contaminants"]["duplicate"] == int(((kinds == "duplicate") & (split == "train")).sum())
    kept = read_parquet(planned["select"].out.file("subset.parquet")).column("sample_id").to_numpy()
    groups = read_parquet(planned["select"].out.file("duplicates.parquet")).to_pydict()
    # Exact copies (cosine distance 0) of one original: exactly one member of each group is kept.
    exact = of[kinds == "duplicate"]
    for source in np.unique(exact):
        members = np.concatenate([[source], ids[(kinds == "duplicate") & (of == source)]])
        assert np.isin(members, kept).sum() == 1
        assert set(members) <= set(groups["sample_id"])
    assert set(duplicated_ids(manifest)) >= set(exact)


def test_clean_manifest_reads_as_all_clean(tmp_path: Path) -> None:
    cfg = build_config({"dataset": {"source": "digits"}}, "clean")
    planned = plan(cfg, tmp_path)
    run_node(cfg, planned, "data")
    manifest = planned["data"].out.file("manifest.parquet")
    from dedt.store import read_parquet

    assert read_parquet(manifest).column_names == ["sample_id", "label", "class_name", "split", "image"]
    _, _, kinds, of = read_contaminants(manifest)
    assert set(kinds) == {"none"} and (of == -1).all() and len(duplicated_ids(manifest)) == 0


def test_memorization_rate_counts_copies_and_spares_heldout_images() -> None:
    from dedt.evaluate import memorization_rate

    rng = np.random.default_rng(0)
    train, heldout = rng.normal(size=(500, 16)), rng.normal(size=(400, 16))
    copies = train[rng.choice(500, 200)]
    rate = memorization_rate(copies, train, heldout)
    assert rate["memorized_frac"] == 1.0 and rate["memorization_threshold"] > 0
    fresh = rng.normal(size=(2000, 16))  # unseen reals of the same distribution: ~1% by construction
    assert memorization_rate(fresh, train, heldout)["memorized_frac"] < 0.03
    assert memorization_rate(heldout, train, heldout)["memorized_frac"] == pytest.approx(0.01, abs=0.005)
    # Restricted to duplicated training images: copies of duplicated ones vs fresh samples near them.
    duplicated = np.zeros(500, bool)
    duplicated[:50] = True
    mixed = np.vstack([train[:50], fresh[:500]])
    rate = memorization_rate(mixed, train, heldout, seen_duplicated=duplicated)
    near_dup = rate["nearest_duplicated_frac"] * len(mixed)
    assert near_dup >= 50 and rate["memorized_frac_duplicated"] == pytest.approx(50 / near_dup, abs=0.02)
    assert "memorized_frac_duplicated" not in memorization_rate(fresh, train, heldout)


def test_memorization_rows_in_features_and_pixels() -> None:
    from dedt.evaluate import PIXELS, RealSource, evaluate_samples, lookup
    from dedt.metrics.registry import FeatureSpace

    rng = np.random.default_rng(1)
    train = rng.uniform(-1, 1, (120, 1, 4, 4)).astype(np.float32)
    heldout = rng.uniform(-1, 1, (60, 1, 4, 4)).astype(np.float32)
    labels = np.repeat([0, 1], 60)
    ids = np.arange(120)
    splits = {"train": (ids, train, labels), "holdout": (np.arange(120, 180), heldout, np.repeat([0, 1], 30))}
    space = FeatureSpace("flat", {"test": 1}, lambda: lambda x: x.reshape(len(x), -1) * 2.0)
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        source = RealSource(Path(root), "fp", splits.__getitem__, None, 60, duplicated_ids=np.arange(10))
        fake = train[:40]  # copies: 10 of duplicated images, 30 of the others
        rows = evaluate_samples(
            fake, labels[:40], [space], source, ["a", "b"], prdc_k=3, with_kid=False, seed=0, pixels=True
        )
    for name in ("flat", PIXELS):
        assert lookup(rows, "memorized_frac", name) == 1.0
        assert lookup(rows, "memorized_frac_duplicated", name) == 1.0
        assert lookup(rows, "nearest_duplicated_frac", name) == 0.25
    assert lookup(rows, "fd", PIXELS) is None  # pixels: memorization only


def test_confusion_table_on_a_constructed_case() -> None:
    from dedt.dirty import confusion, confusion_markdown

    # ids 0..9 clean (0 and 1 were copied), 10..12 copies of 0, 13 a near copy of 1, 14..15 off-domain,
    # 16..19 mislabelled.
    kinds = np.array(["none"] * 10 + ["duplicate"] * 3 + ["near-duplicate"] + ["off-domain"] * 2 + ["mislabel"] * 4)
    of = np.array([-1] * 10 + [0, 0, 0, 1] + [-1] * 6)
    kept = np.zeros(20, bool)
    kept[[0, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16]] = True  # drops clean 1 and 9, copy 10, all off-domain, 3 mislabels
    table = confusion(kinds, kept, of, np.arange(20))
    assert table["kept"] == 12 and table["n"] == 20
    assert table["clean_kept"] == 0.8  # 8 of 10
    assert table["duplicate_removed"] == pytest.approx(1 / 3) and table["near-duplicate_removed"] == 0.0
    assert table["off-domain_removed"] == 1.0 and table["mislabel_removed"] == 0.75
    # Group of 0: 0, 11, 12 kept (3 left); group of 1: only the near copy 13 kept (one left).
    assert table["groups"] == 2 and table["groups_one"] == 0.5 and table["groups_lost"] == 0.0
    assert "| dedup | 12 / 20 | 80.0% | 33.3% | 0.0% | 100.0% | 75.0% | 50.0% | 0.0% |" in confusion_markdown(
        {"dedup": table}
    )
    assert confusion(np.array(["none", "none"]), np.array([True, False]))["duplicate_removed"] is None
    with pytest.raises(DedtError, match="unknown contaminant kinds"):
        confusion(np.array(["dirty"]), np.array([True]))


def test_confusion_from_the_store(tmp_path: Path) -> None:
    from dedt.dirty import confusion_from_store

    _, planned = _dirty_pipeline(tmp_path, dedup_threshold=1e-6)
    tables = confusion_from_store(
        planned["data"].out.file("manifest.parquet"), {"dedup": planned["select"].out.file("subset.parquet")}
    )
    t = tables["dedup"]
    assert t["groups_one"] is not None and t["duplicate_removed"] > 0.5 and t["clean_kept"] > 0.9


def test_the_frontier_report_keeps_cleaned_arms_apart_and_shows_what_they_removed(tmp_path: Path) -> None:
    from dedt.frontier import arms, write_report
    from tests.test_frontier import _row

    _, planned = _dirty_pipeline(tmp_path / "store", dedup_threshold=1e-6)
    dirty = {
        "manifest": str(planned["data"].out.file("manifest.parquet")),
        "memorized_frac": 0.02,
        "memorized_frac_pixels": 0.0,
        "memorized_frac_duplicated": 0.1,
        "memorized_frac_duplicated_pixels": None,
    }
    subset = str(planned["select"].out.file("subset.parquet"))
    rows = []
    for seed in (0, 1):
        rows.append(_row(tmp_path, seed, "full data", 80.0) | dirty | {"subset": None, "cleaning": "dedup 1e-06"})
        rows.append(
            _row(tmp_path, seed, "pruned", 60.0, scorer="random")
            | dirty
            | {"subset": subset, "cleaning": "dedup 1e-06"}
        )
    found = {a.label: a for a in arms(rows)}
    assert set(found) == {"full data", "random 1, uniform, dedup 1e-06"} and found["full data"].is_full
    out = write_report(rows, tmp_path / "report.md", title="dirty", command="test")
    text = out.read_text()
    assert "## Dirty data: what each selection removed" in text and "## Dirty data: memorization" in text
    assert "| full data | " in text and "| 100.0% | 0.0% | 0.0% | 0.0% | 0.0% |" in text  # full data removes nothing
    assert "| random 1, uniform, dedup 1e-06 | 0.020 ± 0.000 | 0.000 ± 0.000 | 0.100 ± 0.000 | – |" in text


def test_sweep_rows_carry_cleaning_ground_truth_and_memorization() -> None:
    from dedt.pipeline import NodeResult
    from dedt.sweep import _dirty_details, cleaning_label

    cfg = build_config(
        {
            "dataset": {"contaminate": {"duplicate_frac": 0.1}},
            "select": {"dedup_threshold": 0.001, "trim_outliers_frac": 0.05},
        },
        "x",
    )
    assert cleaning_label(cfg) == "dedup 0.001 + trim 0.05" and cleaning_label(build_config({}, "x")) == ""
    overall = {
        "classifier": {"subset": {"memorized_frac": 0.03, "memorized_frac_duplicated": 0.2}},
        "pixels": {"subset": {"memorized_frac": 0.01}},
    }
    results = {
        "data": NodeResult("data", "d", "/s/data/d", True, 0.0, {}),
        "select": NodeResult("select", "s", "/s/select/s", True, 0.0, {}),
        "evaluate:train:uniform": NodeResult("evaluate:train:uniform", "e", "/s/e", True, 0.0, {"overall": overall}),
    }
    assert _dirty_details(cfg, results, "pruned") == {
        "manifest": "/s/data/d/manifest.parquet",
        "subset": "/s/select/s/subset.parquet",
        "memorized_frac": 0.03,
        "memorized_frac_duplicated": 0.2,
        "memorized_frac_pixels": 0.01,
        "memorized_frac_duplicated_pixels": None,
    }
    clean = _dirty_details(build_config({}, "x"), results, "pruned")  # a dirty sweep's uncontaminated point
    assert clean["manifest"] is None and clean["subset"] is None and clean["memorized_frac"] == 0.03


def test_a_dirty_sweep_keeps_its_uncontaminated_full_data_apart(tmp_path: Path) -> None:
    from dedt.frontier import arms, dirty_section
    from tests.test_frontier import _row

    _, planned = _dirty_pipeline(tmp_path / "store")
    manifest = str(planned["data"].out.file("manifest.parquet"))
    rows = []
    (tmp_path / "clean").mkdir()
    for seed in (0, 1):
        rows.append(
            _row(tmp_path, seed, "full data", 80.0)
            | {"contaminated": True, "manifest": manifest, "subset": None, "memorized_frac": 0.05}
        )
        rows.append(
            _row(tmp_path / "clean", seed, "full data", 60.0, scorer="random")
            | {"contaminated": False, "manifest": None, "subset": None, "memorized_frac": 0.01}
        )
    found = {a.label: a for a in arms(rows)}
    assert set(found) == {"full data", "full data, uncontaminated"}
    assert found["full data"].is_full and not found["full data, uncontaminated"].is_full
    text = "\n".join(dirty_section(list(found.values())))
    assert "| full data, uncontaminated | 0.010 ± 0.000 |" in text  # memorization, but no confusion row
    assert text.count("| full data |") == 2


def test_a_dirty_sweep_is_also_judged_against_the_clean_data_curve(tmp_path: Path) -> None:
    from dedt.frontier import write_report
    from tests.test_frontier import _row

    rows = []
    (tmp_path / "clean").mkdir()
    for seed in (0, 1):
        rows.append(_row(tmp_path, seed, "full data", 80.0) | {"contaminated": True})
        rows.append(_row(tmp_path / "clean", seed, "full data", 60.0, scorer="random") | {"contaminated": False})
        rows.append(
            _row(tmp_path, seed, "pruned", 40.0, scorer="random") | {"contaminated": True, "cleaning": "trim 0.05"}
        )
    text = write_report(rows, tmp_path / "report.md", title="dirty", command="test").read_text()
    verdict = text.split("## Verdict")[1].split("\n## ")[0]
    clean = text.split("## Dirty data: against the clean data's full-data curve")[1].split("\n## ")[0]
    # The verdict names the best arm a user of the dirty data can choose, never the clean data itself.
    assert "F(B)** (FD 28.28): best arm random 1, uniform, trim 0.05" in verdict
    assert "uncontaminated" not in verdict
    # FD = scale / sqrt(kimg), B = 8 kimg at 1 s per kimg: the clean data reaches 60/sqrt(8) at 8 s; the
    # cleaned arm at kimg 8 x (40/60)^2 plus its 1 s of selection (1.76x); the dirty full data never does.
    assert "| full data, uncontaminated | 2 | 21.2 ± 0.0 | 0.40 ± 0.00 | 1x (yardstick) |" in clean
    assert f"{8 / (8 * 4 / 9 + 1):.2f}x [" in clean.split("| random 1, uniform, trim 0.05 |")[1].split("\n")[0]
    dirty_full = clean.split("| full data | 2 |")[1].split("\n")[0]
    assert dirty_full.count("not reached") == 3  # F(B), 1.05 F(B), 1.10 F(B): 80/sqrt(8) is 1.33x them
    assert "- **F(B)** (FD 21.21): best arm on the dirty data random 1, uniform, trim 0.05 at 1.76x" in clean
