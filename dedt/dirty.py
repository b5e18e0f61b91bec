"""What a selection removed from a contaminated dataset: one confusion table per method.

The manifest of a contaminated dataset (``dataset.contaminate``) knows each train image's kind
(``dedt.data.contaminate``); a select stage's subset says which images a method kept. Per method:
the fraction of each contaminant kind removed, the fraction of clean images kept, and, for the
duplicate groups (an original and its copies), how many were reduced to exactly one image (what
deduplication aims for) or lost altogether. Nothing here feeds back into selection.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dedt.data.contaminate import KINDS, read_contaminants
from dedt.errors import DedtError

CONTAMINANTS = KINDS[1:]


def confusion(
    kinds: np.ndarray, kept: np.ndarray, duplicate_of: np.ndarray | None = None, ids: np.ndarray | None = None
) -> dict[str, Any]:
    """One method's table.

    Args:
        kinds: str (N,) the train images' kinds (``KINDS``).
        kept: bool (N,) whether the method kept each image.
        duplicate_of: int64 (N,) sample id a copy was made from (-1: none), with ``ids`` (N,) the sample ids.

    Returns:
        ``kept`` (images kept), ``n`` (train images), ``clean_kept`` (fraction of clean images kept),
        ``<kind>_removed`` for each contaminant kind present (fraction removed; None when absent), and with
        ``duplicate_of``: ``groups`` (duplicate groups), ``groups_one`` (fraction left with exactly one image),
        ``groups_lost`` (fraction left with none).
    """
    kinds, kept = np.asarray(kinds, dtype=str), np.asarray(kept, bool)
    if kinds.shape != kept.shape:
        raise DedtError(f"{len(kinds)} kinds for {len(kept)} kept flags; pass one of each per train image")
    unknown = set(kinds.tolist()) - set(KINDS)
    if unknown:
        raise DedtError(f"unknown contaminant kinds {sorted(unknown)}; expected {', '.join(KINDS)}")

    def frac(mask: np.ndarray) -> float | None:
        return float(mask.mean()) if mask.size else None

    table: dict[str, Any] = {"kept": int(kept.sum()), "n": len(kept), "clean_kept": frac(kept[kinds == "none"])}
    table |= {f"{kind}_removed": frac(~kept[kinds == kind]) for kind in CONTAMINANTS}
    if duplicate_of is not None and ids is not None:
        of = np.asarray(duplicate_of, np.int64)
        sources = np.unique(of[of >= 0])
        group = np.where(of >= 0, of, np.asarray(ids, np.int64))  # an original is its own group's key
        left = np.asarray([kept[group == s].sum() for s in sources])
        table |= {"groups": len(sources), "groups_one": frac(left == 1), "groups_lost": frac(left == 0)}
    return table


def confusion_from_store(manifest: Path, subsets: Mapping[str, Path | None]) -> dict[str, dict[str, Any]]:
    """``confusion`` per method from a data stage's manifest.parquet and each method's subset.parquet (None:
    the method kept the whole train split, as full-data training does)."""
    from dedt.store import read_parquet

    ids, split, kinds, of = read_contaminants(manifest)
    train = split == "train"
    out = {}
    for method, subset in subsets.items():
        if subset is None:
            out[method] = confusion(kinds[train], np.ones(int(train.sum()), bool), of[train], ids[train])
            continue
        kept_ids = read_parquet(subset, ("sample_id",)).column("sample_id").to_numpy()
        if not np.isin(kept_ids, ids[train]).all():
            raise DedtError(
                f"{subset} names samples outside the train split of {manifest}; they come from different data stages"
            )
        out[method] = confusion(kinds[train], np.isin(ids[train], kept_ids), of[train], ids[train])
    return out


def confusion_markdown(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per method: images kept, clean kept, each contaminant removed, duplicate groups left at one."""
    header = [
        "method",
        "kept",
        "clean kept",
        *(f"{kind} removed" for kind in CONTAMINANTS),
        "groups at one",
        "groups lost",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, t in tables.items():
        cells = [
            method,
            f"{t['kept']:.0f} / {t['n']:.0f}",
            _pct(t["clean_kept"]),
            *(_pct(t[f"{kind}_removed"]) for kind in CONTAMINANTS),
            _pct(t.get("groups_one")),
            _pct(t.get("groups_lost")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
