"""Cluster-stratified selection and kept counts from DRO weights (dedt.stratify, dedt.apportion): exact
counts, known answers on constructed sets, determinism, the options' validation and fingerprints, and the
select stage reading the embeddings and the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedt.apportion import apportion, counts_from_weights
from dedt.config import build_config, resolve
from dedt.errors import DedtError
from dedt.pipeline import _select_config, plan, run_node
from dedt.selection import keep_count, kept_per_class, select
from dedt.stratify import kmeans_strata, pick_order, select_stratified

ROOT = Path(__file__).resolve().parents[1]


def _two_clusters(big: int = 80, small: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated blobs (rows 0..big-1 and big..big+small-1) and scores that favour the big one."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.0, 0.1, (big, 4)), rng.normal(10.0, 0.1, (small, 4))]).astype(np.float32)
    scores = np.concatenate([np.full(big, 1.0), np.zeros(small)]) + rng.random(big + small) * 1e-3
    return x, scores


# -- apportionment -------------------------------------------------------------------------------


def test_apportion_hand_checked() -> None:
    # 10 by 0.5 : 0.3 : 0.2, the first capped at 3: the other 7 split 3 : 2 = 4.2, 2.8 -> 4, 3
    assert apportion(10, [0.5, 0.3, 0.2], [3, 10, 10]).tolist() == [3, 4, 3]
    # equal remainders: the lower group index first
    assert apportion(7, [1, 1, 1], [5, 5, 5]).tolist() == [3, 2, 2]
    # cluster shares: 50 of 80 + 20 is 40 + 10; lower bounds are met first
    assert apportion(50, [80, 20], [80, 20]).tolist() == [40, 10]
    assert apportion(4, [1.0, 1e-9, 0.0], [10, 10, 10], [0, 1, 0]).tolist() == [3, 1, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 40)), min_size=1, max_size=12), st.data())
def test_apportion_is_exact_and_bounded(groups: list[tuple[float, int]], data: st.DataObject) -> None:
    weights = np.array([w for w, _ in groups])
    upper = np.array([n for _, n in groups])
    lower = np.array([data.draw(st.integers(0, n)) for n in upper])
    reachable = int(lower.sum() + (upper - lower)[weights > 0].sum())
    total = data.draw(st.integers(int(lower.sum()), reachable))
    counts = apportion(total, weights, upper, lower)
    assert counts.sum() == total and (counts >= lower).all() and (counts <= upper).all()
    assert (counts[weights == 0] == lower[weights == 0]).all()


def test_apportion_refuses_what_cannot_be_split() -> None:
    with pytest.raises(DedtError, match="cannot split 30"):
        apportion(30, [1.0, 0.0], [20, 50])  # the weight-0 group takes nothing, the other holds 20
    with pytest.raises(DedtError, match="finite and >= 0"):
        apportion(1, [-1.0], [5])


def test_counts_from_weights() -> None:
    # class 0 capped at its 10 images; 50 left split 2 : 1 = 33.3, 16.7 -> 33, 17; weight 0 keeps none
    assert counts_from_weights([0.7, 0.2, 0.1, 0.0], [10, 100, 100, 50], 60).tolist() == [10, 33, 17, 0]
    # a tiny positive weight still keeps one image
    counts = counts_from_weights([0.999, 0.001], [100, 100], 20)
    assert counts.tolist() == [19, 1]
    with pytest.raises(DedtError, match="raise select.keep_frac"):
        counts_from_weights([0.5, 0.5, 0.0], [10, 10, 10], 1)
    with pytest.raises(DedtError, match="hold 10 images"):
        counts_from_weights([1.0, 0.0], [10, 90], 20)
    with pytest.raises(DedtError, match="2 class weights for 3"):
        counts_from_weights([0.5, 0.5], [1, 2, 3], 3)


# -- stratified selection ------------------------------------------------------------------------


@pytest.mark.parametrize("within", ["random", "score", "centroid", "band"])
def test_two_clusters_keep_their_shares(within: str) -> None:
    x, scores = _two_clusters()
    kept = select_stratified(scores, None, 0.5, embeddings=x, strata_k=2, within=within, seed=3)
    assert len(kept) == 50 and (kept < 80).sum() == 40 and (kept >= 80).sum() == 10
    # the plain rule on these scores keeps only the big cluster
    assert (select(scores, None, 0.5) >= 80).sum() == 0


def test_per_class_counts_are_the_plain_rules() -> None:
    x, scores = _two_clusters(60, 15)
    labels = np.tile([0, 1, 2], 25)  # every class holds part of both clusters
    for frac in (0.1, 0.2, 0.37, 1.0):
        kept = select_stratified(scores, labels, frac, embeddings=x, strata_k=2, within="random", seed=0)
        assert kept_per_class(kept, labels) == {c: keep_count(25, frac) for c in range(3)}
        assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)


def test_without_levers_it_is_the_plain_rule() -> None:
    rng = np.random.default_rng(1)
    scores, labels = rng.random(200), rng.integers(0, 5, 200)
    for per_class in (True, False):
        assert np.array_equal(
            select_stratified(scores, labels, 0.3, per_class=per_class),
            select(scores, labels, 0.3, per_class=per_class),
        )


def test_same_seed_same_subset_other_seed_other() -> None:
    x, scores = _two_clusters(300, 100)
    labels = np.tile([0, 1], 200)
    runs = {
        seed: select_stratified(scores, labels, 0.2, embeddings=x, strata_k=4, within="random", seed=seed)
        for seed in (0, 0, 1)
    }
    again = select_stratified(scores, labels, 0.2, embeddings=x, strata_k=4, within="random", seed=0)
    assert np.array_equal(runs[0], again) and not np.array_equal(runs[0], runs[1])
    assert len(runs[1]) == len(runs[0])
    # score and centroid picks draw nothing at random: k-means is seeded, and the picks agree across seeds here
    a = select_stratified(scores, labels, 0.2, embeddings=x, strata_k=2, within="score", seed=0)
    assert np.array_equal(a, select_stratified(scores, labels, 0.2, embeddings=x, strata_k=2, within="score", seed=0))


def test_kmeans_strata_are_numbered_by_lowest_row() -> None:
    x, _ = _two_clusters(30, 10)
    strata, centroids = kmeans_strata(x[::-1], 2, seed=0)  # the small blob now comes first
    assert strata[:10].tolist() == [0] * 10 and strata[10:].tolist() == [1] * 30
    assert centroids.shape == (2, 4) and centroids[0, 0] > 9 and abs(centroids[1, 0]) < 1


def test_pick_orders() -> None:
    rng = np.random.default_rng(0)
    scores = np.arange(10.0)
    assert pick_order("score", scores, rng).tolist()[:3] == [9, 8, 7]
    # band [0.2, 0.8]: quantiles (rank + 0.5) / 10 = 0.05 .. 0.95; ranks 2..7 lie inside and come first
    band = pick_order("band", scores[::-1].copy(), rng, band=(0.2, 0.8))
    assert sorted(band[:6].tolist()) == [2, 3, 4, 5, 6, 7]
    assert sorted(band[6:8].tolist()) == [1, 8]  # then the nearest outside, 0.15 and 0.85
    x = np.array([[0.0], [5.0], [1.0], [-2.0]])
    assert pick_order("centroid", scores[:4], rng, x=x, centre=np.array([0.9])).tolist() == [2, 0, 3, 1]
    assert sorted(pick_order("random", scores, rng).tolist()) == list(range(10))


def test_weights_set_class_counts_and_compose_with_strata() -> None:
    x, scores = _two_clusters(300, 100)
    labels = np.repeat([0, 1], 200)
    total = 2 * keep_count(200, 0.2)  # 80, the plain rule's
    kept = select_stratified(scores, labels, 0.2, class_weights=[0.75, 0.25])
    assert kept_per_class(kept, labels) == {0: 60, 1: 20} and len(kept) == total
    both = select_stratified(scores, labels, 0.2, embeddings=x, strata_k=2, within="random", class_weights=[0.25, 0.75])
    assert kept_per_class(both, labels) == {0: 20, 1: 60}
    # class 1 = 100 rows of the big blob and 100 of the small one: 60 kept, 30 of each
    assert (both >= 300).sum() == 30
    with pytest.raises(DedtError, match="per_class: true"):
        select_stratified(scores, labels, 0.2, per_class=False, class_weights=[0.5, 0.5])
    with pytest.raises(DedtError, match="1 class weights cannot index"):
        select_stratified(scores, labels, 0.2, class_weights=[1.0])


def test_bad_input_is_named() -> None:
    x, scores = _two_clusters(8, 4)
    labels = np.repeat([0, 1], 6)
    with pytest.raises(DedtError, match="strata_k=7 is more than the 6 images of class 0"):
        select_stratified(scores, labels, 0.5, embeddings=x, strata_k=7)
    with pytest.raises(DedtError, match="need the embeddings"):
        select_stratified(scores, labels, 0.5, strata_k=2)
    with pytest.raises(DedtError, match=r"aligned with the scores"):
        select_stratified(scores, labels, 0.5, embeddings=x[:5], strata_k=2)
    with pytest.raises(DedtError, match="select.within must be one of"):
        select_stratified(scores, labels, 0.5, within="nearest")  # type: ignore[arg-type]
    with pytest.raises(DedtError, match="0 <= low < high <= 1"):
        select_stratified(scores, labels, 0.5, within="band", band=(0.6, 0.4))


# -- config, fingerprints, the select stage ------------------------------------------------------


@pytest.mark.parametrize(
    ("select_cfg", "match"),
    [
        ({"strata": "spectral"}, "select.strata"),
        ({"strata": "kmeans", "strata_k": 1}, "select.strata_k"),
        ({"within": "centroid"}, "act with select.strata: kmeans"),
        ({"strata": "kmeans", "band_low": 0.2}, "act with select.within: band"),
        ({"strata": "kmeans", "within": "band", "band_low": 0.5, "band_high": 0.4}, "must be below"),
        ({"keep_by": "dro"}, "select.keep_by"),
        ({"keep_by": "weights", "per_class": False}, "needs select.per_class: true"),
        ({"keep_by": "weights"}, "reweight.proxy_data: full"),
    ],
)
def test_options_are_validated(select_cfg: dict, match: str) -> None:
    with pytest.raises(DedtError, match=match):
        build_config({"select": select_cfg}, "x")


def test_a_full_dump_validates_again() -> None:
    cfg = build_config(
        {
            "select": {"strata": "kmeans", "within": "band", "band_low": 0.2, "keep_by": "weights"},
            "reweight": {"proxy_data": "full"},
        },
        "x",
    )
    assert build_config(cfg.model_dump(), "x") == cfg


def test_fingerprints_change_only_when_a_lever_is_on() -> None:
    demo = resolve("digits-demo", ROOT / "pipelines.yaml")
    assert _select_config(demo) == {"keep_frac": 0.3, "per_class": True}  # as before the levers existed
    base = plan(demo, Path("/store"))["select"].out.fingerprint
    on = [
        ["select.strata=kmeans"],
        ["select.strata=kmeans", "select.within=score"],
        ["select.keep_by=weights", "reweight.proxy_data=full"],
    ]
    fps = {
        plan(resolve("digits-demo", ROOT / "pipelines.yaml", o), Path("/store"))["select"].out.fingerprint for o in on
    }
    assert len(fps) == 3 and base not in fps


def test_weighted_counts_put_reweight_before_select() -> None:
    cfg = resolve("frontier-mnist5k", ROOT / "pipelines.yaml", ["select.keep_by=weights", "reweight.proxy_data=full"])
    planned = plan(cfg, Path("/store"))
    keys = list(planned)
    assert planned["select"].inputs == {"score": "score", "reweight": "reweight"}
    assert keys.index("reference") < keys.index("reweight") < keys.index("select")
    assert "select" not in planned["reweight"].inputs
    # the uniform model on the weighted subset carries the proxy's and reference's costs too
    assert {"reweight", "reference"} <= set(planned["curve:train:uniform"].inputs)


def test_select_stage_stratifies_and_reads_weights(tmp_path: Path) -> None:
    from dedt.stages import WEIGHTS, run_select
    from dedt.store import StageDir, read_parquet, write_parquet

    cfg = build_config(
        {
            "dataset": {"source": "digits"},
            "select": {"keep_frac": 0.2, "strata": "kmeans", "strata_k": 3, "keep_by": "weights"},
            "reweight": {"proxy_data": "full"},
        },
        "levers",
    )
    planned = plan(cfg, tmp_path)
    for key in ("data", "encode", "score"):
        run_node(cfg, planned, key)
    weights = StageDir(tmp_path, "reweight", "constructed")
    weights.path.mkdir(parents=True)
    w = np.array([0.3] + [0.7 / 9] * 9)
    write_parquet(pa.table({"group": np.arange(10, dtype=np.int32), "weight": w}), weights.file(WEIGHTS))
    inputs = {"score": planned["score"].out, "encode": planned["encode"].out, "reweight": weights}
    runs = []
    for i in range(2):
        out = StageDir(tmp_path, "select", f"run{i}")
        out.path.mkdir(parents=True)
        summary = run_select(cfg, inputs, out)
        runs.append(read_parquet(out.file("subset.parquet")).column("sample_id").to_numpy())
    scores = read_parquet(planned["score"].out.file("scores.parquet"))
    sizes = np.bincount(scores.column("label").to_numpy())
    total = sum(keep_count(int(n), 0.2) for n in sizes)
    expected = counts_from_weights(w, sizes, total)
    assert summary["kept"] == total and summary["kept_per_class"] == {str(c): int(n) for c, n in enumerate(expected)}
    assert summary["strata"] == {"k": 3, "within": "random"} and len(summary["class_weights"]) == 10
    assert np.array_equal(runs[0], runs[1])  # same config and seed: the same subset


def test_each_lever_is_its_own_arm_in_a_sweep() -> None:
    from dedt.sweep import cleaning_label, expand

    labels = {cleaning_label(p.cfg) for p in expand("levers-data", ROOT / "pipelines.yaml")}
    assert labels == {"", "kmeans 10 random", "kmeans 10 band 0.1-0.9", "DRO counts", "band 0.1-0.9"}
    both = build_config(
        {
            "select": {"dedup_threshold": 0.01, "strata": "kmeans", "strata_k": 4, "keep_by": "weights"},
            "reweight": {"proxy_data": "full"},
        },
        "x",
    )
    assert cleaning_label(both) == "dedup 0.01 + kmeans 4 random + DRO counts"


def test_a_subset_chosen_by_the_weights_carries_the_proxy_cost() -> None:
    from dedt.pipeline import NodeResult
    from dedt.report import pays_for_dro

    def select_summary(summary: dict) -> dict:
        return {"select": NodeResult("select", "fp", "/p", True, 1.0, summary)}

    plain, weighted = select_summary({"kept": 3}), select_summary({"kept": 3, "class_weights": [0.5, 0.5]})
    assert [pays_for_dro(plain, k) for k in ("reference", "train:uniform", "train")] == [False, False, True]
    assert [pays_for_dro(weighted, k) for k in ("reference", "train:uniform", "train")] == [False, True, True]
