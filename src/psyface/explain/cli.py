"""`psyface explain`: attribution maps of a registered model for any face images.

    psyface explain --model models:/psyface-vgg16@champion --method gradcam --attribute trustworthy \
        face1.jpg face2.png --out explanations/

Needs nothing but the model store: the image size and attribute names come with the model. The CAM
methods' layers are `--layer`'s, else those the `explain` section of a `params.yaml` in the working
directory sets (in a psyface project: the stage's, so the maps are the ones its verdict scored), else
the last convolution. Writes,
per image and attribute, an overlay `{stem}_{method}_{attribute}.png` and the raw float32 map
`{stem}_{method}_{attribute}.npy` (signed, H x W at the model's input size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psyface.config import PARAMS_FILE, from_dict, read_yaml
from psyface.errors import PsyfaceError, entry_point
from psyface.explain.methods import METHODS, MethodOptions, attribute
from psyface.explain.scores import relevance
from psyface.images import load_images, problems_message
from psyface.io import output_folder, write_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="psyface explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="face images (any format PIL reads)")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
    parser.add_argument("--method", choices=METHODS, default="gradcam")
    parser.add_argument(
        "--attribute", action="append", dest="attributes", metavar="NAME", help="repeatable; default: every attribute"
    )
    parser.add_argument("--layer", default=None, help="the CAM methods' layer (a VGG name such as conv3_3, or last); "
                        "default: params.yaml's explain.options in this folder, else last")
    parser.add_argument("--out", type=Path, required=True, help="folder for the overlays and raw maps")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    return parser.parse_args(argv)


def cam_options(layer: str | None, params: Path = PARAMS_FILE) -> MethodOptions:
    """`--layer` for every CAM method; else the options the project's params.yaml gives the explain stage
    (gradcam_layer and each method's own cam_layers); else MethodOptions' defaults (the last convolution)."""
    if layer is not None:
        return MethodOptions(gradcam_layer=layer)
    section = (read_yaml(params).get("explain") or {}) if params.exists() else {}
    return from_dict(MethodOptions, section.get("options") or {}, where=f"{params}:explain.options")


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_folder(args.out)
    from psyface.explain.figures import overlay, save_npy, save_png
    from psyface.model import to_input
    from psyface.tracking import load_model

    net, spec = load_model(args.model, args.tracking_uri)
    wanted = args.attributes or spec.attributes
    unknown = [name for name in wanted if name not in spec.attributes]
    if unknown:
        raise PsyfaceError(f"unknown attribute(s) {unknown}; {args.model} predicts {spec.attributes}")
    columns = [spec.attributes.index(name) for name in wanted]
    images, loaded, problems = load_images(args.files, spec.image_size)
    if not loaded:
        raise PsyfaceError(problems_message(problems, len(args.files)))
    options = cam_options(args.layer)
    maps = attribute(net, to_input(images, "cpu", spec.input_mean, spec.input_std).contiguous(), args.method, options)
    magnitudes = relevance(maps).numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    for row, (path, image) in enumerate(zip(loaded, images, strict=True)):
        for name, column in zip(wanted, columns, strict=True):
            stem = args.out / f"{path.stem}_{args.method}_{name}"
            raw, picture = maps[row, column].numpy(), overlay(image, magnitudes[row, column])
            write_atomic(stem.with_suffix(".npy"), lambda tmp, raw=raw: save_npy(tmp, raw))
            write_atomic(stem.with_suffix(".png"), lambda tmp, picture=picture: save_png(tmp, picture))
    print(f"psyface explain: {len(loaded)} image(s) x {len(wanted)} attribute(s) -> {args.out}")
    if problems:  # the usable files are explained above; the run still fails so no script misses the rest
        raise PsyfaceError(problems_message(problems, len(args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
