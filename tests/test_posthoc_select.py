"""Post-hoc EMA chosen per model at evaluation (``evaluate.posthoc_sigma_rels``): off by default
without touching a fingerprint, validated, and the choice rule (``choose_sigma_rel``) on hand-made snapshots.
The choice on a real run: tests/test_posthoc_select_run.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from dedt.config import build_config
from dedt.diffusion.posthoc import (
    choose_sigma_rel,
    list_posthoc_snapshots,
    reconstruct_ema,
)
from dedt.errors import DedtError
from dedt.pipeline import plan
from tests.helpers import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = [0.2, 0.05, 0.1]  # unsorted on purpose: the config sorts them
# Full data only (keep 1, the reference's budget, no DRO): one trained model, a curve with one snapshot.
ON = {
    **TINY,
    "select": {"keep_frac": 1.0},
    "reweight": {"method": "none", "reference_kimg": 0.5},
    "train": TINY["train"] | {"snapshots": 1, "posthoc_ema": True, "posthoc_snapshots": 2},
    "evaluate": TINY["evaluate"] | {"posthoc_sigma_rels": CANDIDATES},
}


def _fingerprints(raw: dict, *overrides: str) -> dict[str, str]:
    return {k: n.out.fingerprint for k, n in plan(build_config(raw, "p", list(overrides)), Path("/store")).items()}


def test_off_by_default_leaves_every_fingerprint_and_stage_config_unchanged() -> None:
    cfg = build_config(TINY, "tiny")
    assert cfg.evaluate.posthoc_sigma_rels == []
    assert _fingerprints(TINY) == _fingerprints(TINY, "evaluate.posthoc_sigma_rels=[]")
    for node in plan(cfg, Path("/store")).values():
        assert "posthoc_sigma_rels" not in node.config.get("evaluate", {})
    # On: the evaluate and curve stages change, the trained models do not (no retraining).
    trained = {**ON, "evaluate": TINY["evaluate"]}
    before, after = _fingerprints(trained), _fingerprints(ON)
    assert {k for k in before if before[k] != after[k]} == {"evaluate:reference", "curve:reference"}


def test_config_errors_and_normalisation() -> None:
    assert build_config(ON, "p").evaluate.posthoc_sigma_rels == sorted(CANDIDATES)
    no_posthoc = {**ON, "train": TINY["train"]}
    with pytest.raises(DedtError, match="train.posthoc_ema: true"):
        build_config(no_posthoc, "p")
    for bad, match in (([0.05, 0.3], r"in \(0, 0\.2887\)"), ([0.0], r"in \(0, "), ([0.1, 0.1], "listed twice")):
        with pytest.raises(DedtError, match=match):
            build_config(ON, "p", [f"evaluate.posthoc_sigma_rels={bad}"])


def test_choice_takes_the_lowest_fd_first_on_ties_never_nan(tmp_path: Path) -> None:
    import torch

    from dedt.diffusion.posthoc import PROFILES
    from dedt.diffusion.snapshots import write_snapshot

    for nimg in (64, 128):
        for name, sigma in PROFILES.items():
            write_snapshot(tmp_path, nimg, 1.0, {"w": torch.full((2,), sigma * nimg)}, name=name)
    snapshots = list_posthoc_snapshots(tmp_path)
    fds = {0.05: 3.0, 0.08: 1.0, 0.12: 1.0, 0.2: float("nan")}
    seen = []

    def fd_of(state: dict) -> float:
        seen.append(float(state["w"][0]))
        return fds[[0.05, 0.08, 0.12, 0.2][len(seen) - 1]]

    choice = choose_sigma_rel(snapshots, [0.05, 0.08, 0.12, 0.2], 128, fd_of)
    assert choice.sigma_rel == 0.08 and choice.fds == fds
    torch.testing.assert_close(choice.state["w"], reconstruct_ema(snapshots, 0.08, nimg=128)["w"])
    assert seen[0] == pytest.approx(0.05 * 128)  # the tracked profile itself, rebuilt exactly
    with pytest.raises(DedtError, match="no post-hoc EMA snapshot at 100 images"):
        choose_sigma_rel(snapshots, [0.1], 100, fd_of)
    with pytest.raises(DedtError, match="NaN"):
        choose_sigma_rel(snapshots, [0.2], 128, lambda state: float("nan"))
