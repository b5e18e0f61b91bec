"""Reference-model difficulty (dedt.difficulty, score.method: difficulty) and the score band without strata:
one (t, noise) bank shared by all images, the per-draw normalisation, a known answer from a denoiser whose
errors are known exactly, exact band counts, the pipeline's graph, fingerprints and costs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dedt.config import build_config, resolve
from dedt.difficulty import difficulty_scores, draw_bank, draw_losses, normalise
from dedt.diffusion.presets import build_model, build_scheduler
from dedt.diffusion.train import per_sample_loss
from dedt.errors import DedtError
from dedt.pipeline import plan, run_node
from dedt.selection import keep_count
from dedt.stratify import select_stratified

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER = build_scheduler("digits-tiny")


def _images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)


class TemplateDenoiser(torch.nn.Module):
    """The exact noise predictor for data that is always ``template``: eps_hat = (x_t - sqrt(abar) m) /
    sqrt(1 - abar). On an image x its error is sqrt(abar / (1 - abar)) (x - m), so its loss on any draw is
    abar / (1 - abar) * mean((x - m)^2): the normalised difficulty of x is |x - m|^2 over the mean of it."""

    def __init__(self, template: torch.Tensor) -> None:
        super().__init__()
        self.template = template
        self.abar = SCHEDULER.alphas_cumprod

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> SimpleNamespace:
        abar = self.abar[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x_t - abar.sqrt() * self.template) / (1 - abar).sqrt())


def test_the_bank_is_stratified_seeded_and_the_same_for_every_image() -> None:
    t, noise = draw_bank(8, (1, 8, 8), 1000, seed=3)
    np.testing.assert_array_equal(np.sort(t.numpy()) // 125, np.arange(8))  # one t in each eighth of [0, T)
    t2, noise2 = draw_bank(8, (1, 8, 8), 1000, seed=3)
    assert torch.equal(t, t2) and torch.equal(noise, noise2)
    assert not torch.equal(noise, draw_bank(8, (1, 8, 8), 1000, seed=4)[1])
    torch.manual_seed(0)
    model = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=None)
    images = _images(7)
    images[5] = images[1]  # the same image in another batch of 3 gets the same draws, so the same losses
    losses = draw_losses(model, SCHEDULER, images, None, t, noise, batch_size=3)
    assert losses.shape == (7, 8)
    np.testing.assert_allclose(losses[5], losses[1], rtol=1e-5)
    with torch.no_grad():  # image 4 on draw 6 is exactly per_sample_loss on the bank's 6th pair
        direct = per_sample_loss(model, SCHEDULER, torch.from_numpy(images[4:5]), None, t[6:7], noise[6:7])
    np.testing.assert_allclose(losses[4, 6], float(direct), rtol=1e-5)


def test_each_draw_averages_one_after_normalising() -> None:
    losses = np.random.default_rng(0).gamma(2.0, size=(30, 5)) * np.logspace(-2, 1, 5)  # scales differ by draw
    groups = np.arange(30) % 3
    np.testing.assert_allclose(normalise(losses).mean(axis=0), 1.0)
    per_group = normalise(losses, groups)
    for g in range(3):
        np.testing.assert_allclose(per_group[groups == g].mean(axis=0), 1.0)
    with pytest.raises(DedtError, match="mean denoising loss is 0"):
        normalise(np.zeros((4, 2)))


def test_known_answer_from_an_exact_denoiser() -> None:
    """Images at growing distances from the template: difficulty = |x - m|^2 / mean |x - m|^2 on every draw,
    so the scores are known exactly and the template itself scores highest (easiest)."""
    rng = np.random.default_rng(1)
    template = rng.uniform(-0.5, 0.5, (1, 8, 8)).astype(np.float32)
    offsets = (
        rng.normal(size=(6, 1, 8, 8)).astype(np.float32) * np.array([0, 0.05, 0.1, 0.2, 0.3, 0.4])[:, None, None, None]
    )
    images = (template + offsets).astype(np.float32)
    sq = (offsets.astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    model = TemplateDenoiser(torch.from_numpy(template))
    t, _ = draw_bank(16, (1, 8, 8), 1000, seed=0)
    assert int(t.max()) < 1000 and float(SCHEDULER.alphas_cumprod[t].min()) > 0
    scores = difficulty_scores(model, SCHEDULER, images, None, draws=16, seed=0, per_class=False)
    np.testing.assert_allclose(scores, -sq / sq.mean(), rtol=1e-3, atol=1e-6)
    assert list(np.argsort(-scores)) == [0, 1, 2, 3, 4, 5]  # higher = easier = kept first


def test_a_conditional_reference_reads_the_labels() -> None:
    torch.manual_seed(0)
    model = build_model("digits-tiny", in_channels=1, resolution=8, num_classes=3)
    images = _images(6)
    a = difficulty_scores(model, SCHEDULER, images, np.zeros(6, np.int64), draws=4, seed=0, per_class=False)
    b = difficulty_scores(model, SCHEDULER, images, np.array([0, 1, 2, 0, 1, 2]), draws=4, seed=0, per_class=False)
    np.testing.assert_array_equal(a, difficulty_scores(model, SCHEDULER, images, np.zeros(6, np.int64), draws=4,
                                                       seed=0, per_class=False))  # fmt: skip
    assert not np.allclose(a, b)  # the class embedding changes the predictions
    with pytest.raises(DedtError, match="conditioned on 3 classes"):
        difficulty_scores(model, SCHEDULER, images, np.full(6, 3), draws=4, seed=0)
    with pytest.raises(DedtError, match="score.draws must be a positive integer"):
        difficulty_scores(model, SCHEDULER, images, np.zeros(6, np.int64), draws=0, seed=0)


# -- the score band without strata -----------------------------------------------------------------


def test_band_without_strata_keeps_exact_counts_inside_the_band() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [100, 57, 31])
    scores = rng.normal(size=len(labels))
    kept = select_stratified(scores, labels, 0.2, within="band", band=(0.1, 0.6), seed=5)
    for c, n in zip(range(3), (100, 57, 31), strict=True):
        rows = np.flatnonzero(labels == c)
        mine = np.intersect1d(kept, rows)
        assert len(mine) == keep_count(n, 0.2)
        q = (np.argsort(np.argsort(scores[rows])) + 0.5) / n  # each row's score quantile in its class
        assert ((q[np.isin(rows, mine)] >= 0.1) & (q[np.isin(rows, mine)] <= 0.6)).all()
    assert np.array_equal(kept, select_stratified(scores, labels, 0.2, within="band", band=(0.1, 0.6), seed=5))
    assert not np.array_equal(kept, select_stratified(scores, labels, 0.2, within="band", band=(0.1, 0.6), seed=6))


def test_a_band_too_narrow_for_the_count_widens_evenly() -> None:
    """100 images ranked 0..99; the band [0.45, 0.55] holds ranks 45..54 (10), keep 0.2 needs 20: the 10
    nearest the band in quantile fill the rest, 5 on each side, whatever the seed."""
    scores = np.arange(100.0)
    for seed in range(3):
        kept = select_stratified(scores, None, 0.2, within="band", band=(0.45, 0.55), seed=seed)
        np.testing.assert_array_equal(kept, np.arange(40, 60))


# -- config, graph, fingerprints, costs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"score": {"draws": 8}}, "score.draws acts with score.method: difficulty"),
        ({"score": {"method": "difficulty", "draws": 0}}, "score.draws"),
        ({"select": {"within": "score"}}, "act with select.strata: kmeans"),
        ({"select": {"band_low": 0.2}}, "act with select.within: band"),
        ({"select": {"within": "band", "band_low": 0.6, "band_high": 0.5}}, "must be below"),
    ],
)
def test_bad_combinations_are_named(overrides: dict, match: str) -> None:
    with pytest.raises(DedtError, match=match):
        build_config(overrides, "x")


def test_score_reads_the_reference_only_for_difficulty() -> None:
    def planned(*overrides: str) -> dict:
        return plan(resolve("frontier-mnist5k", ROOT / "pipelines.yaml", list(overrides)), Path("/store"))

    base = planned()
    assert base["score"].inputs == {"data": "data", "encode": "encode"}
    assert "draws" not in base["score"].config["score"]  # the score config as before the option existed
    difficulty = planned("score.method=difficulty", "reweight.method=none", "select.within=band")
    keys = list(difficulty)
    assert difficulty["score"].inputs == {"data": "data", "reference": "reference"}
    assert keys.index("reference") < keys.index("score") < keys.index("select")
    assert "encode" not in difficulty  # nothing reads the embeddings
    assert difficulty["score"].config["score"]["draws"] == 16
    assert difficulty["select"].config["select"] == {
        "keep_frac": 0.2, "per_class": True, "within": "band", "band_low": 0.1, "band_high": 0.9
    }  # fmt: skip
    # the same trained reference as every other pipeline's: its fingerprint says which model scored
    assert difficulty["reference"].out.fingerprint == base["reference"].out.fingerprint
    assert (
        planned("score.method=difficulty", "score.draws=8")["score"].out
        != planned("score.method=difficulty")["score"].out
    )
    # from scratch the subset model pays for the reference; DRO arms already did
    assert "reference" in difficulty["curve:train:uniform"].inputs
    assert "reference" not in planned("reweight.method=none")["curve:train:uniform"].inputs
    with_strata = planned("score.method=difficulty", "select.strata=kmeans")
    assert with_strata["select"].inputs == {"score": "score", "encode": "encode"} and "encode" in with_strata


def test_without_baselines_or_dro_the_reference_still_trains_first() -> None:
    cfg = build_config(
        {"score": {"method": "difficulty"}, "reweight": {"method": "none"}, "evaluate": {"baselines": False}}, "x"
    )
    keys = list(plan(cfg, Path("/store")))
    assert keys.index("reference") < keys.index("score") and "evaluate:reference" not in keys


def test_score_and_select_stages_on_digits(tmp_path: Path) -> None:
    """The score stage scores every train image with the trained reference, the same bytes twice; the band
    keeps exact counts in each class from the middle of that ranking."""
    from dedt.artifacts import SCORES, SUBSET
    from dedt.store import StageDir

    cfg = build_config(
        {
            "dataset": {"source": "digits"},
            "score": {"method": "difficulty", "draws": 4},
            "select": {"keep_frac": 0.2, "within": "band", "band_low": 0.2, "band_high": 0.8},
            "reweight": {"method": "none", "reference_kimg": 0.256},
            "train": {"preset": "digits-tiny", "budget_kimg": 0.256, "batch_size": 64, "device": "cpu"},
        },
        "difficulty",
    )
    planned = plan(cfg, tmp_path)
    for key in ("data", "reference", "score", "select"):
        run_node(cfg, planned, key)
    table = SCORES.read(planned["score"].out)
    scores, labels = table.column("score").to_numpy(), table.column("label").to_numpy()
    assert np.isfinite(scores).all() and (scores < 0).all() and len(np.unique(scores)) == len(scores)
    again = StageDir(tmp_path, "score", "again")
    again.path.mkdir(parents=True)
    planned["score"].run(cfg, {"data": planned["data"].out, "reference": planned["reference"].out}, again)
    assert again.file("scores.parquet").read_bytes() == planned["score"].out.file("scores.parquet").read_bytes()
    subset = SUBSET.read(planned["select"].out)
    kept = np.isin(table.column("sample_id").to_numpy(), subset.column("sample_id").to_numpy())
    for c in np.unique(labels):
        rows = labels == c
        assert kept[rows].sum() == keep_count(int(rows.sum()), 0.2)
        q = (np.argsort(np.argsort(scores[rows])) + 0.5) / rows.sum()
        assert ((q[kept[rows]] >= 0.2) & (q[kept[rows]] <= 0.8)).all()


def test_a_difficulty_subset_pays_for_the_reference_from_scratch() -> None:
    """No proxy to pay for, but from scratch the reference's training (its kimg, at the calibrated cost)."""
    from dedt.frontier import Arm
    from dedt.pipeline import NodeResult
    from dedt.report import pays_for_dro, pays_for_reference
    from dedt.sweep import _model_details

    def results(method: str) -> dict:
        summaries = {
            "score": {"n": 3, "method": method},
            "select": {"kept": 3},
            "train:uniform": {},
            "evaluate:train:uniform": {"overall": {}, "fd_per_class": {}},
        }
        return {k: NodeResult(k, "fp", "/p", True, 2.0, s) for k, s in summaries.items()}

    difficulty, gaussian = results("difficulty"), results("gaussian")
    assert [pays_for_reference(difficulty, k) for k in ("reference", "train:uniform", "train")] == [False, True, True]
    assert not pays_for_dro(difficulty, "train:uniform")
    assert [pays_for_reference(gaussian, k) for k in ("train:uniform", "train")] == [False, True]
    cfg = build_config({"score": {"method": "difficulty"}, "reweight": {"method": "none", "reference_kimg": 64}}, "x")
    (row,) = _model_details(cfg, difficulty)
    assert (row["proxy_kimg"], row["reference_kimg"]) == (0.0, 64.0)
    (plain,) = _model_details(cfg, gaussian)
    assert plain["reference_kimg"] == 0.0
    arm = Arm(0.2, "difficulty", "uniform", cleaning="band 0.1-0.9", rows=[row])
    assert arm.overhead_s("pre-trained", 0.01, 0.02) == pytest.approx(row["selection_s"])
    assert arm.overhead_s("scratch", 0.01, 0.02) == pytest.approx(row["selection_s"] + 640.0)


