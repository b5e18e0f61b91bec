"""Data schedules: InfoBatch dynamic pruning and prune then anneal.

The rescaling's unbiasedness by exact enumeration over the drop sets the sampler can draw, exact drop
counts, determinism, plain epochs after prune_until, the loss weights reaching the step, the anneal
switch, byte-identical resume with both on, and fingerprints that move only when a schedule is on.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import dedt.diffusion.train as train_module
from dedt.diffusion.infobatch import InfoBatch, plan_epoch
from dedt.diffusion.options import TrainOptions
from dedt.diffusion.sampler import anneal_step
from dedt.diffusion.train import Trainer, train
from dedt.errors import DedtError
from tests.helpers import TINY_RUN, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3


def dropped(order: np.ndarray, n: int) -> frozenset[int]:
    return frozenset(set(range(n)) - set(order.tolist()))


# The epoch plan


def test_plan_drops_an_exact_count_of_well_learned_samples_only() -> None:
    # mean of the seen scores = 1.0: samples 0-3 are well-learned, 4-7 not, 8-9 never seen
    scores = np.array([0.2, 0.4, 0.6, 0.8, 1.2, 1.4, 1.6, 1.8, np.inf, np.inf])
    for epoch in range(50):
        order, weight = plan_epoch(scores, 0.5, seed=7, epoch=epoch)
        gone = dropped(order, 10)
        assert len(order) == len(set(order.tolist())) == 8 and len(gone) == 2  # 0.5 x 4, exactly
        assert gone <= {0, 1, 2, 3}
        np.testing.assert_array_equal(weight, np.where(order < 4, 2.0, 1.0).astype(np.float32))
    # 3 well-learned at 0.25: 0.75 expected, so 0 or 1 dropped
    counts = Counter(len(dropped(plan_epoch(scores[1:], 0.25, seed=7, epoch=e)[0], 9)) for e in range(400))
    assert set(counts) == {0, 1} and counts[1] / 400 == pytest.approx(0.75, abs=0.07)
    unseen = np.full(5, np.inf)  # nothing seen yet: a full epoch, weight 1
    order, weight = plan_epoch(unseen, 0.5, seed=7, epoch=0)
    assert sorted(order.tolist()) == list(range(5)) and (weight == 1).all()


def test_plan_is_deterministic_given_the_seed_and_epoch() -> None:
    scores = np.random.default_rng(1).gamma(2.0, 1.0, 100)
    a, b = plan_epoch(scores, 0.5, seed=3, epoch=4), plan_epoch(scores, 0.5, seed=3, epoch=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], plan_epoch(scores, 0.5, seed=3, epoch=5)[0])
    assert not np.array_equal(a[0], plan_epoch(scores, 0.5, seed=4, epoch=4)[0])


@pytest.mark.parametrize("ratio", [0.5, Fraction(1, 3)])
def test_rescaled_epoch_loss_equals_the_full_epoch_in_expectation(ratio: Fraction | float) -> None:
    """A fixed table of losses; the well-learned are {0, 1, 2, 3}. Over many seeded epochs every drop set of
    each size the rule allows occurs, with frequencies that match the exact law (count = floor(r m + u),
    then a uniform subset of that size); under that law, enumerated exactly in fractions, the expected sum
    of weight * loss over the epoch is the full epoch's sum, with the weights the sampler returned."""
    losses = [Fraction(v) for v in (3, 1, 4, 1, 5, 9, 2, 6)]
    scores = np.array([0.1, 0.2, 0.3, 0.4, 2.0, 2.0, 2.0, 2.0])
    r = Fraction(ratio)
    well, m, draws = [0, 1, 2, 3], 4, 6000
    seen: Counter[frozenset[int]] = Counter()
    weight_of: dict[int, Fraction] = {}
    for epoch in range(draws):
        order, weight = plan_epoch(scores, float(r), seed=0, epoch=epoch)
        seen[dropped(order, 8)] += 1
        weight_of.update({int(i): Fraction(float(w)) for i, w in zip(order, weight, strict=True)})
    assert all(weight_of[i] == 1 / (1 - r) for i in well)  # 2 and 1.5: exact in float32
    assert all(weight_of[i] == 1 for i in range(4, 8))
    low, frac = math.floor(r * m), r * m - math.floor(r * m)
    law = {}  # P(drop set) exactly
    for size, p_size in ((low, 1 - frac), (low + 1, frac)):
        subsets = list(itertools.combinations(well, size))
        for subset in subsets:
            if p_size:
                law[frozenset(subset)] = p_size / len(subsets)
    assert set(seen) == set(law)  # every allowed drop set occurs, and no other
    for subset, p in law.items():
        assert seen[subset] / draws == pytest.approx(float(p), abs=4 * math.sqrt(float(p) * (1 - float(p)) / draws))
    expected = sum(p * sum(weight_of[i] * losses[i] for i in range(8) if i not in gone) for gone, p in law.items())
    assert expected == sum(losses)


