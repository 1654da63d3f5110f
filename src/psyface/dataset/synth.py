"""Deterministic synthetic rated faces with known ground truth: the embedded default dataset.

Real rated-face sets are licensed, so psyface ships a generator good enough to *test the science*:
every rated attribute is a known function of latent factors that are drawn only inside specific
facial regions (so explanations can be scored against masks), raters are simulated with individual
noise and leniency (so the reliability ceiling is known), and one attribute carries an injected
rater bias against one group while a control attribute has no facial signal at all.

Determinism: every random draw comes from a generator seeded by (seed, identity, image), nuisance
draws happen before any latent is used, and files are written with fixed encoder settings, so the
same arguments give byte-identical files (and the committed `data.dvc` matches a fresh run).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy.spatial import ConvexHull
from tqdm import tqdm

from psyface.arguments import argument_type, non_negative_float, non_negative_int, positive_int
from psyface.config import Bound
from psyface.dataset.layout import Attribute, DatasetSpec, Landmarks, Masks
from psyface.errors import PsyfaceError, entry_point
from psyface.io import output_folder, replace_dir_atomic

REGIONS = ["mouth", "brows", "eyes", "jaw", "cheeks", "forehead", "hair"]
EXPRESSIONS = ["neutral", "happy", "sad", "surprised", "angry"]
SCALE = (1.0, 7.0)

# Which latent factors each attribute's impression is made of (weights on standardised latents).
# Each latent is drawn only inside the regions listed in ATTRIBUTES, which the tests verify.
IMPRESSIONS: dict[str, dict[str, float]] = {
    "happy": {"mouth_curve": 1.0},
    "trustworthy": {"mouth_curve": 0.7, "brow_angle": -0.7},
    "dominant": {"jaw_width": 0.8, "brow_angle": 0.6},
    "attractive": {"eye_size": 0.8, "eye_asymmetry": -0.6},
    "age": {"age": 1.0},
    "warm": {"cheek_warmth": 1.0},
    "control": {"hidden": 1.0},
}
ATTRIBUTES: dict[str, Attribute] = {
    "happy": Attribute(SCALE, ["mouth"], "mouth curvature"),
    "trustworthy": Attribute(SCALE, ["brows", "mouth"], "mouth curvature and brow angle"),
    "dominant": Attribute(SCALE, ["jaw", "brows"], "jaw width and brow angle"),
    "attractive": Attribute(SCALE, ["eyes"], "eye size and symmetry"),
    "age": Attribute(SCALE, ["forehead", "hair"], "forehead lines and grey hair"),
    "warm": Attribute(SCALE, ["cheeks"], "cheek colour"),
    "control": Attribute(SCALE, [], "control: rater agreement on nothing visible (no facial signal)"),
}
LATENT_REGIONS = {
    "mouth_curve": ["mouth"],
    "mouth_width": ["mouth"],
    "mouth_open": ["mouth"],
    "brow_angle": ["brows"],
    "brow_raise": ["brows"],
    "brow_pinch": ["brows"],
    "eye_size": ["eyes"],
    "eye_asymmetry": ["eyes"],
    "eye_open": ["eyes"],
    "jaw_width": ["jaw"],
    "cheek_warmth": ["cheeks"],
    "age": ["forehead", "hair"],
    "hidden": [],
}
# Expressions move the face through their own latents (mouth width and opening, brow height and
# pinch, eye opening), which no rated attribute is made of: an expression moves several regions at
# once, so if it also moved an attribute's latent (as a smile's curvature once moved `happy`) the
# brows would tell a model about the mouth's rating, and no mask could hold the whole truth. Drawn
# independently of every attribute, an expression carries no information about any of them, so each
# attribute's information lies inside its own masks (reports/explain/ground_truth.json checks it).
# Each expression's main shift is many SDs of the per-image spread, so landmarks still classify it.
EXPRESSION_EFFECTS: dict[str, dict[str, float]] = {
    "neutral": {},
    "happy": {"mouth_width": 1.8},
    "sad": {"mouth_width": -1.5, "brow_raise": -1.2},
    "surprised": {"mouth_open": 1.3, "brow_raise": 1.3, "eye_open": 0.8},
    "angry": {"brow_pinch": 1.8, "mouth_width": -0.6},
}
# Every latent is clipped to these bounds where it is drawn, so the masks (the hull of the shapes at
# the bounds) cover every pixel it can move.
CLIP = {"mouth_curve": (-2.5, 2.5), "mouth_width": (-2.5, 2.5), "mouth_open": (0.0, 2.5),
        "brow_angle": (-2.5, 2.5), "brow_raise": (-2.0, 2.5), "brow_pinch": (-1.0, 2.5),
        "eye_open": (-1.5, 2.0), "eye_size": (-2.5, 2.5), "eye_asymmetry": (0.0, 2.5)}
LANDMARK_REGIONS = {
    "jaw": list(range(0, 9)),
    "brows": list(range(9, 19)),
    "eyes": list(range(19, 27)),
    "nose": list(range(27, 30)),
    "mouth": list(range(30, 38)),
}


# The canonical face frame is magnified by FRAMING about FACE_CENTRE so the head fills the image from
# hair to chin, as in cropped face databases: at the 64 px training size the mouth, cheeks and eyes
# then span several pixels instead of one or two (which capped what a CNN could read from them).
FRAMING = 1.35
FACE_CENTRE = np.array([0.5, 0.51])


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings; recorded in dataset.yaml so the data documents how it was made."""

    n_identities: int = 500
    images_per_identity: int = 3
    size: int = 128
    raters: int = 20
    rater_noise: float = 0.8
    seed: int = 0
    bias_attribute: str = "trustworthy"
    bias_group: str = "B"
    bias_shift: float = 0.6
    pixel_noise: float = 3.0


