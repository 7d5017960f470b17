"""Augmentation for sky photographs: what changes between two people's pictures of one nebula.

The sky has no "up", so any rotation and both flips are fair; framing changes
(zoom, crop); exposure and processing change (brightness, contrast, gamma stretch);
sensors add noise; white balance drifts a little. Hue never swaps: red emission
stays red and blue reflection stays blue, because colour is much of what tells
them apart. Whatever is uncovered by rotation is black, like the sky.

Geometry runs on the reduced in-memory copy, then the device's own `prepare`
makes the model-sized image (without its normalisation), then photometry and noise
run at model resolution, and last the spec's normalisation (`preprocess.normalize`,
e.g. "sky"), so the model only ever sees a normalised image, as on the device.

    augment(image, spec, rng) -> (S, S, 3) uint8
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nebula.device.preprocess import PreprocessSpec, normalize, prepare

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
    view, content = _geometry(image, spec, rng)
    return normalize(photometric(view, rng), spec, content)


def _geometry(image: np.ndarray, spec: PreprocessSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop, rotation and flips, then `prepare` without normalisation: (the (S, S, 3) view, where the photograph is).

    The second is an (S, S) bool mask (not padding, not a corner the rotation uncovered) for
    the normalisation's statistics; None when the spec does not normalise (nothing needs it).
    """
    picture = _random_crop(Image.fromarray(image), rng)
    mask = Image.new("L", picture.size, 255)  # where the photograph is: rotated and flipped with it
    angle = float(rng.uniform(0.0, 360.0))
    picture = picture.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    mask = mask.rotate(angle, resample=Image.NEAREST, fillcolor=0)
    for flip in (Image.FLIP_LEFT_RIGHT, Image.FLIP_TOP_BOTTOM):
        if rng.random() < 0.5:
            picture, mask = picture.transpose(flip), mask.transpose(flip)
    plain = replace(spec, normalize="none")
    view = prepare(picture, plain)
    if spec.normalize == "none":
        return view, None
    return view, prepare(mask.convert("RGB"), replace(plain, pad_value=0))[..., 0] >= 128


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


def view_rng(seed: int, name: str, view: int) -> np.random.Generator:
    """The generator for one view of one image (by its file name): the same views whatever order or dataset it is in."""
    digest = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, digest, view])


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


# ---------------------------------------------------------------- "shifted": other people's processing
# On top of the "sky" views: what differs between two amateurs' finished pictures of one object.
SHIFT_GAIN = (0.87, 1.15)  # white balance per channel: wider than the sky recipe, never enough to turn blue into red
SATURATION = (0.5, 1.7)  # from washed-out to boosted colour
GRADIENT = (0.0, 45.0)  # light-pollution / moon gradient amplitude, 0..255 units, in a warm-to-grey colour
VIGNETTE = (0.0, 0.45)  # light lost at the corners
BLUR_RADIUS = (0.0, 1.6)  # seeing, focus, a small telescope's optics (px at model resolution)
JPEG_QUALITY = (30, 95)  # web pictures
HOO_PROBABILITY = 0.15  # bicolour narrowband: red from H-alpha, green and blue from O III


def augment_shifted(image: np.ndarray, spec: PreprocessSpec, rng: np.random.Generator) -> np.ndarray:
    """A "sky" view, then processing and gear that other photographers bring (one (S, S, 3) uint8 view)."""
    view, content = _geometry(image, spec, rng)
    x = photometric(view, rng).astype(np.float32)
    if rng.random() < HOO_PROBABILITY:
        oiii = 0.5 * (x[..., 1] + x[..., 2])
        x = np.stack([x[..., 0], oiii, oiii], axis=-1)
    x = x * rng.uniform(*SHIFT_GAIN, 3).astype(np.float32)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * np.float32(rng.uniform(*SATURATION))
    s = x.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy + 0.5)[..., None]
    tint = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.3, 0.9)], np.float32)
    x = x + ramp * np.float32(rng.uniform(*GRADIENT)) * tint
    x = x * (1 - np.float32(rng.uniform(*VIGNETTE)) * (2 * (xx ** 2 + yy ** 2))[..., None])
    picture = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    radius = float(rng.uniform(*BLUR_RADIUS))
    if radius > 0.3:
        from PIL import ImageFilter

        picture = picture.filter(ImageFilter.GaussianBlur(radius))
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(rng.integers(*JPEG_QUALITY)))
    buffer.seek(0)
    return normalize(np.asarray(Image.open(buffer).convert("RGB")), spec, content)


RECIPES = {"sky": augment, "shifted": augment_shifted}  # --augment NAME
