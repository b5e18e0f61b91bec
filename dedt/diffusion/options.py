"""Typed options of the train and sample stages: every field has its default, unit and range.

Budgets and intervals are counted in images seen (``*_kimg`` = thousands of images), as in EDM2
(Karras et al. 2024): pruning changes what an epoch is, images seen does not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dedt.diffusion.presets import PRESETS

# Fields added after stores held fingerprints (the training levers).
LATER_FIELDS = frozenset(
    {
        "timestep_weighting",
        "snr_gamma",
        "timestep_sampling",
        "posthoc_ema",
        "posthoc_snapshots",
        # The data schedules.
        "dynamic_pruning",
        "prune_ratio",
        "prune_until",
        "anneal_frac",
    }
)
# Fields that say how a run is spread over processes, not what it computes: never in an identity (a
# checkpoint records its world size itself).
RUNTIME_FIELDS = frozenset({"processes"})


class TrainOptions(BaseModel):
    """Options of one diffusion training run (model preset, budget, optimiser, EMA, precision)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field("digits-tiny", description="model preset, a key of dedt.diffusion.presets.PRESETS")
    budget_kimg: float = Field(64.0, gt=0, description="training length in thousands of images seen")
    budget_policy: Literal["images", "epochs"] = Field(
        "images",
        description="pipelines only, for models trained on a kept subset: 'images' = every model sees budget_kimg; "
        "'epochs' = keep_frac x budget_kimg, the same passes over its data as a full-data model given budget_kimg",
    )
    batch_size: int = Field(128, ge=1, description="global batch size (all processes together)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (Ho et al. use 2e-4 for cifar10-ddpm)")
    warmup_kimg: float = Field(
        2.0, ge=0, description="linear learning-rate warm-up from 0, in kimg; 0 disables (Ho et al.: 5000 steps)"
    )
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 disables (Ho et al.: 1)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay: L2 for adam, decoupled for adamw")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="optimiser (betas 0.9, 0.999; eps 1e-8)")
    ema_halflife_kimg: float = Field(
        2.0, gt=0, description="EMA half-life in kimg: the weight of an update halves after this many images (EDM2)"
    )
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="fixed per-step EMA decay instead of the half-life (Ho et al.: 0.9999); None uses the half-life",
    )
    ema: Literal["halflife", "power"] = Field(
        "halflife",
        description="'halflife': EMA with a fixed half-life (ema_halflife_kimg or ema_decay); 'power': EDM2's "
        "power-function EMA (Karras et al. 2024), whose averaging length grows with the run (ema_sigma_rel), so the "
        "EMA is equally fair at every point: the benchmark pipelines' choice, since their curves compare snapshots",
    )
    ema_sigma_rel: float = Field(
        0.10, gt=0, lt=0.2886, description="power EMA's length relative to the run (EDM2 tracks 0.05 and 0.10)"
    )
    snapshots: int = Field(
        0,
        ge=0,
        le=16,
        description="EMA snapshots at log-spaced points: after budget/2, budget/4, ... budget/2^snapshots images; "
        "a pipeline evaluates each (the model's time-to-quality curve, curve.parquet); 0 = the final model only",
    )
    timestep_weighting: Literal["uniform", "min-snr"] = Field(
        "uniform",
        description="loss weight per noise level: 'uniform' = Ho et al.'s L_simple; 'min-snr' = min(SNR(t), "
        "snr_gamma) / SNR(t) (Min-SNR-gamma, Hang et al. 2023), also in the DRO proxy's and reference's losses",
    )
    snr_gamma: float = Field(5.0, gt=0, description="gamma of 'min-snr' (Hang et al.: 5)")
    timestep_sampling: Literal["uniform", "loss-aware"] = Field(
        "uniform",
        description="how t is drawn: 'uniform', or 'loss-aware' = p(t) ~ RMS of t's last 10 losses with a 0.1% "
        "uniform floor, each loss scaled by 1 / (T p(t)) so the objective is unchanged (Nichol & Dhariwal 2021)",
    )
    posthoc_ema: bool = Field(
        False,
        description="also track EDM2's two power EMAs (sigma_rel 0.05, 0.10) and save them at posthoc_snapshots "
        "points, the snapshots' points and the end, so that any sigma_rel can be reconstructed after training "
        "(dedt.diffusion.posthoc.reconstruct_ema)",
    )
    posthoc_snapshots: int = Field(
        16, ge=1, le=1024, description="evenly spaced snapshot points of the post-hoc EMAs over the budget"
    )
    dynamic_pruning: Literal["none", "infobatch"] = Field(
        "none",
        description="'infobatch' (Qin et al. 2024): each epoch skips a random prune_ratio of the well-learned "
        "samples (last loss / its timestep band's running mean loss below the mean) and scales the kept ones' "
        "losses by 1 / (1 - prune_ratio), so the expected gradient is unchanged; needs uniform epochs (no class "
        "mixture sampling). The budget stays in images: a pruned epoch is shorter",
    )
    prune_ratio: float = Field(0.5, gt=0, lt=1, description="InfoBatch: share of the well-learned samples skipped")
    prune_until: float = Field(
        0.875,
        ge=0,
        le=1,
        description="InfoBatch: epochs that start after this fraction of the budget use every sample, unscaled "
        "(the paper's delta)",
    )
    anneal_frac: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="prune then anneal: a model trained on a kept subset spends the last anneal_frac of its budget "
        "on the full train split (uniform epochs, no class weights); full-data models and the DRO proxy ignore it",
    )
    checkpoint_every_kimg: float = Field(16.0, gt=0, description="write a resumable checkpoint every this many kimg")
    keep_checkpoints: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")
    log_every_kimg: float = Field(4.0, gt=0, description="append a line to log.jsonl every this many kimg")
    weighting: Literal["sampling", "loss"] = Field(
        "sampling",
        description="how class weights act: 'sampling' draws class g with probability w_g (DoReMi); "
        "'loss' samples uniformly and scales each sample's loss by k * w_y",
    )
    conditional: bool = Field(True, description="class-conditional model (class embedding); False = unconditional")
    hflip: bool = Field(False, description="random horizontal flips (Ho et al. on CIFAR-10; wrong for digits)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forward pass; weights, optimiser and EMA stay fp32. fp16 needs CUDA"
    )
    channels_last: bool = Field(
        False, description="NHWC memory layout: faster convolutions on tensor-core GPUs, often slower on CPU"
    )
    compile: bool = Field(
        False, description="torch.compile the model: fuses the many small ops of a UNet; costs a minute at start"
    )
    tf32: bool = Field(
        False,
        description="TF32 matmuls and convolutions on CUDA: ~7x the fp32 peak at a 10-bit mantissa; no effect on CPU",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = CUDA when available, else CPU")
    processes: int | Literal["auto"] = Field(
        1,
        description="pipelines' train stages: data-parallel processes (DDP under torchrun, one per GPU) the stage "
        "launches; 'auto' = one per visible CUDA GPU (1 without one). batch_size is the global batch and must divide "
        "by it; the fingerprint and, up to rounding, the losses do not depend on it",
    )
    vae_path: str | None = Field(
        None,
        description="latent diffusion (Rombach et al. 2022): a local diffusers AutoencoderKL folder (or a pipeline "
        "folder with vae/); the data is encoded once (the latents stage), the UNet trains on the scaled latents "
        "(no [-1, 1] input check, no x0 clipping or output clamp while sampling) and samples are decoded before "
        "evaluation. None = pixel space",
    )

    @field_validator("vae_path")
    @classmethod
    def _vae_folder_exists(cls, value: str | None) -> str | None:
        if value is not None:
            from dedt.diffusion.latents import check_vae_folder

            check_vae_folder(value)  # a missing VAE fails while the config is validated, before any stage runs
        return value

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a whole number of processes >= 1 or 'auto' (one per visible GPU), got {value!r}")

    @property
    def latent(self) -> bool:
        """True when training on VAE latents (``vae_path`` set) rather than pixels in [-1, 1]."""
        return self.vae_path is not None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known presets: {', '.join(sorted(PRESETS))}")
        return value

    def _changed(self, name: str) -> bool:
        return getattr(self, name) != type(self).model_fields[name].default

    @model_validator(mode="after")
    def _one_ema_rule(self) -> TrainOptions:
        # "changed" = differs from the default, not "was given": a resolved config travels to GPU workers
        # as a full dump, every field given, and must validate there as it did here
        if self.ema_decay is not None and self._changed("ema_halflife_kimg"):
            raise ValueError("set either ema_decay or ema_halflife_kimg, not both")
        if self.ema == "power" and (self.ema_decay is not None or self._changed("ema_halflife_kimg")):
            raise ValueError("ema 'power' is set by ema_sigma_rel; ema_decay and ema_halflife_kimg are for 'halflife'")
        if self.timestep_weighting != "min-snr" and self._changed("snr_gamma"):
            raise ValueError("snr_gamma is for timestep_weighting 'min-snr'")
        if not self.posthoc_ema and self._changed("posthoc_snapshots"):
            raise ValueError("posthoc_snapshots needs posthoc_ema: true")
        if self.dynamic_pruning != "infobatch" and (self._changed("prune_ratio") or self._changed("prune_until")):
            raise ValueError("prune_ratio and prune_until are for dynamic_pruning 'infobatch'")
        return self

    def identity(self, *, exclude: set[str]) -> dict[str, Any]:
        """The fields that define what a run computes, for fingerprints and checkpoint identities.
        ``RUNTIME_FIELDS`` are always left out, and ``LATER_FIELDS`` at their defaults, so runs that don't
        use them keep the identities they had before those fields existed (stores and checkpoints stay valid)."""
        dump = self.model_dump(exclude=set(exclude) | RUNTIME_FIELDS)
        return {k: v for k, v in dump.items() if not (k in LATER_FIELDS and v == TrainOptions.model_fields[k].default)}


class SampleOptions(BaseModel):
    """Options of the sample stage (always from the EMA weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ddim", "ddpm"] = Field(
        "ddim",
        description="'ddim' (Song et al. 2021, eta 0: deterministic given the start noise) or 'ddpm' (ancestral)",
    )
    steps: int = Field(20, ge=1, le=1000, description="denoising steps, spread over the T = 1000 training steps")
    per_class: int = Field(100, ge=1, description="samples per class (or in all, for an unconditional model)")
    batch_size: int = Field(256, ge=1, description="samples per forward pass; does not change the samples")
    bank_seed: int = Field(
        0,
        ge=0,
        description="seed of the bank of start noises every model samples from (common random numbers: models "
        "differ by their weights, not by the sampler's draws); independent of the training seed",
    )