@dataclass
class Face:
    """Latent factors of one image: identity traits, expression-driven state and nuisance."""

    identity: dict[str, float]
    state: dict[str, float]
    nuisance: dict[str, float] = field(default_factory=dict)

    def latent(self, name: str) -> float:
        return self.state.get(name, self.identity.get(name, 0.0))


def sample_identity(rng: np.random.Generator) -> dict[str, float]:
    """Traits that stay the same across an identity's images (standardised, roughly N(0,1))."""
    return {
        "jaw_width": float(rng.standard_normal()),
        "eye_size": float(rng.standard_normal()),
        "eye_asymmetry": float(abs(rng.standard_normal())),
        "skin_tone": float(rng.uniform(0.0, 1.0)),
        "hair_length": float(rng.uniform(0.0, 1.0)),
        "hair_hue": float(rng.uniform(0.0, 1.0)),
        "age": float(rng.standard_normal()),
        "cheek_warmth": float(rng.standard_normal()),
        "brow_base": float(rng.standard_normal()),
        "mouth_base": float(rng.standard_normal()),
        "hidden": float(rng.standard_normal()),
    }


def sample_face(identity: dict[str, float], rng: np.random.Generator) -> tuple[str, Face]:
    """One image of an identity: nuisance first (so it never depends on latents), then expression.

    Mouth curvature and brow angle (what `happy`, `trustworthy` and `dominant` are made of) mix the
    identity's resting value with per-image variation and never depend on the expression."""
    nuisance = {
        "bg_r": float(rng.uniform(60, 200)),
        "bg_g": float(rng.uniform(60, 200)),
        "bg_b": float(rng.uniform(60, 200)),
        "light": float(rng.uniform(-0.15, 0.15)),
        "dx": float(rng.uniform(-0.025, 0.025)),
        "dy": float(rng.uniform(-0.025, 0.025)),
        "roll": float(rng.uniform(-4.0, 4.0)),
        "zoom": float(rng.uniform(0.97, 1.03)),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }
    expression = EXPRESSIONS[int(rng.integers(0, len(EXPRESSIONS)))]
    effects = EXPRESSION_EFFECTS[expression]
    state = {
        "mouth_curve": 0.8 * identity["mouth_base"] + 0.6 * rng.standard_normal(),
        "brow_angle": 0.8 * identity["brow_base"] + 0.6 * rng.standard_normal(),
        "mouth_width": effects.get("mouth_width", 0.0) + 0.15 * rng.standard_normal(),
        "mouth_open": effects.get("mouth_open", 0.0) + 0.1 * abs(rng.standard_normal()),
        "brow_raise": effects.get("brow_raise", 0.0) + 0.15 * rng.standard_normal(),
        "brow_pinch": effects.get("brow_pinch", 0.0) + 0.15 * rng.standard_normal(),
        "eye_open": effects.get("eye_open", 0.0) + 0.1 * rng.standard_normal(),
    }
    return expression, Face(identity, {k: float(v) for k, v in state.items()}, nuisance)


