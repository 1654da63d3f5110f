"""The one image loader: every stage (validate, prepare, predict, explain) decodes faces through it.

Convertible inputs (CMYK, greyscale, palette/RGBA, 16-bit) become 8-bit RGB; undecodable, tiny or
oversized files raise `ImageProblem` with a reason, so callers can report or quarantine them.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Explicit decompression-bomb limit (PIL's own default would only warn below 2x this).
MAX_IMAGE_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
MIN_IMAGE_SIDE = 16


class ImageProblem(ValueError):
    """An image that cannot be used; `reason` is a short rule name, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(source: Path | bytes, min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Decode a file or bytes into an RGB PIL image, converting what can be converted."""
    return to_rgb(open_image(source, min_side))


RESAMPLING = Image.Resampling.BILINEAR  # how every face is resized (antialiased: it blends neighbours)


def resize_bitfield(bitfield: np.ndarray, size: int) -> np.ndarray:
    """A region bitfield (uint8, bit k = region k) resized like the faces: bit k is set in an output
    pixel when any input pixel the face resize blends into it has bit k. Nearest neighbour would
    drop edge pixels whose blended colour still carries the region's signal, so information about
    an attribute would leak outside its mask."""
    resized = np.zeros((size, size), dtype=np.uint8)
    for bit in range(8):
        plane = ((bitfield >> bit) & 1).astype(np.float32)
        if plane.any():
            blended = np.asarray(Image.fromarray(plane).resize((size, size), RESAMPLING))
            resized |= (blended > 1e-6).astype(np.uint8) << bit
    return resized


def open_image(source: Path | bytes, min_side: int = MIN_IMAGE_SIDE, reduced: bool = False) -> Image.Image:
    """Open and fully decode an image in its own mode (no conversion), mapping every failure to an
    `ImageProblem`. `reduced` lets JPEG decode at 1/8 scale: the whole entropy-coded stream is still
    read (so a truncated or corrupt file fails), at a fraction of the cost; `size` stays the file's."""
    name = str(source) if isinstance(source, Path) else "<bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, bytes) else source
            image = Image.open(handle)
            size = image.size
            if reduced and image.format == "JPEG":
                image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except FileNotFoundError:
        raise ImageProblem("missing_file", f"{name}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageProblem(
            "too_many_pixels", f"{name}: {error} (psyface limit MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS:,})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageProblem("undecodable", f"{name}: cannot decode image ({error})") from None
    if min(size) < min_side:
        raise ImageProblem(
            "too_small", f"{name}: {size[0]}x{size[1]} px is below the minimum side {min_side} px"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparent areas are composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(source: Path | bytes, size: int, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Decode and resize to `size` x `size` (whole image, like the published peer): uint8 HxWx3."""
    image = decode_image(source, min_side=min_side)
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLING)
    return np.asarray(image, dtype=np.uint8)


def load_images(
    sources: list[Path] | list[Path | bytes], size: int
) -> tuple[np.ndarray, list[Path | bytes], list[tuple[int, ImageProblem]]]:
    """Load user images (files or encoded bytes): (uint8 array of the usable ones, their sources,
    (position, problem) of each unusable one).

    One bad image never stops the others; every source ends up in exactly one of the two lists.
    """
    images, loaded, problems = [], [], []
    for position, source in enumerate(sources):
        try:
            images.append(load_image(source, size))
            loaded.append(source)
        except ImageProblem as problem:
            problems.append((position, problem))
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return array, loaded, problems


def problems_message(problems: list[tuple[int, ImageProblem]], total: int, unit: str = "image file",
                     numbered: bool = False) -> str:
    """One paragraph naming every unusable image and the rule it broke. Files name themselves in the
    problem; `numbered` prefixes each with its position (rows of a request, which have no name)."""
    listed = "; ".join(f"{f'{unit} {position}: ' if numbered else ''}[{problem.reason}] {problem}"
                       for position, problem in problems)
    return f"{len(problems)} of {total} {unit}(s) could not be used: {listed}"
