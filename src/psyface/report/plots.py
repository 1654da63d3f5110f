"""The report's figures as PNG bytes (matplotlib, headless): embeddings, learning curves, accuracy."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

PANEL_INCHES = 3.2


def to_png(figure: plt.Figure) -> bytes:
    """Render and close a figure (closing keeps long runs from piling up figures)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _grid(n_panels: int, columns: int = 4) -> tuple[plt.Figure, list[plt.Axes]]:
    columns = min(columns, n_panels)
    rows = math.ceil(n_panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows), squeeze=False)
    flat = list(axes.ravel())
    for unused in flat[n_panels:]:
        unused.axis("off")
    return figure, flat[:n_panels]


def embedding_panels(coordinates: np.ndarray, colours: pd.DataFrame, title: str) -> bytes:
    """One scatter per column of `colours`: numeric columns on a continuous map, others by category.

    Points are drawn in one fixed random order, so no category is hidden under the one drawn last.
    """
    order = np.random.default_rng(0).permutation(len(coordinates))
    x, y = coordinates[order, 0], coordinates[order, 1]
    figure, axes = _grid(len(colours.columns))
    for axis, column in zip(axes, colours.columns):
        values = colours[column].iloc[order]
        if pd.api.types.is_numeric_dtype(values):
            points = axis.scatter(x, y, c=values, cmap="viridis", s=6)
            figure.colorbar(points, ax=axis, fraction=0.046, pad=0.02)
        else:
            labels = values.astype(str)
            categories = sorted(labels.unique())
            palette = {category: f"C{index}" for index, category in enumerate(categories)}
            axis.scatter(x, y, c=labels.map(palette).tolist(), s=6)
            handles = [Line2D([], [], marker="o", linestyle="", color=palette[c], label=c) for c in categories]
            axis.legend(handles=handles, fontsize=7, loc="best")
        axis.set_title(column, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title)
    return to_png(figure)


def learning_curves(curves: pd.DataFrame) -> bytes:
    """Losses in one panel, correlations (`*_r`, `*_r_<attribute>`) in another, anything else alone."""
    families: dict[str, list[str]] = {}
    for metric in (column for column in curves.columns if column != "epoch"):
        if metric.endswith("_loss"):
            family = "loss"
        elif metric.endswith("_r") or "_r_" in metric:
            family = "correlation"
        else:
            family = metric
        families.setdefault(family, []).append(metric)
    figure, axes = _grid(len(families), columns=3)
    for axis, (family, members) in zip(axes, families.items()):
        for metric in members:
            axis.plot(curves["epoch"], curves[metric], marker=".", label=metric)
        axis.set_xlabel("epoch")
        axis.set_title(family)
        axis.legend(fontsize=7)
    return to_png(figure)


def accuracy_against_ceiling(table: pd.DataFrame) -> bytes:
    """Bars of test Pearson r per attribute with the reliability ceiling marked."""
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(table)), 3.2))
    positions = np.arange(len(table))
    axis.bar(positions, table["pearson_r"], color="C0", label="test Pearson r")
    if "pearson_r_ci_low" in table and table["pearson_r_ci_low"].notna().all():  # metrics from before the intervals lack them
        below, above = table["pearson_r"] - table["pearson_r_ci_low"], table["pearson_r_ci_high"] - table["pearson_r"]
        axis.errorbar(positions, table["pearson_r"], yerr=[below, above], fmt="none", ecolor="black", capsize=3,
                      label="95 % interval (identities resampled)")
    axis.scatter(positions, table["ceiling"], marker="_", s=900, color="C3", label="reliability ceiling")
    axis.set_xticks(positions, table["attribute"], rotation=30, ha="right")
    axis.set_ylim(min(0.0, float(table["pearson_r"].min())) - 0.05, 1.05)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.legend(fontsize=8)
    return to_png(figure)