# ---------------------------------------------------------------------------------------------
# Rendering: canonical face frame [0,1]^2, transformed by the pose, drawn at 2x and downsampled.
# ---------------------------------------------------------------------------------------------

def _pose(face: Face, size: int):  # noqa: ANN202 - returns a point transform
    n = face.nuisance
    angle = math.radians(n["roll"])
    cos, sin, zoom = math.cos(angle), math.sin(angle), n["zoom"] * FRAMING

    def transform(points: np.ndarray, scale: float = 1.0) -> list[tuple[float, float]]:
        centred = (np.asarray(points, dtype=np.float64) - FACE_CENTRE) * zoom
        x = centred[:, 0] * cos - centred[:, 1] * sin + 0.5 + n["dx"]
        y = centred[:, 0] * sin + centred[:, 1] * cos + 0.5 + n["dy"]
        return [(float(a), float(b)) for a, b in zip(x * size * scale, y * size * scale)]

    return transform


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _head_outline(jaw_width: float) -> np.ndarray:
    """Head contour: fixed cranium on top, jaw half-width set by the jaw latent below eye level."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    half_width = np.where(np.sin(t) > 0, 0.19 + 0.025 * np.clip(jaw_width, -2.5, 2.5), 0.24)
    x = 0.5 + half_width * np.cos(t) * np.where(np.sin(t) > 0, 1 - 0.35 * np.sin(t) ** 2, 1)
    y = 0.50 + np.where(np.sin(t) > 0, 0.36, 0.30) * np.sin(t)
    return np.stack([x, y], axis=1)


def _clip(name: str, value: float) -> float:
    return float(np.clip(value, *CLIP[name]))


def _mouth_curves(curve: float, width: float, opening: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper and lower lip: curvature lifts the corners, width (expressions) moves them sideways."""
    u = np.linspace(-1, 1, 9)
    x = 0.5 + 0.08 * (1 + 0.12 * _clip("mouth_width", width)) * u
    lift = 0.03 * _clip("mouth_curve", curve) * u**2
    upper = np.stack([x, 0.705 - lift - 0.004], axis=1)
    lower = np.stack([x, 0.705 - lift + 0.004 + 0.03 * _clip("mouth_open", opening) * (1 - u**2)], axis=1)
    return upper, lower


def _brow(side: int, angle: float, raise_: float, pinch: float) -> np.ndarray:
    """Brow line; positive angle lowers the inner end (the frowning, 'dominant' brow); raise lifts the
    whole brow and pinch draws the inner end towards the midline (expressions)."""
    inner = np.linspace(1, 0, 5)
    x = 0.5 + side * (np.linspace(0.05, 0.16, 5) - 0.01 * _clip("brow_pinch", pinch) * inner)
    inner_drop = 0.018 * _clip("brow_angle", angle)
    y = 0.405 - 0.01 * _clip("brow_raise", raise_) + inner_drop * np.linspace(1, -1, 5)
    return np.stack([x, y], axis=1)


def _face_brows(face: Face, side: int) -> np.ndarray:
    return _brow(side, face.latent("brow_angle"), face.latent("brow_raise"), face.latent("brow_pinch"))


def _face_mouth(face: Face) -> tuple[np.ndarray, np.ndarray]:
    return _mouth_curves(face.latent("mouth_curve"), face.latent("mouth_width"), face.latent("mouth_open"))


def _skin(face: Face) -> tuple[int, int, int]:
    t = face.identity["skin_tone"]
    light, dark = np.array([236, 200, 172]), np.array([118, 82, 58])
    return tuple(int(v) for v in np.round(light + (dark - light) * t))


def _hair_colour(face: Face) -> tuple[int, int, int]:
    base = np.array([[40, 28, 20], [110, 70, 35], [200, 160, 90]])[int(face.identity["hair_hue"] * 2.999)]
    grey = np.clip((face.identity["age"] + 1.0) / 3.0, 0.0, 1.0)
    return tuple(int(v) for v in np.round(base + (np.array([205, 205, 205]) - base) * grey))


