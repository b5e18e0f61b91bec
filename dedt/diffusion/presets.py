"""Named model presets: a diffusers ``UNet2DModel`` and the DDPM noise schedule it is trained with.

Every preset uses the schedule of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models",
Sec. 4): T = 1000 steps, betas linear from 1e-4 to 0.02, epsilon prediction. Presets differ only in
the UNet. A preset is a frozen record, and ``PRESETS`` the registry of them (name -> record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dedt.errors import DedtError

if TYPE_CHECKING:  # diffusers takes seconds to import: config validation (options.py) must not pay it
    import torch
    from diffusers import DDPMScheduler, UNet2DModel


@dataclass(frozen=True)
class Preset:
    """A UNet architecture plus its noise schedule, resolution-independent."""

    description: str
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    # Feature-map sizes (pixels) whose down/up blocks get self-attention; the middle block always
    # has one, as in Ho et al.'s UNet.
    attention_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    norm_eps: float = 1e-5
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def downsample_factor(self) -> int:
        """Each level but the last halves the feature map, so the input must divide by this."""
        return 2 ** (len(self.block_out_channels) - 1)


PRESETS: dict[str, Preset] = {
    # The prototype's model (PAPER.md Sec. 8): ~0.65M parameters at 8x8, ~1,170 training images/s
    # on 2 CPU cores at batch 128.
    "digits-tiny": Preset(
        description="8x8 digits, CPU-trainable in minutes (~0.65M parameters)",
        block_out_channels=(32, 64),
        layers_per_block=1,
    ),
    # Three levels: 16x16 -> 8 -> 4 (or 32 -> 16 -> 8); attention on the 8x8 maps.
    "mnist-small": Preset(
        description="16x16 or 32x32 grey-scale digits, CPU-trainable (~1.6M parameters)",
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_resolutions=(8,),
    ),
    # Ho et al. 2020, Appendix B: ch 128, multipliers (1, 2, 2, 2), two residual blocks per level,
    # self-attention at 16x16, dropout 0.1; 35.7M parameters at 32x32. Same layout as the
    # google/ddpm-cifar10-32 diffusers port (which also uses GroupNorm eps 1e-6).
    "cifar10-ddpm": Preset(
        description="Ho et al. 2020 CIFAR-10 UNet, 32x32 RGB (35.7M parameters)",
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        attention_resolutions=(16,),
        dropout=0.1,
        norm_eps=1e-6,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a DedtError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DedtError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def build_model(preset: str, *, in_channels: int, resolution: int, num_classes: int | None) -> UNet2DModel:
    """A freshly initialised UNet for ``in_channels`` x ``resolution`` x ``resolution`` inputs.

    ``num_classes=None`` builds an unconditional model; otherwise the class label enters through a
    learned embedding added to the timestep embedding (diffusers' ``num_class_embeds``).
    The initialisation uses torch's global RNG: seed it first for reproducible weights.
    """
    from diffusers import UNet2DModel

    spec = get_preset(preset)
    if in_channels < 1:
        raise DedtError(f"in_channels must be >= 1, got {in_channels}")
    if resolution < spec.downsample_factor or resolution % spec.downsample_factor:
        raise DedtError(
            f"preset {preset!r} needs a resolution divisible by {spec.downsample_factor}, got {resolution}; "
            "resize the dataset (dataset.resolution) or pick another preset"
        )
    if num_classes is not None and num_classes < 1:
        raise DedtError(f"num_classes must be >= 1 or None (unconditional), got {num_classes}")
    sizes = [resolution // 2**level for level in range(len(spec.block_out_channels))]
    down = tuple("AttnDownBlock2D" if s in spec.attention_resolutions else "DownBlock2D" for s in sizes)
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        dropout=spec.dropout,
        norm_eps=spec.norm_eps,
        # None = one head spanning all channels, as in Ho et al.'s single-head attention.
        attention_head_dim=None,
        num_class_embeds=num_classes,
    )


def build_scheduler(preset: str, *, latent: bool = False) -> DDPMScheduler:
    """The training noise schedule of ``preset`` (Ho et al.: linear betas, epsilon prediction).

    ``latent=True`` (VAE latents, ``TrainOptions.vae_path``) turns off the x0 clipping to [-1, 1]:
    scaled latents are not bounded to that range (Stable Diffusion's reach about +-4), and clipping
    them would distort every sample; latent pipelines (LDM, diffusers' Stable Diffusion) don't clip.
    """
    from diffusers import DDPMScheduler

    spec = get_preset(preset)
    return DDPMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        # Ho et al. clip the predicted x0 to the data range [-1, 1] while sampling (pixels only).
        clip_sample=not latent,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
