"""`psyface explain`: attribution maps of a registered model for any face images.

    psyface explain --model models:/psyface-vgg16@champion --method gradcam --attribute trustworthy \
        face1.jpg face2.png --out explanations/

Needs nothing but the model store: the image size and attribute names come with the model. Writes,
per image and attribute, an overlay `{stem}_{method}_{attribute}.png` and the raw float32 map
`{stem}_{method}_{attribute}.npy` (signed, H x W at the model's input size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from psyface.errors import PsyfaceError, entry_point
from psyface.explain.methods import METHODS, MethodOptions, attribute
from psyface.explain.scores import relevance
from psyface.images import ImageProblem, load_image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="psyface explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="face images (any format PIL reads)")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
    parser.add_argument("--method", choices=METHODS, default="gradcam")
    parser.add_argument(
        "--attribute", action="append", dest="attributes", metavar="NAME", help="repeatable; default: every attribute"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the overlays and raw maps")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from psyface.explain.figures import overlay, save_png
    from psyface.model import to_input
    from psyface.tracking import load_model

    net, spec = load_model(args.model, args.tracking_uri)
    wanted = args.attributes or spec.attributes
    unknown = [name for name in wanted if name not in spec.attributes]
    if unknown:
        raise PsyfaceError(f"unknown attribute(s) {unknown}; {args.model} predicts {spec.attributes}")
    columns = [spec.attributes.index(name) for name in wanted]
    try:
        images = np.stack([load_image(path, spec.image_size) for path in args.files])
    except ImageProblem as problem:
        raise PsyfaceError(str(problem)) from None
    maps = attribute(net, to_input(images).contiguous(), args.method, MethodOptions())
    magnitudes = relevance(maps).numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    for row, (path, image) in enumerate(zip(args.files, images, strict=True)):
        for name, column in zip(wanted, columns, strict=True):
            stem = args.out / f"{path.stem}_{args.method}_{name}"
            np.save(stem.with_suffix(".npy"), maps[row, column].numpy())
            save_png(stem.with_suffix(".png"), overlay(image, magnitudes[row, column]))
    print(f"psyface explain: {len(args.files)} image(s) x {len(wanted)} attribute(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