# The sampler: scores, bands, plain epochs after prune_until


def test_scores_are_normalised_per_timestep_band_and_keep_the_last_loss() -> None:
    ib = InfoBatch(6, batch_size=6, num_timesteps=1000, prune_ratio=0.5, prune_until_nimg=100, seed=0)
    t = torch.tensor([0, 10, 20, 990, 980, 970])  # band 0 and band 19
    ib.update(np.arange(6), t, torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0], dtype=torch.float64))
    # band means 2 and 20: a loss 10x larger at high noise is just as well learned
    torch.testing.assert_close(ib.score, torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5]))
    assert ib.band_steps[0] == 1 and ib.band_steps[19] == 1 and ib.band_steps[1:19].sum() == 0
    # a second step in band 0 only, sample 0 twice: the mean moves to 0.95 * 2 + 0.05 * 6.2 (momentum 0.95)
    ib.update(np.array([0, 0]), torch.tensor([5, 5]), torch.tensor([4.0, 8.4], dtype=torch.float64))
    assert ib.band_mean[0].item() == pytest.approx(0.95 * 2 + 0.05 * 6.2)
    assert ib.score[0].item() == pytest.approx(8.4 / (0.95 * 2 + 0.05 * 6.2), rel=1e-6)  # the last of the two
    assert ib.band_mean[19].item() == 20.0


def test_epochs_after_prune_until_are_plain_and_the_budget_stays_in_images() -> None:
    n, batch = 20, 8
    ib = InfoBatch(n, batch_size=batch, num_timesteps=10, prune_ratio=0.5, prune_until_nimg=60, seed=1)
    scores = torch.linspace(0.1, 2.0, n, dtype=torch.float64)  # 0.1 ... 2.0, one band: half well-learned
    lengths, nimg = {}, 0
    for _ in range(20):
        index, weight = ib.next_batch(nimg)
        assert len(index) == batch == len(weight)
        ib.update(index, torch.zeros(batch, dtype=torch.int64), scores[torch.from_numpy(index)])
        lengths[ib.epoch] = (len(ib.order), (ib.weight != 1).any())
        nimg += batch
    # epoch 0 starts unseen (full); epochs starting before image 60 are pruned and reweighted;
    # the first to start at or after 60 and every later one are full and unweighted
    starts = np.cumsum([0] + [length for length, _ in lengths.values()])[:-1]
    assert list(lengths) == list(range(len(lengths))) and starts[-1] >= 60
    for (epoch, (length, weighted)), start in zip(lengths.items(), starts, strict=True):
        if epoch == 0 or start >= 60:
            assert (length, weighted) == (n, False)
        else:
            assert length < n and weighted
    assert ib.pruned_epochs == sum(1 for s in starts if s < 60) and ib.epochs == len(lengths)
    assert ib.skipped == sum(n - length for length, _ in lengths.values()) > 0
    assert ib.summary()["skipped_frac"] == round(ib.skipped / (n * len(lengths)), 6)


