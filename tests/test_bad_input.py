"""Bad input through the command line: exit code 2, one line naming the file or field, no traceback,
nothing written to the store.

Each case is a real ``python -m flows.cli run`` subprocess (no Prefect server starts: the config
and ``dedt.preflight`` fail first). The cases run two at a time in a module fixture; each test
then checks one case's outcome. tests/test_cli.py covers four more through the CLI (unknown
pipeline, keep_frac=2 (> 1), unknown scorer, a --set without '='): not repeated here.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import TINY

REPO = Path(__file__).resolve().parent.parent
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@dataclass
class Case:
    config: dict | str | None  # the pipeline "p" (a mapping), raw pipelines-file text, or None: no file
    needle: str | Callable[[Path], str]  # must appear in the message: the field or file (and its fix)
    overrides: list[str] = field(default_factory=list)
    store: Callable[[Path], Path] | None = None  # builds a store to run against (planted artifacts)
    env: dict = field(default_factory=dict)
    hostile: bool = False  # crafted to exhaust memory or time: the run gets LIMIT_AS of address space, LIMIT_S


LIMIT_AS, LIMIT_S = 6 << 30, 90  # importing torch alone maps ~4 GB of address space
# Python that caps its own address space, then runs the CLI: a case that would allocate more fails
# with MemoryError (exit 1) instead of exhausting the machine.
CAPPED = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2); "
    "os.execv(sys.executable, [sys.executable, '-m', 'flows.cli', *sys.argv[2:]])"
)


def with_dataset(**dataset) -> dict:  # noqa: ANN003
    return {**TINY, "dataset": dataset}


# ---- dataset builders (each returns the dataset path inside the case's folder) -----------------


def image_folder(root: Path, counts=(4, 4, 4), size=(8, 8), mode="L") -> Path:  # noqa: ANN001
    for c, n in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            shape = size + ((3,) if mode == "RGB" else ())
            Image.fromarray(np.full(shape, 20 * c + i, np.uint8), mode).save(root / f"class{c}" / f"{i}.png")
    return root


def npz(path: Path, **arrays) -> Path:  # noqa: ANN003
    np.savez(path, **arrays)
    return path


def small_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    return npz(path, images=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), labels=np.repeat(np.arange(3), 10))


def folder_case(damage: Callable[[Path], object], needle: Callable[[Path], str], **dataset) -> Callable:  # noqa: ANN003
    def build(work: Path) -> Case:
        root = image_folder(work / "ds")
        damage(root)
        return Case(with_dataset(source="imagefolder", path=str(root), **dataset), needle(root))

    return build


def npz_case(arrays: dict, needle: str = "data.npz") -> Callable:
    def build(work: Path) -> Case:
        path = npz(work / "data.npz", **arrays)
        return Case(with_dataset(source="npz", path=str(path)), needle if needle != "data.npz" else str(path))

    return build


def _truncate(path: Path) -> None:
    """A PNG whose header is intact but whose pixel data stops early (PIL: 'image file is truncated')."""
    noise = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 40])


def _symlink_out(root: Path) -> None:
    outside = root.parent / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    (root / "class0" / "link.png").symlink_to(outside)


def _mixed_sizes(root: Path) -> None:
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "class1" / "big.png")


def _mixed_channels(root: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(root / "class1" / "rgb.png")


def _no_classes(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()


def _junk_npz(work: Path) -> Case:
    (work / "junk.npz").write_bytes(b"not a zip archive")
    return Case(with_dataset(source="npz", path=str(work / "junk.npz")), str(work / "junk.npz"))


def _cifar_evil(work: Path) -> Case:
    root = work / "cifar-10-batches-py"
    root.mkdir()

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("touch " + str(work / "pwned"),))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    return Case(with_dataset(source="cifar10", path=str(root)), "refusing to load")


def cifar_case(
    batch: Callable[[], bytes], meta: Callable[[], bytes] | None = None, needle: str = "data_batch_1"
) -> Callable:
    """A cifar-10-batches-py folder with a crafted ``data_batch_1`` (and ``batches.meta``), run under the caps."""

    def build(work: Path) -> Case:
        root = work / "cifar-10-batches-py"
        root.mkdir()
        (root / "data_batch_1").write_bytes(batch())
        if meta is not None:
            (root / "batches.meta").write_bytes(meta())
        return Case(with_dataset(source="cifar10", path=str(root)), needle, hostile=True)

    return build


def _cifar_valid() -> bytes:
    from tests.test_security import cifar_py2_batch

    return cifar_py2_batch(np.zeros((20, 3072), np.uint8), [0, 1] * 10)


def _cifar_zero_strides() -> bytes:
    """A few bytes claiming a (10^7, 3072) array (~30 GiB): numpy's rebuilder would make it from zero strides."""
    from tests.test_security import cifar_py2_batch

    return cifar_py2_batch(np.zeros((1, 3072), np.uint8), [0], shape=(10_000_000, 3072))


