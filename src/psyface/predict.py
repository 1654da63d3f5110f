"""`psyface predict`: rate face images with a registered model; and the pyfunc MLflow serves.

The pyfunc takes a DataFrame with an `image` column (bytes; base64 in JSON requests) or a `path`
column, decodes with the one image loader, preprocesses with `to_input` exactly as in training, and
returns one column per attribute on the rating scale. `psyface predict` loads weights through
`tracking.load_model` (safetensors, no unpickling) and accepts only `models:/` URIs unless told
`--allow-any-uri`. A file that cannot be used (undecodable, too small, over the pixel limit) does not
stop the others: the usable ones are rated and written, then every unusable one is named with its
reason and the command exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from psyface.errors import PsyfaceError, entry_point
from psyface.images import load_images, problems_message
from psyface.io import write_atomic
from psyface.model import ModelSpec, load_trained, predict_ratings

IMAGE_COLUMN = "image"
PATH_COLUMN = "path"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
TRUSTED_SCHEMES = ("models:/",)


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


def image_files(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, not recursive)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PsyfaceError(f"{item}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise PsyfaceError(f"{item}: no such file or folder")
    return files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="psyface predict", description="Rate face images with a registered model.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR")
    parser.add_argument("--model", default="models:/psyface-vgg16@champion", help="model URI (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the table to this CSV instead of printing it")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--allow-any-uri", action="store_true", help="accept URIs other than models:/ (only from stores you trust)"
    )
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.startswith(TRUSTED_SCHEMES) and not args.allow_any_uri:
        raise PsyfaceError(f"refusing model URI {args.model!r}: expected models:/NAME@ALIAS (pass --allow-any-uri to override)")
    files = image_files(args.inputs)
    from psyface.tracking import load_model

    net, spec = load_model(args.model)
    images, loaded, problems = load_images(files, spec.image_size)
    if not loaded:
        raise PsyfaceError(problems_message(problems, len(files)))
    table = ratings_frame(predict_ratings(net, spec, images, args.batch_size), spec)
    table.insert(0, "file", [str(path) for path in loaded])
    if args.out:
        write_atomic(args.out, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
        print(f"wrote {len(table)} predictions to {args.out}")
    else:
        table.to_csv(sys.stdout, index=False, float_format="%.4f")
    if problems:  # the usable files are rated above; the run still fails so no script misses the rest
        raise PsyfaceError(problems_message(problems, len(files)))
    return 0


if __name__ == "__main__":
    main()
