"""Stage `prepare`: decode and resize every image once into a compact uint8 array.

Training then reads one memory-mappable array instead of decoding JPEG/PNG files every epoch (the
published peer's main cost). Region masks (and human attention masks) are packed the same way, with
nearest-neighbour resizing so their bits survive.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from psyface.config import load_section
from psyface.dataset.layout import DATA_DIR, DatasetSpec, Masks, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.images import ImageProblem, load_image
from psyface.io import replace_dir_atomic
from psyface.split import SPLIT_FILE, SPLITS

PREPARED_DIR = Path("artifacts/prepared")


@dataclass
class PrepareParams:
    image_size: int = 64


@dataclass
class Prepared:
    """The arrays `prepare` writes; row i of every field is the same image."""

    images: np.ndarray
    table: pd.DataFrame
    masks: np.ndarray | None = None
    attention: np.ndarray | None = None

    def split(self, name: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.table["split"].to_numpy() == name)


def pack_masks(spec: DatasetSpec, masks: Masks, ids: list[str], size: int) -> np.ndarray:
    """Region bitfields of `ids`, resized with nearest neighbour (bits must not be blended)."""
    packed = np.zeros((len(ids), size, size), dtype=np.uint8)
    for row, image_id in enumerate(tqdm(ids, desc="prepare: masks", unit="img")):
        path = spec.root / masks.template.format(id=image_id)
        try:
            with Image.open(path) as mask:
                packed[row] = np.asarray(mask.convert("L").resize((size, size), Image.Resampling.NEAREST))
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


def save(prepared: Prepared, folder: Path, dataset: str) -> None:
    def fill(tmp: Path) -> None:
        np.save(tmp / "images.npy", prepared.images)
        prepared.table.to_csv(tmp / "table.csv", index=False)
        if prepared.masks is not None:
            np.save(tmp / "masks.npy", prepared.masks)
        if prepared.attention is not None:
            np.save(tmp / "attention.npy", prepared.attention)
        counts = prepared.table["split"].value_counts()
        meta = {
            "dataset": dataset,
            "image_size": int(prepared.images.shape[1]),
            "n": len(prepared.table),
            "counts": {name: int(counts.get(name, 0)) for name in SPLITS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    replace_dir_atomic(folder, fill)


def load_prepared(folder: Path = PREPARED_DIR, mmap: bool = True) -> Prepared:
    """Read what `prepare` wrote (images memory-mapped: no copy until used)."""
    if not (folder / "meta.json").is_file():
        raise PsyfaceError(f"{folder} is incomplete or missing: run `dvc repro prepare`")
    mode = "r" if mmap else None
    optional = {name: folder / f"{name}.npy" for name in ("masks", "attention")}
    return Prepared(
        images=np.load(folder / "images.npy", mmap_mode=mode),
        table=pd.read_csv(folder / "table.csv", dtype={"id": str}),
        **{name: np.load(path, mmap_mode=mode) if path.exists() else None for name, path in optional.items()},
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="psyface prepare", description=__doc__.split("\n\n")[0]).parse_args(argv)
    params = load_section("prepare", PrepareParams)
    if params.image_size < 32:
        raise PsyfaceError(f"prepare.image_size must be at least 32 (VGG16 pools 5 times), got {params.image_size}")
    spec = load_dataset(DATA_DIR)
    if not SPLIT_FILE.is_file():
        raise PsyfaceError(f"{SPLIT_FILE} not found: run `dvc repro split` first")
    assignment = pd.read_csv(SPLIT_FILE, dtype={"id": str})
    prepared = prepare(spec, assignment, params.image_size)
    save(prepared, PREPARED_DIR, spec.name)
    megabytes = prepared.images.nbytes / 2**20
    print(f"prepare: {len(prepared.table)} images at {params.image_size}px -> {PREPARED_DIR}/images.npy "
          f"({megabytes:.1f} MiB)" + (", masks packed" if prepared.masks is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
