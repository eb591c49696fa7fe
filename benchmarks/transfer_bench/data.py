"""Offline image data of the transfer benchmark (``benchmarks/transfer.py``): a many-class procedural
source task for pre-training, and few-shot target tasks in the spirit of VTAB-1k.

Every generator is pure NumPy and seeded: image ``i`` of a set is drawn from its own generator
``default_rng([seed, set id, i])``, so a set is reproducible from its seed alone and needs no storage.
Images are ``uint8 [N, S, S, 3]`` arrays (S = 32 by default), rendered at twice the size and box-filtered
down (anti-aliased edges).

Source (pre-training): ``shape (8) x texture (8) x side (2)`` = 128 classes, the side being the half of
the image (left / right) the shape's centre lies in. Size, rotation, colour, background, the exact position
within the half and pixel noise are nuisances, so the features learn shape, texture and a coarse horizontal
position, but are trained to ignore vertical position, colour and how a shape is turned.

Targets (few-shot fine-tuning, each with a fixed train set of at most 1000 images and a test set):

==============  ==========================================================================================
``digits``      real images: scikit-learn's bundled handwritten digits (8x8, 1,797 images), upscaled
                bilinearly, grey tiled to RGB; 10 classes. (natural-ish, real data)
``count``       1-6 small random objects on a background; label = count - 1 (VTAB structured:
                Clevr/count). 6 classes.
``location``    one small object; label = its quadrant (4 classes) (VTAB structured: dSprites/loc). The
                source task knows left from right but was trained to *ignore* vertical position.
``orientation`` one elongated arrow; label = where it points, 4 classes of 90 degrees, +- 20 degrees
                jitter (VTAB structured: dSprites/ori). The source task was trained to *ignore* rotation.
``texture``     a full-image texture of 10 kinds none of which is a source texture, random colours,
                scale, angle and phase (VTAB natural: DTD).
==============  ==========================================================================================
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "SOURCE_SHAPES", "SOURCE_TEXTURES", "TARGETS", "TargetData", "make_source", "make_target",
    "source_num_classes",
]

SOURCE_SHAPES = ("disc", "square", "triangle", "diamond", "plus", "ring", "cross", "half_disc")
SOURCE_TEXTURES = ("solid", "stripes", "checker", "dots", "rings", "speckle", "ramp", "grid")
SOURCE_SIDES = ((0.22, 0.44), (0.56, 0.78))  # ranges of the shape's centre x: left half, right half
TARGET_TEXTURES = ("plaid", "rays", "waves", "bricks", "blobs", "grain", "zigzag", "crosshatch", "spiral",
                   "polka")
_SOURCE_SET, _TARGET_SET = 1, 2


# ------------------------------------------------------------------------------------- drawing helpers
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` of a ``size x size`` canvas, in units of the final image."""
    coords = (np.arange(size) + 0.5) / size
    return np.meshgrid(coords, coords)  # xx varies along columns


def _local(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float):
    """Coordinates in a shape's frame: centred, rotated by ``angle``, scaled by ``radius``."""
    dx, dy = xx - cx, yy - cy
    cos, sin = np.cos(angle), np.sin(angle)
    return (dx * cos + dy * sin) / radius, (-dx * sin + dy * cos) / radius


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    if kind == "disc":
        return r < 1.0
    if kind == "square":
        return np.maximum(abs(u), abs(v)) < 0.8
    if kind == "triangle":
        return (v < 0.55) & (v > -0.9 + 1.9 * abs(u))
    if kind == "diamond":
        return abs(u) + abs(v) < 1.0
    if kind == "plus":
        return ((abs(u) < 0.3) & (abs(v) < 1.0)) | ((abs(v) < 0.3) & (abs(u) < 1.0))
    if kind == "ring":
        return (r < 1.0) & (r > 0.55)
    if kind == "cross":
        a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
        return ((abs(a) < 0.28) & (abs(b) < 1.0)) | ((abs(b) < 0.28) & (abs(a) < 1.0))
    if kind == "half_disc":
        return (r < 1.0) & (v > -0.1)
    if kind == "arrow":  # elongated, points along +u
        return (u > -1.0) & (u < 1.0) & (abs(v) < 0.42 * (1.0 - u) / 2.0 + 0.05)
    raise ValueError(kind)


