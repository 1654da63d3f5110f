"""`psyface predict`: rate face images with a registered model (the served pyfunc is `serving.py`).

It loads weights through `tracking.load_model` (safetensors, no unpickling) and accepts only
`models:/` URIs unless told `--allow-any-uri`. A file that cannot be used (undecodable, too small, over the pixel limit) does not
stop the others: the usable ones are rated and written, then every unusable one is named with its
reason and the command exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psyface.arguments import positive_int
from psyface.errors import PsyfaceError, entry_point
from psyface.images import load_images, problems_message
from psyface.io import output_file, write_atomic
from psyface.model import predict_ratings
from psyface.serving import ratings_frame

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
TRUSTED_SCHEMES = ("models:/",)


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
    parser.add_argument("--batch-size", type=positive_int, default=64)
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
    if args.out:
        output_file(args.out)
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
