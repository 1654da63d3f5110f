"""Tiny datasets in the canonical layout, built in a test's tmp folder (reusable by any test)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from psyface.dataset.layout import Attribute, DatasetSpec

SEXES = ("female", "male")
EXPRESSIONS = ("neutral", "smile")


def draw_face(size: int = 40, shade: int = 0) -> Image.Image:
    """A cartoon face: enough structure to be a real RGB image, cheap to draw."""
    image = Image.new("RGB", (size, size), (200 - shade % 50, 180, 160 + shade % 60))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size - size // 8, size - size // 8), fill=(230, 190, 160))
    draw.ellipse((size // 3 - 2, size // 3, size // 3 + 2, size // 3 + 3), fill=(20, 20, 20))
    draw.ellipse((2 * size // 3 - 2, size // 3, 2 * size // 3 + 2, size // 3 + 3), fill=(20, 20, 20))
    draw.line((size // 3, 2 * size // 3, 2 * size // 3, 2 * size // 3), fill=(120, 40, 40), width=2)
    return image


def make_ratings(rows: int, attributes: tuple[str, ...]) -> pd.DataFrame:
    """A deterministic ratings table: ids f000..., attribute means inside [1, 7], two categories."""
    table = pd.DataFrame({"id": [f"f{i:03d}" for i in range(rows)]})
    for k, attribute in enumerate(attributes):
        table[attribute] = [round(1.5 + ((i * (k + 3)) % 11) / 2, 2) for i in range(rows)]
    table["gender"] = [SEXES[i % 2] for i in range(rows)]
    table["expression"] = [EXPRESSIONS[(i // 2) % 2] for i in range(rows)]
    return table


def make_dataset(
    root: Path,
    rows: int = 4,
    size: int = 40,
    attributes: tuple[str, ...] = ("happy", "trustworthy"),
    scale: tuple[float, float] = (1.0, 7.0),
) -> DatasetSpec:
    """Write dataset.yaml, ratings.csv and one PNG per row under `root`; return the spec."""
    root.mkdir(parents=True, exist_ok=True)
    spec = DatasetSpec(
        name="tiny",
        attributes={name: Attribute(scale=scale) for name in attributes},
        sensitive_features={"gender": list(SEXES)},
        labels={"expression": list(EXPRESSIONS)},
        root=root,
    )
    spec.write(root)
    table = make_ratings(rows, attributes)
    table.to_csv(spec.ratings_path, index=False)
    (root / "images").mkdir(exist_ok=True)
    for i, image_id in enumerate(table["id"]):
        draw_face(size, shade=i * 7).save(spec.image_path(image_id))
    return spec


def write_table(spec: DatasetSpec, table: pd.DataFrame) -> None:
    """Replace the ratings table (tests edit a copy of `read_table` and write it back)."""
    table.to_csv(spec.ratings_path, index=False)


def read_table(spec: DatasetSpec) -> pd.DataFrame:
    """The ratings table as text, the way a test edits it."""
    return pd.read_csv(spec.ratings_path, dtype=str)
