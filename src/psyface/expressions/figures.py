"""The stage's two figures: accuracy/time vs landmarks, and the kept landmarks on mean faces."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from psyface.artifacts import NormalisedLandmarks
    from psyface.expressions.reduction import ExpressionResult


def plot_curves(results: list[ExpressionResult], path: Path) -> None:
    """Test accuracy and µs/face against the number of landmarks, one line per expression."""
    figure, (accuracy_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        n = [step.n_landmarks for step in result.steps]
        accuracy = [step.fitted.scores["test_accuracy"] for step in result.steps]
        line, = accuracy_axis.plot(n, accuracy, marker=".", label=result.expression)
        accuracy_axis.plot(result.reduced.n_landmarks, accuracy[result.chosen], "o", ms=10, mfc="none",
                           color=line.get_color())
        time_axis.plot(n, [step.fitted.scores["us_per_face"] for step in result.steps], marker=".",
                       color=line.get_color(), label=result.expression)
    accuracy_axis.set(xlabel="landmarks", ylabel="test accuracy", title="Accuracy vs landmarks")
    time_axis.set(xlabel="landmarks", ylabel="µs per face (batched)", title="Inference time")
    accuracy_axis.invert_xaxis()
    time_axis.invert_xaxis()
    accuracy_axis.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


def plot_kept_landmarks(
    results: list[ExpressionResult], data: NormalisedLandmarks, path: Path
) -> None:
    """Per expression: its mean normalised training face (grey points), kept landmarks in red,
    marker area proportional to the reduced model's IG relevance."""
    figure, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.6), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        faces = data.points[(data.split == "train") & (data.labels == result.expression)]
        mean_face = faces.mean(axis=0) if len(faces) else data.reference
        axis.scatter(*mean_face.T, s=10, color="0.55")
        relevance = result.reduced.fitted.relevance
        sizes = 30 + 170 * relevance / max(float(relevance.max()), 1e-12)
        axis.scatter(*mean_face[result.reduced.kept].T, s=sizes, color="tab:red", alpha=0.8)
        axis.set_title(f"{result.expression}: {result.reduced.n_landmarks}/{result.full.n_landmarks}")
        axis.set_aspect("equal")
        axis.invert_yaxis()  # image coordinates: y grows downwards
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)