def _hair_shape(length: float) -> np.ndarray:
    bottom = 0.40 + 0.38 * length
    t = np.linspace(np.pi, 2 * np.pi, 24)
    top = np.stack([0.5 + 0.265 * np.cos(t), 0.47 + 0.31 * np.sin(t)], axis=1)
    sides = np.array([[0.765, 0.47], [0.75, bottom], [0.25, bottom], [0.235, 0.47]])
    return np.concatenate([top, sides])


def _hair_cap() -> np.ndarray:
    t = np.linspace(np.pi, 2 * np.pi, 24)
    outer = np.stack([0.5 + 0.25 * np.cos(t), 0.50 + 0.31 * np.sin(t)], axis=1)
    inner = np.stack([0.5 + 0.20 * np.cos(t[::-1]), 0.31 + 0.06 * np.sin(t[::-1])], axis=1)
    return np.concatenate([outer, inner])


def landmarks(face: Face) -> np.ndarray:
    """38 points in the canonical frame (before pose): jaw, brows, eyes, nose, mouth."""
    outline = _head_outline(face.identity["jaw_width"])
    lower = outline[(outline[:, 1] > 0.50)]
    jaw = lower[np.linspace(0, len(lower) - 1, 9).round().astype(int)]
    brows = np.concatenate([_face_brows(face, -1), _face_brows(face, 1)])
    eyes = []
    for side, (rx, ry) in zip((-1, 1), _eye_radii(face)):
        cx = 0.5 + side * 0.105
        eyes.append([[cx - rx, 0.465], [cx, 0.465 - ry], [cx + rx, 0.465], [cx, 0.465 + ry]])
    nose = np.array([[0.5, 0.50], [0.5, 0.60], [0.5, 0.615]])
    upper, lower_lip = _face_mouth(face)
    mouth = np.concatenate([upper[[0, 2, 4, 6, 8]], lower_lip[[6, 4, 2]]])
    return np.concatenate([jaw, brows, np.asarray(eyes).reshape(-1, 2), nose, mouth])


def _eye_radii(face: Face) -> list[tuple[float, float]]:
    return _radii(face.identity["eye_size"], face.identity["eye_asymmetry"], face.latent("eye_open"))


def _radii(eye_size: float, eye_asymmetry: float, eye_open: float) -> list[tuple[float, float]]:
    """(rx, ry) of the left and right eye: asymmetry makes the right eye the larger one (relational:
    it is read by comparing both eyes, which is why `attractive`'s mask holds both)."""
    size = 1 + 0.2 * _clip("eye_size", eye_size)
    asym = 0.2 * _clip("eye_asymmetry", eye_asymmetry)
    openness = 1 + 0.25 * _clip("eye_open", eye_open)
    return [(0.040 * size * (1 + s * asym / 2), 0.022 * size * (1 + s * asym / 2) * openness) for s in (-1, 1)]


