"""Importing 1,000 1024-px JPEGs: the old path (decode, re-encode as PNG, one process) vs the new one
(verify, keep the original file; all cores), side by side in one run, with the floor of just
reading the files. Prints images/s and bytes stored per image.

    PYTHONPATH=src python benchmarks/bench_import.py [N_IMAGES [N_OLD]]

The old path is timed on the first N_OLD images (default 100: at ~1-3 images/s the whole set would
take ten minutes; its cost per image is steady, so its rate is what the ratio needs).

The JPEGs are 16 distinct synthetic faces rendered at 512 px, upscaled to 1024 px with per-image
noise (quality 90, ~photo-sized files), written once into a temporary folder; every path reads the
same files from the page cache, so the comparison is like for like.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from psyface.dataset.importers import ImportPlan, default_workers, import_images
from psyface.dataset.synth import SynthConfig, render, sample_face, sample_identity
from psyface.images import decode_image

SIZE = 1024


def make_jpegs(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    bases = []
    for person in range(16):
        identity = sample_identity(np.random.default_rng([0, person]))
        _, face = sample_face(identity, np.random.default_rng([0, person, 1]))
        image, _, _ = render(face, 512, SynthConfig().pixel_noise)
        bases.append(np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.int16))
    ids = [f"face{i:04d}" for i in range(n)]
    for i, image_id in enumerate(tqdm(ids, desc="bench: writing JPEGs", unit="img")):
        noisy = np.clip(bases[i % 16] + rng.integers(-3, 4, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{image_id}.jpg", "JPEG", quality=90)
    return ids


def old_path(source: Path, ids: list[str], out: Path) -> None:
    """What `psyface import` did before: decode every file and write it as PNG, serially."""
    out.mkdir()
    for image_id in tqdm(ids, desc="old: re-encode PNG", unit="img"):
        decode_image(source / f"{image_id}.jpg", min_side=1).save(out / f"{image_id}.png", "PNG")


def stored_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    n_old = min(n, int(sys.argv[2]) if len(sys.argv) > 2 else 100)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        ids = make_jpegs(root / "src", n)
        source_bytes = stored_bytes(root / "src")
        plan = ImportPlan(name="bench", table=pd.DataFrame({"id": ids}), id_column="id", images_dir=root / "src",
                          filename_template="{id}.jpg", attributes=[], sensitive=[], labels=[], scale=(1.0, 7.0))
        rows = []

        start = time.perf_counter()
        for image_id in ids:
            (root / "src" / f"{image_id}.jpg").read_bytes()
        rows.append(("read the files only (floor)", time.perf_counter() - start, None))

        start = time.perf_counter()
        old_path(root / "src", ids[:n_old], root / "old")
        old = time.perf_counter() - start
        rows.append((f"old: decode + PNG, 1 process ({n_old} images)", old * n / n_old,
                     stored_bytes(root / "old") * n / n_old))

        workers = default_workers()
        for label, copy in ((f"new: verify + copy, {workers} processes", True),
                            (f"new: verify + hard-link, {workers} processes", False)):
            out = root / ("copy" if copy else "link")
            start = time.perf_counter()
            plan.copy = copy
            counts, problems = import_images(plan, ids, out, workers)
            rows.append((label, time.perf_counter() - start, stored_bytes(out)))
            assert not problems and sum(counts.values()) == n, (counts, problems)

    print(f"\nimport of {n} {SIZE}-px JPEGs ({source_bytes / n / 1e3:.0f} kB each) on {cpu_name()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'path':<48}{'images/s':>10}{'kB stored/image':>17}{'vs old':>8}")
    old_seconds = rows[1][1]
    for label, seconds, stored in rows:
        kb = "-" if stored is None else f"{stored / n / 1e3:.0f}"
        print(f"{label:<48}{n / seconds:>10.1f}{kb:>17}{old_seconds / seconds:>7.1f}x")
    print("(hard-linked files share the originals' blocks: their kB are not new disk use)")


if __name__ == "__main__":
    main()
