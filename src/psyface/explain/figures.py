"""Pictures of attribution maps: overlays, mean heatmaps, highest/lowest-predicted grids, deletion curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

COLORMAP = matplotlib.colormaps["jet"]


def normalise(heat: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] (an all-zero map stays zero)."""
    top = float(heat.max())
    return heat / top if top > 0 else np.zeros_like(heat)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 HxWx3 face with a colour-mapped relevance map (HxW, >= 0) blended on top."""
    colours = COLORMAP(normalise(heat))[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)


def save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)


def save_mean_heatmaps(
    path: Path, mean_face: np.ndarray, mean_maps: dict[str, np.ndarray], attributes: list[str], aligned: bool
) -> None:
    """Rows = methods, columns = attributes: the average normalised map over the mean face."""
    fig, axes = plt.subplots(
        len(mean_maps), len(attributes), figsize=(1.8 * len(attributes), 1.9 * len(mean_maps)), squeeze=False
    )
    for row, (method, maps) in enumerate(mean_maps.items()):
        for column, attribute in enumerate(attributes):
            axis = axes[row, column]
            axis.imshow(overlay(mean_face, maps[column]))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(attribute, fontsize=9)
            if column == 0:
                axis.set_ylabel(method, fontsize=9)
    note = "faces aligned" if aligned else "faces NOT aligned: a mean map blurs over face positions"
    fig.suptitle(f"Mean relevance per attribute on the test set ({note})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_extremes(
    path: Path,
    images: np.ndarray,
    maps: np.ndarray,
    predictions: np.ndarray,
    attributes: list[str],
    title: str,
    n_top: int,
) -> None:
    """Two rows per attribute: its `n_top` highest-predicted faces with their maps, then the lowest.

    `maps` is (N, A, H, W) relevance, `predictions` (N, A) on the rating scale.
    """
    n_top = min(n_top, len(images))
    fig, axes = plt.subplots(2 * len(attributes), n_top, figsize=(1.5 * n_top, 3.0 * len(attributes)), squeeze=False)
    for column_of_attribute, attribute in enumerate(attributes):
        order = np.argsort(predictions[:, column_of_attribute])
        for offset, (label, indices) in enumerate((("highest", order[::-1][:n_top]), ("lowest", order[:n_top]))):
            row = 2 * column_of_attribute + offset
            for column, index in enumerate(indices):
                axis = axes[row, column]
                axis.imshow(overlay(images[index], maps[index, column_of_attribute]))
                axis.set_xticks([])
                axis.set_yticks([])
                axis.set_title(f"{predictions[index, column_of_attribute]:.2f}", fontsize=7)
                if column == 0:
                    axis.set_ylabel(f"{attribute}\n{label}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_deletion_curves(path: Path, curves: dict[str, np.ndarray], random_curve: np.ndarray) -> None:
    """Mean prediction change vs. share of pixels deleted, per method and for a random order."""
    fig, axis = plt.subplots(figsize=(5, 3.5))
    fractions = np.linspace(0, 1, len(random_curve))
    for method, curve in curves.items():
        axis.plot(fractions, curve, label=method)
    axis.plot(fractions, random_curve, "k--", label="random order")
    axis.set_xlabel("share of pixels deleted (most relevant first)")
    axis.set_ylabel("|prediction change| (std units)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
