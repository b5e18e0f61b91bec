"""The time-to-quality report: a sweep's curves -> docs/RESULTS.md and its plots (PAPER.md section 7).

Everything is computed here from the artifacts (no number is typed by hand): each trained model's
``curve.parquet`` (FD at log-spaced points of its own training, all models sampling one noise bank)
and the calibrated per-image costs. The full-data curve is the yardstick: its own mean FD at B/4,
B/2 and B, and 5% / 10% above F(B), are the targets; an arm's time to a target is when its mean
curve first reaches it plus its one-off costs; speed-up = full-data time / arm time, with a 95%
interval from resampling seeds, in two settings: reference pre-trained (the paper's) and from
scratch. The verdict and the paper's four claims are restated on that basis.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dedt.quality import Curve, Interval, per_doubling_fall, speedup_interval
from dedt.report import plot_class_bars, save_figure
from dedt.store import atomic_write_text, read_parquet

PAPER_MIN_SPEEDUP = 2.34  # the paper's smallest CIFAR-10 speed-up
DENSITY_SCORERS = ("gaussian", "knn")  # the density-based scorers of claim 1
CURVES_PLOT, KIMG_PLOT, NOISE_PLOT = "fd_vs_seconds.png", "fd_vs_kimg.png", "sampling_noise.png"
CLASS_FD_PLOT, WEIGHTS_PLOT = "class_fd.png", "weights_vs_difficulty.png"
SETTINGS = {
    "pre-trained": "reference pre-trained (its cost excluded: the paper's setting)",
    "scratch": "from scratch (training the DRO reference included)",
}


@dataclass
class Arm:
    """One method (keep ratio, scorer, weighting) over seeds: its curves and one-off costs."""

    keep_frac: float
    scorer: str  # "-" for full data
    reweighting: str  # uniform | dro
    cleaning: str = ""  # near-duplicate removal / trimming before selection (sweep.cleaning_label)
    clean_data: bool = False  # in a dirty-data sweep, an arm on the uncontaminated data
    training: str = ""  # training levers on (sweep.training_label), for every model of the arm's points
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    finals: list[dict[str, Any]] = field(default_factory=list)  # the curve's final row per seed

    @property
    def sees_all(self) -> bool:
        """Trained on the whole train split: no selection, so no one-off cost."""
        return self.keep_frac == 1.0 and self.reweighting == "uniform" and not self.cleaning

    @property
    def is_full(self) -> bool:
        """The yardstick: all the data, trained the plain way."""
        return self.sees_all and not self.clean_data and not self.training

    @property
    def label(self) -> str:
        if self.is_full:
            return "full data"
        training = f", {self.training}" if self.training else ""
        if self.sees_all:
            return "full data" + (", uncontaminated" if self.clean_data else "") + training
        return (
            f"{self.scorer} {self.keep_frac:g}, {self.reweighting}"
            + (f", {self.cleaning}" if self.cleaning else "")
            + (", uncontaminated" if self.clean_data else "")
            + training
        )

    def mean(self, column: str) -> float:
        values = [r[column] for r in self.rows if r.get(column) is not None]
        return statistics.fmean(values) if values else math.nan

    def final(self, column: str) -> list[float]:
        return [f[column] for f in self.finals if f.get(column) is not None and f[column] == f[column]]

    def overhead_s(self, setting: str, s_per_img: float, proxy_s_per_img: float) -> float:
        """One-off seconds: selection (measured), the proxy and, from scratch, the reference (calibrated)."""
        if self.sees_all:
            return 0.0
        cost = self.mean("selection_s") + 1000.0 * self.mean("proxy_kimg") * proxy_s_per_img
        if setting == "scratch":
            cost += 1000.0 * self.mean("reference_kimg") * s_per_img
        return cost


def arms(rows: Sequence[dict[str, Any]]) -> list[Arm]:
    """Group the comparison rows by method, each (method, seed) once, and read their curves."""
    found: dict[tuple[float, str, str, str, bool, str], dict[int, dict[str, Any]]] = {}
    for row in rows:
        if not row.get("curve"):
            continue
        keep = 1.0 if row["model"] == "full data" else float(row["keep_frac"])
        reweighting = "dro" if row["model"] == "pruned+reweighted" else "uniform"
        cleaning = "" if row["model"] == "full data" else row.get("cleaning") or ""
        clean_data = row.get("contaminated") is False  # only dirty-data sweeps have the column
        training = row.get("training") or ""  # only sweeps with training levers have the column
        scorer = "-" if keep == 1.0 and reweighting == "uniform" and not cleaning else row["scorer"]
        key = (keep, scorer, reweighting, cleaning, clean_data, training)
        found.setdefault(key, {}).setdefault(int(row["seed"]), row)
    out = []
    for (keep, scorer, rw, cleaning, clean_data, training), by_seed in sorted(found.items()):
        arm = Arm(keep, scorer, rw, cleaning=cleaning, clean_data=clean_data, training=training)
        for seed in sorted(by_seed):
            table = read_parquet(Path(by_seed[seed]["curve"])).to_pylist()
            arm.rows.append(by_seed[seed])
            arm.curves.append(Curve([t["kimg"] for t in table], [t["fd"] for t in table]))
            arm.finals.append(table[-1])
        out.append(arm)
    return out


@dataclass(frozen=True)
class Yardstick:
    """The full-data curve and what a reader needs to judge it."""

    curve: Curve
    targets: dict[str, float]  # name -> FD
    floor: float | None  # the real-data floor: held-out reals vs train reals
    fall: float  # fraction the FD still falls per doubling at B


def yardstick(full: Arm) -> Yardstick:
    curve = Curve.mean(full.curves)
    b = curve.kimg[-1]
    targets = {f"F(B/{d})": curve.at(b / d) for d in (4, 2) if b / d >= curve.kimg[0]}
    targets |= {"F(B)": float(curve.fd[-1]), "1.05 F(B)": 1.05 * curve.fd[-1], "1.10 F(B)": 1.10 * curve.fd[-1]}
    floor = full.mean("floor_fd")
    return Yardstick(curve, targets, None if math.isnan(floor) else floor, per_doubling_fall(curve))


def speedups(arm: Arm, full: Arm, ys: Yardstick, costs: tuple[float, float]) -> dict[tuple[str, str], Interval]:
    """(target, setting) -> speed-up with its interval."""
    s_per_img, proxy_s_per_img = costs
    out = {}
    for name, target in ys.targets.items():
        for setting in SETTINGS:
            out[name, setting] = speedup_interval(
                full.curves,
                arm.curves,
                target,
                full_s_per_kimg=1000 * s_per_img,
                arm_s_per_kimg=1000 * s_per_img,
                arm_overhead_s=arm.overhead_s(setting, s_per_img, proxy_s_per_img),
            )
    return out


def sampling_noise(all_arms: Sequence[Arm]) -> list[float]:
    """|FD(bank 1) - FD(bank 2)| / mean, per final model: the FD's own sampling noise."""
    return [
        abs(f["fd"] - f["fd_bank2"]) / ((f["fd"] + f["fd_bank2"]) / 2)
        for a in all_arms
        for f in a.finals
        if f.get("fd_bank2") is not None and f["fd"]
    ]