def _cifar_shared_lists() -> bytes:
    """~1 KB of pickle whose labels are a binary tree of one shared list 60 levels deep (2^60 leaves)."""
    node: list = [0]
    for _ in range(60):
        node = [node, node]
    return pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": node}, protocol=2)


def _eps_as_png(root: Path) -> None:
    """PostScript named .png: Pillow would hand it to Ghostscript, were it allowed to guess the format."""
    (root / "class0" / "0.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")


def _huge_png_header(root: Path) -> None:
    """A PNG whose header claims 10,000 x 10,000 pixels (100 Mpx) in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)
    (root / "class1" / "0.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _npz_declared_giant(work: Path) -> Case:
    """An .npz of a few hundred bytes whose images.npy header declares (100000, 2048, 2048): ~400 GB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 2048, 2048)}
    )
    labels = io.BytesIO()
    np.save(labels, np.zeros(100_000, np.int64))
    with zipfile.ZipFile(work / "data.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(64))
        archive.writestr("labels.npy", labels.getvalue())
    return Case(with_dataset(source="npz", path=str(work / "data.npz")), "GiB", hostile=True)


def _npz_big_images(work: Path) -> Case:
    """Native 2048 x 2048 images without dataset.resolution: too large to train on."""
    path = npz(work / "data.npz", images=np.zeros((20, 2048, 2048), np.uint8), labels=np.repeat(np.arange(2), 10))
    return Case(with_dataset(source="npz", path=str(path)), "dataset.resolution", hostile=True)


def _non_utf8_class(root: Path) -> None:
    os.mkdir(os.fsencode(root) + b"/class\xff")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsdecode(os.fsencode(root) + b"/class\xff/0.png"))


def _too_many_class_folders(work: Path) -> Case:
    root = image_folder(work / "ds")
    for c in range(1001):
        (root / f"extra{c:04d}").mkdir()
    return Case(with_dataset(source="imagefolder", path=str(root)), "at most 1000 classes", hostile=True)


def _cifar_empty(work: Path) -> Case:
    (work / "cifar").mkdir()
    return Case(with_dataset(source="cifar10", path=str(work / "cifar")), "data_batch_1..5")


# ---- planted artifacts: a store with finished stages, one of them damaged but with a valid marker ----


def planted(stage_key: str, plant: Callable) -> Callable[[Path], Case]:  # noqa: ANN001
    """A store where the stages before ``stage_key``'s reader are finished, ``stage_key``'s artifact replaced
    (and its marker rewritten to match): the CLI must refuse it before running its reader."""

    def build(work: Path) -> Case:
        from dedt.config import build_config
        from dedt.pipeline import plan, run_node

        raw = with_dataset(source="npz", path=str(small_npz(work / "data.npz")))
        cfg = build_config(raw, "p")
        store = work / "store"
        planned = plan(cfg, store)
        keys = list(planned)
        for key in keys[: keys.index(stage_key) + 1]:
            if planned[key].stage in ("data", "encode", "score", "select"):
                run_node(cfg, planned, key)
        out = planned[stage_key].out
        name = plant(out, planned)
        files = json.loads(out.file("_COMPLETE").read_text())["files"] if out.file("_COMPLETE").exists() else {}
        out.mark_complete(sorted({*files, name, "summary.json"}), {"planted": True})
        return Case(raw, str(out.file(name)), store=lambda _: store)

    return build


