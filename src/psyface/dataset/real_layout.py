"""A synthetic set laid out the way a lab hands one over, to test `psyface import` on: the generator's
faces as JPEG in a folder reached through a symlink, the raw ratings as a long table (one row per
rating, some ratings missing), the mean table as a semicolon-separated, decimal-comma spreadsheet
export, and no masks or landmarks.

    OUT/
      shared_drive/faces/{id}.jpg   the photos (quality 90)
      faces -> shared_drive/faces   the symlink a user would import from
      ratings_long.csv              id, rater, attribute, rating, trial_type
      ratings_means.csv             id;happy;...;group;gender;age_band (decimal commas)

Faces, demographics and raters are those of `psyface synth` with the same settings (the same
seeded draws), so the injected rater bias and the known rater noise carry over.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from psyface.dataset.synth import (
    SynthConfig,
    _demographics,
    impressions,
    parse_args,
    render,
    sample_face,
    sample_identity,
    simulate_raters,
)
from psyface.errors import PsyfaceError, entry_point
from psyface.io import output_folder

FACES_LINK = "faces"
LONG_FILE = "ratings_long.csv"
MEANS_FILE = "ratings_means.csv"
MISSING_RATINGS = 0.1  # share of (face, rater) ratings left out, as in real sets
JPEG_QUALITY = 90


def write_real_layout(out: Path, config: SynthConfig, progress: bool = True) -> dict[str, Path]:
    """Write the set into `out` (must not exist); returns the paths a user passes to `psyface import`."""
    folder = out / "shared_drive" / "faces"
    folder.mkdir(parents=True)
    faces, rows = [], []
    total = config.n_identities * config.images_per_identity
    bar = tqdm(total=total, desc="synth: real-layout faces", unit="face", disable=not progress)
    for person in range(config.n_identities):
        identity = sample_identity(np.random.default_rng([config.seed, person]))
        for shot in range(config.images_per_identity):
            _, face = sample_face(identity, np.random.default_rng([config.seed, person, shot + 1]))
            image_id = f"p{person:04d}_{shot}"
            image, _, _ = render(face, config.size, config.pixel_noise)
            Image.fromarray(image).save(folder / f"{image_id}.jpg", "JPEG", quality=JPEG_QUALITY)
            faces.append(face)
            rows.append({"id": image_id, **_demographics(face)})
            bar.update()
    bar.close()
    (out / FACES_LINK).symlink_to(Path("shared_drive") / "faces", target_is_directory=True)
    table = pd.DataFrame(rows)
    rater_rng = np.random.default_rng([config.seed, 1_000_003])
    ratings = simulate_raters(impressions(faces), table["group"], config, rater_rng)
    keep = np.random.default_rng([config.seed, 2_000_003])
    long = []
    for attribute, values in ratings.items():
        face_index, rater = np.nonzero(keep.random(values.shape) >= MISSING_RATINGS)
        long.append(pd.DataFrame({"id": table["id"].to_numpy()[face_index], "rater": [f"r{r:02d}" for r in rater],
                                  "attribute": attribute, "rating": values[face_index, rater].astype(int),
                                  "trial_type": "main"}))
    long_table = pd.concat(long, ignore_index=True)
    long_table.to_csv(out / LONG_FILE, index=False)
    means = long_table.pivot_table(index="id", columns="attribute", values="rating", aggfunc="mean", sort=False)
    means = table[["id"]].join(means[list(ratings)], on="id")
    means = means.join(table.set_index("id")[["group", "gender", "age_band"]], on="id")
    means.to_csv(out / MEANS_FILE, sep=";", decimal=",", index=False, float_format="%.3f")
    return {"images": out / FACES_LINK, "ratings": out / MEANS_FILE, "ratings_long": out / LONG_FILE}


@entry_point
def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv, prog="psyface synth-real", description=__doc__.split("\n\n")[0])
    out: Path = output_folder(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise PsyfaceError(f"{out} exists and is not empty; pass --force to replace it")
    staging = out.with_name(f".{out.name}.synth-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_real_layout(staging, config)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    n = config.n_identities * config.images_per_identity
    print(f"wrote {n} faces at {config.size}px in the layout a lab hands over to {out}/ (no masks, no landmarks)")
    print(f"import it: psyface import generic --images {out / FACES_LINK} --ratings {out / MEANS_FILE} "
          f"--ratings-long {out / LONG_FILE} --rater-column rater --id-column id --filename-template '{{id}}.jpg' "
          f"--sensitive group gender age_band --scale 1 7 --out data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
