"""The DRO proxy: shared (t, eps), stale excess for absent groups, determinism, clusters, references."""

import numpy as np
import pytest
import torch

from dedt.diffusion.options import TrainOptions
from dedt.diffusion.presets import build_model
from dedt.errors import DedtError
from dedt.reweight import ProxyTrainer, kmeans_groups, load_reference, train_proxy

OPTIONS = TrainOptions(preset="digits-tiny", batch_size=12, lr=1e-3)


def _data(n=30, k=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % k
    return images, labels


def _reference(seed=1):
    torch.manual_seed(seed)
    return build_model("digits-tiny", in_channels=1, resolution=8, num_classes=3)


def test_absent_group_keeps_its_previous_excess():
    images, labels = _data()
    trainer = ProxyTrainer(
        images, labels, labels, _reference(), OPTIONS, num_classes=3, eta=1.0, smoothing=1e-3, seed=0
    )
    trainer.step(np.arange(12))  # all three groups present
    first = trainer.excess.copy()
    assert np.all(first >= 0)
    only_group_0 = np.flatnonzero(labels == 0)[:6]
    trainer.step(only_group_0)
    assert trainer.excess[1] == first[1] and trainer.excess[2] == first[2]
    assert trainer.alpha.sum() == pytest.approx(1.0)


def test_same_noise_for_proxy_and_reference_gives_zero_excess_against_itself():
    images, labels = _data()
    trainer = ProxyTrainer(images, labels, labels, _reference(), OPTIONS, num_classes=3, eta=1.0, smoothing=0.0, seed=0)
    trainer.reference = trainer.proxy  # reference == proxy: with a shared (t, eps) the excess is exactly 0
    trainer.step(np.arange(12))
    np.testing.assert_array_equal(trainer.excess, np.zeros(3))
    np.testing.assert_allclose(trainer.alpha, np.full(3, 1 / 3))


def test_timestep_range_outside_batch_counts_nothing():
    images, labels = _data()
    trainer = ProxyTrainer(
        images,
        labels,
        labels,
        _reference(),
        OPTIONS,
        num_classes=3,
        eta=1.0,
        smoothing=1e-3,
        seed=0,
        t_range=(0.999, 1.0),
    )
    torch.manual_seed(0)
    trainer.step(np.arange(3))  # 3 draws of t: almost surely none in the top 0.1%
    np.testing.assert_array_equal(trainer.excess, np.zeros(3))


def test_train_proxy_deterministic_and_averaged():
    images, labels = _data()
    runs = [
        train_proxy(
            images,
            labels,
            labels,
            _reference(),
            OPTIONS,
            num_classes=3,
            budget_kimg=0.06,
            eta=1.0,
            smoothing=1e-3,
            seed=3,
        )
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].weights, runs[1].weights)
    np.testing.assert_allclose(runs[0].weights, runs[0].alphas.mean(axis=0))
    np.testing.assert_allclose(runs[0].alphas[0], np.full(3, 1 / 3))  # alpha_0 included
    assert len(runs[0].alphas) == 1 + 5  # 60 images / batch 12


def test_kmeans_groups_recover_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    truth = np.repeat([2, 0, 1], 40)
    x = centers[truth] + rng.normal(0, 0.3, (120, 2)).astype(np.float32)
    groups = kmeans_groups(x, 3, seed=0)
    assert groups[0] == 0 and len(np.unique(groups)) == 3
    for g in range(3):  # each cluster is one true group
        assert len(np.unique(truth[groups == g])) == 1
    with pytest.raises(DedtError, match="clusters"):
        kmeans_groups(x, 1, seed=0)


def test_local_reference_checkpoint_folder(tmp_path):
    model = _reference()
    model.save_pretrained(tmp_path / "pipe" / "unet")
    loaded = load_reference(str(tmp_path / "pipe"), in_channels=1, resolution=8)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(DedtError, match="1x8px images but the data is 3x32px"):
        load_reference(str(tmp_path / "pipe"), in_channels=3, resolution=32)
    with pytest.raises(DedtError, match="holds no diffusers UNet"):
        load_reference(str(tmp_path), in_channels=1, resolution=8)


class _OracleForZeros(torch.nn.Module):
    """A reference that is exact for all-zero images (eps = x_t / sqrt(1 - abar_t)), poor elsewhere."""

    class config:  # noqa: N801 - mimics a diffusers model's config attribute
        num_class_embeds = None

    def __init__(self):
        super().__init__()
        from dedt.diffusion.presets import build_scheduler

        self.abar = build_scheduler("digits-tiny").alphas_cumprod

    def forward(self, x_t, t, class_labels=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=x_t / (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1))


def test_collapse_warning_on_constructed_run():
    images, labels = _data()
    images[labels == 1] = 0.0  # the reference is perfect on group 1 only: all excess, all weight, goes there
    images[labels != 1] = 1.0
    result = train_proxy(
        images,
        labels,
        labels,
        _OracleForZeros(),
        OPTIONS,
        num_classes=3,
        budget_kimg=0.36,
        eta=50.0,
        smoothing=0.0,
        seed=0,
    )
    assert result.weights.argmax() == 1
    assert result.warning is not None and "collapsed" in result.warning and "eta 50.0" in result.warning


def test_kmeans_groups_reweight_unlabelled_pipeline(store):
    """Reweighting without labels: k-means clusters of the embeddings are the DRO groups."""
    import pyarrow.parquet as pq

    from dedt.config import build_config
    from dedt.pipeline import plan, run_node
    from tests.helpers import TINY

    cfg = build_config(TINY, "tiny", ["reweight.groups=kmeans", "reweight.clusters=4", "train.conditional=false"])
    planned = plan(cfg, store)
    for key in ("data", "encode", "score", "select", "reference", "reweight", "train"):
        run_node(cfg, planned, key)
    out = planned["reweight"].out
    weights = pq.read_table(out.file("weights.parquet")).column("weight").to_numpy()
    groups = pq.read_table(out.file("groups.parquet")).column("group").to_numpy()
    assert len(weights) == 4 and weights.sum() == pytest.approx(1.0)
    assert set(groups) == {0, 1, 2, 3}
    assert planned["train"].out.is_complete()
