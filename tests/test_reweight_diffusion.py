"""Group DRO for diffusion: common (t, eps) across groups, the normalized excess, dropout
symmetry, iterated rounds on the full data, absent classes, and the proxy's learning-rate warm-up."""

import numpy as np
import pytest
import torch

from dedt.diffusion.options import TrainOptions
from dedt.diffusion.presets import build_model
from dedt.reweight import (
    TIMESTEP_BANDS,
    ProxyTrainer,
    member_slots,
    stratified_batch,
    stratified_timesteps,
    train_proxy,
)

OPTIONS = TrainOptions(preset="digits-tiny", batch_size=12, lr=1e-3)


def _data(n=30, k=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)
    return images, np.arange(n, dtype=np.int64) % k


def _reference(seed=1):
    torch.manual_seed(seed)
    return build_model("digits-tiny", in_channels=1, resolution=8, num_classes=3)


def _trainer(images, labels, options=OPTIONS, **kwargs):
    """A proxy on the tiny reference with the defaults these tests share; ``kwargs`` vary one knob."""
    return ProxyTrainer(
        images, labels, labels, _reference(), options, num_classes=3, eta=1.0, smoothing=1e-3, seed=0, **kwargs
    )


def test_member_slots_by_hand():
    np.testing.assert_array_equal(member_slots(np.array([2, 0, 2, 1, 0, 2])), [0, 0, 1, 0, 1, 2])