def test_with_a_gpu_pool_the_difficulty_score_is_dispatched() -> None:
    from tasks.stages import SCORE_BY_MODEL, STAGE_TASKS, stage_task

    def score_task(method: str) -> object:
        cfg = build_config({"score": {"method": method}, "deployment": {"gpu_pool": "gpu"}}, "x")
        return stage_task(plan(cfg, Path("/store"))["score"], cfg)

    assert score_task("difficulty") is SCORE_BY_MODEL and score_task("gaussian") is STAGE_TASKS["score"]


def test_a_reference_checkpoint_scores_in_place_of_a_trained_one(tmp_path: Path) -> None:
    """reweight.reference_path: the score stage loads that UNet (its files name the score's input), nothing
    is trained."""
    torch.manual_seed(0)
    build_model("digits-tiny", in_channels=1, resolution=8, num_classes=None).save_pretrained(tmp_path / "unet")
    cfg = build_config(
        {
            "dataset": {"source": "digits"},
            "score": {"method": "difficulty", "draws": 2},
            "reweight": {"method": "none", "reference_path": str(tmp_path / "unet")},
            "train": {"preset": "digits-tiny", "device": "cpu"},
        },
        "checkpoint",
    )
    planned = plan(cfg, tmp_path / "store")
    assert planned["reference"].stage == "reference" and planned["score"].inputs["reference"] == "reference"
    data, _, score = (run_node(cfg, planned, key) for key in ("data", "reference", "score"))
    assert score.summary == {"n": data.summary["n_train"], "method": "difficulty", "draws": 2, "seconds": score.seconds}
