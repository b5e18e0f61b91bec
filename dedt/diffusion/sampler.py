"""Training batches as a pure function of (seed, step), so resuming needs only the step count.

Two modes:
- uniform (no class weights, or loss weighting): the stream of indices is a sequence of epochs,
  each a fresh seeded permutation of the dataset, cut into consecutive batches, so every image is
  seen once per epoch;
- class mixture (sampling weights w): each slot of a batch draws class g with probability w_g and
  then an image of that class uniformly, with replacement. This is DoReMi's domain-weighted
  sampling (Xie et al. 2023, Sec. 2) with classes as domains.
A batch is global (all data-parallel ranks together); each rank takes its own slice.
"""

from __future__ import annotations

import math

import numpy as np

from dedt.errors import DedtError

# Distinct SeedSequence streams, so the two modes never share random numbers.
_EPOCH_STREAM = 0
_MIXTURE_STREAM = 1


def check_class_weights(class_weights: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Validate a probability vector over classes; returns it as float64, renormalised exactly."""
    weights = np.asarray(class_weights, dtype=np.float64)
    if weights.shape != (num_classes,):
        raise DedtError(f"class_weights must have shape ({num_classes},) (one per class), got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise DedtError(f"class_weights must be finite and >= 0, got {weights.tolist()}")
    total = weights.sum()
    if abs(total - 1.0) > 1e-4:
        raise DedtError(f"class_weights must sum to 1 (a distribution over classes), they sum to {total:.6g}")
    counts = np.bincount(labels, minlength=num_classes)
    empty = [g for g in range(num_classes) if weights[g] > 0 and counts[g] == 0]
    if empty:
        raise DedtError(f"classes {empty} have positive weight but no training images; give them weight 0")
    return weights / total


class BatchSampler:
    """Global batches of dataset indices: ``batch(step)`` depends only on (seed, step)."""

    def __init__(
        self,
        labels: np.ndarray,
        *,
        batch_size: int,
        num_classes: int,
        class_weights: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        """``class_weights=None`` gives uniform epochs; a weight vector gives the class mixture."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or len(labels) == 0:
            raise DedtError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
        self.n = len(labels)
        self.batch_size = batch_size
        self.seed = seed
        self.weights = None if class_weights is None else check_class_weights(class_weights, labels, num_classes)
        # Images sorted by class: class g occupies order[starts[g] : starts[g] + counts[g]].
        self._order = np.argsort(labels, kind="stable")
        self._counts = np.bincount(labels, minlength=num_classes)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._epochs: dict[int, np.ndarray] = {}

    def batch(self, step: int) -> np.ndarray:
        """Dataset indices (int64, length batch_size) of the global batch number ``step``."""
        if self.weights is None:
            return self._uniform_batch(step)
        return self._mixture_batch(step)

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's permutation, cached (a batch spans at most a few consecutive epochs)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch]).permutation(self.n)
        return self._epochs[epoch]

    def _uniform_batch(self, step: int) -> np.ndarray:
        """Positions [step*B, (step+1)*B) of the endless stream of epoch permutations."""
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.n)
            take = min(self.n - offset, stop - position)
            parts.append(self._permutation(epoch)[offset : offset + take])
            position += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _mixture_batch(self, step: int) -> np.ndarray:
        """Class g with probability w_g, then an image uniformly within the class."""
        rng = np.random.default_rng([self.seed, _MIXTURE_STREAM, step])
        classes = rng.choice(len(self.weights), size=self.batch_size, p=self.weights)
        within = rng.integers(0, self._counts[classes])
        return self._order[self._starts[classes] + within]


def anneal_step(budget_nimg: int, batch_size: int, anneal_frac: float) -> int:
    """Prune then anneal: the first step whose batch starts at or after (1 - anneal_frac) of the budget,
    where a model trained on a subset moves to the full train split."""
    return math.ceil(round((1.0 - anneal_frac) * budget_nimg, 6) / batch_size)
