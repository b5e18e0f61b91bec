"""Post-hoc EMA (EDM2, Karras et al. 2024, section 3 and appendix C): choose the EMA length after training.

A run with ``train.posthoc_ema`` tracks two power-function EMAs (``PROFILES``: sigma_rel 0.05 and
0.10, EDM2's choice) and saves both at ``posthoc_snapshots`` evenly spaced points, the evaluation
points of ``train.snapshots`` and the end, as ``snapshots/<profile>-<nimg>.safetensors``. The EMA
of any other sigma_rel at any saved point is then a linear combination of those snapshots, whose
coefficients make the combined averaging profile closest (least squares) to the wanted one.

The power EMA after t steps is sum_i w_i theta_i with w_i = (i^(g+1) - (i-1)^(g+1)) / t^(g+1)
(``dedt.diffusion.ema.power_ema_beta`` multiplied out), the integral over step i of the continuous
profile p(tau) = (g+1) tau^g / t^(g+1) on [0, t]; so least squares between continuous profiles is
least squares between the per-step weights (for weights that are constant within a step).

``choose_sigma_rel`` picks the EMA length after training (``evaluate.posthoc_sigma_rels``): the
candidate whose rebuilt EMA scores the lowest FD on a *selection* bank of samples, drawn from other
start noises than the reporting bank (``selection_bank``), so the choice is not fitted to the
sampling noise of the FD it then reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from dedt.diffusion.ema import sigma_rel_to_gamma
from dedt.diffusion.snapshots import Snapshot, list_snapshots
from dedt.errors import DedtError

# The tracked profiles by snapshot name: EDM2 trains with sigma_rel 0.05 and 0.10.
PROFILES: dict[str, float] = {"ema005": 0.05, "ema010": 0.10}
# The selection bank: this fraction of the reporting bank's samples per class (rounded up), so that
# choosing among n candidates costs n / 2 reporting banks of sampling; its start noises are those of
# seed sample.bank_seed + SELECT_BANK_OFFSET (the reporting bank is bank_seed, the curve's second bank + 1).
SELECT_FRACTION = 0.5
SELECT_BANK_OFFSET = 2


def posthoc_points(budget_nimg: int, batch_size: int, count: int) -> list[int]:
    """``count`` evenly spaced snapshot points, budget * k / count for k = 1..count, each the first
    whole batch at or past it (the last is the run's end): EDM2 saves at a fixed interval."""
    return sorted({math.ceil(budget_nimg * k / count / batch_size) * batch_size for k in range(1, count + 1)})


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """Inner products <p_a, p_b> of power-function profiles p(tau) = (g+1) tau^g / t^(g+1) on [0, t].

    Integrating the product up to min(t_a, t_b) gives, for t_a <= t_b,
    (g_a+1)(g_b+1) / ((g_a+g_b+1) t_b) * (t_a/t_b)^g_b (EDM2 Eq. 151, ``power_function_correlation``).
    Broadcasts its arguments; the unit of t cancels out of the solved coefficients.
    """
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_posthoc_coefficients(
    in_nimg: Sequence[float], in_sigma_rel: Sequence[float], out_nimg: float, out_sigma_rel: float
) -> np.ndarray:
    """Coefficients x (n,) with sum_i x_i p_i closest in L2 to the profile (out_nimg, out_sigma_rel).

    The normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_out> (EDM2 Algorithm 3),
    solved by least squares since near-duplicate snapshots make A nearly singular, then scaled to
    sum 1 so that a constant parameter stays itself (EDM2 normalises the same way).
    Args: in_nimg, in_sigma_rel (n,) the snapshots' images seen and tracked sigma_rel; the target's.
    """
    t = np.asarray(in_nimg, np.float64)
    gamma = np.array([sigma_rel_to_gamma(s) for s in in_sigma_rel], np.float64)
    if t.shape != gamma.shape or t.ndim != 1 or len(t) == 0 or (t <= 0).any():
        raise DedtError(f"need matching non-empty 1-D snapshot points with nimg > 0; got {t.shape} and {gamma.shape}")
    gamma_out = sigma_rel_to_gamma(out_sigma_rel)
    a = profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    b = profile_dot(t, gamma, np.float64(out_nimg), np.float64(gamma_out))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


def list_posthoc_snapshots(run_dir: Path) -> dict[float, list[Snapshot]]:
    """The run's post-hoc snapshots by tracked sigma_rel (profiles with none are left out)."""
    found = {sigma_rel: list_snapshots(run_dir, name=name) for name, sigma_rel in PROFILES.items()}
    return {sigma_rel: snaps for sigma_rel, snaps in found.items() if snaps}


def reconstruct_ema(
    snapshots: Mapping[float, Sequence[Snapshot]], sigma_rel: float, *, nimg: int | None = None
) -> dict[str, torch.Tensor]:
    """The power-function EMA of ``sigma_rel`` after ``nimg`` images, from tracked snapshots.

    Args:
        snapshots: tracked sigma_rel -> its snapshots (``list_posthoc_snapshots``); every snapshot
            at or before ``nimg`` is used.
        sigma_rel: the wanted EMA length relative to the run, in (0, 0.2887).
        nimg: the point to reconstruct; None = the latest snapshot.
    Returns: a state dict like the snapshots' (float32 tensors), summed in float64 because the
    coefficients of nearby snapshots can be large and of opposite signs.
    """
    pool = [(s, tracked) for tracked, snaps in snapshots.items() for s in snaps]
    if not pool:
        raise DedtError("no post-hoc EMA snapshots given; train with train.posthoc_ema: true")
    nimg = max(s.nimg for s, _ in pool) if nimg is None else nimg
    used = sorted(((s, tracked) for s, tracked in pool if s.nimg <= nimg), key=lambda pair: pair[0].nimg)
    if not used:
        first = min(s.nimg for s, _ in pool)
        raise DedtError(f"no post-hoc snapshot at or before {nimg} images; the first is at {first}")
    coefficients = solve_posthoc_coefficients([s.nimg for s, _ in used], [g for _, g in used], nimg, sigma_rel)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for (snap, _), x in zip(used, coefficients, strict=False):
        for key, value in load_file(snap.weights).items():
            dtypes.setdefault(key, value.dtype)
            if value.is_floating_point():
                total[key] = total.get(key, 0) + float(x) * value.to(torch.float64)
            else:  # integer buffers (counters) are not averaged: the latest snapshot's
                total[key] = value
    return {key: value.to(dtypes[key]) for key, value in total.items()}


@dataclass(frozen=True)
class Choice:
    """The chosen post-hoc EMA: its sigma_rel, every candidate's selection FD, its weights."""

    sigma_rel: float
    fds: dict[float, float]  # candidate sigma_rel -> FD of its selection bank
    state: dict[str, torch.Tensor]


def selection_bank(per_class: int, bank_seed: int) -> tuple[int, int]:
    """(samples per class, noise seed) of the selection bank beside a reporting bank of ``per_class``
    samples per class drawn from ``bank_seed``."""
    return max(1, math.ceil(per_class * SELECT_FRACTION)), bank_seed + SELECT_BANK_OFFSET


def choose_sigma_rel(
    snapshots: Mapping[float, Sequence[Snapshot]],
    sigma_rels: Sequence[float],
    nimg: int,
    fd_of: Callable[[dict[str, torch.Tensor]], float],
) -> Choice:
    """The candidate of ``sigma_rels`` whose EMA after ``nimg`` images has the lowest ``fd_of`` (its
    selection-bank FD); ties go to the first candidate, a NaN FD never wins.

    A snapshot at ``nimg`` itself is required: reconstructed from earlier points only, the EMA would be
    an extrapolation, not the model at ``nimg``.
    """
    if not sigma_rels:
        raise DedtError("no sigma_rel to choose from; list some in evaluate.posthoc_sigma_rels")
    at = sorted({s.nimg for snaps in snapshots.values() for s in snaps})
    if nimg not in at:
        raise DedtError(
            f"no post-hoc EMA snapshot at {nimg} images (the run saved them at {at or 'no point'}); "
            "train with train.posthoc_ema: true, which saves one at the run's end and at every curve snapshot"
        )
    fds: dict[float, float] = {}
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for sigma_rel in sigma_rels:
        state = reconstruct_ema(snapshots, sigma_rel, nimg=nimg)
        fds[sigma_rel] = float(fd_of(state))
        if not math.isnan(fds[sigma_rel]) and (best is None or fds[sigma_rel] < fds[best[0]]):
            best = (sigma_rel, state)
    if best is None:
        raise DedtError(f"every post-hoc EMA candidate's selection FD is NaN at {nimg} images: {fds}")
    return Choice(best[0], fds, best[1])
