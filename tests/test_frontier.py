"""The frontier report: grouping over seeds, the speed-up definitions, the claims' verdicts, and the
Markdown + plots written from comparison rows (known inputs, hand-computed answers)."""

from __future__ import annotations

import json
import math

import pytest

from dedt.frontier import cells, claims, speedups, steps_to_quality, write_report

CLASSES = ["0", "1", "2"]


def _row(seed, model, keep=1.0, scorer="gaussian", policy="images", fd=10.0, kimg=10.0, train_s=100.0,
         per_class=(9.0, 10.0, 11.0), weights=None, proxy_s=10.0):
    return {"point": f"p{keep}{scorer}{policy}", "keep_frac": keep, "scorer": scorer, "encoder": "pixels",
            "reweight": "doremi", "seed": seed, "model": model, "images": 100, "kimg": kimg, "cost_s": 0.0,
            "fd": fd, "speedup": None, "policy": "images" if model == "full data" else policy, "train_s": train_s,
            "selection_s": 5.0, "proxy_s": proxy_s, "reference_s": 100.0, "fid_inception": None,
            "precision": 0.5, "recall": 0.4, "fd_per_class": json.dumps(dict(zip(CLASSES, per_class))),
            "weights": None if weights is None else json.dumps(weights)}


def _sweep_rows():
    """Full data FD 10 (both seeds); gaussian beats random; DRO improves 2 of 3 classes and puts its
    largest weight on the class the full-data model generates best (class 0)."""
    rows = []
    for seed in (0, 1):
        for scorer, fd_uniform in (("gaussian", 12.0), ("random", 20.0)):
            for policy, kimg, train_s in (("epochs", 2.0, 20.0), ("images", 10.0, 100.0)):
                point = dict(keep=0.2, scorer=scorer, policy=policy, kimg=kimg, train_s=train_s)
                rows.append(_row(seed, "full data", fd=10.0 + seed))  # every point repeats the full-data model
                rows.append(_row(seed, "pruned", fd=fd_uniform + seed, per_class=(12.0, 12.0, 12.0), **point))
                rows.append(_row(seed, "pruned+reweighted", fd=fd_uniform - 1.5 + seed, per_class=(10.0, 11.0, 13.0),
                                 weights=[0.5, 0.3, 0.2], **point))
    return rows


def test_cells_count_each_run_once_and_average_over_seeds():
    by = {(c.policy, c.keep_frac, c.scorer, c.reweighting): c for c in cells(_sweep_rows())}
    full = by["-", 1.0, "-", "uniform"]
    assert len(full.rows) == 2 and full.mean("fd") == 10.5  # 8 copies of it collapse to one per seed
    assert by["epochs", 0.2, "gaussian", "dro"].mean("fd") == pytest.approx(11.0)
    assert len(by) == 1 + 2 * 2 * 2


def test_speedup_definitions():
    by = {(c.policy, c.keep_frac, c.scorer, c.reweighting): c for c in cells(_sweep_rows())}
    full = by["-", 1.0, "-", "uniform"]
    s = speedups(by["epochs", 0.2, "gaussian", "dro"], full)
    assert s["train"] == pytest.approx(100 / 20)
    assert s["one-off"] == pytest.approx(100 / (20 + 5 + 10))  # + selection + proxy
    assert s["scratch"] == pytest.approx(100 / (20 + 5 + 10 + 100))  # + the reference dedt trained
    u = speedups(by["epochs", 0.2, "gaussian", "uniform"], full)
    assert u["one-off"] == u["scratch"] == pytest.approx(100 / 25)  # a uniform model needs no proxy, no reference


def test_steps_to_quality_brackets():
    rows = _sweep_rows()
    for r in rows:  # gaussian+dro reaches the full-data FD only with the larger budget
        if r["scorer"] == "gaussian" and r["model"] == "pruned+reweighted":
            r["fd"] = 10.0 + r["seed"] if r["policy"] == "images" else 30.0
    all_cells = cells(rows)
    full = next(c for c in all_cells if c.is_full)
    steps = steps_to_quality(all_cells, full)
    assert steps[0.2, "gaussian", "dro"] == "1.00x–5.00x"  # reached at 10 kimg, not at 2
    assert steps[0.2, "random", "uniform"] == "not reached by 10 kimg"


