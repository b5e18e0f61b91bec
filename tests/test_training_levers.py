"""Training levers: Min-SNR-gamma weighting, loss-aware timestep sampling, post-hoc EMA.

Hand-computed values for the pure functions, the unbiasedness of importance sampling computed
exactly from p(t), byte-identical resume with the sampler's state, and a post-hoc reconstruction
checked against an EMA tracked directly in the same run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dedt.diffusion.train as train_module
from dedt.diffusion.options import LATER_FIELDS, TrainOptions
from dedt.diffusion.posthoc import PROFILES, list_posthoc_snapshots, reconstruct_ema, solve_posthoc_coefficients
from dedt.diffusion.presets import PRESETS, Preset, build_scheduler
from dedt.diffusion.timestep_sampler import HISTORY, UNIFORM_FLOOR, LossAwareTimesteps
from dedt.diffusion.train import Trainer, train
from dedt.diffusion.weighting import min_snr_weights, timestep_weight_table
from dedt.reweight import ProxyTrainer
from tests.helpers import TINY_RUN, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3


@pytest.fixture
def short_schedule(monkeypatch: pytest.MonkeyPatch) -> str:
    """digits-tiny with T = 8 timesteps and dropout: the loss-aware sampler warms up within a few
    steps of batch 16, so a short run covers both of its phases (and the dropout RNG stream)."""
    monkeypatch.setitem(
        PRESETS,
        "tiny-t8",
        Preset(description="test", block_out_channels=(32, 64), layers_per_block=1, dropout=0.1,
               num_train_timesteps=8, beta_end=0.3),
    )  # fmt: skip
    return "tiny-t8"


# Min-SNR-gamma


def test_min_snr_weights_are_the_formula_on_the_real_scheduler() -> None:
    scheduler = build_scheduler("digits-tiny")
    abar = scheduler.alphas_cumprod.double().numpy()
    t = torch.arange(len(abar))
    snr = abar / (1 - abar)
    expected = np.minimum(snr, 5.0) / snr
    got = min_snr_weights(scheduler.alphas_cumprod, t, 5.0)
    assert got.dtype == torch.float32 and got.shape == (1000,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # Hand values: t = 0 has SNR = (1 - 1e-4) / 1e-4 = 9999, so weight 5 / 9999 (to the float32 abar's
    # precision: 1 - abar_0 keeps ~3 digits); the noisy end is 1.
    assert got[0].item() == pytest.approx(5 / 9999, rel=1e-3)
    assert (got[snr <= 5] == 1).all() and (got[snr > 5] < 1).all()
    from diffusers.training_utils import compute_snr  # diffusers' own SNR agrees

    np.testing.assert_allclose(compute_snr(scheduler, t).double().numpy(), snr, rtol=1e-4)
    assert timestep_weight_table("uniform", scheduler.alphas_cumprod, snr_gamma=5.0) is None


def test_min_snr_composes_with_class_loss_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's loss is mean(l_i * w(t_i) * k w_{y_i}): both weights act on the same per-sample loss."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = train_module.per_sample_loss

    def recording(model, scheduler, x0, labels, t, noise):  # type: ignore[no-untyped-def]
        losses = original(model, scheduler, x0, labels, t, noise)
        seen.append((losses.detach().clone(), labels, t))
        return losses

    monkeypatch.setattr(train_module, "per_sample_loss", recording)
    images, labels = tiny_data()
    class_weights = np.array([0.2, 0.3, 0.5])
    options = TrainOptions(timestep_weighting="min-snr", snr_gamma=2.0, weighting="loss", **TINY_RUN)
    trainer = Trainer(images, labels, options, num_classes=NUM_CLASSES, class_weights=class_weights)
    trainer.step()
    losses, y, t = seen[0]
    table = min_snr_weights(trainer.scheduler.alphas_cumprod, torch.arange(1000), 2.0)
    expected = (losses * table[t] * torch.tensor(NUM_CLASSES * class_weights, dtype=torch.float32)[y]).mean()
    torch.testing.assert_close(trainer.pop_mean_loss(), expected.item())


def test_dro_proxy_weights_both_losses_like_final_training() -> None:
    images, labels = tiny_data()
    options = TrainOptions(timestep_weighting="min-snr", **TINY_RUN)
    reference = Trainer(images, labels, TrainOptions(**TINY_RUN), num_classes=NUM_CLASSES).ema.module
    proxy = ProxyTrainer(images, labels, labels, reference, options, num_classes=NUM_CLASSES, eta=1.0,
                         smoothing=1e-3, seed=0)  # fmt: skip
    expected = min_snr_weights(proxy.scheduler.alphas_cumprod, torch.arange(1000), 5.0)
    torch.testing.assert_close(proxy.timestep_weight, expected)
    proxy.step(np.arange(16))
    assert np.isfinite(proxy.alpha).all() and proxy.alpha.sum() == pytest.approx(1.0)
    plain = ProxyTrainer(images, labels, labels, reference, TrainOptions(**TINY_RUN), num_classes=NUM_CLASSES, eta=1.0,
                         smoothing=1e-3, seed=0)  # fmt: skip
    assert plain.timestep_weight is None


# Loss-aware timestep sampling


def _warm_sampler(rms_by_t: np.ndarray) -> LossAwareTimesteps:
    """A sampler whose history at t holds HISTORY losses of root mean square rms_by_t[t]."""
    T = len(rms_by_t)
    sampler = LossAwareTimesteps(T)
    spread = np.sqrt(np.linspace(0.5, 1.5, HISTORY))  # mean square 1: the RMS is rms_by_t exactly
    for k in range(HISTORY):
        sampler.update(torch.arange(T), torch.from_numpy(rms_by_t * spread[k]))
    return sampler


def test_loss_aware_probabilities_follow_the_rms_with_a_uniform_floor() -> None:
    T = 50
    rms = np.linspace(0.1, 2.0, T)
    sampler = LossAwareTimesteps(T)
    sampler.update(torch.arange(T - 1), torch.ones(T - 1))  # t = 49 never seen: still uniform
    torch.testing.assert_close(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    sampler = _warm_sampler(rms)
    expected = (1 - UNIFORM_FLOOR) * rms / rms.sum() + UNIFORM_FLOOR / T
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-12)


def test_loss_aware_history_keeps_the_last_losses_per_timestep() -> None:
    sampler = LossAwareTimesteps(8)
    sampler.update(torch.full((15,), 5), torch.arange(15.0))  # 15 losses at t = 5 in one batch
    assert sampler.seen[5] == 15 and sorted(sampler.history[5].tolist()) == list(range(5, 15))
    sampler.update(torch.tensor([5, 2, 5]), torch.tensor([100.0, 7.0, 101.0]))  # overwrite the two oldest
    assert sorted(sampler.history[5].tolist()) == [*range(7, 15), 100, 101]
    assert sampler.history[2, 0] == 7 and sampler.seen[2] == 1


def test_importance_weighted_loss_equals_the_uniform_loss_in_expectation() -> None:
    """E_{t~p}[L_t w(t)] = sum_t p(t) L_t w(t) computed exactly from p, with the weights the sampler
    returned for the t it drew; and a Monte Carlo mean agrees within its standard error."""
    T = 200
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 1.0, T)  # a fixed table of per-timestep losses
    sampler = _warm_sampler(losses * rng.uniform(0.5, 2.0, T))  # p not proportional to the table itself
    p = sampler.probabilities().numpy()
    t, w = sampler.sample(400_000, torch.Generator().manual_seed(0))
    t, w = t.numpy(), w.double().numpy()
    assert len(np.unique(t)) == T  # every t drawn, so every weight is observed
    weight_of = np.zeros(T)
    weight_of[t] = w
    assert np.array_equal(weight_of[t], w)  # one weight per timestep: w is a function of t
    np.testing.assert_allclose(weight_of, 1 / (T * p), rtol=1e-6)
    assert (p * losses * weight_of).sum() == pytest.approx(losses.mean(), rel=1e-6)
    draws = losses[t] * w
    assert abs(draws.mean() - losses.mean()) < 4 * draws.std() / np.sqrt(len(draws))
    np.testing.assert_allclose(np.bincount(t, minlength=T) / len(t), p, atol=4 * np.sqrt(p.max() / len(t)))


def test_resume_with_loss_aware_sampling_min_snr_and_posthoc_ema_is_byte_identical(
    tmp_path: Path, short_schedule: str
) -> None:
    images, labels = tiny_data()
    options = TrainOptions(preset=short_schedule, timestep_sampling="loss-aware", timestep_weighting="min-snr",
                           posthoc_ema=True, posthoc_snapshots=4, ema="power", snapshots=2, **TINY_RUN)  # fmt: skip
    run = dict(num_classes=NUM_CLASSES, seed=3, progress=False)

    def kill(step: int, nimg: int) -> None:
        if step == 11:  # three steps past the step-8 checkpoint
            raise KeyboardInterrupt

    straight = train(images, labels, options, tmp_path / "straight", **run)
    with pytest.raises(KeyboardInterrupt):
        train(images, labels, options, tmp_path / "resumed", on_step=kill, **run)
    state = torch.load(next((tmp_path / "resumed" / "checkpoints").glob("ckpt-*0.128")) / "training_state.pt",
                       weights_only=True)  # fmt: skip
    assert state["timestep_sampler"]["seen"].min() >= HISTORY  # resumed in the loss-aware phase
    resumed = train(images, labels, options, tmp_path / "resumed", **run)

    assert straight["final_loss"] == resumed["final_loss"]
    for name in ("model.safetensors", "ema.safetensors"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    straight_snaps = sorted(p.name for p in (tmp_path / "straight" / "snapshots").glob("*.safetensors"))
    assert straight_snaps == sorted(p.name for p in (tmp_path / "resumed" / "snapshots").glob("*.safetensors"))
    for name in straight_snaps:  # the weights (the JSON records hold wall-clock seconds)
        assert (tmp_path / "straight" / "snapshots" / name).read_bytes() == \
            (tmp_path / "resumed" / "snapshots" / name).read_bytes()  # fmt: skip
    found = list_posthoc_snapshots(tmp_path / "straight")
    # 4 even points (64, 128, 192, 256 images) plus the curve's points (64, 128): no repeats.
    assert {sigma: [s.nimg for s in snaps] for sigma, snaps in found.items()} == {
        0.05: [64, 128, 192, 256],
        0.10: [64, 128, 192, 256],
    }


def test_levers_at_their_defaults_keep_the_identity() -> None:
    plain = TrainOptions()
    assert plain.identity(exclude=set()) == {
        k: v for k, v in plain.model_dump().items()
        if k not in {"timestep_weighting", "snr_gamma", "timestep_sampling", "posthoc_ema", "posthoc_snapshots",
                     "dynamic_pruning", "prune_ratio", "prune_until", "anneal_frac",
                     "processes"}  # processes: a runtime field, never in an identity
    }  # fmt: skip
    lever = TrainOptions(timestep_weighting="min-snr").identity(exclude=set())
    assert lever["timestep_weighting"] == "min-snr" and "snr_gamma" not in lever
    with pytest.raises(ValueError, match="snr_gamma is for"):
        TrainOptions(snr_gamma=3.0)
    with pytest.raises(ValueError, match="posthoc_snapshots needs"):
        TrainOptions(posthoc_snapshots=8)


def test_pipeline_fingerprints_change_only_with_a_lever_on(pipelines_file: Path, tmp_path: Path) -> None:
    from dedt.config import resolve
    from dedt.pipeline import plan

    def planned(*overrides: str) -> dict:
        return plan(resolve("tiny", pipelines_file, list(overrides)), tmp_path)

    plain, lever = planned(), planned("train.timestep_sampling=loss-aware")
    assert LATER_FIELDS.isdisjoint(plain["train"].config["train"])  # the train config as before the levers
    assert plain["select"].out.fingerprint == lever["select"].out.fingerprint
    for key in ("reference", "reweight", "train", "train:uniform"):
        assert plain[key].out.fingerprint != lever[key].out.fingerprint


# Post-hoc EMA


def test_posthoc_coefficients_reproduce_a_tracked_profile_exactly() -> None:
    nimg = [100.0, 200.0, 300.0, 400.0] * 2
    sigma = [0.05] * 4 + [0.10] * 4
    x = solve_posthoc_coefficients(nimg, sigma, 400.0, 0.10)
    np.testing.assert_allclose(x, [0, 0, 0, 0, 0, 0, 0, 1], atol=1e-8)
    assert solve_posthoc_coefficients(nimg, sigma, 300.0, 0.07).sum() == pytest.approx(1.0)


def test_posthoc_reconstruction_matches_a_directly_tracked_ema(tmp_path: Path) -> None:
    """A run tracks sigma_rel 0.05 and 0.10 for post-hoc EMA and, as its main EMA, 0.075 directly:
    the 0.075 EMA reconstructed from the snapshots equals the tracked one within 1e-3 relative."""
    images, labels = tiny_data(96)
    options = TrainOptions(budget_kimg=1.536, batch_size=16, warmup_kimg=0.1, checkpoint_every_kimg=2.0,
                           ema="power", ema_sigma_rel=0.075, posthoc_ema=True, posthoc_snapshots=16,
                           device="cpu")  # fmt: skip
    train(images, labels, options, tmp_path, num_classes=NUM_CLASSES, progress=False)
    snapshots = list_posthoc_snapshots(tmp_path)
    assert sorted(snapshots) == sorted(PROFILES.values()) and len(snapshots[0.05]) == 16
    direct = load_file(tmp_path / "ema.safetensors")
    rebuilt = reconstruct_ema(snapshots, 0.075)
    assert rebuilt.keys() == direct.keys()
    diff = sum(float((rebuilt[k].double() - direct[k].double()).square().sum()) for k in direct) ** 0.5
    norm = sum(float(direct[k].double().square().sum()) for k in direct) ** 0.5
    final = load_file(snapshots[0.10][-1].weights)
    drift = sum(float((final[k].double() - direct[k].double()).square().sum()) for k in direct) ** 0.5
    assert diff / norm < 1e-3
    assert diff < drift / 10  # and far closer than the nearest tracked profile: the test can fail
    exact = reconstruct_ema(snapshots, 0.10)
    for k in final:
        torch.testing.assert_close(exact[k], final[k], rtol=1e-5, atol=1e-6)