def test_the_step_multiplies_each_loss_by_its_infobatch_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = train_module.per_sample_loss

    def recording(model, scheduler, x0, labels, t, noise):  # type: ignore[no-untyped-def]
        losses = original(model, scheduler, x0, labels, t, noise)
        seen.append(losses.detach().clone())
        return losses

    monkeypatch.setattr(train_module, "per_sample_loss", recording)
    images, labels = tiny_data()
    trainer = Trainer(images, labels, TrainOptions(dynamic_pruning="infobatch", **TINY_RUN), num_classes=NUM_CLASSES)
    weights: list[np.ndarray] = []
    draw = trainer.infobatch.next_batch  # type: ignore[union-attr]
    monkeypatch.setattr(trainer.infobatch, "next_batch", lambda nimg: (lambda b: weights.append(b[1]) or b)(draw(nimg)))
    for _ in range(3):  # epoch 0: 3 full steps of 16
        trainer.step()
        trainer.pop_mean_loss()
    trainer.step()  # the first pruned epoch
    assert set(weights[-1].tolist()) == {1.0, 2.0}
    expected = (seen[-1] * torch.from_numpy(weights[-1])).mean()
    torch.testing.assert_close(trainer.pop_mean_loss(), expected.item())


def test_infobatch_refuses_a_class_mixture() -> None:
    images, labels = tiny_data()
    options = TrainOptions(dynamic_pruning="infobatch", **TINY_RUN)
    with pytest.raises(DedtError, match="uniform epochs"):
        Trainer(images, labels, options, num_classes=NUM_CLASSES, class_weights=np.array([0.2, 0.3, 0.5]))
    loss = TrainOptions(dynamic_pruning="infobatch", weighting="loss", **TINY_RUN)  # loss weights: uniform epochs
    assert Trainer(images, labels, loss, num_classes=NUM_CLASSES, class_weights=np.array([0.2, 0.3, 0.5])).infobatch


# Prune then anneal


def test_anneal_switches_at_its_step_and_only_then_draws_outside_the_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert anneal_step(256, 16, 0.25) == 12 and anneal_step(256, 16, 0.2) == 13 and anneal_step(1000, 128, 0.3) == 6
    drawn: list[torch.Tensor] = []
    original = train_module.per_sample_loss

    def recording(model, scheduler, x0, labels, t, noise):  # type: ignore[no-untyped-def]
        drawn.append(x0.clone())
        return original(model, scheduler, x0, labels, t, noise)

    monkeypatch.setattr(train_module, "per_sample_loss", recording)
    full, full_labels = tiny_data(96)
    subset = np.arange(0, 96, 2)  # the kept half
    options = TrainOptions(anneal_frac=0.25, **TINY_RUN)
    trainer = Trainer(full[subset], full_labels[subset], options, num_classes=NUM_CLASSES,
                      anneal_data=(full, full_labels))  # fmt: skip
    assert trainer.anneal_step == 12
    for _ in range(16):
        trainer.step()
    rows = torch.from_numpy(full).flatten(1)
    which = [torch.cdist(x.flatten(1), rows).argmin(dim=1) for x in drawn]  # full-split row of each image
    for step, found in enumerate(which):
        inside = np.isin(found.numpy(), subset)
        assert inside.all() if step < 12 else not inside.all()
    # after the switch: uniform epochs over all 96 (6 steps each), so steps 12-15 see 64 distinct images
    assert len(set(torch.cat(which[12:16]).tolist())) == 64


