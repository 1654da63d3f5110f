"""The canonical dataset layout under `data/` and its `dataset.yaml` description.

Every data source (the synthetic generator, `psyface import generic`, `psyface import us10k`) writes
this layout, and every stage reads it through `DatasetSpec`, so nothing downstream knows where the
faces came from:

    data/
      dataset.yaml          what the columns mean (this module's schema)
      ratings.csv           one row per image: id, attribute means, sensitive features, labels
      images/{id}.png       the faces (template configurable; `{ext}` in it stands for whichever of
                            IMAGE_EXTENSIONS exists, so imported originals keep their own format)
      masks/{id}.png        optional: uint8 bitfield, bit k set where `masks.regions[k]` is
      landmarks.csv         optional: id, x0, y0, x1, y1, ... in image pixel coordinates
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from psyface.config import from_dict, read_yaml
from psyface.errors import PsyfaceError
from psyface.io import read_csv_checked

DATASET_FILE = "dataset.yaml"
DATA_DIR = Path("data")  # the DVC-tracked dataset every stage reads (data.dvc)
# What `{ext}` in an image template may be: the importer keeps JPEG and PNG originals as they are and
# re-encodes everything else to PNG, so these two cover every imported image.
IMAGE_EXTENSIONS = ("jpg", "png")


@dataclass(frozen=True)
class Attribute:
    """A rated attribute: its rating scale and (when known) the facial regions that cause it.

    `rating_biases` names sensitive features the ratings are known to depend on whatever the face
    shows (a rater bias): their visible cues (skin tone, hair) tell a model about the rating from
    outside the regions, so the ground-truth check reports the attribute with them partialled out.
    """

    scale: tuple[float, float]
    regions: list[str] = field(default_factory=list)
    description: str = ""
    rating_biases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Masks:
    """Per-image region masks: `template` names a uint8 PNG whose bit k marks `regions[k]`."""

    template: str = "masks/{id}.png"
    regions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Landmarks:
    """Landmark coordinates in one CSV: `id, x0, y0, ...`; `regions` maps names to point indices."""

    file: str = "landmarks.csv"
    n_points: int = 0
    regions: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """The parsed `dataset.yaml`. `root` is the folder it was read from."""

    name: str
    attributes: dict[str, Attribute]
    id_column: str = "id"
    image_template: str = "images/{id}.png"
    ratings_file: str = "ratings.csv"
    identity_column: str | None = None
    sensitive_features: dict[str, list[str]] = field(default_factory=dict)
    intersections: list[list[str]] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)
    reliability: dict[str, float] = field(default_factory=dict)
    aligned: bool = False
    masks: Masks | None = None
    human_attention: Masks | None = None
    landmarks: Landmarks | None = None
    source: dict[str, Any] = field(default_factory=dict)
    root: Path = Path("data")

    @property
    def attribute_names(self) -> list[str]:
        return list(self.attributes)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    @property
    def has_landmarks(self) -> bool:
        return self.landmarks is not None

    @property
    def ratings_path(self) -> Path:
        return self.root / self.ratings_file

    def image_path(self, image_id: str) -> Path:
        """Path of an image; refuses ids that would lie outside the dataset folder. With `{ext}` in the
        template, the first of IMAGE_EXTENSIONS that exists (the first one when none does)."""
        if "{ext}" not in self.image_template:
            return _inside(self.root, self.image_template.format(id=image_id), image_id)
        candidates = [_inside(self.root, self.image_template.format(id=image_id, ext=ext), image_id)
                      for ext in IMAGE_EXTENSIONS]
        return next((path for path in candidates if path.is_file()), candidates[0])

    def mask_path(self, image_id: str) -> Path:
        if self.masks is None:
            raise PsyfaceError(f"dataset {self.name!r} declares no masks")
        return _inside(self.root, self.masks.template.format(id=image_id), image_id)

    def attribute_mask(self, bitfield: np.ndarray, attribute: str) -> np.ndarray:
        """Boolean mask of the regions that cause `attribute`, from a region bitfield array."""
        if self.masks is None:
            raise PsyfaceError(f"dataset {self.name!r} declares no masks")
        bits = 0
        for region in self.attributes[attribute].regions:
            bits |= 1 << self.masks.regions.index(region)
        return (bitfield & bits) != 0

    def read_ratings(self) -> pd.DataFrame:
        """The ratings table with ids as strings; a missing file or id column is a clear error."""
        path = self.ratings_path
        table = read_csv_checked(path, dtype={self.id_column: str}, keep_default_na=True)
        if self.id_column not in table.columns:
            raise PsyfaceError(
                f"{path}: id column {self.id_column!r} missing; columns found: {list(table.columns)}"
            )
        return table

    def to_yaml_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("root")
        for key in ("masks", "human_attention", "landmarks", "identity_column"):
            if data[key] is None:
                data.pop(key)
        for attribute in data["attributes"].values():
            attribute["scale"] = list(attribute["scale"])
        return data

    def write(self, root: Path) -> Path:
        """Write `dataset.yaml` into `root` (byte-stable: sorted nowhere, insertion order kept)."""
        path = root / DATASET_FILE
        path.write_text(yaml.safe_dump(self.to_yaml_dict(), sort_keys=False), encoding="utf-8")
        return path


def _inside(root: Path, relative: str, image_id: str) -> Path:
    """Resolve `relative` under `root`; ids are names, so absolute paths and `..` are refused."""
    parts = image_id.replace("\\", "/").split("/")
    if image_id.startswith(("/", "\\")) or ".." in parts or Path(image_id).is_absolute():
        raise PsyfaceError(f"id {image_id!r} is an absolute path or contains '..': ids must be plain names")
    base = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(base):
        raise PsyfaceError(f"id {image_id!r} resolves outside the dataset folder {root}")
    return path


def load_dataset(root: Path | str = DATA_DIR) -> DatasetSpec:
    """Read and check `root/dataset.yaml`; every inconsistency is reported with its key."""
    root = Path(root)
    path = root / DATASET_FILE
    if not path.is_file():
        raise PsyfaceError(
            f"{path} not found: generate the default data with `psyface synth --out {root}` "
            f"or import yours with `psyface import ...`"
        )
    raw = read_yaml(path)
    spec = from_dict(DatasetSpec, raw, where=str(path))
    spec = dataclasses.replace(spec, root=root)
    _check(spec, path)
    return spec


def _check(spec: DatasetSpec, path: Path) -> None:
    if not spec.attributes:
        raise PsyfaceError(f"{path}: declares no attributes")
    for name, attribute in spec.attributes.items():
        low, high = attribute.scale
        if not low < high:
            raise PsyfaceError(f"{path}: attributes.{name}.scale must be [low, high], got {attribute.scale}")
        known = spec.masks.regions if spec.masks else []
        unknown = [r for r in attribute.regions if spec.masks and r not in known]
        if unknown:
            raise PsyfaceError(f"{path}: attributes.{name}.regions {unknown} not in masks.regions {known}")
        undeclared = [f for f in attribute.rating_biases if f not in spec.sensitive_features]
        if undeclared:
            raise PsyfaceError(f"{path}: attributes.{name}.rating_biases {undeclared} are not sensitive_features "
                               f"{list(spec.sensitive_features)}")
    if "{id}" not in spec.image_template:
        raise PsyfaceError(f"{path}: image_template must contain {{id}}, got {spec.image_template!r}")
    template_parts = spec.image_template.replace("\\", "/").split("/")
    if Path(spec.image_template).is_absolute() or ".." in template_parts:
        raise PsyfaceError(f"{path}: image_template must be a path inside the dataset folder, got {spec.image_template!r}")
    try:
        spec.image_template.format(id="x", ext="png")
    except (KeyError, IndexError, ValueError) as error:
        raise PsyfaceError(f"{path}: image_template may only use {{id}} and {{ext}}, got {spec.image_template!r} "
                           f"({error})") from None
    overlap = set(spec.attributes) & (set(spec.sensitive_features) | set(spec.labels))
    if overlap:
        raise PsyfaceError(f"{path}: {sorted(overlap)} declared both as attribute and as category")
    for combo in spec.intersections:
        missing = [f for f in combo if f not in spec.sensitive_features]
        if missing:
            raise PsyfaceError(f"{path}: intersection {combo} names undeclared sensitive features {missing}")