def plot_curves(
    all_arms: Sequence[Arm],
    ys: Yardstick,
    s_per_img: float,
    proxy_s_per_img: float,
    seconds_path: Path,
    kimg_path: Path,
) -> None:
    """FD vs calibrated seconds (one-off costs included, reference pre-trained) and FD vs images seen:
    mean over seeds with a min-max band, log-log; the lower envelope of all arms dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Ten colours while they suffice, twenty beyond: no two arms share one.
    palette = (lambda i: f"C{i % 10}") if len(all_arms) <= 10 else (lambda i: plt.cm.tab20(i % 20))
    for path, use_seconds in ((seconds_path, True), (kimg_path, False)):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        envelope: list[tuple[float, float]] = []
        for i, arm in enumerate(all_arms):
            mean = Curve.mean(arm.curves)
            fds = np.asarray([[c.at(k) for k in mean.kimg] for c in arm.curves])
            shift = arm.overhead_s("pre-trained", s_per_img, proxy_s_per_img) if use_seconds else 0.0
            x = mean.kimg * 1000 * s_per_img + shift if use_seconds else mean.kimg
            style = (
                dict(color="k", lw=2.2)
                if arm.is_full
                else dict(color=palette(i), lw=1.2, ls="-" if arm.reweighting == "dro" else "--")
            )
            ax.plot(x, mean.fd, marker=".", label=arm.label, **style)
            ax.fill_between(x, fds.min(axis=0), fds.max(axis=0), alpha=0.12, color=style["color"])
            envelope += list(zip(x, mean.fd, strict=True))
        envelope.sort()
        best, lower = math.inf, []
        for x, fd in envelope:
            if fd < best:
                best = fd
                lower.append((x, fd))
        ax.step(*zip(*lower, strict=True), where="post", color="grey", ls=":", lw=1.5, label="lower envelope")
        for name, target in ys.targets.items():
            ax.axhline(target, color="grey", lw=0.5)
            ax.annotate(name, (envelope[0][0], target), fontsize=6)  # sorted: the leftmost x
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(
            xlabel="calibrated seconds (training + one-off costs)" if use_seconds else "images seen (kimg)",
            ylabel="FD (mean over seeds)",
            title="time to quality" if use_seconds else "FD vs images seen",
        )
        ax.legend(fontsize=6, ncol=2, loc="lower left")  # FD falls late and to the right: this corner is free
        save_figure(fig, path)


def plot_noise(noise: Sequence[float], path: Path) -> None:
    """The relative FD difference between two noise banks, one dot per final model, sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.sort(np.asarray(noise)) * 100, "o", ms=4, color="C0")
    ax.axhline(5, color="k", ls="--", lw=1, label="5% comparison level")
    ax.set(
        ylabel="|FD(bank 1) - FD(bank 2)| / mean FD (%)",
        xlabel="final models, sorted",
        title="FD sampling noise (same model, two noise banks)",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def verdict(all_arms: Sequence[Arm], table: dict[str, dict[tuple[str, str], Interval]], ys: Yardstick) -> list[str]:
    """Which arm is best at each target (reference pre-trained), and whether any beats full data. Arms on
    uncontaminated data are no choice for a user with dirty data: the clean-data section compares them."""
    lines = []
    for name in ys.targets:
        found = _best_reached(table, [a for a in all_arms if not (a.is_full or a.clean_data)], name)
        if found is None:
            lines.append(
                f"- **{name}** (FD {ys.targets[name]:.2f}): no other arm reaches it within its run; full data is best."
            )
            continue
        iv, best = found
        beats = iv.value > 1 and iv.low > 1
        lines.append(
            f"- **{name}** (FD {ys.targets[name]:.2f}): best arm {best.label} at {iv}; "
            + (
                "it beats the full-data curve (interval above 1)."
                if beats
                else "it beats the full-data curve on the mean, but the interval includes 1."
                if iv.value > 1
                else "it is no faster than the full-data curve (speed-up ≤ 1)."
            )
        )
    wins = [
        a.label
        for a in all_arms
        if not (a.is_full or a.clean_data)
        for name in ys.targets
        if (iv := table[a.label][name, "pre-trained"]).value and iv.low > 1
    ]
    lines.append(
        "- **Overall**: "
        + (
            f"arms that beat the full-data curve with the interval above 1 at some target: "
            f"{', '.join(sorted(set(wins)))}."
            if wins
            else "no arm beats the full-data curve at any target with its interval above 1: "
            "on this benchmark, training on all the data for less time is as fast or "
            "faster than every pruning recipe measured."
        )
    )
    return lines


def plot_weights_vs_difficulty(all_arms: Sequence[Arm], full: Arm, path: Path) -> dict[str, float]:
    """Mean DRO weight per class (over every reweighting run) against the full-data per-class FD;
    returns the mean weights by class (empty without reweighting runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = _per_class(full)
    classes = list(ref)
    weights = [json.loads(r["weights"]) for a in all_arms if a.reweighting == "dro" for r in a.rows if r.get("weights")]
    fig, ax = plt.subplots(figsize=(5, 4))
    mean_w = np.zeros(0)
    if not weights:
        plt.close(fig)
        return {}
    if weights and len(weights[0]) == len(classes):
        mean_w = np.mean(np.asarray(weights), axis=0)
        ax.scatter([ref[c] for c in classes], mean_w)
        for c, x, y in zip(classes, [ref[c] for c in classes], mean_w, strict=True):
            ax.annotate(c, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
        ax.axhline(1 / len(classes), color="k", ls="--", lw=1, label="uniform")
        ax.legend()
    ax.set(
        xlabel="full-data model's FD on the class (harder →)",
        ylabel="mean DRO weight",
        title="weights vs class difficulty",
    )
    save_figure(fig, path)
    return {c: float(w) for c, w in zip(classes, mean_w, strict=True)}


def _per_class(arm: Arm) -> dict[str, float]:
    """Mean over seeds of the final per-class FD."""
    acc: dict[str, list[float]] = {}
    for f in arm.finals:
        for c, v in json.loads(f["fd_per_class"]).items():
            if v is not None and v == v:
                acc.setdefault(c, []).append(v)
    return {c: statistics.fmean(v) for c, v in acc.items()}


def _classes_improved(before: Arm, after: Arm) -> list[float]:
    """Per seed: the fraction of classes whose final FD fell from the uniform to the reweighted model."""
    out = []
    for b, a in zip(before.finals, after.finals, strict=False):  # seeds of the shorter arm
        fb, fa = json.loads(b["fd_per_class"]), json.loads(a["fd_per_class"])
        classes = [c for c in fb if fb[c] is not None and fa.get(c) is not None]
        if classes:
            out.append(sum(fa[c] < fb[c] for c in classes) / len(classes))
    return out


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _weights_vs_reference(arm: Arm, full: Arm) -> list[float]:
    """Per seed: Spearman(weight of class c, full-data model's final FD on class c)."""
    refs = {int(r["seed"]): json.loads(f["fd_per_class"]) for r, f in zip(full.rows, full.finals, strict=True)}
    rhos = []
    for row in arm.rows:
        ref = refs.get(int(row["seed"]))
        if row.get("weights") and ref:
            weights = json.loads(row["weights"])
            pairs = [(w, ref[c]) for w, c in zip(weights, ref, strict=False) if ref[c] is not None]
            if len(weights) == len(ref) and len(pairs) > 2:
                rhos.append(_spearman(*zip(*pairs, strict=True)))
    return [r for r in rhos if not math.isnan(r)]


def claims(
    all_arms: Sequence[Arm], full: Arm, table: dict[str, dict[tuple[str, str], Interval]], ys: Yardstick
) -> list[tuple[str, str, str]]:
    """(claim, held / did not hold, the numbers) for the paper's four claims, on time to quality."""
    # The paper's arms only: a lever (cleaning, strata, training options) is a different method.
    plain = [a for a in all_arms if not (a.cleaning or a.training or a.clean_data)]
    by = {(a.keep_frac, a.scorer, a.reweighting): a for a in plain}
    out = []
    loose = "1.10 F(B)"

    comparisons, wins = [], 0
    for (keep, scorer, rw), arm in sorted(by.items()):
        rand = by.get((keep, "random", "uniform"))
        if rw == "uniform" and scorer in DENSITY_SCORERS and keep <= 0.2 and rand:
            d, r = statistics.fmean(arm.final("fd")), statistics.fmean(rand.final("fd"))
            wins += d < r
            comparisons.append(
                f"{scorer} {d:.1f} vs random {r:.1f} at keep {keep:g} (final FD, equal images; "
                f"time to {loose}: {table[arm.label][loose, 'pre-trained']} vs "
                f"{table[rand.label][loose, 'pre-trained']})"
            )
    if comparisons:
        out.append(
            (
                "1. Density-based pruning beats random at keep ≤ 20%",
                "held" if wins == len(comparisons) else "held partly" if wins else "did not hold",
                f"{wins} of {len(comparisons)}: " + "; ".join(comparisons),
            )
        )

    fractions = [
        f
        for (keep, scorer, rw), arm in by.items()
        if rw == "dro" and (keep, scorer, "uniform") in by
        for f in _classes_improved(by[keep, scorer, "uniform"], arm)
    ]
    if fractions:
        mean = statistics.fmean(fractions)
        out.append(
            (
                "2. Reweighting improves class-wise FD for most classes",
                "held" if mean > 0.5 else "did not hold",
                f"on average {mean:.0%} of classes improved (final per-class FD, same seed, {len(fractions)} "
                f"pairs); a majority improved in {sum(f > 0.5 for f in fractions)} of them",
            )
        )

    rhos = [rho for a in plain if a.reweighting == "dro" for rho in _weights_vs_reference(a, full)]
    if rhos:
        mean = statistics.fmean(rhos)
        out.append(
            (
                "3. Above-uniform weights go to the easily generated classes (negative rank correlation of "
                "weight with the full-data model's per-class FD)",
                "held" if mean < 0 else "did not hold",
                f"Spearman rho {mean:+.2f} ± {statistics.pstdev(rhos):.2f} over {len(rhos)} runs; negative in "
                f"{sum(r < 0 for r in rhos)}",
            )
        )

    dro = [a for a in plain if a.reweighting == "dro"]
    if dro:
        parts, held = [], []
        for setting in SETTINGS:
            scored = [(table[a.label]["1.05 F(B)", setting], a) for a in dro]
            reached = [(iv, a) for iv, a in scored if iv.value is not None]
            if reached:
                iv, a = max(reached, key=lambda p: p[0].value)
                held.append(iv.value >= PAPER_MIN_SPEEDUP)
                parts.append(f"{setting}: best {a.label} at {iv}")
            else:
                held.append(False)
                parts.append(f"{setting}: no pruned+reweighted arm reaches 1.05 F(B) within its run")
        out.append(
            (
                f"4. Pruned + reweighted reaches F(B) within 5% with ≥ {PAPER_MIN_SPEEDUP}x speed-up (each setting)",
                "held" if all(held) else "held partly" if any(held) else "did not hold",
                "; ".join(parts),
            )
        )
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _pm(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plots_dir(report: Path) -> Path:
    """Where a report's plots go: beside it, named after it (docs/RESULTS.md -> docs/results/)."""
    return report.parent / report.stem.lower()


def _best_reached(
    table: dict[str, dict[tuple[str, str], Interval]], candidates: Sequence[Arm], target: str
) -> tuple[Interval, Arm] | None:
    """The candidate with the highest speed-up to ``target`` (reference pre-trained), None when none reaches it."""
    reached = [(table[a.label][target, "pre-trained"], a) for a in candidates]
    return max(((iv, a) for iv, a in reached if iv.value is not None), key=lambda p: p[0].value, default=None)


def ttq_table(
    all_arms: Sequence[Arm],
    table: dict[str, dict[tuple[str, str], Interval]],
    ys: Yardstick,
    setting: str,
    base: Arm,
) -> tuple[list[str], list[list[str]]]:
    """The time-to-quality table of one setting against the yardstick arm ``base``: header and body, one row
    per arm."""
    header = ["arm", "seeds", "final FD", "recall", *ys.targets]
    body = [
        [
            a.label,
            str(len(a.curves)),
            _pm(a.final("fd")),
            _pm(a.final("recall"), 2),
            *(("1x (yardstick)" if a is base else str(table[a.label][t, setting])) for t in ys.targets),
        ]
        for a in all_arms
    ]
    return header, body


def calibrated_costs(all_arms: Sequence[Arm]) -> tuple[float, float]:
    """Seconds per training image and per proxy image: the median over the sweep's calibrate stages
    (one per dataset split), so every arm is converted at one rate."""

    def median(column: str) -> float:
        values = [r[column] for a in all_arms for r in a.rows if r.get(column)]
        if not values:
            raise ValueError(f"no calibrated {column} in the sweep (a calibrate stage runs with each full-data model)")
        return statistics.median(values)

    return median("train_s_per_img"), median("proxy_s_per_img")


def time_to_quality_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The time-to-quality table as records (one per arm and setting), for a table artifact; empty
    without a full-data curve."""
    all_arms = arms(rows)
    full = next((a for a in all_arms if a.is_full), None)
    if full is None:
        return []
    costs = calibrated_costs(all_arms)
    ys = yardstick(full)
    out = []
    for arm in all_arms:
        if not arm.is_full:
            table = speedups(arm, full, ys, costs)
            out += [
                {"arm": arm.label, "setting": setting, "seeds": len(arm.curves)}
                | {name: str(table[name, setting]) for name in ys.targets}
                for setting in SETTINGS
            ]
    return out


def write_report(rows: list[dict[str, Any]], out: Path, *, title: str, command: str, setup: Sequence[str] = ()) -> Path:
    """Write ``out`` (Markdown) and its plots beside it in ``<out stem>/``; return ``out``."""
    all_arms = arms(rows)
    fulls = [a for a in all_arms if a.is_full]
    if not fulls:
        raise ValueError(
            "the sweep has no full-data model with a curve (evaluate.baselines: true, "
            "train.snapshots > 0) to compare against"
        )
    full = fulls[0]
    all_arms = [full] + [a for a in all_arms if not a.is_full]
    s_per_img, proxy_s_per_img = calibrated_costs(all_arms)
    ys = yardstick(full)
    table = {a.label: speedups(a, full, ys, (s_per_img, proxy_s_per_img)) for a in all_arms if not a.is_full}
    noise = sampling_noise(all_arms)
    images = plots_dir(out)
    images.mkdir(parents=True, exist_ok=True)
    rel = lambda name: f"{images.name}/{name}"  # noqa: E731
    b = ys.curve.kimg[-1]

    lines = [
        f"# {title}",
        "",
        f"Generated by `{command}` from the sweep's artifacts (each model's curve.parquet and "
        "the calibrate stage); regenerate it rather than editing it.",
        "",
        "## Setup",
        "",
        *[f"- {s}" for s in setup],
        f"- Calibrated costs (measured side by side, one run): {1 / s_per_img:,.0f} training images/s, "
        f"{1 / proxy_s_per_img:,.0f} DRO proxy images/s; time = images seen x cost + one-off costs. The measured "
        "wall-clock of each run is in its curve.parquet (train_seconds) but decides nothing.",
        "",
        "## The yardstick: full data",
        "",
        f"Full-data mean FD at B = {b:g} kimg: F(B) = {ys.curve.fd[-1]:.2f}"
        + (
            f"; the real-data floor (held-out vs train reals) is {ys.floor:.2f}, so F(B) is "
            f"{ys.curve.fd[-1] / ys.floor:.1f}x the floor"
            if ys.floor
            else ""
        )
        + f". The curve still falls {ys.fall:.0%} per doubling at B"
        + (
            " (not levelled off: the targets are points on a falling curve, not a plateau)."
            if ys.fall > 0.1
            else " (close to levelled off)."
        ),
        "",
        *_table(["kimg", *(f"{k:g}" for k in ys.curve.kimg)], [["FD (mean)", *(f"{v:.2f}" for v in ys.curve.fd)]]),
        "",
        "Targets: " + ", ".join(f"{k} = {v:.2f}" for k, v in ys.targets.items()) + ".",
        "",
    ]
    if noise:
        lines += [
            "## FD sampling noise",
            "",
            f"Every final model is also sampled from a second noise bank: the FD moves by "
            f"{statistics.median(noise):.1%} (median), {max(noise):.1%} (max) over {len(noise)} models. "
            "Arms share one bank at every point (common random numbers), so their differences are smaller "
            "than this; a gap below it between two single models is noise.",
            "",
            f"![sampling noise]({rel(NOISE_PLOT)})",
            "",
        ]
        plot_noise(noise, images / NOISE_PLOT)
    for setting, text in SETTINGS.items():
        header, body = ttq_table(all_arms, table, ys, setting, full)
        lines += [
            f"## Time to quality: {text}",
            "",
            "Speed-up = full-data time to the target / the arm's time (its mean curve's first crossing, "
            "log-log interpolated, plus its one-off costs); [95% interval over seeds]; 'not reached' = not "
            "within the arm's run.",
            "",
            *_table(header, body),
            "",
        ]
    plot_curves(all_arms, ys, s_per_img, proxy_s_per_img, images / CURVES_PLOT, images / KIMG_PLOT)
    lines += [
        "## Curves",
        "",
        f"![FD vs seconds]({rel(CURVES_PLOT)})",
        "",
        f"![FD vs kimg]({rel(KIMG_PLOT)})",
        "",
        "## Verdict",
        "",
        *verdict(all_arms, table, ys),
        "",
    ]

    pair = _figure2_pair(all_arms)
    if pair:
        before, after = pair
        series = {"full data": _per_class(full), "pruned": _per_class(before), "pruned+reweighted": _per_class(after)}
        plot_class_bars(
            series,
            images / CLASS_FD_PLOT,
            title=f"per-class FD, {after.scorer}, keep {after.keep_frac:g} (final models)",
        )
        lines += [
            "## Per-class FD before and after reweighting",
            "",
            f"{after.scorer}, keep {after.keep_frac:g}; final models, mean over seeds.",
            "",
            f"![per-class FD]({rel(CLASS_FD_PLOT)})",
            "",
        ]
    mean_w = plot_weights_vs_difficulty(all_arms, full, images / WEIGHTS_PLOT)
    if mean_w:
        lines += ["## Weights vs class difficulty", "", f"![weights vs difficulty]({rel(WEIGHTS_PLOT)})", ""]
    lines += posthoc_section(all_arms)
    lines += clean_yardstick_section(all_arms, (s_per_img, proxy_s_per_img))
    lines += dirty_section(all_arms)
    stated = [list(c) for c in claims(all_arms, full, table, ys)]
    if stated:  # a sweep without the paper's arms (density scorers, DRO) tests none of its claims
        lines += ["## The paper's claims, on time to quality", ""]
        lines += _table(["claim", "outcome", "numbers"], stated)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def posthoc_section(all_arms: Sequence[Arm]) -> list[str]:
    """Arms whose evaluation chose a post-hoc EMA (``evaluate.posthoc_sigma_rels``): the sigma_rel of each
    seed's final model and their mean; nothing otherwise."""
    chosen = {a.label: [f["sigma_rel"] for f in a.finals if f.get("sigma_rel") is not None] for a in all_arms}
    body = [[label, ", ".join(f"{v:g}" for v in values), f"{statistics.fmean(values):.3g}"]
            for label, values in chosen.items() if values]  # fmt: skip
    if not body:
        return []
    return [
        "## Post-hoc EMA",
        "",
        "The EMA length each final model was evaluated with, chosen among the candidates for the lowest FD "
        "on a separate noise bank (each curve point chooses its own; curve.parquet's sigma_rel column).",
        "",
        *_table(["arm", "sigma_rel per seed", "mean"], body),
        "",
    ]


def clean_yardstick_section(all_arms: Sequence[Arm], costs: tuple[float, float]) -> list[str]:
    """In a dirty-data sweep with a full-data arm on the uncontaminated data: every arm against that arm's
    curve, the quality a user would get from clean data (every model is measured against the clean train split,
    so the FDs compare); nothing otherwise."""
    clean = next((a for a in all_arms if a.clean_data and a.sees_all and not a.training), None)
    if clean is None:
        return []
    ys = yardstick(clean)
    others = [a for a in all_arms if a is not clean]
    table = {a.label: speedups(a, clean, ys, costs) for a in others}
    header, body = ttq_table([clean, *others], table, ys, "pre-trained", clean)
    lines = [
        "## Dirty data: against the clean data's full-data curve",
        "",
        f"The yardstick here is {clean.label}: F(B) = {ys.curve.fd[-1]:.2f}, the quality the same training "
        "gives on the uncontaminated images. Speed-up = its time to the target / the arm's time (reference "
        "pre-trained, as above; its curve is in the plots above); 'not reached' = not within the arm's run.",
        "",
        *_table(header, body),
        "",
    ]
    dirty = [a for a in others if not a.clean_data]
    for name, target in ys.targets.items():
        found = _best_reached(table, dirty, name)
        if found is not None:
            lines.append(f"- **{name}** (FD {target:.2f}): best arm on the dirty data {found[1].label} at {found[0]}.")
        else:
            closest = min(dirty, key=lambda a: a.mean("fd"), default=None)
            lines.append(
                f"- **{name}** (FD {target:.2f}): no arm on the dirty data reaches it"
                + (f"; the closest final FD is {closest.label}'s, {closest.mean('fd'):.2f}." if closest else ".")
            )
    return lines + [""]


def dirty_section(all_arms: Sequence[Arm]) -> list[str]:
    """Contaminated data (rows with a manifest): per arm, what its selection removed and how much its final
    model copies, each the mean over seeds; nothing otherwise."""
    from dedt.dirty import confusion_from_store, confusion_markdown

    if not any(r.get("manifest") for a in all_arms for r in a.rows):
        return []
    tables, memorization = {}, []
    for arm in all_arms:
        seeds = [
            confusion_from_store(Path(r["manifest"]), {"": Path(r["subset"]) if r.get("subset") else None})[""]
            for r in arm.rows
            if r.get("manifest")
        ]
        if seeds:  # an arm on uncontaminated data has no ground truth to count
            tables[arm.label] = {k: _mean_or_none([s[k] for s in seeds]) for k in seeds[0]}
        memorization.append(
            [
                arm.label,
                *(
                    _pm([r[c] for r in arm.rows if r.get(c) is not None], 3)
                    for c in (
                        "memorized_frac",
                        "memorized_frac_pixels",
                        "memorized_frac_duplicated",
                        "memorized_frac_duplicated_pixels",
                    )
                ),
            ]
        )
    return [
        "## Dirty data: what each selection removed",
        "",
        "From the manifest's ground truth (`contaminant`); mean over seeds. Groups = an original and its copies: "
        "at one = exactly one image left (what deduplication aims for), lost = none left.",
        "",
        confusion_markdown(tables),
        "## Dirty data: memorization",
        "",
        "Fraction of the final model's samples nearer their nearest training image than the 1st percentile of "
        "held-out reals' distances (~0.01 without copying), in the first feature space and in pixels, and the same "
        "among samples whose nearest training image has copies; mean ± spread over seeds.",
        "",
        *_table(
            [
                "arm",
                "memorized (features)",
                "memorized (pixels)",
                "nearest duplicated (features)",
                "nearest duplicated (pixels)",
            ],
            memorization,
        ),
        "",
    ]


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _figure2_pair(all_arms: Sequence[Arm]) -> tuple[Arm, Arm] | None:
    """(uniform, dro) arms of the Figure 2 analogue: keep 0.2 (else the smallest), gaussian first."""
    by = {(a.keep_frac, a.scorer, a.reweighting): a for a in all_arms}
    pairs = [
        (k, by[k[0], k[1], "uniform"], a) for k, a in by.items() if k[2] == "dro" and (k[0], k[1], "uniform") in by
    ]
    if not pairs:
        return None
    _, before, after = min(pairs, key=lambda p: (p[0][0] != 0.2, p[0][0], p[0][1] != "gaussian", p[0][1]))
    return before, after


def describe_setup(points: Sequence[Any], sweep: Any) -> list[str]:
    """Setup lines of the report, read from the sweep's validated configs (GridPoint list, SweepConfig)."""
    cfg = points[0].cfg
    grid_keys = sorted({k for p in points for k in p.values})
    varied = {k: sorted({json.dumps(p.values[k]) for p in points if k in p.values}) for k in grid_keys}
    return [
        f"Data: `{cfg.dataset.source}` at {cfg.dataset.resolution or 'native'} px, holdout {cfg.dataset.holdout_frac:g} "
        f"per class; encoder `{cfg.encode.encoder}`; scores per class: {cfg.score.per_class}.",
        f"Model: preset `{cfg.train.preset}`, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, "
        + (
            f"power-function EMA sigma_rel {cfg.train.ema_sigma_rel:g}"
            if cfg.train.ema == "power"
            else f"EMA half-life {cfg.train.ema_halflife_kimg:g} kimg"
        )
        + f", {cfg.train.snapshots} snapshots per run (every halving back from the end); "
        f"full-data budget B = {cfg.reweight.reference_kimg:g} kimg "
        f"(the full-data model is also the DRO reference); proxy {cfg.reweight.proxy_kimg:g} kimg, "
        f"eta {'default' if cfg.reweight.eta is None else format(cfg.reweight.eta, 'g')}, "
        f"smoothing {cfg.reweight.smoothing:g}.",
        f"Evaluation: {cfg.sample.per_class} samples per class ({cfg.sample.method.upper()}-{cfg.sample.steps}) "
        f"from one noise bank (seed {cfg.sample.bank_seed}) for every model and point; FD, "
        f"per-class FD and precision/recall (k = {cfg.evaluate.prdc_k}) in the {cfg.evaluate.feature_spaces[0]} "
        f"feature space against the full train split"
        + (
            " (of the uncontaminated data on contaminated data, in a classifier trained on it: every arm on one "
            "real set)"
            if any(p.cfg.dataset.contaminate.active for p in points)
            else ""
        )
        + "".join(f"; {space} too at {n} of {len(points)} points" for space, n in _extra_spaces(points).items())
        + ".",
        "Grid: "
        + "; ".join(f"`{k}` ∈ {{{', '.join(v)}}}" for k, v in varied.items())
        + f" ({len(points)} points; shared stages run once); {sweep.max_concurrency} stages at a time on "
        f"{os.cpu_count()} CPU cores.",
    ]


def _extra_spaces(points: Sequence[Any]) -> dict[str, int]:
    """Feature spaces beyond each point's first, with how many points compute them."""
    counts: dict[str, int] = {}
    for p in points:
        for space in p.cfg.evaluate.feature_spaces[1:]:
            counts[space] = counts.get(space, 0) + 1
    return counts