def render(face: Face, size: int, pixel_noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (uint8 HxWx3), region bitfield mask (uint8 HxW) and landmarks (38x2, pixels)."""
    big = 2 * size
    to_big = _pose(face, big)
    skin = _skin(face)
    canvas = Image.new("RGB", (big, big), tuple(int(face.nuisance[k]) for k in ("bg_r", "bg_g", "bg_b")))
    draw = ImageDraw.Draw(canvas)
    hair = _hair_colour(face)
    draw.polygon(to_big(_hair_shape(face.identity["hair_length"])), fill=hair)
    draw.polygon(to_big(_head_outline(face.identity["jaw_width"])), fill=skin)
    draw.polygon(to_big(_hair_cap()), fill=hair)
    line_colour = tuple(int(c * 0.72) for c in skin)
    for k in range(int(np.clip(np.round(1.5 * (face.identity["age"] + 1.2)), 0, 4))):
        y = 0.335 + 0.012 * k
        draw.line(to_big(np.array([[0.42, y + 0.004], [0.5, y], [0.58, y + 0.004]])), fill=line_colour,
                  width=max(1, big // 128))
    blush = np.array([200, 40, 60])
    warmth = float(np.clip(0.5 + 0.25 * face.identity["cheek_warmth"], 0.0, 1.0)) * 0.55
    cheek = tuple(int(v) for v in np.round(np.array(skin) + (blush - np.array(skin)) * warmth))
    for side in (-1, 1):
        draw.polygon(to_big(_ellipse(0.5 + side * 0.135, 0.595, 0.042, 0.032)), fill=cheek)
    for side in (-1, 1):
        draw.line(to_big(_face_brows(face, side)), fill=(45, 32, 25), width=_brow_width(big))
    for side, (rx, ry) in zip((-1, 1), _eye_radii(face)):
        cx = 0.5 + side * 0.105
        draw.polygon(to_big(_ellipse(cx, 0.465, rx, ry)), fill=(245, 245, 245))
        draw.polygon(to_big(_ellipse(cx, 0.465, min(rx, ry) * 0.85, min(rx, ry) * 0.85)), fill=(50, 60, 90))
    draw.line(to_big(np.array([[0.5, 0.50], [0.5, 0.60], [0.485, 0.615]])), fill=line_colour,
              width=max(1, big // 96))
    upper, lower = _face_mouth(face)
    draw.polygon(to_big(np.concatenate([upper, lower[::-1]])), fill=(140, 40, 50))
    image = np.asarray(canvas.reduce(2), dtype=np.float64)
    gradient = 1 + face.nuisance["light"] * np.linspace(-1, 1, size)[None, :, None]
    noise = np.random.default_rng(face.nuisance["noise_seed"]).normal(0.0, pixel_noise, image.shape)
    pixels = np.clip(np.round(image * gradient + noise), 0, 255).astype(np.uint8)
    return pixels, region_masks(face, size), np.asarray(_pose(face, size)(landmarks(face)))


def _brow_width(canvas: int) -> int:
    """Stroke width of the brows on a `canvas`-pixel drawing."""
    return max(2, canvas // 48)


def _corners(*latents: str) -> itertools.product:
    """Every combination of the latents' clip bounds: the corners of the box they can move in."""
    return itertools.product(*(CLIP[name] for name in latents))


def _reach(shape: Callable[..., np.ndarray], *latents: str) -> np.ndarray:
    """Convex hull of `shape(*values)` at every corner of the latents' box. The shape's points move
    linearly in each latent, so every shape the latents can draw lies inside."""
    points = np.concatenate([shape(*values) for values in _corners(*latents)])
    return points[ConvexHull(points).vertices]


def _eye_reach(side: int) -> np.ndarray:
    """The ellipse holding every eye the eye latents can draw on `side` (-1 left, 1 right): an
    ellipse's radii grow monotonically in each latent, so the largest radii at the corners bound all."""
    index = (-1, 1).index(side)
    rx, ry = np.max([_radii(*values)[index] for values in _corners("eye_size", "eye_asymmetry", "eye_open")], axis=0)
    return _ellipse(0.5 + side * 0.105, 0.465, rx, ry)


MOUTH_REACH = _reach(lambda c, w, o: np.concatenate(_mouth_curves(c, w, o)), "mouth_curve", "mouth_width", "mouth_open")
BROW_REACH = {side: _reach(lambda a, r, p, s=side: _brow(s, a, r, p), "brow_angle", "brow_raise", "brow_pinch")
              for side in (-1, 1)}
EYE_REACH = {side: _eye_reach(side) for side in (-1, 1)}


def region_masks(face: Face, size: int) -> np.ndarray:
    """Bitfield (bit k = REGIONS[k]) covering every pixel the region's latents can change: the hull
    of each feature's shapes over its latents' whole clipped range (so a mask never depends on the
    latents it covers), grown by the stroke and a margin for anti-aliased edges."""
    to_px = _pose(face, size)
    margin = max(1, round(size / 64))
    brow_margin = margin + math.ceil(_brow_width(2 * size) / 4)
    masks = np.zeros((size, size), dtype=np.uint8)
    shapes: dict[str, list[np.ndarray]] = {
        "mouth": [MOUTH_REACH],
        "eyes": [EYE_REACH[-1], EYE_REACH[1]],
        "cheeks": [_ellipse(0.5 + s * 0.135, 0.595, 0.052, 0.042) for s in (-1, 1)],
        "forehead": [np.array([[0.40, 0.32], [0.60, 0.32], [0.60, 0.39], [0.40, 0.39]])],
        "hair": [_hair_shape(face.identity["hair_length"]), _hair_cap()],
    }
    for bit, region in enumerate(REGIONS):
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        if region == "jaw":
            widest, narrowest = _head_outline(2.5), _head_outline(-2.5)
            _fill_dilated(draw, to_px(widest), margin)
            draw.polygon(to_px(narrowest), fill=0)
            draw.line(to_px(np.concatenate([narrowest, narrowest[:1]])), fill=1, width=2 * margin + 1)
            draw.polygon(to_px(np.array([[-1, -1], [2, -1], [2, 0.46], [-1, 0.46]])), fill=0)
        if region == "brows":
            for side in (-1, 1):
                _fill_dilated(draw, to_px(BROW_REACH[side]), brow_margin)
        for shape in shapes.get(region, []):
            _fill_dilated(draw, to_px(shape), margin)
        masks |= np.asarray(layer, dtype=np.uint8) << bit
    return masks


def _fill_dilated(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], margin: int) -> None:
    """Fill a polygon grown by `margin` pixels, so anti-aliased edges stay inside the mask."""
    draw.polygon(points, fill=1)
    draw.line([*points, points[0]], fill=1, width=2 * margin + 1, joint="curve")