def _wrong_dim(out, planned) -> str:  # noqa: ANN001
    import pyarrow.parquet as pq

    from dedt.encoders.streaming import embedding_table
    from dedt.store import write_parquet

    ids = pq.read_table(out.file("embeddings.parquet"), columns=["sample_id"]).column("sample_id").to_numpy()
    write_parquet(
        embedding_table(ids, np.zeros((len(ids), 32), np.float32)),
        out.file("embeddings.parquet"),
        {"encoder": "pixels", "dim": 32, "preprocessing": "none"},
    )
    return "embeddings.parquet"


def _other_samples(out, planned) -> str:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedt.store import write_parquet

    table = pq.read_table(out.file("scores.parquet"))
    ids = table.column("sample_id").to_numpy() + 1000
    write_parquet(table.set_column(0, "sample_id", pa.array(ids)), out.file("scores.parquet"), {"method": "gaussian"})
    return "scores.parquet"


def _off_simplex(out, planned) -> str:  # noqa: ANN001
    import pyarrow as pa

    from dedt.store import atomic_write_text, write_parquet

    write_parquet(
        pa.table({"group": np.arange(3, dtype=np.int32), "weight": np.array([0.6, 0.6, 0.6])}),
        out.file("weights.parquet"),
        {"eta": 1.0},
    )
    atomic_write_text(out.file("summary.json"), json.dumps({"weights": [0.6, 0.6, 0.6], "seconds": 0}))
    return "weights.parquet"


def _foreign_subset(out, planned) -> str:  # noqa: ANN001
    import pyarrow as pa

    from dedt.store import write_parquet

    write_parquet(
        pa.table(
            {
                "sample_id": np.array([5000, 5001], np.int64),
                "label": np.array([0, 1], np.int32),
                "score": np.zeros(2),
                "rank": np.arange(2, dtype=np.int64),
            }
        ),
        out.file("subset.parquet"),
    )
    return "subset.parquet"