def _source_texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture value in [0, 1] on a shape's local frame."""
    phase = rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(2.2, 3.2)
    if kind == "solid":
        return np.ones_like(u)
    if kind == "stripes":
        return (np.sin(np.pi * freq * u + phase) > 0).astype(float)
    if kind == "checker":
        return ((np.floor(freq * (u + 2)) + np.floor(freq * (v + 2))) % 2).astype(float)
    if kind == "dots":
        return (np.hypot(((freq * u + phase) % 2) - 1, ((freq * v) % 2) - 1) > 0.55).astype(float)
    if kind == "rings":
        return (np.sin(np.pi * 2.0 * freq * np.hypot(u, v) + phase) > 0).astype(float)
    if kind == "speckle":
        return (rng.random(u.shape) > 0.5).astype(float)
    if kind == "ramp":
        return np.clip(0.5 + 0.5 * u, 0, 1)
    if kind == "grid":
        return ((abs(np.sin(np.pi * freq * u + phase)) < 0.35) | (abs(np.sin(np.pi * freq * v)) < 0.35)
                ).astype(float)
    raise ValueError(kind)


def _hue_colour(hue: float, rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0)))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    level = rng.uniform(0.15, 0.85)
    xx, yy = _grid(size)
    slope = rng.uniform(-0.15, 0.15, 2)
    image = level + slope[0] * (xx - 0.5) + slope[1] * (yy - 0.5)
    return np.repeat(image[..., None], 3, axis=2)