def test_claims_verdicts_and_numbers():
    all_cells = cells(_sweep_rows())
    full = next(c for c in all_cells if c.is_full)
    verdicts = {text.split(".")[0]: (outcome, numbers) for text, outcome, numbers in claims(all_cells, full)}
    assert verdicts["1"][0] == "held" and "gaussian 12.5 vs random 20.5" in verdicts["1"][1]
    assert verdicts["2"][0] == "held" and "67% of classes" in verdicts["2"][1]
    # weight 0.5 on class 0 (full-data FD 9), 0.2 on class 2 (FD 11): rho = -1
    assert verdicts["3"][0] == "held" and "rho -1.00" in verdicts["3"][1]
    # gaussian+dro, equal epochs: FD 11.0 <= 1.05 * 10.5 at 100 / (20 + 5 + 10) = 2.86x >= 2.34x
    assert verdicts["4"][0] == "held" and "gaussian at keep 0.2, equal epochs" in verdicts["4"][1]


def test_claim_4_fails_when_no_model_is_close():
    rows = [r | {"fd": r["fd"] * (1 if r["model"] == "full data" else 3)} for r in _sweep_rows()]
    all_cells = cells(rows)
    full = next(c for c in all_cells if c.is_full)
    outcome = {t.split(".")[0]: (o, n) for t, o, n in claims(all_cells, full)}
    assert outcome["4"][0] == "did not hold"
    assert "at ≥ 2.34x the best FD is gaussian at keep 0.2, equal epochs: FD 33.0 vs full data 10.5" in outcome["4"][1]


def test_report_written_from_rows(tmp_path):
    out = write_report(_sweep_rows(), tmp_path / "RESULTS.md", title="t", command="dedt sweep x --report r.md",
                       setup=["a setup line"])
    text = out.read_text()
    assert "10.5 ± 0.7" in text  # full-data FD, mean ± std over seeds 0 and 1
    assert "| 0.2 | gaussian | dro | 2 | 11.0 ± 0.7 |" in text
    assert "## The paper's claims, here" in text and "a setup line" in text
    for png in ("frontier.png", "class_fd.png", "weights_vs_difficulty.png"):
        assert (tmp_path / "results" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"(results/{png})" in text
    assert not math.isnan(float(text.split("FD ")[1].split(" ")[0]))


def test_report_needs_a_full_data_model(tmp_path):
    rows = [r for r in _sweep_rows() if r["model"] != "full data"]
    with pytest.raises(ValueError, match="no full-data model"):
        write_report(rows, tmp_path / "R.md", title="t", command="c")


def test_frontier_smoke_sweep_writes_report_from_artifacts(prefect_harness, store, tmp_path):
    """The repo's `frontier-smoke` sweep end to end: the report's numbers are the comparison's."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from flows.cli import main

    repo = Path(__file__).resolve().parent.parent
    report = tmp_path / "docs" / "RESULTS.md"
    assert main(["sweep", "frontier-smoke", "--pipelines", str(repo / "pipelines.yaml"), "--report", str(report)]) == 0
    # no capsys: Prefect's console log handler would keep writing to its closed stream in later tests
    (comparison,) = (store / "sweep").glob("*/comparison.parquet")
    rows = pq.read_table(comparison).to_pylist()
    assert {r["model"] for r in rows} == {"full data", "pruned", "pruned+reweighted"}
    assert {r["scorer"] for r in rows} == {"gaussian", "random"} and {r["policy"] for r in rows} >= {"epochs"}
    full_fd = next(r["fd"] for r in rows if r["model"] == "full data")
    text = report.read_text()
    assert f"FD {full_fd:.2f}" in text  # one seed: no ± term
    for r in rows:
        if r["model"] != "full data":
            assert f"| {r['keep_frac']:g} | {r['scorer']} | {'dro' if r['weights'] else 'uniform'} | {r['kimg']:g} | " \
                   f"{r['fd']:.1f} |" in text
    assert text.count("| held") + text.count("| did not hold") + text.count("| held partly") >= 3
    assert (report.parent / "results" / "frontier.png").exists()


def test_a_model_evaluated_twice_keeps_the_row_with_inception():
    rows = _sweep_rows()
    rows.append(_row(0, "full data", fd=10.0) | {"fid_inception": 55.0})
    full = next(c for c in cells(rows) if c.is_full)
    assert full.values("fid_inception") == [55.0] and len(full.rows) == 2
