"""Stage `prepare`: decode and resize every image once into a compact uint8 array.

Training then reads one memory-mappable array instead of decoding JPEG/PNG files every epoch (the
published peer's main cost). Region masks (and human attention masks) are packed the same way, with
nearest-neighbour resizing so their bits survive.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from psyface.artifacts import PREPARED_DIR, Prepared, read_split, save_prepared
from psyface.config import Bound, load_section
from psyface.dataset.layout import DATA_DIR, DatasetSpec, Masks, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.images import ImageProblem, load_image, resize_bitfield


@dataclass
class PrepareParams:
    image_size: Annotated[int, Bound(32)] = 64  # VGG16 pools 5 times


def pack_masks(spec: DatasetSpec, masks: Masks, ids: list[str], size: int) -> np.ndarray:
    """Region bitfields of `ids`, resized to cover every pixel the face resize blends them into."""
    packed = np.zeros((len(ids), size, size), dtype=np.uint8)
    for row, image_id in enumerate(tqdm(ids, desc="prepare: masks", unit="img")):
        path = spec.root / masks.template.format(id=image_id)
        try:
            with Image.open(path) as mask:
                packed[row] = resize_bitfield(np.asarray(mask.convert("L")), size)
        except OSError as error:
            raise PsyfaceError(f"mask of {image_id!r} unreadable at {path}: {error}") from None
    return packed


def prepare(spec: DatasetSpec, assignment: pd.DataFrame, size: int) -> Prepared:
    """Decode the split rows' images (and masks) into arrays aligned with their table rows."""
    ratings = spec.read_ratings()
    table = assignment.merge(ratings, left_on="id", right_on=spec.id_column, how="left", validate="1:1")
    if spec.id_column != "id":
        table = table.drop(columns=[spec.id_column])
    ids = table["id"].tolist()
    images = np.zeros((len(ids), size, size, 3), dtype=np.uint8)
    for row, image_id in enumerate(tqdm(ids, desc="prepare: images", unit="img")):
        try:
            images[row] = load_image(spec.image_path(image_id), size)
        except ImageProblem as problem:
            raise PsyfaceError(f"{problem} (rule {problem.reason}); run the validate stage") from None
    masks = pack_masks(spec, spec.masks, ids, size) if spec.masks else None
    attention = pack_masks(spec, spec.human_attention, ids, size) if spec.human_attention else None
    return Prepared(images, table, masks, attention)


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="psyface prepare", description=__doc__.split("\n\n")[0]).parse_args(argv)
    params = load_section("prepare", PrepareParams)
    spec = load_dataset(DATA_DIR)
    assignment = read_split()
    prepared = prepare(spec, assignment, params.image_size)
    save_prepared(prepared, PREPARED_DIR, spec.name)
    megabytes = prepared.images.nbytes / 2**20
    print(f"prepare: {len(prepared.table)} images at {params.image_size}px -> {PREPARED_DIR}/images.npy "
          f"({megabytes:.1f} MiB)" + (", masks packed" if prepared.masks is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