# ---------------------------------------------------------------------------------------------
# Ratings: simulated raters with leniency and noise; split-half reliability.
# ---------------------------------------------------------------------------------------------

def impression(face: Face) -> dict[str, float]:
    """The noise-free impression each attribute's raters form of one face (raw units)."""
    return {
        attribute: sum(w * face.latent(name) for name, w in weights.items())
        for attribute, weights in IMPRESSIONS.items()
    }


def impressions(faces: list[Face]) -> pd.DataFrame:
    """Impressions of every face, standardised over the sample."""
    frame = pd.DataFrame([impression(face) for face in faces])
    return (frame - frame.mean()) / frame.std(ddof=0)


def simulate_raters(
    signal: pd.DataFrame, groups: pd.Series, config: SynthConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Integer ratings (faces x raters) per attribute on SCALE, with the configured group bias."""
    low, high = SCALE
    middle, spread = (low + high) / 2, (high - low) / 5
    ratings = {}
    for attribute in signal.columns:
        leniency = 0.3 * rng.standard_normal(config.raters)
        noise = config.rater_noise * rng.standard_normal((len(signal), config.raters))
        latent = signal[attribute].to_numpy()[:, None] + leniency[None, :] + noise
        if attribute == config.bias_attribute:
            latent = latent - config.bias_shift * (groups.to_numpy() == config.bias_group)[:, None]
        ratings[attribute] = np.clip(np.round(middle + spread * latent), low, high)
    return ratings


def split_half_reliability(ratings: np.ndarray, rng: np.random.Generator, splits: int = 50) -> float:
    """Mean Spearman-Brown-corrected correlation between random halves of the raters."""
    n_raters = ratings.shape[1]
    values = []
    for _ in range(splits):
        order = rng.permutation(n_raters)
        a = ratings[:, order[: n_raters // 2]].mean(axis=1)
        b = ratings[:, order[n_raters // 2 :]].mean(axis=1)
        r = float(np.corrcoef(a, b)[0, 1])
        values.append(2 * r / (1 + r))
    return round(float(np.mean(values)), 4)


def _demographics(face: Face) -> dict[str, str]:
    age = face.identity["age"]
    return {
        "group": "B" if face.identity["skin_tone"] >= 0.5 else "A",
        "gender": "feminine" if face.identity["hair_length"] >= 0.5 else "masculine",
        "age_band": "young" if age < -0.43 else ("middle" if age < 0.43 else "older"),
    }


def generate(out: Path, config: SynthConfig, progress: bool = True) -> DatasetSpec:
    """Write the whole dataset into `out` (must not exist) and return its spec."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir()
    (out / "masks").mkdir()
    faces: list[Face] = []
    rows: list[dict[str, object]] = []
    points: list[np.ndarray] = []
    total = config.n_identities * config.images_per_identity
    bar = tqdm(total=total, desc="synth: faces", unit="face", disable=not progress)
    for person in range(config.n_identities):
        identity_rng = np.random.default_rng([config.seed, person])
        identity = sample_identity(identity_rng)
        for shot in range(config.images_per_identity):
            expression, face = sample_face(identity, np.random.default_rng([config.seed, person, shot + 1]))
            image_id = f"p{person:04d}_{shot}"
            image, masks, marks = render(face, config.size, config.pixel_noise)
            Image.fromarray(image).save(out / "images" / f"{image_id}.png", compress_level=6)
            Image.fromarray(masks).save(out / "masks" / f"{image_id}.png", compress_level=6)
            faces.append(face)
            points.append(marks)
            rows.append({"id": image_id, "identity": f"p{person:04d}", **_demographics(face),
                         "expression": expression})
            bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    rater_rng = np.random.default_rng([config.seed, 1_000_003])
    ratings = simulate_raters(impressions(faces), table["group"], config, rater_rng)
    reliability = {name: split_half_reliability(values, rater_rng) for name, values in ratings.items()}
    means = pd.DataFrame({name: values.mean(axis=1) for name, values in ratings.items()})
    columns = ["id", "identity", *ATTRIBUTES, "group", "gender", "age_band", "expression"]
    pd.concat([table, means], axis=1)[columns].to_csv(out / "ratings.csv", index=False, float_format="%.4f")
    coordinates = np.round(np.stack(points).reshape(len(points), -1), 2)
    header = [f"{axis}{k}" for k in range(coordinates.shape[1] // 2) for axis in ("x", "y")]
    marks_table = pd.DataFrame(coordinates, columns=header)
    marks_table.insert(0, "id", table["id"])
    marks_table.to_csv(out / "landmarks.csv", index=False, float_format="%.2f")
    attributes = dict(ATTRIBUTES)
    if config.bias_shift:
        attributes[config.bias_attribute] = replace(attributes[config.bias_attribute], rating_biases=["group"])
    spec = DatasetSpec(
        name="psyface-synthetic",
        attributes=attributes,
        identity_column="identity",
        sensitive_features={"group": ["A", "B"], "gender": ["feminine", "masculine"],
                            "age_band": ["young", "middle", "older"]},
        intersections=[["group", "gender"]],
        labels={"expression": EXPRESSIONS},
        reliability=reliability,
        aligned=True,
        masks=Masks(template="masks/{id}.png", regions=REGIONS),
        landmarks=Landmarks(file="landmarks.csv", n_points=coordinates.shape[1] // 2, regions=LANDMARK_REGIONS),
        source={"generator": "psyface synth", **vars(config),
                "bias": f"raters rate group {config.bias_group} lower on {config.bias_attribute} "
                        f"by {config.bias_shift} rater-SD units regardless of the face"},
        root=out,
    )
    spec.write(out)
    return spec


# The range of each SynthConfig field on the command line (a split half needs two raters; below 32 px
# the face's parts are a pixel or two); fields not named take any value of their default's type.
OPTION_TYPES: dict[str, Callable[[str], object]] = {
    "n_identities": positive_int, "images_per_identity": positive_int, "size": argument_type(Annotated[int, Bound(32)]),
    "raters": argument_type(Annotated[int, Bound(2)]), "rater_noise": non_negative_float,
    "pixel_noise": non_negative_float, "seed": non_negative_int,
}


def parse_args(argv: list[str] | None, prog: str = "psyface synth", description: str = __doc__.split("\n\n")[0]
               ) -> tuple[argparse.Namespace, SynthConfig]:
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=OPTION_TYPES.get(name, type(value)), default=value,
                            help=f"default: {value}")
    args = parser.parse_args(argv)
    config = replace(defaults, **{k: getattr(args, k) for k in vars(defaults)})
    if config.bias_attribute not in ATTRIBUTES:
        parser.error(f"--bias-attribute must be one of {list(ATTRIBUTES)}")
    return args, config


@entry_point
def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    out: Path = output_folder(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise PsyfaceError(f"{out} exists and is not empty; pass --force to replace it")
    generated = []
    replace_dir_atomic(out, lambda staging: generated.append(generate(staging, config)))
    spec = generated[0]
    n = config.n_identities * config.images_per_identity
    print(f"wrote {n} faces ({config.n_identities} identities) at {config.size}px to {out}/")
    print("reliability (split-half, Spearman-Brown): "
          + ", ".join(f"{k}={v:.3f}" for k, v in spec.reliability.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