def _finish(canvas: np.ndarray, rng: np.random.Generator, noise: float = 0.04) -> np.ndarray:
    """Box-filter 2x down, add pixel noise, quantise to uint8."""
    big = canvas.shape[0]
    small = canvas.reshape(big // 2, 2, big // 2, 2, 3).mean(axis=(1, 3))
    small = small + rng.normal(0.0, noise, small.shape)
    return (np.clip(small, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _paint(canvas: np.ndarray, mask: np.ndarray, value: np.ndarray, colour: np.ndarray, dark: np.ndarray) -> None:
    canvas[mask] = (value[mask, None] * colour + (1.0 - value[mask, None]) * dark)


# ------------------------------------------------------------------------------------------- source
def source_num_classes() -> int:
    return len(SOURCE_SHAPES) * len(SOURCE_TEXTURES) * len(SOURCE_SIDES)


def _render_source(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    shape = SOURCE_SHAPES[label % len(SOURCE_SHAPES)]
    texture = SOURCE_TEXTURES[(label // len(SOURCE_SHAPES)) % len(SOURCE_TEXTURES)]
    side = SOURCE_SIDES[label // (len(SOURCE_SHAPES) * len(SOURCE_TEXTURES))]
    big = 2 * size
    xx, yy = _grid(big)
    canvas = _background(big, rng)
    radius = rng.uniform(0.22, 0.36)
    cx, cy = rng.uniform(*side), rng.uniform(radius * 0.8, 1 - radius * 0.8)
    u, v = _local(xx, yy, cx, cy, radius, rng.uniform(0, 2 * np.pi))
    mask = _shape_mask(shape, u, v)
    colour = _hue_colour(rng.uniform(), rng)
    _paint(canvas, mask, _source_texture(texture, u, v, rng), colour, colour * rng.uniform(0.1, 0.35))
    return _finish(canvas, rng)


def make_source(num_images: int, seed: int, size: int = 32, offset: int = 0, shard: tuple[int, int] = (0, 1)
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, S, S, 3], labels int64 [N])`` of the source task; labels cycle over the classes.

    ``offset`` shifts the image ids (a held-out set uses ids past the training ones). ``shard=(r, w)`` keeps
    the images whose id is ``r`` modulo ``w`` (one process's share of the set in data-parallel training).
    """
    classes = source_num_classes()
    rank, world = shard
    ids = range(offset + rank, offset + num_images, world)
    images = np.empty((len(ids), size, size, 3), np.uint8)
    labels = np.empty(len(ids), np.int64)
    for i, index in enumerate(ids):
        rng = np.random.default_rng([seed, _SOURCE_SET, index])
        labels[i] = index % classes
        images[i] = _render_source(int(labels[i]), size, rng)
    return images, labels


# ------------------------------------------------------------------------------------------ targets
def _random_object(canvas: np.ndarray, xx, yy, rng, cx, cy, radius, shape=None, angle=None) -> None:
    shape = shape or SOURCE_SHAPES[rng.integers(len(SOURCE_SHAPES))]
    angle = rng.uniform(0, 2 * np.pi) if angle is None else angle
    u, v = _local(xx, yy, cx, cy, radius, angle)
    mask = _shape_mask(shape, u, v)
    colour = _hue_colour(rng.uniform(), rng)
    background = float(canvas[0, 0, 0])
    if abs(colour.mean() - background) < 0.15:  # keep objects visible against the background
        colour = np.clip(colour * (0.45 if background > 0.5 else 1.6), 0, 1)
    _paint(canvas, mask, np.ones_like(u), colour, colour)


def _render_count(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    big = 2 * size
    xx, yy = _grid(big)
    canvas = _background(big, rng)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:  # rejection sampling of non-overlapping objects
        radius = rng.uniform(0.075, 0.115)
        cx, cy = rng.uniform(radius, 1 - radius, 2)
        if all(np.hypot(cx - x, cy - y) > radius + r + 0.03 for x, y, r in placed):
            placed.append((cx, cy, radius))
    for cx, cy, radius in placed:
        _random_object(canvas, xx, yy, rng, cx, cy, radius)
    return _finish(canvas, rng)


LOCATION_GRID = 2  # a 2 x 2 grid of cells (quadrants): 4 classes


def _render_location(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    big = 2 * size
    xx, yy = _grid(big)
    canvas = _background(big, rng)
    radius = rng.uniform(0.09, 0.14)
    row, col = divmod(label, LOCATION_GRID)
    low, high = 0.1, 0.9  # centres span [low, high], split into LOCATION_GRID cells per axis
    cell = (high - low) / LOCATION_GRID
    cx = low + cell * (col + rng.uniform(0.15, 0.85))
    cy = low + cell * (row + rng.uniform(0.15, 0.85))
    _random_object(canvas, xx, yy, rng, cx, cy, radius)
    return _finish(canvas, rng)


ORIENTATION_BINS = 4  # the arrow points right, down, left or up (image coordinates), +- 20 degrees


def _render_orientation(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    big = 2 * size
    xx, yy = _grid(big)
    canvas = _background(big, rng)
    radius = rng.uniform(0.26, 0.36)
    cx, cy = rng.uniform(0.32, 0.68, 2)
    width = 2 * np.pi / ORIENTATION_BINS
    angle = width * label + np.deg2rad(rng.uniform(-20.0, 20.0))
    _random_object(canvas, xx, yy, rng, cx, cy, radius, shape="arrow", angle=angle)
    return _finish(canvas, rng)


def _target_texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    phase = rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(3.0, 5.0)
    if kind == "plaid":
        return 0.5 + 0.25 * np.sin(2 * np.pi * freq * u + phase) + 0.25 * np.sin(2 * np.pi * freq * v)
    if kind == "rays":
        return 0.5 + 0.5 * np.sin(rng.integers(5, 9) * np.arctan2(v, u) + phase)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * (v + 0.12 * np.sin(2 * np.pi * 1.5 * u)) + phase)
    if kind == "bricks":
        row = np.floor(freq * v)
        shifted = u + 0.5 * (row % 2) / freq
        return (((freq * v) % 1 > 0.15) & ((freq * shifted * 0.5) % 1 > 0.1)).astype(float)
    if kind == "blobs":
        field = sum(np.sin(2 * np.pi * rng.uniform(0.8, 1.8) * (np.cos(a) * u + np.sin(a) * v) + rng.uniform(0, 6))
                    for a in rng.uniform(0, np.pi, 4))
        return (field > 0).astype(float)
    if kind == "grain":
        return rng.random(u.shape)
    if kind == "zigzag":
        tri = 2 * abs((freq * u) % 1 - 0.5)  # a triangle wave across u displaces stripes along v
        return (np.sin(2 * np.pi * freq * (v + 0.15 * tri) + phase) > 0).astype(float)
    if kind == "crosshatch":
        a, b = u + v, u - v
        return ((abs(np.sin(np.pi * freq * a + phase)) < 0.25) | (abs(np.sin(np.pi * freq * b)) < 0.25)).astype(float)
    if kind == "spiral":
        return 0.5 + 0.5 * np.sin(3 * np.arctan2(v, u) + 2 * np.pi * freq * 0.6 * np.hypot(u, v) + phase)
    if kind == "polka":
        cell_u, cell_v = (freq * 0.6 * u) % 1 - 0.5, (freq * 0.6 * v) % 1 - 0.5
        return (np.hypot(cell_u, cell_v) < 0.28).astype(float)
    raise ValueError(kind)


def _render_texture(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    big = 2 * size
    xx, yy = _grid(big)
    u, v = _local(xx, yy, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.8, 1.25),
                  rng.uniform(0, 2 * np.pi))
    value = np.clip(_target_texture(TARGET_TEXTURES[label], u, v, rng), 0, 1)
    first, second = _hue_colour(rng.uniform(), rng), _hue_colour(rng.uniform(), rng) * rng.uniform(0.2, 0.6)
    canvas = value[..., None] * first + (1 - value[..., None]) * second
    return _finish(canvas, rng, noise=0.05)


_RENDERERS: dict[str, tuple[int, Callable[[int, int, np.random.Generator], np.ndarray]]] = {
    "count": (6, _render_count),
    "location": (LOCATION_GRID ** 2, _render_location),
    "orientation": (ORIENTATION_BINS, _render_orientation),
    "texture": (len(TARGET_TEXTURES), _render_texture),
}
TARGETS = ("digits", "count", "location", "orientation", "texture")
_TARGET_IDS = {name: i for i, name in enumerate(TARGETS)}
TARGET_GROUPS = {"digits": "real", "count": "structured", "location": "structured", "orientation": "structured",
                 "texture": "natural"}


@dataclass
class TargetData:
    """One target task: ``train`` images/labels (the few-shot training set, <= 1000) and ``test``."""

    name: str
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def split_validation(self, fraction: float = 0.2) -> "TargetData":
        """The last ``fraction`` of the training set as a validation 'test' set (for hyper-parameter choice)."""
        cut = int(round(len(self.train_labels) * (1 - fraction)))
        return TargetData(f"{self.name}/val", self.num_classes, self.train_images[:cut], self.train_labels[:cut],
                          self.train_images[cut:], self.train_labels[cut:])


def _digits(num_train: int, num_test: int | None, seed: int, size: int) -> TargetData:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng([seed, _TARGET_SET, 0]).permutation(len(digits.target))
    grey = (digits.images / 16.0 * 255.0).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in grey])
    images = np.repeat(images[..., None], 3, axis=3)[order]
    labels = digits.target.astype(np.int64)[order]
    if num_train >= len(labels):
        raise ValueError(f"digits has {len(labels)} images; num_train={num_train} leaves no test set")
    test_end = len(labels) if num_test is None else min(len(labels), num_train + num_test)
    return TargetData("digits", 10, images[:num_train], labels[:num_train], images[num_train:test_end],
                      labels[num_train:test_end])


def make_target(name: str, num_train: int, num_test: int | None, seed: int = 0, size: int = 32) -> TargetData:
    """A target task: ``num_train`` training images (balanced, shuffled) and ``num_test`` test images.

    ``num_test=None`` means 1000 for the procedural targets and all remaining images for ``digits``.
    """
    if name == "digits":
        return _digits(num_train, num_test, seed, size)
    if name not in _RENDERERS:
        raise ValueError(f"unknown target {name!r}; expected one of {TARGETS}")
    classes, render = _RENDERERS[name]
    num_test = 1000 if num_test is None else num_test
    total = num_train + num_test
    images = np.empty((total, size, size, 3), np.uint8)
    labels = np.arange(total, dtype=np.int64) % classes
    for i in range(total):
        rng = np.random.default_rng([seed, _TARGET_SET, _TARGET_IDS[name], i])
        images[i] = render(int(labels[i]), size, rng)
    shuffle = np.random.default_rng([seed, _TARGET_SET, _TARGET_IDS[name], 10**6])
    train_order = shuffle.permutation(num_train)
    return TargetData(name, classes, images[:num_train][train_order], labels[:num_train][train_order],
                      images[num_train:], labels[num_train:])