def _reference_other_arch(work: Path) -> Case:
    ref = work / "ref"
    ref.mkdir()
    (ref / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "UNet2DModel",
                "in_channels": 3,
                "out_channels": 3,
                "sample_size": 32,
                "block_out_channels": [32, 64],
            }
        )
    )
    (ref / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return Case({**TINY, "reweight": {**TINY["reweight"], "reference_path": str(ref)}}, "reweight.reference_path")


def _reference_missing(work: Path) -> Case:
    return Case(
        {**TINY, "reweight": {**TINY["reweight"], "reference_path": str(work / "no-such-unet")}},
        "reweight.reference_path",
    )


def _store_is_file(work: Path) -> Case:
    (work / "store-file").write_text("x")
    return Case(TINY, str(work / "store-file"), env={"DEDT_HOME": str(work / "store-file" / "store")})


def simple(config: dict | str | None, needle: str, *overrides: str) -> Callable[[Path], Case]:
    return lambda work: Case(config, needle, list(overrides))


CASES: dict[str, Callable[[Path], Case]] = {
    # datasets
    "dataset-missing-path": lambda w: Case(with_dataset(source="imagefolder", path=str(w / "nope")), str(w / "nope")),
    "dataset-path-not-set": simple(with_dataset(source="npz"), "dataset.path"),
    "dataset-empty-class": folder_case(lambda r: (r / "class3").mkdir(), lambda r: str(r / "class3")),
    "dataset-truncated-image": folder_case(
        lambda r: _truncate(r / "class0" / "1.png"), lambda r: str(r / "class0" / "1.png")
    ),
    "dataset-zero-byte-image": folder_case(
        lambda r: (r / "class1" / "0.png").write_bytes(b""), lambda r: str(r / "class1" / "0.png")
    ),
    "dataset-not-an-image": folder_case(
        lambda r: (r / "class2" / "0.png").write_text("hello"), lambda r: str(r / "class2" / "0.png")
    ),
    "dataset-mixed-sizes-no-resize": folder_case(_mixed_sizes, lambda r: "dataset.resolution"),
    "dataset-mixed-channels": folder_case(_mixed_channels, lambda r: "dataset.channels"),
    "dataset-no-class-folders": folder_case(_no_classes, lambda r: str(r)),
    "dataset-symlink-escape": folder_case(_symlink_out, lambda r: "outside the dataset root"),
    "npz-nan-pixels": npz_case({"images": np.full((6, 8, 8), np.nan), "labels": np.array([0, 1] * 3)}),
    "npz-labels-out-of-range": npz_case({"images": np.zeros((6, 8, 8), np.uint8), "labels": np.array([-1, 0, 1] * 2)}),
    "npz-class-without-images": npz_case(
        {"images": np.zeros((20, 8, 8), np.uint8), "labels": np.array([0, 2] * 10)}, "no training images"
    ),
    "npz-count-mismatch": npz_case({"images": np.zeros((5, 8, 8), np.uint8), "labels": np.array([0, 1])}),
    "npz-no-labels": npz_case({"images": np.zeros((5, 8, 8), np.uint8)}),
    "npz-float-labels": npz_case({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0.5, 1.0])}),
    "npz-not-an-npz": _junk_npz,
    "cifar10-no-batches": _cifar_empty,
    "cifar10-pickle-payload": _cifar_evil,
    "cifar10-object-array": cifar_case(
        lambda: pickle.dumps({b"data": np.array([[1, "x"]], object), b"labels": [0]}, 2), needle="not a uint8 array"
    ),
    "cifar10-zero-stride-giant": cifar_case(_cifar_zero_strides, needle="(N, 3072)"),
    "cifar10-shared-nested-lists": cifar_case(_cifar_shared_lists, needle="'labels'"),
    "cifar10-not-a-dict": cifar_case(lambda: pickle.dumps([1, 2, 3], 2), needle="holds no dict"),
    "cifar10-huge-int-label": cifar_case(
        lambda: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10**5000]}, 2), needle="'labels'"
    ),
    "cifar10-truncated": cifar_case(lambda: _cifar_valid()[:-3000]),
    "cifar10-bad-meta": cifar_case(_cifar_valid, lambda: pickle.dumps({b"label_names": 5}, 2), needle="batches.meta"),
    "dataset-eps-named-png": folder_case(_eps_as_png, lambda r: str(r / "class0" / "0.png")),
    "dataset-100-megapixel-png": folder_case(_huge_png_header, lambda r: str(r / "class1" / "0.png")),
    "dataset-fifo-named-png": folder_case(lambda r: os.mkfifo(r / "class2" / "9.png"), lambda r: "not a regular file"),
    "dataset-non-utf8-class-folder": folder_case(_non_utf8_class, lambda r: "not UTF-8"),
    "dataset-1000-plus-class-folders": _too_many_class_folders,
    "dataset-holdout-zero": simple(TINY, "dataset.holdout_frac", "dataset.holdout_frac=0"),
    "dataset-holdout-empty-few-per-class": npz_case(
        {"images": np.zeros((15, 8, 8), np.uint8), "labels": np.repeat(np.arange(3), 5)}, "dataset.holdout_frac"
    ),
    "npz-declared-giant": _npz_declared_giant,
    "npz-2048px-images": _npz_big_images,
    "npz-labels-up-to-1e12": lambda w: Case(
        with_dataset(
            source="npz",
            path=str(npz(w / "data.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 10**12]))),
        ),
        "at most 1000 classes",
        hostile=True,
    ),
    "npz-10000-classes": lambda w: Case(
        with_dataset(
            source="npz",
            path=str(npz(w / "data.npz", images=np.zeros((20_000, 8, 8), np.uint8), labels=np.arange(20_000) % 10_000)),
        ),
        "at most 1000 classes",
        hostile=True,
    ),
    "reference-path-root": lambda w: Case(
        {**TINY, "reweight": {**TINY["reweight"], "reference_path": "/"}}, "reweight.reference_path", hostile=True
    ),
    # configs
    "config-bad-yaml": lambda w: Case("pipelines: {p: {seed: [1, 2}", "pipelines.yaml:1:"),
    "config-python-tag": simple("pipelines:\n  p: !!python/object/apply:os.system ['true']\n", "tag refused"),
    "config-no-pipelines-mapping": simple("- just\n- a list\n", "'pipelines:'"),
    "config-file-missing": simple(None, "pipelines file"),
    "config-unknown-key": simple(TINY, "select.keep_fraction", "select.keep_fraction=0.2"),
    "config-unknown-section": simple({**TINY, "trian": {"lr": 1}}, "trian"),
    "config-wrong-type": simple(TINY, "train.batch_size", "train.batch_size=lots"),
    "config-section-not-mapping": simple({**TINY, "select": 0.3}, "select"),
    "config-keep-frac-zero": simple(TINY, "select.keep_frac", "select.keep_frac=0"),
    "config-unknown-encoder": simple(TINY, "encode.encoder", "encode.encoder=vgg99"),
    "config-unknown-preset": simple(TINY, "train.preset", "train.preset=huge"),
    "config-unknown-source": simple(TINY, "dataset.source", "dataset.source=imagenet"),
    "config-budget-zero": simple(TINY, "train.budget_kimg", "train.budget_kimg=0"),
    "config-reference-budget-negative": simple(TINY, "reweight.reference_kimg", "reweight.reference_kimg=-1"),
    "config-eta-zero": simple(TINY, "reweight.eta", "reweight.eta=0"),
    "config-smoothing-one": simple(TINY, "reweight.smoothing", "reweight.smoothing=1"),
    "config-seed-negative": simple(TINY, "seed", "seed=-3"),
    "config-set-python-tag": simple(
        TINY, "--set select.keep_frac", "select.keep_frac=!!python/object/apply:os.getcwd []"
    ),
    "config-t-range-inverted": simple(
        TINY, "reweight.t_min_frac", "reweight.t_min_frac=0.6", "reweight.t_max_frac=0.5"
    ),
    # artifacts in the store (valid marker, wrong content)
    "artifact-embeddings-wrong-dim": planted("encode", _wrong_dim),
    "artifact-scores-other-samples": planted("score", _other_samples),
    "artifact-subset-foreign-samples": planted("select", _foreign_subset),
    "artifact-weights-off-simplex": planted("reweight", _off_simplex),
    # weights
    "weights-encoder-file-missing": simple(
        TINY, "encode.weights", "encode.encoder=resnet18", "encode.weights=/nonexistent/resnet18.pth"
    ),
    "weights-reference-missing": _reference_missing,
    "weights-inception-other-torchscript": lambda w: (
        (w / "my_inception.pt").write_bytes(b"PK\x03\x04 not FID's")
        and Case(TINY, "sha1", ["encode.encoder=inception", f"encode.weights={w / 'my_inception.pt'}"])
    ),
    "weights-reference-other-architecture": _reference_other_arch,
    # store
    "store-root-is-a-file": _store_is_file,
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def run_case(name: str, work: Path) -> dict:
    work.mkdir(parents=True)
    case = CASES[name](work)
    pipelines = work / "pipelines.yaml"
    if isinstance(case.config, dict):
        pipelines.write_text(yaml.safe_dump({"pipelines": {"p": case.config}}))
    elif isinstance(case.config, str):
        pipelines.write_text(case.config)
    store = case.store(work) if case.store else work / "store"
    before = snapshot(store)
    cmd = [sys.executable, "-m", "flows.cli", "run", "p", "--pipelines", str(pipelines)]
    if case.hostile:
        cmd[1:3] = ["-c", CAPPED, str(LIMIT_AS)]
    cmd += [a for o in case.overrides for a in ("--set", o)]
    env = {**os.environ, **ENV, "DEDT_HOME": str(store), **case.env}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=LIMIT_S if case.hostile else 300
    )
    needle = case.needle(work) if callable(case.needle) else case.needle
    return {
        "code": proc.returncode,
        "stderr": proc.stderr,
        "stdout": proc.stdout,
        "needle": needle,
        "before": before,
        "after": snapshot(store),
        "work": work,
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("bad")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_case, name, base / name) for name in CASES}
    return {name: future.result() for name, future in futures.items()}


def test_at_least_30_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_exit_2_nothing_written(outcomes: dict, name: str) -> None:
    out = outcomes[name]
    lines = out["stderr"].strip().splitlines()
    assert out["code"] == 2, out["stderr"][-2000:]
    assert len(lines) == 1 and lines[0].startswith("dedt: error: "), out["stderr"][-2000:]
    assert "Traceback" not in out["stderr"]
    assert out["needle"] in lines[0], lines[0]
    assert out["after"] == out["before"], "the store changed"
    assert not (out["work"] / "pwned").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    pipelines = tmp_path / "pipelines.yaml"
    pipelines.write_text(yaml.safe_dump({"pipelines": {"p": with_dataset(source="npz", path=str(tmp_path / "x"))}}))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--debug", "run", "p", "--pipelines", str(pipelines)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ENV, "DEDT_HOME": str(tmp_path / "store")},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DedtError" in proc.stderr
    assert not (tmp_path / "store").exists()
