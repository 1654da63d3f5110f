"""Landmark shape geometry (pure core): shapes are (n_faces, n_points, 2) arrays, and complex numbers
make rotations one product. The landmarks stage normalises the training faces with it and the
expression classifiers' served model normalises a new face with the same `normalise_shapes`, so a
served face is normalised exactly as in training.
"""

from __future__ import annotations

import numpy as np


def _as_complex(points: np.ndarray) -> np.ndarray:
    return points[..., 0] + 1j * points[..., 1]


def _as_points(shapes: np.ndarray) -> np.ndarray:
    return np.stack([shapes.real, shapes.imag], axis=-1)


def _centre_and_scale(shapes: np.ndarray, anchors: np.ndarray | slice) -> np.ndarray:
    """Complex shapes (n, P) -> moved and scaled so the `anchors` have centroid 0 and unit RMS size."""
    centred = shapes - shapes[..., anchors].mean(axis=-1, keepdims=True)
    size = np.sqrt((np.abs(centred[..., anchors]) ** 2).mean(axis=-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        return centred / size


def normalise_shapes(points: np.ndarray, reference: np.ndarray, anchors: np.ndarray | None = None) -> np.ndarray:
    """Remove position, scale and roll: (n, P, 2) -> (n, P, 2) aligned onto `reference` (P, 2).

    The similarity transform is estimated on the `anchors` (landmark indices; default all) and
    applied to every point, so landmarks that move with expression can be left out of the pose
    estimate and then keep their own displacement instead of spreading it over the whole face. The
    rotation minimising the squared anchor distance to the reference is exp(i*arg(sum conj(z)*r)),
    the closed-form ordinary Procrustes solution; degenerate shapes come back as NaN.
    """
    index = slice(None) if anchors is None else np.asarray(anchors)
    shapes = _centre_and_scale(_as_complex(np.asarray(points, dtype=np.float64)), index)
    target = _centre_and_scale(_as_complex(np.asarray(reference, dtype=np.float64)), index)
    overlap = np.sum(np.conj(shapes[..., index]) * target[..., index], axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rotation = overlap / np.abs(overlap)
    return _as_points(shapes * rotation)


def procrustes_mean(
    points: np.ndarray, anchors: np.ndarray | None = None, iterations: int = 10, tolerance: float = 1e-10
) -> np.ndarray:
    """Generalised Procrustes mean shape (P, 2) of (n, P, 2) shapes, aligned on `anchors`.

    Starts from the mean of the centred, scaled (unrotated) shapes, so the reference keeps the
    images' upright orientation, and re-aligns every new mean onto it to stop the mean drifting.
    """
    index = slice(None) if anchors is None else np.asarray(anchors)
    start = _centre_and_scale(_as_complex(np.asarray(points, dtype=np.float64)), index).mean(axis=0)
    reference = _as_points(start)
    for _ in range(iterations):
        mean = normalise_shapes(points, reference, anchors).mean(axis=0)
        mean = normalise_shapes(mean[None], reference, anchors)[0]
        done = np.sum((mean - reference) ** 2) < tolerance
        reference = mean
        if done:
            break
    return reference


def flatten(points: np.ndarray) -> np.ndarray:
    """(n, P, 2) -> (n, 2P) features ordered x0, y0, x1, y1, ...; landmark j owns columns 2j, 2j+1."""
    return points.reshape(len(points), -1)


def coordinate_columns(n_points: int) -> list[str]:
    return [f"{axis}{index}" for index in range(n_points) for axis in ("x", "y")]


def degenerate(points: np.ndarray, anchors: np.ndarray | slice) -> np.ndarray:
    """(n, P, 2) -> (n,) True where a shape cannot be normalised (its `anchors` coincide)."""
    return ~np.isfinite(_centre_and_scale(_as_complex(np.asarray(points, dtype=np.float64)), anchors)).all(axis=1)
