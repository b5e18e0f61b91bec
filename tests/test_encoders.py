"""Encoders: registry and errors, offline encoders' values, network encoders' shapes, streaming encode."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dedt.encoders import ENCODERS, get_encoder, validate_encoder_name
from dedt.encoders.offline import projection_matrix
from dedt.encoders.streaming import encode_to_parquet, read_embeddings
from dedt.errors import DedtError


def images(n: int, channels: int = 1, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, channels, size, size)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Registry and validation


def test_registry_names_and_import_is_torch_free():
    assert set(ENCODERS) == {"pixels", "random-projection", "open_clip", "inception", "resnet18", "resnet50", "dinov2"}
    code = (
        "import sys; import dedt.encoders as e, dedt.encoders.streaming; "
        "e.validate_encoder_name('open_clip:ViT-B-32'); e.get_encoder('random-projection').encode_batch("
        "__import__('numpy').zeros((1, 1, 2, 2), 'float32')); "
        "assert not {'torch', 'open_clip', 'torchvision'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vgg16", "known encoders: pixels, random-projection, open_clip:<model>[:<pretrained>], inception"),
        ("open_clip", "needs an argument"),
        ("open_clip:NoSuchNet", "unknown open_clip model 'NoSuchNet'"),
        ("dinov2:tiny", "choose one of small, base, large, giant"),
        ("pixels:3", "takes no ':' argument"),
    ],
)
def test_bad_names_fail_with_the_fix(name, message):
    with pytest.raises(DedtError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_encoder_name(name)


def test_missing_pretrained_file_names_the_path(tmp_path):
    missing = tmp_path / "clip.safetensors"
    with pytest.raises(DedtError, match=str(missing)):
        validate_encoder_name(f"open_clip:ViT-S-32:{missing}")
    with pytest.raises(DedtError, match=str(missing)):
        get_encoder("resnet18", weights=str(missing))
    garbage = tmp_path / "resnet18.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DedtError, match=f"{garbage} could not be read"):
        get_encoder("resnet18", weights=str(garbage), device="cpu")


def test_missing_cached_weights_name_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(DedtError, match=r"torch/hub/checkpoints/resnet18-f37072fd\.pth.*weights=random"):
        get_encoder("resnet18", device="cpu")
    with pytest.raises(DedtError, match=r"dinov2_vits14_pretrain\.pth"):
        get_encoder("dinov2:small", device="cpu")


def test_open_clip_tag_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from dedt.encoders.torch_models import resolve_open_clip_weights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip
    expected = r"vit_base_patch32_clip_224\.openai.*open_clip_model\.safetensors.*\.cache/clip/ViT-B-32\.pt"
    with pytest.raises(DedtError, match=expected):
        resolve_open_clip_weights("ViT-B-32", "openai")
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    planted = repo / "snapshots" / "abc" / "open_clip_model.safetensors"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"")
    path, tag_cfg = resolve_open_clip_weights("ViT-B-32", "openai")
    assert path == planted and tag_cfg["quick_gelu"] is True


# ---------------------------------------------------------------------------------------------
# Offline encoders


def test_pixels_is_the_flattened_image():
    x = images(3, channels=3, size=4)
    encoder = get_encoder("pixels", dim=7)  # dim is ignored
    z = encoder.encode_batch(x)
    assert z.dtype == np.float32 and z.shape == (3, 48) and encoder.dim == 48
    np.testing.assert_array_equal(z[1], x[1].reshape(-1))
    assert z[2, 16] == x[2, 1, 0, 0]  # (C, H, W) order
    with pytest.raises(DedtError, match="C\\*H\\*W = 12"):
        encoder.encode_batch(images(1, channels=3, size=2))


def test_random_projection_values_and_determinism():
    x = images(50, size=8)
    z = get_encoder("random-projection", dim=32, seed=3).encode_batch(x)
    assert z.shape == (50, 32) and z.dtype == np.float32
    matrix = np.random.default_rng(3).standard_normal((64, 32), dtype=np.float32) / np.sqrt(32)
    np.testing.assert_allclose(z, x.reshape(50, -1) @ matrix, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(z, get_encoder("random-projection", dim=32, seed=3).encode_batch(x))
    assert not np.allclose(z, get_encoder("random-projection", dim=32, seed=4).encode_batch(x))


def test_random_projection_preserves_norms_on_average():
    """Johnson-Lindenstrauss scaling: E||Rx||^2 = ||x||^2 with R ~ N(0, 1/dim)."""
    x = images(200, size=8).reshape(200, -1)
    ratio = np.sum((x @ projection_matrix(64, 2048, 0)) ** 2, axis=1) / np.sum(x**2, axis=1)
    assert abs(ratio.mean() - 1) < 0.02


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 8, 8), np.float32), "shape"),
        (np.zeros((2, 2, 8, 8), np.float32), "C in"),
        (np.zeros((2, 1, 8, 8), np.uint8), "uint8"),
        (np.full((2, 1, 8, 8), 3.0, np.float32), r"\[-1, 1\]"),
        (np.full((2, 1, 8, 8), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_images_are_refused(bad, message):
    with pytest.raises(DedtError, match=message):
        get_encoder("pixels").encode_batch(bad)


# ---------------------------------------------------------------------------------------------
# Network encoders, random init or bundled weights (CPU, one or two tiny images each)


def assert_same_weights(a, b) -> None:
    import torch

    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_open_clip_random_init_and_local_file(tmp_path):
    import torch

    encoder = get_encoder("open_clip:ViT-S-32", device="cpu", seed=1)
    z = encoder.encode_batch(images(2, channels=1, size=16))  # grayscale is replicated to RGB
    assert z.shape == (2, 384) and encoder.dim == 384 and np.isfinite(z).all()
    assert "bicubic" in encoder.preprocessing and "CLIP normalisation" in encoder.preprocessing
    checkpoint = tmp_path / "vit-s-32.pt"
    torch.save(encoder.network.model.state_dict(), checkpoint)
    loaded = get_encoder(f"open_clip:ViT-S-32:{checkpoint}", device="cpu")  # seed 0: only the file can match
    assert loaded.name == f"open_clip:ViT-S-32:{checkpoint}" and "vit-s-32.pt" in loaded.preprocessing
    assert_same_weights(loaded.network, encoder.network)


def test_inception_gives_2048_features():
    encoder = get_encoder("inception", device="cpu")
    z = encoder.encode_batch(images(2, channels=3, size=16))
    assert z.shape == (2, 2048) and z.dtype == np.float32 and (z >= 0).all()  # pool3 follows a ReLU


def test_resnet18_random_init_is_seeded():
    x = images(2, channels=3, size=16)
    z = get_encoder("resnet18", weights="random", device="cpu").encode_batch(x)
    assert z.shape == (2, 512)
    np.testing.assert_array_equal(z, get_encoder("resnet18", weights="random", device="cpu").encode_batch(x))
    assert not np.allclose(z, get_encoder("resnet18", weights="random", device="cpu", seed=1).encode_batch(x))


def test_dinov2_random_init_and_local_checkpoint(tmp_path):
    from safetensors.torch import save_file

    encoder = get_encoder("dinov2:small", weights="random", device="cpu")
    assert encoder.encode_batch(images(1, channels=3, size=16)).shape == (1, 384) and encoder.dim == 384
    checkpoint = tmp_path / "dinov2.safetensors"
    save_file(encoder.network.state_dict(), str(checkpoint))
    assert_same_weights(
        get_encoder("dinov2:small", weights=str(checkpoint), device="cpu", seed=5).network, encoder.network
    )


# ---------------------------------------------------------------------------------------------
# Streaming encode


def stream(tmp_path: Path, source, n: int, encoder=None, **kwargs) -> tuple[np.ndarray, np.ndarray, dict]:
    encoder = encoder or get_encoder("random-projection", dim=16)
    out = tmp_path / "embeddings.parquet"
    encode_to_parquet(source, n, np.arange(n) + 100, encoder, out, tmp_path / "work", progress=False, **kwargs)
    return read_embeddings(out)


def test_streaming_equals_one_shot(tmp_path):
    x = images(1000)
    ids, z, metadata = stream(tmp_path, x, 1000, batch_size=64, shard_size=300)
    np.testing.assert_array_equal(ids, np.arange(1000) + 100)
    np.testing.assert_allclose(z, get_encoder("random-projection", dim=16).encode_batch(x), rtol=1e-6, atol=1e-6)
    assert metadata == {"encoder": "random-projection", "dim": 16, "preprocessing": metadata["preprocessing"]}
    assert "seed 0" in metadata["preprocessing"]
    assert not (tmp_path / "work").exists()  # shards cleaned up
    footer = pq.read_metadata(tmp_path / "embeddings.parquet")
    assert max(footer.row_group(i).num_rows for i in range(footer.num_row_groups)) == 64  # copied batch by batch


def test_streaming_resumes_after_a_kill(tmp_path):
    x = images(1000)
    calls: list[tuple[int, int]] = []

    def dying_loader(start: int, stop: int) -> np.ndarray:
        if start >= 600:  # shards [0, 300) and [300, 600) are done when the "kill" comes
            raise KeyboardInterrupt
        calls.append((start, stop))
        return x[start:stop]

    with pytest.raises(KeyboardInterrupt):
        stream(tmp_path, dying_loader, 1000, batch_size=100, shard_size=300)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (tmp_path / "embeddings.parquet").exists()

    calls.clear()
    ids, z, _ = stream(tmp_path, lambda a, b: calls.append((a, b)) or x[a:b], 1000, batch_size=100, shard_size=300)
    assert calls[0] == (600, 700) and sum(b - a for a, b in calls) == 400  # only the missing rows
    np.testing.assert_allclose(z, get_encoder("random-projection", dim=16).encode_batch(x), rtol=1e-6, atol=1e-6)


def test_kill_during_concatenation_resumes_without_encoding(tmp_path, monkeypatch):
    import dedt.encoders.streaming as streaming

    x = images(100)
    real_concatenate = streaming._concatenate
    monkeypatch.setattr(streaming, "_concatenate", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        encode_to_parquet(
            x,
            100,
            np.arange(100),
            get_encoder("pixels"),
            tmp_path / "e.parquet",
            tmp_path / "w",
            shard_size=40,
            progress=False,
        )
    monkeypatch.setattr(streaming, "_concatenate", real_concatenate)
    fresh = get_encoder("pixels")  # dim unknown: it never sees a batch on this run
    metadata = encode_to_parquet(
        lambda a, b: pytest.fail("all shards were done"),
        100,
        np.arange(100),
        fresh,
        tmp_path / "e.parquet",
        tmp_path / "w",
        shard_size=40,
        progress=False,
    )
    assert metadata["dim"] == 64 and fresh.dim is None
    np.testing.assert_array_equal(read_embeddings(tmp_path / "e.parquet")[1], x.reshape(100, -1))


def test_shards_of_another_encoder_are_redone(tmp_path):
    x = images(200)

    def die_after_first_shard(start: int, stop: int) -> np.ndarray:
        if start >= 50:
            raise KeyboardInterrupt
        return x[start:stop]

    with pytest.raises(KeyboardInterrupt):
        stream(
            tmp_path,
            die_after_first_shard,
            200,
            encoder=get_encoder("random-projection", dim=16, seed=9),
            shard_size=50,
        )
    starts: list[int] = []
    _, z, _ = stream(tmp_path, lambda a, b: starts.append(a) or x[a:b], 200, shard_size=50)  # seed 0 now
    assert starts[0] == 0  # the seed-9 shard was not reused
    np.testing.assert_allclose(z, get_encoder("random-projection", dim=16).encode_batch(x), rtol=1e-6, atol=1e-6)


def test_streaming_memory_is_bounded_by_batch_and_shard(tmp_path):
    n = 20_000
    requested: list[int] = []

    def loader(start: int, stop: int) -> np.ndarray:
        requested.append(stop - start)
        return images(stop - start, seed=start)

    tracemalloc.start()
    encode_to_parquet(
        loader,
        n,
        np.arange(n),
        get_encoder("pixels"),
        tmp_path / "out.parquet",
        tmp_path / "work",
        batch_size=128,
        shard_size=1024,
        progress=False,
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full = n * 64 * 4  # the whole image array (and as much again for all embeddings)
    assert max(requested) == 128
    assert peak < full / 4, (peak, full)


def test_bad_streaming_input_and_corrupt_artifacts(tmp_path):
    encoder = get_encoder("pixels")
    with pytest.raises(DedtError, match="sample_ids"):
        encode_to_parquet(images(4), 4, np.arange(3), encoder, tmp_path / "o.parquet", tmp_path / "w")
    with pytest.raises(DedtError, match="loader returned 1 images"):
        encode_to_parquet(
            lambda a, b: images(1), 4, np.arange(4), encoder, tmp_path / "o.parquet", tmp_path / "w", progress=False
        )
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DedtError, match=str(broken)):
        read_embeddings(broken)
