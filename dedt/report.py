"""Tables and plots: the run summary (full vs pruned vs pruned+reweighted), the evaluate stage's
pictures and report, the DRO weights, and the PNGs the Prefect UI shows."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dedt.artifacts import CLASS_FD_PLOT, GRID, REPORT
from dedt.store import atomic_path, atomic_write_text

MODEL_LABELS = {"reference": "full data", "train:uniform": "pruned", "train": "pruned+reweighted"}
SELECTION_STAGES = ("encode", "score", "select")


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically, without a version stamp (same bytes every run)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def quality_curves_png(curves: Mapping[str, Any], s_per_img: float) -> bytes:
    """FD against images seen and against calibrated seconds, one line per model curve
    (``dedt.quality.Curve``), log-log, as PNG bytes: what the Prefect UI shows of time to quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, curve in curves.items():
        axes[0].plot(curve.kimg, curve.fd, marker=".", label=label)
        axes[1].plot(curve.kimg * 1000 * s_per_img, curve.fd, marker=".", label=label)
    axes[0].set(xlabel="images seen (kimg)", ylabel="FD", title="FD vs images seen")
    axes[1].set(xlabel="calibrated training seconds", ylabel="FD", title="FD vs time")
    for ax in axes:
        ax.set(xscale="log", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def plot_weights(weights: np.ndarray, alphas: np.ndarray, path: Path) -> None:
    """Two panels: the DRO trajectory per group and the final weights against uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for g in range(alphas.shape[1]):
        left.plot(alphas[:, g], label=str(g), lw=1)
    left.set(xlabel="proxy step", ylabel="alpha", title="DRO trajectory")
    left.legend(fontsize=6, ncol=2)
    right.bar(np.arange(len(weights)), weights)
    right.axhline(1 / len(weights), color="k", ls="--", lw=1, label="uniform")
    right.set(xlabel="group", ylabel="weight", title="averaged weights")
    right.legend()
    save_figure(fig, path)


def plot_class_bars(
    series: Mapping[str, Mapping[str, float]],
    path: Path,
    *,
    title: str = "per-class FD",
    ylabel: str = "Fréchet distance",
) -> None:
    """Grouped bars: one group per class, one bar per series (NaN = too few samples, left empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(c for values in series.values() for c in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(classes) + 2), 3.5))
    for i, (label, values) in enumerate(series.items()):
        heights = [values.get(c, float("nan")) for c in classes]
        ax.bar(np.arange(len(classes)) + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(np.arange(len(classes)), classes)
    ax.set(xlabel="class", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_evaluation(
    folder: Path,
    rows: Sequence[Any],
    fake: np.ndarray,
    fake_labels: np.ndarray,
    num_classes: int,
    *,
    space: str,
    references: Sequence[str],
    title: str,
    seed: int,
    clean_target: bool = False,
) -> None:
    """The evaluate stage's pictures and report: grid.png (8 samples per class, a row each), class_fd.png
    (per-class FD in ``space`` against each reference) and report.md (``dedt.evaluate.report_markdown``)."""
    from dedt import evaluate
    from dedt.diffusion.sample import save_grid

    save_grid(
        fake[np.concatenate([np.flatnonzero(fake_labels == c)[:8] for c in range(num_classes)])], folder / GRID, nrow=8
    )
    plot_class_bars(
        {f"vs {ref}": evaluate.per_class_fd(rows, space, ref) for ref in references},
        folder / CLASS_FD_PLOT,
        title=f"per-class FD, {space} features",
    )
    atomic_write_text(
        folder / REPORT,
        evaluate.report_markdown(
            rows,
            title=title,
            seed=seed,
            images={"samples": GRID, "per-class FD": CLASS_FD_PLOT},
            clean_target=clean_target,
        ),
    )


def enlarged_png(path: Path, min_width: int = 320) -> bytes:
    """A sample grid scaled up by a whole factor (nearest neighbour): 8x8 digits are specks otherwise."""
    from PIL import Image

    with Image.open(path) as image:
        factor = max(1, -(-min_width // image.width))
        buffer = io.BytesIO()
        image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def training_curves_png(logs: dict[str, Path]) -> bytes:
    """Loss against kimg for each model's ``log.jsonl`` (one line per log interval), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, log in logs.items():
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        ax.plot([r["kimg"] for r in lines], [r["loss"] for r in lines], marker=".", label=label)
    ax.set(xlabel="kimg (thousands of images seen)", ylabel="loss", title="training curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_class_fd(before: Mapping[str, float], after: Mapping[str, float], path: Path) -> None:
    """The paper's Figure 2 analogue: per-class FD of the pruned model before and after reweighting.

    ``before``/``after`` are evaluate summaries' ``fd_per_class`` (class name -> FD).
    """
    plot_class_bars(
        {"before reweighting": before, "after reweighting": after},
        path,
        title="per-class FD before / after reweighting",
    )


def full_data_curve(results: dict[str, Any]) -> Any:
    """The full-data model's FD curve (``dedt.quality.Curve``): its snapshots' curve stage when the
    pipeline has one, else its final point alone; None without a measured full-data model."""
    from dedt.quality import Curve

    if "curve:reference" in results:
        summary = results["curve:reference"].summary
        return Curve(summary["kimg"], summary["fd"])
    if "evaluate:reference" in results and "reference" in results:
        return Curve([results["reference"].summary["nimg"] / 1000], [results["evaluate:reference"].summary["fd"]])
    return None


def summary_rows(results: dict[str, Any], *, proxy_kimg: float = 0.0) -> list[dict[str, Any]]:
    """One row per trained model: images used, FD overall/worst/best, cost and equal-quality speed-up.

    Equal-quality speed-up (PAPER.md section 7) = the full-data curve's time to reach this model's FD
    / this model's cost, both in calibrated seconds (images seen x the per-image cost of the
    calibrate stage): below 1, plain shorter training on all the data would have been better. The
    cost counts selection (encode, score, select: measured seconds) and, reweighted or with class counts
    set by the weights (``pays_for_dro``), the DRO proxy
    (``proxy_kimg`` at the calibrated proxy cost); "from scratch" adds the reference DM's training
    (``pays_for_reference``), which the paper's setting takes as pre-trained. ≥ / ≤ mark bounds, where the
    full-data curve does not bracket the FD (better than its end / worse than its first point).
    """
    from dedt.quality import equal_quality_speedup

    selection = sum(results[k].seconds for k in SELECTION_STAGES if k in results)
    full = full_data_curve(results)
    costs = results["calibrate"].summary if "calibrate" in results else None
    rows = []
    for key, label in MODEL_LABELS.items():
        if f"evaluate:{key}" not in results:
            continue
        train, ev = results[key].summary, results[f"evaluate:{key}"].summary
        per_class = {c: v for c, v in ev["fd_per_class"].items() if v == v}  # drop NaN (too few samples)
        row = {
            "model": label,
            "images": train["n_images"],
            "kimg": round(train["nimg"] / 1000, 1),
            "train_s": round(train["seconds"], 1),
            "fd": ev["fd"],
            "cost_s": None,
            "speedup": None,
            "speedup_scratch": None,
        }
        if costs is not None and full is not None:
            s_per_kimg = 1000.0 * costs["train_s_per_img"]
            cost = train["nimg"] / 1000 * s_per_kimg
            if key != "reference":
                cost += selection
            if pays_for_dro(results, key):
                cost += proxy_kimg * 1000.0 * costs["proxy_s_per_img"]
            row["cost_s"] = round(cost, 1)
            if key == "reference":  # the yardstick itself: 1x by definition (its FD is its curve's end)
                row["speedup"] = row["speedup_scratch"] = "1.00x"
                rows.append(row | _extremes(per_class))
                continue
            row["speedup"] = str(equal_quality_speedup(full, s_per_kimg, ev["fd"], cost))
            scratch = cost + (full.kimg[-1] * s_per_kimg if pays_for_reference(results, key) else 0.0)
            row["speedup_scratch"] = str(equal_quality_speedup(full, s_per_kimg, ev["fd"], scratch))
        rows.append(row | _extremes(per_class))
    return rows


def pays_for_dro(results: dict[str, Any], key: str) -> bool:
    """Whether a model carries the DRO proxy's (and, from scratch, its reference's) cost: the reweighted one, and
    any model whose subset's class counts the DRO weights set (``select.keep_by: weights``)."""
    select = results.get("select")
    return key == "train" or (key != "reference" and select is not None and "class_weights" in select.summary)


def pays_for_reference(results: dict[str, Any], key: str) -> bool:
    """Whether a model carries the reference DM's training from scratch: the DRO ones (``pays_for_dro``) and
    any model whose subset the reference's difficulty scores chose (``score.method: difficulty``)."""
    score = results.get("score")
    by_model = score is not None and score.summary.get("method") == "difficulty"
    return pays_for_dro(results, key) or (key != "reference" and by_model)


def _extremes(per_class: dict[str, float]) -> dict[str, str]:
    """The worst and best class by FD, as table cells."""
    worst, best = max(per_class, key=per_class.get), min(per_class, key=per_class.get)
    return {"worst_class": f"{worst} ({per_class[worst]:.2f})", "best_class": f"{best} ({per_class[best]:.2f})"}


def weights_vs_difficulty(results: dict[str, Any]) -> dict[str, Any] | None:
    """How the DRO weights relate to class difficulty (the reference's per-class FD) and what they did.

    The paper reports that above-uniform weights go to the *easily generated* classes, i.e. a
    negative rank correlation between weight and the reference model's per-class FD. Also counts
    the classes whose FD improved from the pruned-uniform to the pruned+reweighted model.
    """
    needed = ("reweight", "evaluate:reference", "evaluate:train", "evaluate:train:uniform")
    if not all(k in results for k in needed):
        return None
    from scipy.stats import spearmanr

    weights = results["reweight"].summary["weights"]
    ref = results["evaluate:reference"].summary["fd_per_class"]
    before = results["evaluate:train:uniform"].summary["fd_per_class"]
    after = results["evaluate:train"].summary["fd_per_class"]
    classes = [c for c in ref if ref[c] == ref[c]]  # skip NaN
    rho = spearmanr([weights[i] for i, c in enumerate(ref) if c in classes], [ref[c] for c in classes]).statistic
    improved = sum(after[c] < before[c] for c in classes if before[c] == before[c] and after[c] == after[c])
    return {
        "spearman_weight_vs_reference_fd": round(float(rho), 3),
        "classes_improved": improved,
        "classes": len(classes),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def stage_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "stage": key,
            "fingerprint": r.fingerprint,
            "status": "cached" if r.cached else "computed",
            "seconds": r.seconds,
        }
        for key, r in results.items()
    ]
