"""Pictures of attribution maps: overlays, mean heatmaps, highest/lowest-predicted grids, deletion and
insertion curves, cascading randomisation curves."""

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


def save_npy(path: Path, array: np.ndarray) -> None:
    """`np.save` to exactly `path` (np.save would append .npy to a temporary name)."""
    with path.open("wb") as handle:
        np.save(handle, array)


def save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG")  # explicit: atomic writes use a .tmp name


def mosaic(tiles: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 HxWx3 tiles -> one image with white gaps (one axes draws fast)."""
    side = tiles[0][0].shape[0]
    n_rows, n_columns = len(tiles), max(map(len, tiles))
    canvas = np.full((n_rows * (side + gap), n_columns * (side + gap), 3), 255, dtype=np.uint8)
    for row, row_tiles in enumerate(tiles):
        for column, tile in enumerate(row_tiles):
            top, left = row * (side + gap), column * (side + gap)
            canvas[top : top + side, left : left + side] = tile
    return canvas


def save_mosaic(
    path: Path, tiles: list[list[np.ndarray]], row_labels: list[str], column_labels: list[str], title: str,
    captions: list[list[str]] | None = None,
) -> None:
    """Draw a tile mosaic with row/column labels and optional per-tile captions, and save it."""
    side = tiles[0][0].shape[0] + 2
    canvas = mosaic(tiles)
    scale = 1.4 / side  # inches per pixel: a tile is about 1.4 in wide
    fig, axis = plt.subplots(figsize=(canvas.shape[1] * scale + 1.6, canvas.shape[0] * scale + 0.8))
    axis.imshow(canvas)
    axis.set_yticks([side * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=8)
    axis.set_xticks([side * (i + 0.5) for i in range(len(column_labels))], column_labels, fontsize=8)
    axis.xaxis.tick_top()
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    for row, row_captions in enumerate(captions or []):
        for column, caption in enumerate(row_captions):
            axis.text(side * column + 2, side * (row + 1) - 4, caption, fontsize=6, color="white")
    axis.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_mean_heatmaps(
    path: Path, mean_face: np.ndarray, mean_maps: dict[str, np.ndarray], attributes: list[str], aligned: bool
) -> None:
    """Rows = methods, columns = attributes: the average normalised map over the mean face."""
    tiles = [[overlay(mean_face, maps[column]) for column in range(len(attributes))] for maps in mean_maps.values()]
    note = "faces aligned" if aligned else "faces NOT aligned: a mean map blurs over face positions"
    save_mosaic(path, tiles, list(mean_maps), attributes, f"Mean relevance per attribute on the test set ({note})")


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

    `maps` is (N, A, H, W) relevance, `predictions` (N, A) on the rating scale (printed per face).
    """
    n_top = min(n_top, len(images))
    tiles, captions, labels = [], [], []
    for column, attribute in enumerate(attributes):
        order = np.argsort(predictions[:, column])
        for label, indices in (("highest", order[::-1][:n_top]), ("lowest", order[:n_top])):
            tiles.append([overlay(images[i], maps[i, column]) for i in indices])
            captions.append([f"{predictions[i, column]:.2f}" for i in indices])
            labels.append(f"{attribute} {label}")
    save_mosaic(path, tiles, labels, [], title, captions)


def save_perturbation_curves(
    path: Path, curves: dict[str, dict[str, np.ndarray]], random_curves: dict[str, np.ndarray]
) -> None:
    """Two panels, deletion and insertion: mean curve per method (`curves[method][kind]`) and of a
    random pixel order (`random_curves[kind]`), against the share of pixels deleted or inserted."""
    kinds = {"deletion": "share of pixels deleted (most relevant first)",
             "insertion": "share of pixels inserted into the baseline (most relevant first)"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, (kind, label) in zip(axes, kinds.items()):
        fractions = np.linspace(0, 1, len(random_curves[kind]))
        for method, by_kind in curves.items():
            axis.plot(fractions, by_kind[kind], label=method)
        axis.plot(fractions, random_curves[kind], "k--", label="random order")
        axis.set_title(kind, fontsize=9)
        axis.set_xlabel(label, fontsize=8)
    axes[0].set_ylabel("|prediction change| / recovered (std units)", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_randomisation_curves(path: Path, cascades: dict[str, dict[str, float]], threshold: float) -> None:
    """Cascading randomisation: rank correlation of |maps| with the trained model's, per method, as
    layers are re-initialised from the output down (`cascades[method][step]`); the dashed line is
    the sanity threshold a method must fall below."""
    fig, axis = plt.subplots(figsize=(5.5, 3.5))
    for method, cascade in cascades.items():
        steps = ["none", *cascade]
        axis.plot(range(len(steps)), [1.0, *cascade.values()], marker="o", label=method)
        axis.set_xticks(range(len(steps)), steps, fontsize=8)
    axis.axhline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
    axis.set_xlabel("randomised down to (cumulative, from the output)", fontsize=8)
    axis.set_ylabel("rank correlation of |maps|", fontsize=8)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
