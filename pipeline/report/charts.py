"""The report's charts, drawn with matplotlib: training curves (figure 3), the confusion matrix and the
deletion curve (true-class probability left after deleting the top-attended or random cells, over k).

Kept apart from overlay.py, which blends heatmaps into frames pixel by pixel (numpy and PIL, matplotlib only for
its colour map): these are figures with axes (Agg backend, imported lazily). Every PNG goes through the one
atomic writer.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_tsv(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a tab-separated table with a header line, as float arrays (blank or bad cells: nan)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        return {}
    header = lines[0].split("\t")
    columns: dict[str, list[float]] = {name: [] for name in header}
    for line in lines[1:]:
        cells = line.split("\t")
        for i, name in enumerate(header):
            try:
                columns[name].append(float(cells[i]))
            except (IndexError, ValueError):
                columns[name].append(math.nan)
    return {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}


def _plot_panel(ax, path: Path | None, ylabel: str) -> None:
    table = read_tsv(path) if path is not None and Path(path).is_file() else {}
    epochs = table.get("epoch")
    if epochs is None or len(epochs) == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    else:
        for column, style in (("train", "o-"), ("val", "s--")):
            if column in table:
                ax.plot(epochs, table[column], style, label=column, markersize=3)
        ax.legend()
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def write_curves(path: str | Path, loss_tsv: str | Path | None, accuracy_tsv: str | Path | None) -> Path:
    """PNG of loss and accuracy per epoch, train and val side by side (the source study's figure 3)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    try:
        _plot_panel(left, Path(loss_tsv) if loss_tsv else None, "loss")
        _plot_panel(right, Path(accuracy_tsv) if accuracy_tsv else None, "video accuracy")
        left.set_title("loss")
        right.set_title("accuracy")
        right.set_ylim(-0.02, 1.02)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_confusion(path: str | Path, classes: Sequence[str], matrix: np.ndarray | Sequence[Sequence[int]]) -> Path:
    """Annotated heatmap PNG: rows true class, columns predicted; colour = share of the row, text = count."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k} for {k} classes, got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, np.float64), where=rows > 0)
    side = max(4.0, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    try:
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
        ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
        ax.set_yticks(range(k), labels=list(classes))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 40:
            for i in range(k):
                for j in range(k):
                    if counts[i, j]:
                        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.5 else "black")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_deletion(path: str | Path, deletion: dict[str, Any]) -> Path:
    """PNG of eval.json's deletion curve: true-class probability left against the cells deleted per frame,
    top-attended beside random (mean, the band +-1 sd over the draws), the gap between them shaded."""
    plt = _pyplot()
    curve = deletion["curve"]
    k = np.asarray(curve["k"], np.float64)
    top = np.asarray(curve["top_probability"], np.float64)
    random = np.asarray(curve["random_probability"], np.float64)
    spread = np.asarray(curve["random_probability_std"], np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    try:
        ax.fill_between(k, top, random, color="#d93025", alpha=0.12, linewidth=0, label="area between")
        ax.fill_between(k, random - spread, random + spread, color="#7f7f7f", alpha=0.3, linewidth=0)
        ax.plot(k, random, "s--", color="#555555", markersize=3,
                label=f"random cells ({deletion.get('random_draws')} draws, ±1 sd)")
        ax.plot(k, top, "o-", color="#d93025", markersize=3, label="top-attended cells")
        unmodified = (deletion.get("unmodified") or {}).get("true_probability")
        if unmodified is not None:
            ax.axhline(unmodified, color="#137333", linewidth=0.8, linestyle=":", label="nothing deleted")
        ax.set_xlabel(f"cells deleted per frame (of {curve.get('cells')})")
        ax.set_ylabel("true-class probability")
        ax.set_ylim(-0.02, 1.02)
        area = (deletion.get("area_between") or {}).get("probability")
        if area is not None:
            ax.set_title(f"deletion curve: area between {area:.3f}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def write_figures(folder: Path, metrics: dict[str, Any] | None, train_plots: Path, notes: list[str]) -> dict[str, str]:
    """curves.png, confusion.png and deletion.png in `folder` where their data exists; {name: path relative
    to folder}.

    A chart without data is not drawn (and a note says why) rather than drawn empty: the page then shows
    nothing where it has nothing to show.
    """
    figures: dict[str, str] = {}
    loss, accuracy = Path(train_plots) / "loss.tsv", Path(train_plots) / "accuracy.tsv"
    if loss.is_file() or accuracy.is_file():
        write_curves(folder / "curves.png", loss if loss.is_file() else None, accuracy if accuracy.is_file() else None)
        figures["curves"] = "curves.png"
    else:
        notes.append(f"no training curves: {loss} and {accuracy} are missing")
    confusion = (metrics or {}).get("confusion")
    if confusion and confusion.get("classes"):
        write_confusion(folder / "confusion.png", confusion["classes"], confusion["matrix"])
        figures["confusion"] = "confusion.png"
    deletion = (metrics or {}).get("deletion") or {}
    if len((deletion.get("curve") or {}).get("k") or []) >= 2:
        write_deletion(folder / "deletion.png", deletion)
        figures["deletion"] = "deletion.png"
    return figures
