"""Sweeps: grid expansion and validation, shared stages counted once, the comparison table and
plots, and the `dedt-sweep` flow on a tiny 2-point grid (concurrency, then a fully cached rerun)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dedt.errors import DedtError
from dedt.pipeline import NodeResult, plan
from dedt.sweep import comparison_rows, expand, load_sweeps, node_id, plot_comparison, unique_nodes
from flows.cli import main
from tests.helpers import TINY

# Two optimiser steps per model, no DRO and no baselines: per point only select, the pruned
# model and its evaluation; data, encode, score and the classifier are shared.
BASE = copy.deepcopy(TINY)
BASE["reweight"] = {"method": "none"}
BASE["train"].update(budget_kimg=0.128, checkpoint_every_kimg=0.128, log_every_kimg=0.064)
BASE["sample"].update(per_class=2)
BASE["evaluate"]["baselines"] = False


def _write(tmp_path: Path, sweeps: dict) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"tiny": TINY, "base": BASE}, "sweeps": sweeps}, sort_keys=False))
    return path


def test_expand_is_the_grid_product_in_order(tmp_path):
    path = _write(
        tmp_path,
        {
            "g": {
                "base": "tiny",
                "grid": {"select.keep_frac": [0.1, 0.3], "encode.encoder": ["pixels", "random-projection"]},
            }
        },
    )
    points = expand("g", path)
    assert [p.label for p in points] == [
        "select.keep_frac=0.1 encode.encoder=pixels",
        "select.keep_frac=0.1 encode.encoder=random-projection",
        "select.keep_frac=0.3 encode.encoder=pixels",
        "select.keep_frac=0.3 encode.encoder=random-projection",
    ]
    assert points[3].cfg.select.keep_frac == 0.3 and points[3].cfg.encode.encoder == "random-projection"
    assert points[0].cfg.train == points[3].cfg.train  # only the grid keys change
    assert load_sweeps(path)["g"].max_concurrency == 2


@pytest.mark.parametrize(
    "sweep,needle",
    [
        ({"base": "nope", "grid": {"seed": [0]}}, "base pipeline 'nope'"),
        ({"base": "tiny", "grid": {}}, "empty grid"),
        ({"base": "tiny", "grid": {"select.keep_frac": [0.1, 2.0]}}, "point select.keep_frac=2.0"),
        ({"base": "tiny", "grid": {"score.methd": ["knn"]}}, "score.methd"),
        ({"base": "tiny", "grid": {"seed": [0]}, "max_concurency": 2}, "max_concurency"),
    ],
)
def test_bad_sweeps_fail_before_work_naming_the_field(tmp_path, sweep, needle):
    with pytest.raises(DedtError, match="sweep 'g'") as error:
        expand("g", _write(tmp_path, {"g": sweep}))
    assert needle in str(error.value)


def test_shared_stages_listed_once_inputs_first(tmp_path):
    path = _write(
        tmp_path,
        {"g": {"base": "tiny", "grid": {"select.keep_frac": [0.1, 0.3], "score.method": ["gaussian", "random"]}}},
    )
    plans = [plan(p.cfg, Path("/store")) for p in expand("g", path)]
    nodes = unique_nodes(plans)
    stages = [n.id.split("/")[0] for n in nodes]
    # One data, encoder, classifier, cost calibration, full-data reference (+ its evaluation); a scorer
    # per method, a selection (and everything downstream of it) per point.
    assert {s: stages.count(s) for s in set(stages)} == {
        "data": 1,
        "encode": 1,
        "classifier": 1,
        "calibrate": 1,
        "score": 2,
        "select": 4,
        "reweight": 4,
        "train": 1 + 4 + 4,
        "evaluate": 1 + 4 + 4,
    }
    position = {n.id: i for i, n in enumerate(nodes)}
    assert all(position[i] < position[n.id] for n in nodes for i in n.inputs)
    assert len({node_id(node) for planned in plans for node in planned.values()}) == len(nodes)


def _fake_results(keep_frac: float, fd: float, reweighted_fd: float) -> dict[str, NodeResult]:
    def result(seconds: float, **summary) -> NodeResult:
        return NodeResult("k", "fp", "/x", True, seconds, {"seconds": seconds, **summary})

    train = {"n_images": int(1000 * keep_frac), "nimg": 500}
    evaluate = lambda v: result(1.0, fd=v, fd_per_class={"0": v - 1, "1": v + 1})  # noqa: E731
    return {
        "encode": result(1.0),
        "score": result(1.0),
        "select": result(0.0),
        "reweight": result(2.0, weights=[0.4, 0.6]),
        "reference": result(40.0, n_images=1000, nimg=1000),
        "train:uniform": result(10.0, **train),
        "train": result(10.0, **train),
        "evaluate:reference": evaluate(5.0),
        "calibrate": result(3.0, train_s_per_img=0.01, proxy_s_per_img=0.02),
        "evaluate:train:uniform": evaluate(fd),
        "evaluate:train": evaluate(reweighted_fd),
    }


def test_comparison_rows_and_plots(tmp_path):
    path = _write(tmp_path, {"g": {"base": "tiny", "grid": {"select.keep_frac": [0.2, 0.4]}}})
    points = expand("g", path)
    rows = comparison_rows(points, [_fake_results(0.2, 9.0, 8.0), _fake_results(0.4, 7.0, 6.5)])
    assert [(r["keep_frac"], r["model"], r["fd"]) for r in rows] == [
        (0.2, "full data", 5.0),
        (0.2, "pruned", 9.0),
        (0.2, "pruned+reweighted", 8.0),
        (0.4, "full data", 5.0),
        (0.4, "pruned", 7.0),
        (0.4, "pruned+reweighted", 6.5),
    ]
    # equal-quality speed-up: the full-data curve (here its end alone: 1 kimg, FD 5, 10 s per kimg) reaches
    # the pruned models' worse FDs before its first point, so only bounds: <= 10 s / (5 s training + 2 s
    # selection (+ the proxy at 20 s per kimg))
    proxy_s = points[0].cfg.reweight.proxy_kimg * 20
    assert [r["speedup"] for r in rows[:3]] == ["1.00x", f"≤{10 / 7:.2f}x", f"≤{10 / (7 + proxy_s):.2f}x"]
    assert [r["cost_s"] for r in rows[:3]] == [10.0, 7.0, round(7 + proxy_s, 1)]
    assert {r["scorer"] for r in rows} == {"gaussian"} and rows[0]["point"] == "select.keep_frac=0.2"
    # the one-off costs apart, and the DRO weights on the reweighted model's row only
    assert [(r["selection_s"], r["proxy_s"], r["reference_s"]) for r in rows[:3]] == [(2.0, 2.0, 40.0)] * 3
    assert [r["weights"] for r in rows[:3]] == [None, None, "[0.4, 0.6]"]
    assert json.loads(rows[1]["fd_per_class"]) == {"0": 8.0, "1": 10.0}
    plot_comparison(rows, tmp_path / "fd.png", tmp_path / "speed.png")
    assert (tmp_path / "fd.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "speed.png").stat().st_size > 1000


def test_cli_sweep_dry_run(tmp_path, store, capsys):
    path = _write(tmp_path, {"g": {"base": "base", "grid": {"select.keep_frac": [0.3, 0.5]}}})
    assert main(["sweep", "g", "--pipelines", str(path), "--dry-run"]) == 0
    assert "2 points, 10 distinct stages, 10 to run" in capsys.readouterr().out
    assert not store.exists()


def test_sweep_flow_concurrent_then_fully_cached(prefect_harness, store, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.sweep import sweep_flow

    path = _write(tmp_path, {"g": {"base": "base", "grid": {"select.keep_frac": [0.3, 0.5]}, "max_concurrency": 2}})
    state = sweep_flow("g", str(path), return_state=True)
    first = state.result()
    assert (first["stages"], first["computed"]) == (10, 10)
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    spans = [(t.start_time, t.end_time) for t in task_runs if t.start_time and t.end_time]
    at_once = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    assert len(spans) == 10 and at_once == 2  # independent stages overlapped, never more than the limit

    second = sweep_flow("g", str(path))
    assert second["computed"] == 0 and second["rows"] == first["rows"]
    table = pq.read_table(first["comparison"]).to_pylist()
    assert [(r["keep_frac"], r["model"]) for r in table] == [(0.3, "pruned"), (0.5, "pruned")]
    assert all(r["fd"] > 0 and r["images"] > 0 for r in table)
    assert (Path(first["comparison"]).parent / "fd_vs_keep_frac.png").exists()
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_latest_artifacts()}
    assert {"g-comparison", "g-summary", "g-fd-vs-keep-frac", "g-fd-vs-cost"} <= keys


def test_grid_union_and_keep_all_points_share_one_run(tmp_path):
    path = _write(
        tmp_path,
        {
            "g": {
                "base": "tiny",
                "grid": [
                    {"select.keep_frac": [1.0], "score.method": ["gaussian", "random"], "train.budget_kimg": [1.0]},
                    {"seed": [1], "select.keep_frac": [0.3]},
                ],
            }
        },
    )
    points = expand("g", path)
    assert [p.label for p in points] == [
        "select.keep_frac=1.0 score.method=gaussian train.budget_kimg=1.0",
        "select.keep_frac=1.0 score.method=random train.budget_kimg=1.0",
        "seed=1 select.keep_frac=0.3",
    ]
    plans = [plan(p.cfg, Path("/store")) for p in points]
    # keep_frac 1 keeps everything: nothing to encode or score, and both scorers' points are one run
    assert "score" not in plans[0] and "encode" not in plans[0]
    assert {k: n.out.fingerprint for k, n in plans[0].items()} == {k: n.out.fingerprint for k, n in plans[1].items()}
    # uniform on everything at the reference's budget (1 kimg) is the reference: not trained twice
    assert "train:uniform" not in plans[0] and "evaluate:reference" in plans[0]
    assert "train:uniform" in plans[2] and points[2].cfg.seed == 1


def test_budget_policy_epochs_scales_subset_budgets_only(tmp_path):
    path = _write(tmp_path, {"g": {"base": "tiny", "grid": {"train.budget_policy": ["images", "epochs"]}}})
    images, epochs = [plan(p.cfg, Path("/store")) for p in expand("g", path)]
    assert images["train"].config["train"]["budget_kimg"] == TINY["train"]["budget_kimg"]
    assert epochs["train"].config["train"]["budget_kimg"] == TINY["train"]["budget_kimg"] * TINY["select"]["keep_frac"]
    # the reference, the proxy and the selection do not depend on the policy: shared
    for key in ("reference", "reweight", "select", "evaluate:reference"):
        assert images[key].out.fingerprint == epochs[key].out.fingerprint, key
    assert images["train:uniform"].out.fingerprint != epochs["train:uniform"].out.fingerprint


def test_lever_labels_name_each_arm_and_anneal_only_on_subset_models():
    from dedt.config import build_config
    from dedt.sweep import cleaning_label, training_label

    both = build_config(
        {
            "reweight": {"method": "none"},
            "train": {"timestep_sampling": "loss-aware", "dynamic_pruning": "infobatch", "anneal_frac": 0.25},
        },
        "x",
    )
    assert training_label(both) == "loss-aware + infobatch 0.5 until 0.875 + anneal 0.25"
    # The full-data model of the same point does not anneal: it is the plain reference, labelled without it.
    assert training_label(both, subset=False) == "loss-aware + infobatch 0.5 until 0.875"
    assert training_label(build_config({"train": {"anneal_frac": 0.25}}, "x"), subset=False) == ""
    band = build_config({"score": {"method": "difficulty"}, "select": {"within": "band", "band_high": 0.8}}, "x")
    assert cleaning_label(band) == "band 0.1-0.8" and cleaning_label(build_config({}, "x")) == ""
    expanded = {training_label(p.cfg) for p in expand("levers-data", Path(__file__).parents[1] / "pipelines.yaml")}
    assert {"", "infobatch 0.5 until 0.875", "anneal 0.25"} <= expanded
