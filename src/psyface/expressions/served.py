"""The registered model: raw landmark coordinates in, one probability per expression out.

An MLflow pyfunc wrapping the landmark normalisation and every expression's binary classifier on
its own landmark subset (all landmarks for the full model, the kept ones for the reduced model).
Input is every landmark, so one model serves any landmark detector output; the pose is estimated
on the alignment landmarks and the classifiers read only their kept landmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow.pyfunc
import numpy as np
import pandas as pd
from torch import nn

from psyface.expressions.classifier import predict_proba
from psyface.shapes import coordinate_columns, flatten, normalise_shapes


def feature_columns(kept: np.ndarray) -> np.ndarray:
    """Columns of the flattened features (x0, y0, x1, ...) that belong to the landmarks `kept`."""
    kept = np.asarray(kept)
    return np.stack([2 * kept, 2 * kept + 1], axis=1).ravel()


@dataclass
class ExpressionClassifier:
    model: nn.Module
    kept: np.ndarray


class LandmarkExpressionModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with columns x0, y0, ... in image pixels. Output: p_<expression> per
    expression and `expression`, the most probable one (one-vs-rest argmax)."""

    def __init__(self, reference: np.ndarray, anchors: np.ndarray, classifiers: dict[str, ExpressionClassifier]):
        self.reference = np.asarray(reference)
        self.anchors = np.asarray(anchors)
        self.classifiers = classifiers

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        n_points = len(self.reference)
        points = model_input[coordinate_columns(n_points)].to_numpy(dtype=np.float64)
        features = flatten(normalise_shapes(points.reshape(len(points), n_points, 2), self.reference, self.anchors))
        probabilities = pd.DataFrame(
            {
                f"p_{name}": predict_proba(classifier.model, features[:, feature_columns(classifier.kept)])
                for name, classifier in self.classifiers.items()
            },
            index=model_input.index,
        )
        names = np.array(list(self.classifiers))
        return probabilities.assign(expression=names[probabilities.to_numpy().argmax(axis=1)])