def test_stratified_timesteps_one_per_stratum():
    t = stratified_timesteps(8, 1000, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.sort(t.numpy()) // 125, np.arange(8))  # one draw in each eighth of [0, T)


def test_ith_member_of_every_group_gets_the_same_t_and_noise():
    images, labels = _data(n=60)
    trainer = _trainer(images, labels)
    batch = stratified_batch(labels, 14, np.random.default_rng(0))  # 5, 5 and 4 members
    g = torch.from_numpy(labels[batch])
    t, noise = trainer.draw(g)
    slots = member_slots(labels[batch])
    for i in range(4):
        rows = np.flatnonzero(slots == i)
        assert sorted(labels[batch][rows]) == [0, 1, 2]
        assert len(set(t[rows].tolist())) == 1
        for row in rows[1:]:
            torch.testing.assert_close(noise[row], noise[rows[0]], rtol=0, atol=0)
    assert len(set(t[slots < 4].tolist())) == 4  # different members draw different noise levels
    trainer.timesteps = "independent"
    t, _ = trainer.draw(g)
    assert len(set(t.tolist())) > 5  # one draw per sample


def test_step_feeds_the_pool_to_proxy_and_reference(monkeypatch):
    """Within a step both models see the pool's (t, x_t); the i-th members of all groups share t."""
    import dedt.diffusion.train as train_module

    images, labels = _data()
    trainer = _trainer(images, labels)
    seen = []
    real = train_module.per_sample_loss
    monkeypatch.setattr(
        train_module,
        "per_sample_loss",
        lambda model, scheduler, x0, y, t, noise: seen.append((t, noise)) or real(model, scheduler, x0, y, t, noise),
    )
    batch = np.arange(12)
    trainer.step(batch)
    (t_proxy, eps_proxy), (t_ref, eps_ref) = seen
    assert torch.equal(t_proxy, t_ref) and torch.equal(eps_proxy, eps_ref)
    slots = member_slots(labels[batch])
    for i in range(4):
        assert len(set(t_proxy[slots == i].tolist())) == 1


def test_normalized_excess_by_hand():
    images, labels = _data()
    trainer = _trainer(images, labels, excess="normalized")
    band = 1000 // TIMESTEP_BANDS
    t = torch.tensor([0, 1, band])  # two samples in band 0, one in band 1
    loss, ref = torch.tensor([0.6, 0.3, 0.02]), torch.tensor([0.5, 0.3, 0.01])
    got = trainer.sample_excess(loss, ref, t)
    np.testing.assert_allclose(got.numpy(), [0.1 / 0.4, 0.0, 0.01 / 0.01], atol=1e-7)
    # The band means run over steps: band 0 now averages 0.5, 0.3 and 0.1.
    got = trainer.sample_excess(torch.tensor([0.2]), torch.tensor([0.1]), torch.tensor([2]))
    np.testing.assert_allclose(got.numpy(), [0.1 / 0.3], atol=1e-7)


def test_log_ratio_excess_by_hand():
    images, labels = _data()
    trainer = _trainer(images, labels, excess="log-ratio")
    got = trainer.sample_excess(torch.tensor([0.2, 0.01]), torch.tensor([0.1, 0.02]), torch.tensor([0, 900]))
    np.testing.assert_allclose(got.numpy(), np.log([2.0, 0.5]), rtol=1e-6)


def test_identical_proxy_and_reference_give_zero_excess_with_dropout():
    """cifar10-ddpm has dropout 0.1: both models run in train mode with the same masks."""
    options = TrainOptions(preset="cifar10-ddpm", batch_size=4, conditional=False)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
    labels = np.array([0, 1, 0, 1])
    torch.manual_seed(0)  # ProxyTrainer seeds the proxy with seed=0: the reference is the same network
    reference = build_model("cifar10-ddpm", in_channels=3, resolution=16, num_classes=None)
    trainer = ProxyTrainer(images, labels, labels, reference, options, num_classes=2, eta=1.0, smoothing=0.0, seed=0)
    for a, b in zip(trainer.proxy.parameters(), reference.parameters(), strict=False):
        assert torch.equal(a, b)
    trainer.step(np.arange(4))
    np.testing.assert_array_equal(trainer.excess, np.zeros(2))
    np.testing.assert_allclose(trainer.alpha, [0.5, 0.5])


def test_proxy_gets_the_trainers_warmup():
    images, labels = _data()
    options = OPTIONS.model_copy(update={"warmup_kimg": 0.024})  # 24 images: two steps of 12
    trainer = _trainer(images, labels, options)
    trainer.step(np.arange(12))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    trainer.step(np.arange(12, 24))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_absent_class_gets_weight_zero_and_training_accepts_it(tmp_path):
    import pyarrow as pa

    from dedt.artifacts import WEIGHTS, read_weights
    from dedt.diffusion.train import train
    from dedt.store import StageDir, write_parquet

    images, labels = _data()
    kept = labels != 1  # global selection dropped class 1
    result = train_proxy(
        images[kept],
        labels[kept],
        labels[kept],
        _reference(),
        OPTIONS,
        num_classes=3,
        budget_kimg=0.036,
        smoothing=0.1,
        seed=0,
        num_groups=3,
    )
    assert result.weights[1] == 0 and np.all(result.alphas[:, 1] == 0)
    assert result.weights[[0, 2]].min() > 0 and result.weights.sum() == pytest.approx(1.0)
    stage = StageDir(tmp_path, "reweight", "fp")
    stage.path.mkdir(parents=True)
    write_parquet(pa.table({"group": np.arange(3, dtype=np.int32), "weight": result.weights}), WEIGHTS.path(stage))
    weights = read_weights(stage)
    out = train(
        images[kept],
        labels[kept],
        OPTIONS.model_copy(update={"budget_kimg": 0.024}),
        tmp_path / "run",
        num_classes=3,
        class_weights=weights,
        progress=False,
    )
    assert out["nimg"] == 24


def test_kmeans_groups_assign_rows_outside_the_fit():
    """Iterated DRO needs groups for the full data while the clusters are fitted on the subset."""
    from dedt.reweight import kmeans_groups

    rng = np.random.default_rng(0)
    truth = np.repeat([2, 0, 1], 40)
    x = np.array([[0, 0], [10, 0], [0, 10]], np.float32)[truth] + rng.normal(0, 0.3, (120, 2)).astype(np.float32)
    fit = np.arange(120) % 2 == 0
    groups = kmeans_groups(x, 3, seed=0, fit=fit)
    assert groups[0] == 0  # numbered by first appearance among the fitted rows
    # Every other row goes to the nearest centroid of the fitted rows (Lloyd's fixed point: their means).
    centroids = np.stack([x[fit & (groups == g)].mean(axis=0) for g in range(3)])
    nearest = np.linalg.norm(x[~fit, None] - centroids[None], axis=2).argmin(axis=1)
    np.testing.assert_array_equal(groups[~fit], nearest)


def test_rounds_2_with_kmeans_groups_and_a_conditional_model(store, monkeypatch):
    """Round 2 re-trains the reference on the full train split, conditioned on the classes like the
    proxy, while the clusters only weight the sampling."""
    import dedt.reweight as reweight
    from dedt.config import build_config
    from dedt.pipeline import plan, run_node
    from tests.helpers import TINY

    cfg = build_config(
        TINY,
        "tiny",
        [
            "reweight.groups=kmeans",
            "reweight.clusters=4",
            "train.conditional=false",
            "reweight.rounds=2",
            "reweight.proxy_kimg=0.256",
            "reweight.reference_kimg=0.256",
        ],
    )
    # A conditional model with k-means groups: the pipeline config refuses it for the final model,
    # the reweight stage must still condition every model of its own consistently.
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"conditional": True})})
    calls = []
    real_proxy, real_reference = reweight.train_proxy, reweight.train_reference

    def spy_proxy(images, labels, groups, reference, options, **kw):
        calls.append(("proxy", reference.config.num_class_embeds, int(labels.max()), int(groups.max()), len(images)))
        return real_proxy(images, labels, groups, reference, options, **kw)

    def spy_reference(images, labels, groups, weights, options, **kw):
        calls.append(("reference", len(images), int(labels.max()), int(groups.max()), len(weights)))
        return real_reference(images, labels, groups, weights, options, **kw)

    monkeypatch.setattr(reweight, "train_proxy", spy_proxy)
    monkeypatch.setattr(reweight, "train_reference", spy_reference)
    planned = plan(cfg, store)
    for key in ("data", "encode", "score", "select", "reference", "reweight"):
        run_node(cfg, planned, key)
    (_, embeds_1, classes_1, groups_1, subset), (_, full, classes_full, _, k), (_, embeds_2, _, _, _) = calls
    assert embeds_1 == embeds_2 == 10 and classes_1 == classes_full == 9  # classes, not the 4 clusters
    assert groups_1 == 3 and k == 4
    assert full > 2 * subset  # keep 0.3: the round-2 reference trains on the full train split
    import pyarrow.parquet as pq

    weights = pq.read_table(planned["reweight"].out.file("weights.parquet")).column("weight").to_numpy()
    assert len(weights) == 4 and weights.sum() == pytest.approx(1.0)
