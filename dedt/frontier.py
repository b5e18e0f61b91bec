"""The data-efficiency frontier report: a sweep's comparison rows -> docs/RESULTS.md and its plots.

Everything in the report is computed here from the rows ``dedt.sweep.comparison_rows`` wrote
(no number is typed by hand): mean +- std over seeds per (budget policy, keep ratio, scorer,
reweighting), the speed-ups of PAPER.md section 7 with their definitions, the frontier plot
(FD vs wall-clock), per-class FD before/after reweighting, weights vs class difficulty, and a
verdict on each of the paper's four claims.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dedt.report import plot_class_bars, save_figure
from dedt.store import atomic_write_text

QUALITY_TOL = 0.05  # "matches full-data quality": mean FD within 5% of the full-data mean
PAPER_MIN_SPEEDUP = 2.34  # the paper's smallest CIFAR-10 speed-up
DENSITY_SCORERS = ("gaussian", "knn")  # the density-based scorers of claim 1
FRONTIER_PLOT, CLASS_FD_PLOT, WEIGHTS_PLOT = "frontier.png", "class_fd.png", "weights_vs_difficulty.png"

DEFINITIONS = {
    "train": "full-data training seconds / this model's training seconds (pruning and proxy costs ignored)",
    "one-off": "full-data training seconds / (training + encode + score + select + proxy seconds): the paper's "
               "setting, where the reference DM is pre-trained and costs nothing",
    "scratch": "as one-off, plus the seconds dedt spent training the reference DM itself (reweighted models only; "
               "uniform models need no reference)",
    "steps": f"images seen by the full-data model / fewest images seen (among this sweep's budgets) at which the "
             f"mean FD is within {QUALITY_TOL:.0%} of the full-data mean FD; two budgets are measured per method "
             "(keep_frac x B under equal epochs, B under equal images), so this is a bracket, not a curve",
}


@dataclass(frozen=True)
class Cell:
    """One method at one budget: its rows over seeds."""

    policy: str  # images | epochs | "-" (keep_frac 1: both policies are the same run)
    keep_frac: float
    scorer: str  # "-" at keep_frac 1 (nothing is scored)
    reweighting: str  # uniform | dro
    rows: tuple[dict[str, Any], ...]

    def values(self, column: str) -> list[float]:
        return [r[column] for r in self.rows if r.get(column) is not None and not _isnan(r[column])]

    def mean(self, column: str) -> float:
        values = self.values(column)
        return statistics.fmean(values) if values else math.nan

    @property
    def label(self) -> str:
        return "full data" if self.is_full else f"{self.scorer}, {self.reweighting}"

    @property
    def is_full(self) -> bool:
        return self.keep_frac == 1.0 and self.reweighting == "uniform"


def cells(rows: Iterable[dict[str, Any]]) -> list[Cell]:
    """Group rows by method and budget, each (seed, method, budget) once.

    The full-data model appears in every point and the keep_frac 1 models in every scorer's point:
    they are one run each per seed, counted once (by the row with the most metrics).
    """
    groups: dict[tuple[str, float, str, str], dict[int, dict[str, Any]]] = {}
    for row in rows:
        keep = 1.0 if row["model"] == "full data" else float(row["keep_frac"])
        reweighting = "dro" if row["model"] == "pruned+reweighted" else "uniform"
        policy, scorer = ("-", "-") if keep == 1.0 else (row["policy"], row["scorer"])
        by_seed = groups.setdefault((policy, keep, scorer, reweighting), {})
        seed = int(row["seed"])
        # the same model evaluated twice (e.g. with Inception in one grid, without in another): keep the fuller row
        if seed not in by_seed or (by_seed[seed].get("fid_inception") is None and row.get("fid_inception") is not None):
            by_seed[seed] = row
    return [Cell(*key, tuple(by_seed[s] for s in sorted(by_seed))) for key, by_seed in sorted(groups.items())]


def speedups(cell: Cell, full: Cell) -> dict[str, float]:
    """The three wall-clock speed-ups of DEFINITIONS (ratios of mean seconds)."""
    t_full = full.mean("train_s")
    if cell.is_full:  # the full-data model selects nothing
        return {"train": 1.0, "one-off": 1.0, "scratch": 1.0}
    train, oneoff = cell.mean("train_s"), cell.mean("train_s") + cell.mean("selection_s")
    oneoff += cell.mean("proxy_s") if cell.reweighting == "dro" else 0.0
    scratch = oneoff + (cell.mean("reference_s") if cell.reweighting == "dro" else 0.0)
    return {"train": t_full / train, "one-off": t_full / oneoff, "scratch": t_full / scratch}


def steps_to_quality(all_cells: Sequence[Cell], full: Cell) -> dict[tuple[float, str, str], str]:
    """Per (keep, scorer, reweighting): the steps-to-quality bracket of DEFINITIONS, as text."""
    target = (1 + QUALITY_TOL) * full.mean("fd")
    full_kimg = full.mean("kimg")
    out = {}
    for key in {(c.keep_frac, c.scorer, c.reweighting) for c in all_cells if not c.is_full}:
        budgets = sorted((c.mean("kimg"), c.mean("fd")) for c in all_cells
                         if (c.keep_frac, c.scorer, c.reweighting) == key)
        reached = [kimg for kimg, fd in budgets if fd <= target]
        if not reached:
            out[key] = f"not reached by {budgets[-1][0]:g} kimg"
        else:
            first = reached[0]
            below = [kimg for kimg, _ in budgets if kimg < first]
            upper = full_kimg / below[-1] if below else None
            out[key] = f"{full_kimg / first:.2f}x–{upper:.2f}x" if upper else f"≥ {full_kimg / first:.2f}x"
    return out


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _pm(cell: Cell, column: str, digits: int = 1) -> str:
    values = cell.values(column)
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _per_class(cell: Cell, column: str = "fd_per_class") -> dict[str, float]:
    """Mean over seeds of a per-class JSON column."""
    acc: dict[str, list[float]] = {}
    for row in cell.rows:
        if row.get(column):
            for c, v in json.loads(row[column]).items():
                if v is not None and not _isnan(v):
                    acc.setdefault(c, []).append(v)
    return {c: statistics.fmean(v) for c, v in acc.items()}


def _classes_improved(before: Cell, after: Cell) -> list[float]:
    """Per seed: the fraction of classes whose FD fell from the uniform to the reweighted model."""
    fractions = []
    for b, a in zip(before.rows, after.rows):
        fb, fa = json.loads(b["fd_per_class"]), json.loads(a["fd_per_class"])
        classes = [c for c in fb if not _isnan(fb[c]) and not _isnan(fa.get(c, math.nan))]
        if classes:
            fractions.append(sum(fa[c] < fb[c] for c in classes) / len(classes))
    return fractions


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _weights_vs_reference(cell: Cell, full: Cell) -> list[float]:
    """Per seed: Spearman(weight of class c, full-data model's FD on class c)."""
    refs = {int(r["seed"]): json.loads(r["fd_per_class"]) for r in full.rows}
    rhos = []
    for row in cell.rows:
        if row.get("weights") and int(row["seed"]) in refs:
            weights, ref = json.loads(row["weights"]), refs[int(row["seed"])]
            classes = list(ref)
            if len(weights) == len(classes):
                pairs = [(w, ref[c]) for w, c in zip(weights, classes) if not _isnan(ref[c])]
                rhos.append(_spearman(*zip(*pairs)))
    return rhos


def claims(all_cells: Sequence[Cell], full: Cell) -> list[tuple[str, str, str]]:
    """(claim, held / did not hold, the numbers) for the paper's four claims."""
    by = {(c.policy, c.keep_frac, c.scorer, c.reweighting): c for c in all_cells}
    policies = sorted({c.policy for c in all_cells if c.policy != "-"})
    low_keeps = sorted({c.keep_frac for c in all_cells if c.keep_frac <= 0.2})
    out = []

    # 1. density-based pruning beats random at keep <= 20%
    comparisons, wins = [], 0
    for policy in policies:
        for keep in low_keeps:
            rand = by.get((policy, keep, "random", "uniform"))
            for scorer in DENSITY_SCORERS:
                dens = by.get((policy, keep, scorer, "uniform"))
                if rand and dens:
                    wins += dens.mean("fd") < rand.mean("fd")
                    comparisons.append(f"{scorer} {dens.mean('fd'):.1f} vs random {rand.mean('fd'):.1f} "
                                       f"(keep {keep:g}, equal {policy})")
    if comparisons:
        verdict = "held" if wins == len(comparisons) else "held partly" if wins else "did not hold"
        out.append(("1. Density-based pruning beats random at keep ≤ 20% (mean FD of the pruned, uniform model)",
                    verdict, f"{wins} of {len(comparisons)} comparisons: " + "; ".join(comparisons)))

    # 2. reweighting improves class-wise FD for most classes
    fractions = []
    for (policy, keep, scorer, rw), cell in by.items():
        if rw == "dro" and keep < 1.0 and (policy, keep, scorer, "uniform") in by:
            fractions += _classes_improved(by[policy, keep, scorer, "uniform"], cell)
    if fractions:
        mean = statistics.fmean(fractions)
        most = sum(f > 0.5 for f in fractions)
        out.append(("2. Reweighting improves class-wise FD for most classes", "held" if mean > 0.5 else "did not hold",
                    f"on average {mean:.0%} of classes improved (pruned vs pruned+reweighted, same seed, "
                    f"{len(fractions)} pairs); a majority improved in {most} of {len(fractions)} pairs"))

    # 3. above-uniform weights go to the easily generated classes
    rhos = [rho for c in all_cells if c.reweighting == "dro" and c.keep_frac < 1.0 and c.policy == policies[0]
            for rho in _weights_vs_reference(c, full)]
    rhos = [r for r in rhos if not math.isnan(r)]
    if rhos:
        mean = statistics.fmean(rhos)
        out.append(("3. Above-uniform weights go to the easily generated classes (negative rank correlation of "
                    "weight with the full-data model's per-class FD)", "held" if mean < 0 else "did not hold",
                    f"Spearman rho {mean:+.2f} ± {statistics.pstdev(rhos):.2f} over {len(rhos)} reweighting runs; "
                    f"negative in {sum(r < 0 for r in rhos)} of them"))

    # 4. pruned + reweighted within 5% of full data at >= 2.34x less wall-clock
    target = (1 + QUALITY_TOL) * full.mean("fd")
    candidates = [(c, speedups(c, full)) for c in all_cells if c.reweighting == "dro" and c.keep_frac < 1.0]
    if candidates:
        matches = [(c, s) for c, s in candidates if c.mean("fd") <= target and s["one-off"] >= PAPER_MIN_SPEEDUP]
        close = [(c, s) for c, s in candidates if c.mean("fd") <= target]
        fast = [(c, s) for c, s in candidates if s["one-off"] >= PAPER_MIN_SPEEDUP]
        parts = []
        if matches:
            parts.append("matched by " + _describe(*max(matches, key=lambda cs: cs[1]["one-off"]), full))
        else:
            if close:
                parts.append("within 5% only at lower speed-ups, best " +
                             _describe(*max(close, key=lambda cs: cs[1]["one-off"]), full))
            if fast:
                parts.append(f"at ≥ {PAPER_MIN_SPEEDUP}x the best FD is " +
                             _describe(*min(fast, key=lambda cs: cs[0].mean("fd")), full))
        out.append((f"4. At some keep ratio, pruned + reweighted matches full-data quality within "
                    f"{QUALITY_TOL:.0%} at ≥ {PAPER_MIN_SPEEDUP}x less wall-clock (one-off definition)",
                    "held" if matches else "did not hold", "; ".join(parts)))
    return out


def _describe(cell: Cell, s: dict[str, float], full: Cell) -> str:
    """One reweighted model's quality and speed-ups, for a claim's numbers."""
    return (f"{cell.scorer} at keep {cell.keep_frac:g}, equal {cell.policy}: FD {cell.mean('fd'):.1f} vs full data "
            f"{full.mean('fd'):.1f} ({cell.mean('fd') / full.mean('fd') - 1:+.0%}), speed-up {s['one-off']:.2f}x "
            f"one-off, {s['scratch']:.2f}x scratch, {s['train']:.2f}x train")


def plot_frontier(all_cells: Sequence[Cell], full: Cell, path: Path) -> None:
    """FD vs wall-clock (one-off definition), one curve per method (scorer x reweighting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({(c.scorer, c.reweighting) for c in all_cells if c.keep_frac < 1.0})
    scorers = sorted({m[0] for m in methods})
    t_full = full.mean("train_s")
    for scorer, rw in methods:
        points = sorted((t_full / speedups(c, full)["one-off"], c.mean("fd")) for c in all_cells
                        if (c.scorer, c.reweighting) == (scorer, rw))
        ax.plot(*zip(*points), "-" if rw == "dro" else "--", marker="^" if rw == "dro" else "o",
                color=f"C{scorers.index(scorer)}", label=f"{scorer}, {rw}")
    ax.plot([t_full], [full.mean("fd")], "k*", ms=12, label="full data")
    dro_full = [c for c in all_cells if c.keep_frac == 1.0 and c.reweighting == "dro"]
    if dro_full:
        ax.plot([t_full / speedups(dro_full[0], full)["one-off"]], [dro_full[0].mean("fd")], "kP", ms=9,
                label="full data, dro")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="wall-clock seconds (training + encode/score/select + proxy)", ylabel="FD (mean over seeds, log)",
           title="data-efficiency frontier")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_weights_vs_difficulty(all_cells: Sequence[Cell], full: Cell, path: Path) -> dict[str, float]:
    """Mean DRO weight per class (over every reweighting run) against the full-data per-class FD;
    returns the mean weights by class (empty without reweighting runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = _per_class(full)
    classes = list(ref)
    weights = [json.loads(r["weights"]) for c in all_cells if c.reweighting == "dro" and c.keep_frac < 1.0
               for r in c.rows if r.get("weights")]
    fig, ax = plt.subplots(figsize=(5, 4))
    mean_w = np.zeros(0)
    if weights and len(weights[0]) == len(classes):
        mean_w = np.mean(np.asarray(weights), axis=0)
        ax.scatter([ref[c] for c in classes], mean_w)
        for c, x, y in zip(classes, [ref[c] for c in classes], mean_w):
            ax.annotate(c, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
        ax.axhline(1 / len(classes), color="k", ls="--", lw=1, label="uniform")
        ax.legend()
    ax.set(xlabel="full-data model's FD on the class (harder →)", ylabel="mean DRO weight",
           title="weights vs class difficulty")
    save_figure(fig, path)
    return {c: float(w) for c, w in zip(classes, mean_w)}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def plots_dir(report: Path) -> Path:
    """Where a report's plots go: beside it, named after it (docs/RESULTS.md -> docs/results/)."""
    return report.parent / report.stem.lower()


def write_report(rows: list[dict[str, Any]], out: Path, *, title: str, command: str,
                 setup: Sequence[str] = ()) -> Path:
    """Write ``out`` (Markdown) and its plots beside it in ``<out stem>/``; return ``out``."""
    all_cells = cells(rows)
    fulls = [c for c in all_cells if c.is_full]
    if not fulls:
        raise ValueError("the sweep has no full-data model (evaluate.baselines: true) to compare against")
    full = fulls[0]
    images = plots_dir(out)
    images.mkdir(parents=True, exist_ok=True)
    rel = lambda name: f"{images.name}/{name}"  # noqa: E731
    steps = steps_to_quality(all_cells, full)
    seeds = sorted({int(r["seed"]) for r in rows})

    lines = [f"# {title}", "", f"Generated by `{command}` from the sweep's artifacts (comparison.parquet); "
             "regenerate it rather than editing it.", ""]
    lines += ["## Setup", "", *[f"- {s}" for s in setup],
              f"- Seeds: {', '.join(map(str, seeds))}; every number is mean ± std over seeds.",
              f"- Full-data model: {full.mean('kimg'):g} kimg, {_pm(full, 'train_s')} s of training, "
              f"FD {_pm(full, 'fd', 2)}.", "", "## Speed-up definitions (PAPER.md section 7)", ""]
    lines += [f"- **{name}**: {text}." for name, text in DEFINITIONS.items()]

    for policy in sorted({c.policy for c in all_cells if c.policy != "-"}):
        lines += ["", f"## Equal {policy}" + (" (budget = keep_frac × B)" if policy == "epochs" else
                                              " (budget = B for every model)"), ""]
        body = []
        for c in [full, *[c for c in all_cells if c.keep_frac == 1.0 and c.reweighting == "dro"],
                  *[c for c in all_cells if c.policy == policy]]:
            s = speedups(c, full)
            body.append([f"{c.keep_frac:g}", c.scorer, c.reweighting, f"{c.mean('kimg'):g}", _pm(c, "fd"),
                         _pm(c, "fid_inception"), _pm(c, "precision", 2), _pm(c, "recall", 2), _pm(c, "train_s"),
                         f"{s['train']:.2f}x", f"{s['one-off']:.2f}x", f"{s['scratch']:.2f}x",
                         "–" if c.is_full else steps.get((c.keep_frac, c.scorer, c.reweighting), "–")])
        lines += _table(["keep", "scorer", "weights", "kimg", "FD", "Inception FID", "precision", "recall",
                         "train s", "speed-up train", "speed-up one-off", "speed-up scratch", "steps-to-quality"], body)

    plot_frontier(all_cells, full, images / FRONTIER_PLOT)
    lines += ["", "## Frontier", "", f"![FD vs wall-clock]({rel(FRONTIER_PLOT)})", "",
              "Wall-clock on the x axis is the **one-off** definition (the paper's pre-trained reference setting)."]

    pick = _figure2_cell(all_cells)
    if pick is not None:
        before, after = pick
        series = {"full data": _per_class(full), "pruned": _per_class(before), "pruned+reweighted": _per_class(after)}
        plot_class_bars(series, images / CLASS_FD_PLOT, title=f"per-class FD, {after.scorer}, keep "
                        f"{after.keep_frac:g}, equal {after.policy}")
        improved = _classes_improved(before, after)
        lines += ["", "## Per-class FD before and after reweighting (the paper's Figure 2 analogue)", "",
                  f"{after.scorer} scorer, keep {after.keep_frac:g}, equal {after.policy}; mean over seeds. "
                  f"Classes improved per seed: {', '.join(f'{f:.0%}' for f in improved)}.", "",
                  f"![per-class FD]({rel(CLASS_FD_PLOT)})", ""]
        lines += _table(["class", "full data", "pruned", "pruned+reweighted"],
                        [[c, *(f"{series[s].get(c, math.nan):.1f}" for s in series)] for c in series["full data"]])

    mean_w = plot_weights_vs_difficulty(all_cells, full, images / WEIGHTS_PLOT)
    lines += ["", "## Weights vs class difficulty", "",
              "Mean DRO weight per class over every reweighting run (keep < 1), against the full-data model's "
              "per-class FD (mean over seeds; higher = harder to generate).", "",
              f"![weights vs difficulty]({rel(WEIGHTS_PLOT)})", ""]
    if mean_w:
        ref = _per_class(full)
        lines += _table(["class", "full-data FD", "mean weight", "uniform"],
                        [[c, f"{ref[c]:.1f}", f"{w:.3f}", f"{1 / len(mean_w):.3f}"] for c, w in mean_w.items()])

    lines += ["", "## The paper's claims, here", ""]
    lines += _table(["claim", "outcome", "numbers"], [list(c) for c in claims(all_cells, full)])
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def _figure2_cell(all_cells: Sequence[Cell]) -> tuple[Cell, Cell] | None:
    """(uniform, dro) cells of the Figure 2 analogue: keep 0.2 (else the smallest), gaussian (else the
    first scorer), equal epochs (else the other policy)."""
    by = {(c.policy, c.keep_frac, c.scorer, c.reweighting): c for c in all_cells}
    pairs = [(k[:3], by[k[:3] + ("uniform",)], c) for k, c in by.items()
             if k[3] == "dro" and k[1] < 1.0 and k[:3] + ("uniform",) in by]
    if not pairs:
        return None
    rank = lambda p: (p[0][1] != 0.2, p[0][1], p[0][2] != "gaussian", p[0][2], p[0][0] != "epochs")  # noqa: E731
    _, before, after = min(pairs, key=rank)
    return before, after


def describe_setup(points: Sequence[Any], sweep: Any) -> list[str]:
    """Setup lines of the report, read from the sweep's validated configs (GridPoint list, SweepConfig)."""
    cfg = points[0].cfg
    grid_keys = sorted({k for p in points for k in p.values})
    varied = {k: sorted({json.dumps(p.values[k]) for p in points if k in p.values}) for k in grid_keys}
    return [
        f"Data: `{cfg.dataset.source}` at {cfg.dataset.resolution or 'native'} px, holdout {cfg.dataset.holdout_frac:g} "
        f"per class; encoder `{cfg.encode.encoder}`; scores per class: {cfg.score.per_class}.",
        f"Model: preset `{cfg.train.preset}`, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, EMA half-life "
        f"{cfg.train.ema_halflife_kimg:g} kimg; full-data budget B = {cfg.reweight.reference_kimg:g} kimg "
        f"(the full-data model is also the DRO reference); proxy {cfg.reweight.proxy_kimg:g} kimg, "
        f"eta {cfg.reweight.eta:g}, smoothing {cfg.reweight.smoothing:g}.",
        f"Evaluation: {cfg.sample.per_class} samples per class ({cfg.sample.method.upper()}-{cfg.sample.steps}); FD, "
        f"per-class FD and precision/recall (k = {cfg.evaluate.prdc_k}) in the {cfg.evaluate.feature_spaces[0]} "
        f"feature space against the full train split"
        + "".join(f"; {space} too at {n} of {len(points)} points" for space, n in _extra_spaces(points).items()) + ".",
        "Grid: " + "; ".join(f"`{k}` ∈ {{{', '.join(v)}}}" for k, v in varied.items())
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
