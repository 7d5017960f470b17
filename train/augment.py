"""Augmentation for sky photographs: what changes between two people's pictures of one nebula.

The sky has no "up", so any rotation and both flips are fair; framing changes
(zoom, crop); exposure and processing change (brightness, contrast, gamma stretch);
sensors add noise; white balance drifts a little. Hue never swaps: red emission
stays red and blue reflection stays blue, because colour is much of what tells
them apart. Whatever is uncovered by rotation is black, like the sky.

Geometry runs on the reduced in-memory copy, then the device's own `prepare`
makes the model-sized image, then photometry and noise run at model resolution.

    augment(image, spec, rng) -> (S, S, 3) uint8
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nebula.device.preprocess import PreprocessSpec, prepare

# Ranges, chosen to look like other gear and other processing, not like another object.
CROP_FRACTION = (0.65, 1.0)  # side of the kept window, as a fraction of the image side
BRIGHTNESS = (0.75, 1.3)
CONTRAST = (0.8, 1.25)
GAMMA = (0.7, 1.4)  # < 1 stretches faint nebulosity up, > 1 darkens it
CHANNEL_GAIN_SIGMA = 0.05  # log-gain per channel: a few percent of white-balance drift
CHANNEL_GAIN_LIMIT = 0.10  # |gain - 1| never exceeds this, so no channel can overtake another by much
NOISE_SIGMA = (0.0, 6.0)  # Gaussian read noise, in 0..255 units


def augment(image: np.ndarray, spec: PreprocessSpec, rng: np.random.Generator) -> np.ndarray:
    """One random view of an HxWx3 uint8 RGB image, as the (S, S, 3) uint8 model input."""
    picture = Image.fromarray(image)
    picture = _random_crop(picture, rng)
    angle = float(rng.uniform(0.0, 360.0))
    picture = picture.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        picture = picture.transpose(Image.FLIP_TOP_BOTTOM)
    return photometric(prepare(picture, spec), rng)


def _random_crop(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = picture.size
    fraction = float(rng.uniform(*CROP_FRACTION))
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return picture.crop((left, top, left + cw, top + ch))


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, stretch, white balance and noise on an (S, S, 3) uint8 image."""
    x = image.astype(np.float32) / 255.0
    x = x ** np.float32(rng.uniform(*GAMMA))
    mean = x.mean()
    x = (x - mean) * np.float32(rng.uniform(*CONTRAST)) + mean
    x = x * np.float32(rng.uniform(*BRIGHTNESS))
    gains = np.exp(rng.normal(0.0, CHANNEL_GAIN_SIGMA, 3))
    x = x * np.clip(gains, 1 - CHANNEL_GAIN_LIMIT, 1 + CHANNEL_GAIN_LIMIT).astype(np.float32)
    x = x * 255.0 + rng.normal(0.0, rng.uniform(*NOISE_SIGMA), x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
    """The generator for one view of one image: the same views whatever order they are made in."""
    return np.random.default_rng([seed, index, view])


def save_grid(rows: list[tuple[str, list[np.ndarray]]], path: str | Path, tile: int = 112) -> Path:
    """Write a PNG grid: one row per (caption, images), so a person can check the augmentation."""
    columns = max(len(images) for _, images in rows)
    caption_h = 14
    grid = Image.new("RGB", (columns * (tile + 2), len(rows) * (tile + caption_h + 2)), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for r, (caption, images) in enumerate(rows):
        y = r * (tile + caption_h + 2)
        draw.text((2, y + 1), caption, fill=(230, 230, 230))
        for c, image in enumerate(images):
            grid.paste(Image.fromarray(image).resize((tile, tile), Image.BILINEAR), (c * (tile + 2), y + caption_h))
    path = Path(path)
    grid.save(path)
    return path
