"""The registered model's serving contract: the MLflow pyfunc, its signature and its input decoding.

Core module shared by `tracking` (which logs the pyfunc with this signature), `predict` and the
models-from-code entry `pyfunc_model.py`: the pyfunc takes a DataFrame with an `image` column (bytes;
base64 in JSON requests) or a `path` column, decodes with the one image loader, preprocesses with
`to_input` exactly as in training, and returns one column per attribute on the rating scale.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from psyface.images import load_images, problems_message
from psyface.model import ModelSpec, load_trained, predict_ratings

IMAGE_COLUMN = "image"
PATH_COLUMN = "path"


def signature(spec: ModelSpec) -> ModelSignature:
    """Input: image bytes or a path per row; output: one double per attribute."""
    inputs = Schema([ColSpec("binary", IMAGE_COLUMN, required=False), ColSpec("string", PATH_COLUMN, required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", name) for name in spec.attributes]))


def images_from_frame(frame: pd.DataFrame, size: int) -> np.ndarray:
    """Decode each row's `image` bytes (or else its `path`) into a uint8 (N, size, size, 3) array.

    Every unusable row is named (index and rule) in one ValueError: a batch is answered whole or not at
    all, never with rows silently dropped."""
    if IMAGE_COLUMN not in frame and PATH_COLUMN not in frame:
        raise ValueError(f"input needs a column {IMAGE_COLUMN!r} (bytes) or {PATH_COLUMN!r}; got {list(frame.columns)}")
    sources: list[Path | bytes] = []
    for row in frame.to_dict("records"):
        source = row.get(IMAGE_COLUMN)
        missing = source is None or (isinstance(source, float) and np.isnan(source))
        sources.append(Path(str(row.get(PATH_COLUMN))) if missing else bytes(source))
    images, _, problems = load_images(sources, size)
    if problems:
        raise ValueError(problems_message(problems, len(frame), unit="row", numbered=True))
    return images


def ratings_frame(ratings: np.ndarray, spec: ModelSpec) -> pd.DataFrame:
    return pd.DataFrame(ratings.astype(np.float64), columns=spec.attributes)


class AttributePyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: image bytes or paths in, ratings out (preprocessing included)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.net, self.spec = load_trained(Path(context.artifacts["weights"]), Path(context.artifacts["spec"]))

    def predict(self, context: object, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            images = images_from_frame(model_input, self.spec.image_size)
        except ValueError as error:  # a caller's mistake: HTTP 400 with the reason when served
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        return ratings_frame(predict_ratings(self.net, self.spec, images), self.spec)
