"""Dataset sources and the manifest: shapes, scaling, splits, and clear errors on bad input."""

import pickle

import numpy as np
import pytest
from PIL import Image

from dedt.data.manifest import holdout_mask, load_split, prepare_images, write_manifest
from dedt.data.sources import load_source
from dedt.errors import DedtError


def _folder(root, counts, size=(8, 8), mode="L"):
    for c, n in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            arr = np.full(size + ((3,) if mode == "RGB" else ()), 10 * c + i, np.uint8)
            Image.fromarray(arr, mode).save(root / f"class{c}" / f"{i}.png")
    return root


def test_digits_scaled_exactly():
    raw = load_source("digits", None)
    assert raw.images.shape == (1797, 8, 8, 1) and raw.images.dtype == np.uint8
    assert raw.images.max() == 255 and set(np.unique(raw.labels)) == set(range(10))


def test_manifest_round_trip_scales_to_minus_one_one(tmp_path):
    raw = load_source("digits", None)
    images = prepare_images(raw, None, None)
    hold = holdout_mask(raw.labels, 0.1, seed=0)
    write_manifest(raw, images, hold, tmp_path / "m.parquet", {})
    ids, x, y = load_split(tmp_path / "m.parquet", "train")
    assert x.shape == ((~hold).sum(), 1, 8, 8) and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(y, raw.labels[~hold])
    np.testing.assert_array_equal(np.rint((x[0, 0] + 1) * 127.5), images[ids[0], :, :, 0])


def test_holdout_per_class_and_seeded():
    labels = np.repeat(np.arange(3), 20)
    a, b = holdout_mask(labels, 0.25, 1), holdout_mask(labels, 0.25, 1)
    np.testing.assert_array_equal(a, b)
    assert [int(a[labels == c].sum()) for c in range(3)] == [5, 5, 5]


def test_imagefolder_reads_classes_and_resizes(tmp_path):
    root = _folder(tmp_path / "ds", [3, 2], size=(10, 10))
    raw = load_source("imagefolder", str(root))
    assert raw.class_names == ["class0", "class1"] and list(raw.labels) == [0, 0, 0, 1, 1]
    assert prepare_images(raw, 4, None).shape == (5, 4, 4, 1)
    assert prepare_images(raw, None, 3).shape == (5, 10, 10, 3)


def test_mixed_sizes_need_a_resolution(tmp_path):
    root = _folder(tmp_path / "ds", [2], size=(8, 8))
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "class0" / "big.png")
    raw = load_source("imagefolder", str(root))
    with pytest.raises(DedtError, match="dataset.resolution"):
        prepare_images(raw, None, None)
    assert prepare_images(raw, 8, None).shape == (3, 8, 8, 1)


@pytest.mark.parametrize("case", ["missing", "empty_class", "truncated", "zero_byte", "not_image", "no_classes"])
def test_imagefolder_bad_input(tmp_path, case):
    root = tmp_path / "ds"
    if case != "missing":
        _folder(root, [2, 1])
    if case == "empty_class":
        (root / "class2").mkdir()
    elif case == "truncated":
        data = (root / "class0" / "0.png").read_bytes()
        (root / "class0" / "0.png").write_bytes(data[:20])
    elif case == "zero_byte":
        (root / "class0" / "0.png").write_bytes(b"")
    elif case == "not_image":
        (root / "class0" / "0.png").write_text("hello")
    elif case == "no_classes":
        for p in sorted(root.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    with pytest.raises(DedtError) as err:
        load_source("imagefolder", str(root))
    assert str(root) in str(err.value)


def test_symlink_outside_root_refused(tmp_path):
    root = _folder(tmp_path / "ds", [1])
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    (root / "class0" / "link.png").symlink_to(outside)
    with pytest.raises(DedtError, match="outside the dataset root"):
        load_source("imagefolder", str(root))


def test_npz_and_its_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]))
    raw = load_source("npz", str(good))
    assert raw.images.shape == (4, 8, 8, 1) and raw.class_names == ["0", "1"]
    cases = {
        "nan.npz": dict(images=np.full((2, 8, 8), np.nan), labels=np.array([0, 1])),
        "mismatch.npz": dict(images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1])),
        "nolabels.npz": dict(images=np.zeros((3, 8, 8), np.uint8)),
        "floatlabels.npz": dict(images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0.5, 1.0])),
        "negative.npz": dict(images=np.zeros((2, 8, 8), np.uint8), labels=np.array([-1, 0])),
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DedtError):
            load_source("npz", str(tmp_path / name))


def test_cifar10_batches_and_pickle_guard(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 0, 1, 2]}
    (root / "data_batch_1").write_bytes(pickle.dumps(batch))
    raw = load_source("cifar10", str(root))
    assert raw.images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(raw.images[0, :, :, 0].ravel(), batch[b"data"][0, :1024])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DedtError, match="not a CIFAR-10"):
        load_source("cifar10", str(root))


def test_missing_path_names_the_field(tmp_path):
    with pytest.raises(DedtError, match="dataset.path"):
        load_source("npz", None)
    with pytest.raises(DedtError, match="does not exist"):
        load_source("cifar10", str(tmp_path / "nope"))
