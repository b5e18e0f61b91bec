"""The optimiser of diffusion training, shared by the final models and the DRO proxy (``dedt.reweight``)."""

from __future__ import annotations

import torch

from dedt.diffusion.options import TrainOptions


def make_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """Adam or AdamW with the fused kernel: one pass over all parameters, ~4x faster than torch's
    default per-tensor loop for digits-tiny on CPU, and one launch on CUDA."""
    kind = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
    return kind(
        model.parameters(),
        lr=options.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=options.weight_decay,
        fused=True,
    )
