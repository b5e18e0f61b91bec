"""Evaluation metrics: Fréchet distance (FID), Inception features, precision/recall, KID, memorization.

Importing this package loads numpy/scipy only; ``dedt.metrics.inception`` (torch) and
``dedt.metrics.fidelity`` are imported on use.
"""

from dedt.metrics.frechet import fid_from_features, frechet_distance, gaussian_stats

__all__ = ["fid_from_features", "frechet_distance", "gaussian_stats"]
