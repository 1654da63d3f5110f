"""The bad-input corpus (issue 7), generated on demand so no binary blobs live in git.

Each writer makes one kind of awkward image file at `path`. `IMAGE_CASES` maps a case name to its
writer and the outcome the image loader must give: "ok" for inputs that are converted, otherwise the
`ImageProblem.reason` they are rejected with.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from factories import draw_face
from PIL import Image


def truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    draw_face(64).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def not_an_image(path: Path) -> None:
    path.write_text("id,happy\nthis is a CSV, not a picture\n", encoding="utf-8")


def cmyk_jpeg(path: Path) -> None:
    draw_face(40).convert("CMYK").save(path, "JPEG")


def greyscale(path: Path) -> None:
    draw_face(40).convert("L").save(path, "PNG")


def rgba_png(path: Path) -> None:
    image = draw_face(40).convert("RGBA")
    image.putalpha(128)
    image.save(path, "PNG")


def palette_png(path: Path) -> None:
    draw_face(40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, "PNG")


def sixteen_bit_png(path: Path) -> None:
    array = (np.asarray(draw_face(40).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(array).save(path, "PNG")  # uint16 array: PIL writes a 16-bit greyscale PNG


def one_pixel(path: Path) -> None:
    Image.new("RGB", (1, 1), (128, 128, 128)).save(path, "PNG")


def decompression_bomb(path: Path) -> None:
    """A PNG whose header claims 30000x30000 px (900 M) with almost no data: cheap to make and read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


IMAGE_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # case: (writer, file suffix, expected outcome)
    "truncated_jpeg": (truncated_jpeg, ".jpg", "undecodable"),
    "empty_file": (empty_file, ".png", "undecodable"),
    "not_an_image": (not_an_image, ".png", "undecodable"),
    "cmyk_jpeg": (cmyk_jpeg, ".jpg", "ok"),
    "greyscale": (greyscale, ".png", "ok"),
    "rgba_png": (rgba_png, ".png", "ok"),
    "palette_png": (palette_png, ".png", "ok"),
    "sixteen_bit_png": (sixteen_bit_png, ".png", "ok"),
    "one_pixel": (one_pixel, ".png", "too_small"),
    "decompression_bomb": (decompression_bomb, ".png", "too_many_pixels"),
}
