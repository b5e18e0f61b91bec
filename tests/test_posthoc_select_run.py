"""Post-hoc EMA chosen per model at evaluation, on a tiny real run (``evaluate.posthoc_sigma_rels``):
the evaluate stage picks the candidate whose selection-bank FD, recomputed here from the rebuilt weights, is the
lowest, and reports exactly the FD of those weights on the reporting bank; the curve and the sweep carry the choice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.torch import load_file

from dedt.artifacts import CLASSIFIER, CURVE, MANIFEST, METRICS
from dedt.config import build_config
from dedt.diffusion.posthoc import SELECT_BANK_OFFSET, list_posthoc_snapshots, reconstruct_ema, selection_bank
from dedt.pipeline import plan, run_node
from tests.helpers import TINY
from tests.test_posthoc_select import CANDIDATES, ON

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The ON pipeline computed stage by stage (no orchestration), the calibration left out; on one thread,
    as the tests that recompute its numbers (the same float sums, so the same bits)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = build_config(ON, "posthoc")
    planned = plan(cfg, tmp_path_factory.mktemp("store"))
    results = {key: run_node(cfg, planned, key) for key in planned if key != "calibrate"}
    torch.set_num_threads(threads)
    return {"cfg": cfg, "planned": planned, "results": results}


def _samples_fd(cfg, planned, state: dict, per_class: int, bank_seed: int) -> float:
    """FD in the classifier space, against the full train split, of ``state``'s samples from one bank."""
    from dedt import evaluate
    from dedt.data.manifest import class_names
    from dedt.diffusion.train import load_model
    from dedt.metrics.registry import feature_space
    from dedt.stages import generate

    run_dir, data = planned["reference"].out.path, planned["data"].out
    classifier = planned["classifier"].out.file(CLASSIFIER)
    model = load_model(run_dir, ema=True)
    model.load_state_dict(state)
    labels = np.repeat(np.arange(len(class_names(MANIFEST.path(data)))), per_class)
    fake, _ = generate(cfg, model, cfg.train.preset, labels, classifier, bank_seed)
    source = evaluate.stage_source(data.root, data, None)
    return evaluate.selection_fd(fake, feature_space("classifier", classifier=classifier), source)


def test_evaluate_picks_the_lowest_selection_fd_and_reports_those_weights(run: dict) -> None:
    from dedt.evaluate import lookup, read_metrics

    cfg, planned, results = run["cfg"], run["planned"], run["results"]
    summary = results["evaluate:reference"].summary["posthoc_ema"]
    rows = read_metrics(METRICS.path(planned["evaluate:reference"].out))
    nimg = results["reference"].summary["nimg"]
    snapshots = list_posthoc_snapshots(planned["reference"].out.path)
    per_class, bank_seed = selection_bank(cfg.sample.per_class, cfg.sample.bank_seed)
    assert (per_class, bank_seed) == (4, cfg.sample.bank_seed + SELECT_BANK_OFFSET)
    direct = {
        s: _samples_fd(cfg, planned, reconstruct_ema(snapshots, s, nimg=nimg), per_class, bank_seed)
        for s in sorted(CANDIDATES)
    }
    recorded = {s: lookup(rows, "posthoc_select_fd", "classifier", cls=f"sigma_rel={s:g}") for s in direct}
    assert recorded == pytest.approx(direct, rel=1e-9)
    assert len(set(direct.values())) == len(direct)  # the candidates differ: the choice means something
    best = min(direct, key=direct.get)
    assert summary["sigma_rel"] == best == lookup(rows, "posthoc_sigma_rel", "classifier")
    assert summary["n_select"] == 40
    reported = _samples_fd(cfg, planned, reconstruct_ema(snapshots, best, nimg=nimg), 8, cfg.sample.bank_seed)
    assert lookup(rows, "fd", "classifier") == pytest.approx(reported, rel=1e-9)
    assert results["evaluate:reference"].summary["fd"] == pytest.approx(reported, rel=1e-5)
    report = (planned["evaluate:reference"].out.path / "report.md").read_text()
    assert f"EMA of sigma_rel {best:g}" in report


def test_evaluate_choice_is_deterministic(run: dict) -> None:
    from dedt.stages import run_evaluate
    from dedt.store import StageDir

    cfg, planned = run["cfg"], run["planned"]
    node = planned["evaluate:reference"]
    inputs = {role: planned[key].out for role, key in node.inputs.items()}
    again = StageDir(node.out.root, "evaluate", "again")  # the same store: its cached reference statistics
    again.path.mkdir(parents=True)
    summary = {k: v for k, v in run["results"]["evaluate:reference"].summary.items() if k != "seconds"}  # run_node's
    assert run_evaluate(cfg, inputs, again) == summary
    assert METRICS.read(again).equals(METRICS.read(node.out))


def test_curve_points_carry_their_chosen_sigma_rel(run: dict) -> None:
    from dedt.store import read_parquet

    planned, results = run["planned"], run["results"]
    table = read_parquet(CURVE.path(planned["curve:reference"].out)).to_pylist()
    assert [r["final"] for r in table] == [False, True]
    assert table[-1]["sigma_rel"] == results["evaluate:reference"].summary["posthoc_ema"]["sigma_rel"]
    assert table[0]["sigma_rel"] in CANDIDATES
    assert not math.isnan(table[-1]["fd_bank2"])
    assert results["curve:reference"].summary["sigma_rel"] == [r["sigma_rel"] for r in table]


def test_the_comparison_row_and_the_frontier_report_carry_the_choice(run: dict) -> None:
    from dedt.frontier import Arm, posthoc_section
    from dedt.sweep import GridPoint, comparison_rows, training_label

    cfg, results = run["cfg"], run["results"]
    [row] = comparison_rows([GridPoint("posthoc", {}, cfg)], [results])
    assert row["model"] == "full data"
    assert row["sigma_rel"] == results["evaluate:reference"].summary["posthoc_ema"]["sigma_rel"]
    assert training_label(cfg) == "post-hoc EMA"  # its own arm, not the plain full-data yardstick
    plain = build_config(TINY, "tiny")
    assert "sigma_rel" not in comparison_rows([GridPoint("plain", {}, plain)], [results])[0]

    arm = Arm(1.0, "-", "uniform", training="post-hoc EMA", finals=[{"sigma_rel": 0.1}, {"sigma_rel": 0.15}])
    plain_arm = Arm(1.0, "-", "uniform", finals=[{"fd": 1.0}])
    section = "\n".join(posthoc_section([plain_arm, arm]))
    assert "| full data, post-hoc EMA | 0.1, 0.15 | 0.125 |" in section and "| full data |" not in section
    assert posthoc_section([plain_arm]) == []


def test_off_the_same_models_keep_their_own_ema_and_curve_columns(run: dict) -> None:
    """Without candidates the trained model is shared (same store) and evaluated with its own EMA."""
    from dedt.store import read_parquet

    cfg = build_config({**ON, "evaluate": TINY["evaluate"]}, "plain")
    planned = plan(cfg, run["planned"]["reference"].out.root)
    results = {key: run_node(cfg, planned, key) for key in planned if key != "calibrate"}
    assert results["reference"].cached and "posthoc_ema" not in results["evaluate:reference"].summary
    table = read_parquet(CURVE.path(planned["curve:reference"].out))
    assert "sigma_rel" not in table.column_names and "sigma_rel" not in results["curve:reference"].summary
    own = _samples_fd(cfg, planned, dict(load_file(planned["reference"].out.path / "ema.safetensors")), 8, 0)
    assert table.column("fd").to_pylist()[-1] == pytest.approx(own, rel=1e-9)