def test_anneal_without_full_data_is_a_plain_run(tmp_path: Path) -> None:
    images, labels = tiny_data()
    plain = train(images, labels, TrainOptions(**TINY_RUN), tmp_path / "plain", num_classes=NUM_CLASSES, progress=False)
    annealed = train(images, labels, TrainOptions(anneal_frac=0.5, **TINY_RUN), tmp_path / "anneal",
                     num_classes=NUM_CLASSES, progress=False)  # fmt: skip
    assert "anneal" not in annealed and plain["final_loss"] == annealed["final_loss"]
    for name in ("model.safetensors", "ema.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "anneal" / name).read_bytes()


def test_resume_with_infobatch_and_anneal_is_byte_identical(tmp_path: Path) -> None:
    full, full_labels = tiny_data(96)
    subset = np.arange(48)
    options = TrainOptions(dynamic_pruning="infobatch", prune_until=0.75, anneal_frac=0.25, **TINY_RUN)
    run = dict(num_classes=NUM_CLASSES, seed=3, progress=False, anneal_data=(full, full_labels))

    def kill(step: int, nimg: int) -> None:
        if step == 11:  # three steps past the step-8 checkpoint, inside a pruned epoch
            raise KeyboardInterrupt

    straight = train(full[subset], full_labels[subset], options, tmp_path / "straight", **run)
    with pytest.raises(KeyboardInterrupt):
        train(full[subset], full_labels[subset], options, tmp_path / "resumed", on_step=kill, **run)
    resumed = train(full[subset], full_labels[subset], options, tmp_path / "resumed", **run)

    assert straight["anneal"] == resumed["anneal"] == {"switch_step": 12, "switch_kimg": 0.192}
    assert straight["infobatch"] == resumed["infobatch"] and straight["infobatch"]["skipped_frac"] > 0
    assert straight["final_loss"] == resumed["final_loss"]
    for name in ("model.safetensors", "ema.safetensors"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


# Options and fingerprints


def test_schedule_options_are_validated_and_out_of_the_identity_at_their_defaults() -> None:
    plain = TrainOptions().identity(exclude=set())
    assert {"dynamic_pruning", "prune_ratio", "prune_until", "anneal_frac"}.isdisjoint(plain)
    on = TrainOptions(dynamic_pruning="infobatch", prune_ratio=0.3, anneal_frac=0.2).identity(exclude=set())
    assert (on["dynamic_pruning"], on["prune_ratio"], on["anneal_frac"]) == ("infobatch", 0.3, 0.2)
    assert "prune_until" not in on  # at its default
    with pytest.raises(ValueError, match="are for dynamic_pruning"):
        TrainOptions(prune_ratio=0.3)
    for bad in ({"prune_ratio": 1.0}, {"prune_until": 1.5}, {"anneal_frac": 1.0}, {"anneal_frac": -0.1}):
        with pytest.raises(ValueError):
            TrainOptions(dynamic_pruning="infobatch", **bad)


def test_fingerprints_move_only_where_a_schedule_acts(pipelines_file: Path, tmp_path: Path) -> None:
    from dedt.config import resolve
    from dedt.pipeline import plan

    def fingerprints(*overrides: str) -> dict[str, str]:
        return {
            k: n.out.fingerprint for k, n in plan(resolve("tiny", pipelines_file, list(overrides)), tmp_path).items()
        }

    plain = fingerprints()
    explicit = fingerprints("train.dynamic_pruning=none", "train.anneal_frac=0.0")
    assert explicit == plain  # the defaults, spelled out, are the old pipeline
    anneal = fingerprints("train.anneal_frac=0.3")
    # the reference and the DRO proxy ignore anneal_frac: shared with the plain pipeline
    assert {k for k in plain if anneal[k] != plain[k]} == {
        "train", "train:uniform", "evaluate:train", "evaluate:train:uniform"
    }  # fmt: skip
    pruned = fingerprints("train.dynamic_pruning=infobatch", "train.weighting=loss")
    assert pruned["reference"] != fingerprints("train.weighting=loss")["reference"]  # the reference prunes too
    with pytest.raises(ValueError, match="infobatch prunes uniform epochs"):
        fingerprints("train.dynamic_pruning=infobatch")  # the reweighted model draws a class mixture


def test_the_train_stage_anneals_a_subset_model_to_the_full_split(tmp_path: Path) -> None:
    import json

    from dedt.config import build_config
    from dedt.pipeline import plan, run_node

    cfg = build_config(
        {
            "dataset": {"source": "digits"},
            "encode": {"encoder": "pixels"},
            "score": {"method": "random"},
            "select": {"keep_frac": 0.3},
            "reweight": {"method": "none"},
            "train": {"preset": "digits-tiny", "budget_kimg": 0.256, "batch_size": 64, "device": "cpu",
                      "anneal_frac": 0.5},
        },
        "anneal",
    )  # fmt: skip
    planned = plan(cfg, tmp_path)
    for key in ("data", "encode", "score", "select"):
        run_node(cfg, planned, key)
    summary = run_node(cfg, planned, "train:uniform").summary
    kept = run_node(cfg, planned, "select").summary["kept"]
    assert summary["n_images"] == kept and summary["anneal"] == {"switch_step": 2, "switch_kimg": 0.128}
    identity = json.loads((planned["train:uniform"].out.path / "training_options.json").read_text())["identity"]
    assert identity["options"]["anneal_frac"] == 0.5 and "anneal_data_sha256" in identity
