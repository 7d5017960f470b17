"""How an RGB image becomes the model's input: defined once, as data, used everywhere.

Training-time evaluation, the conversion checks and the Raspberry Pi all call
`prepare`, so what the Pi feeds the model is exactly what training was scored on.
The normalisation (x - mean) / std lives inside the model (its first layer is built
from this spec), so the input is raw RGB bytes and the int8 model's input
quantization is (scale 1.0, zero point 0). Each backbone in `nebula.train.backbones`
carries its own spec; the run folder and the .tflite carry the model's.

With `normalize="sky"` the spec also takes out what differs between photographers'
processing before the model sees it: each channel's sky background is subtracted
(light pollution, colour cast, black point) and one common gain stretches the
brightest part to full scale (exposure, stretch), as an astrophotographer's
background neutralisation and auto-stretch do. `prepare` applies it to the
photograph only, never to the padding; training applies the same `normalize`
after its photometric augmentation, so the model only ever sees normalised images.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

RESIZE_MODES = ("fit", "center_crop", "stretch")
NORMALIZE_MODES = ("none", "sky", "background")  # background: the sky's subtraction without its stretch
_SKY_MIN_SPAN = 16  # levels: the largest gain "sky" gives is 255 / 16, so a blank, noisy frame is not stretched into snow
_INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything the device needs to feed a model; stored in the run folder and in the .tflite."""

    input_size: int = 224
    # "fit" keeps the whole frame and pads with black: the sky's background is black,
    # and a nebula near the edge of a wide field is not cropped away.
    resize_mode: str = "fit"
    interpolation: str = "bilinear"
    color_order: str = "RGB"
    pad_value: int = 0
    # The model's first layer computes (x - mean) / std on raw RGB 0..255, the same for
    # every channel. An integer mean keeps the int8 input path exact (see backbones.preprocess_layer).
    mean: float = 127.0
    std: float = 128.0
    # Per-image normalisation of the photograph (not the padding) before the model: "none", or
    # "sky" = subtract each channel's `background_percentile`, then scale all channels by one gain
    # so the brightest channel's `white_percentile` lands at 255 (see `sky_lut`); "background" = the
    # subtraction alone (no stretch).
    normalize: str = "none"
    background_percentile: float = 5.0
    white_percentile: float = 99.5

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATIONS)}, not {self.interpolation!r}")
        if self.color_order != "RGB":
            raise ValueError("only RGB colour order is supported")
        if not self.std > 0:
            raise ValueError(f"std must be positive, not {self.std!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, not {self.normalize!r}")
        if not 0 <= self.background_percentile < self.white_percentile <= 100:
            raise ValueError(f"need 0 <= background_percentile < white_percentile <= 100, not "
                             f"{self.background_percentile!r} and {self.white_percentile!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        """Read a spec written by to_dict, or an older one: free-text `normalization` for mean and std; no `normalize` = "none"."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "normalization" in data and "mean" not in data:
            values["mean"], values["std"] = _parse_old_normalization(data["normalization"])
        return cls(**values)

    def content_size(self, width: int, height: int) -> tuple[int, int]:
        """Size the image is resized to before padding ("fit") or cropping ("center_crop")."""
        s = self.input_size
        if self.resize_mode == "stretch":
            return s, s
        pick = max if self.resize_mode == "fit" else min
        scale = s / pick(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))


# What older files wrote, e.g. "(x - 127) / 128, inside the model".
_OLD_NORMALIZATION = re.compile(r"^\(x - (\d+(?:\.\d+)?)\) / (\d+(?:\.\d+)?)\b")


def _parse_old_normalization(text) -> tuple[float, float]:
    match = _OLD_NORMALIZATION.match(str(text))
    if not match:
        raise ValueError(f"normalization {text!r} is not of the form '(x - MEAN) / STD'")
    return float(match.group(1)), float(match.group(2))


def prepare(image: Image.Image | np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize an RGB image (PIL or HxWx3 uint8) per `spec`, normalised per `spec.normalize`; returns (S, S, 3) uint8."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    s = spec.input_size
    resample = _INTERPOLATIONS[spec.interpolation]
    w, h = spec.content_size(*image.size)
    if image.size != (w, h):
        image = image.resize((w, h), resample)
    if spec.resize_mode == "center_crop":
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if spec.normalize != "none":  # on the photograph alone: the black padding below never enters the statistics
        image = image.point(sky_lut(image.histogram(), spec))
    if spec.resize_mode != "fit":
        return np.asarray(image)
    canvas = np.full((s, s, 3), spec.pad_value, dtype=np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top : top + h, left : left + w] = np.asarray(image)
    return canvas


def normalize(image: np.ndarray, spec: PreprocessSpec, content: np.ndarray | None = None) -> np.ndarray:
    """`spec.normalize` on an (S, S, 3) uint8 image that `prepare` sized but did not normalise (training's views).

    `content` (S, S) bool marks the photograph; only it enters the statistics, and everything
    else (padding, corners a rotation uncovered) becomes `pad_value`, as `prepare` leaves padding.
    None: the whole image is photograph. With normalize "none" the image comes back as it is.
    """
    if spec.normalize == "none":
        return image
    picture = Image.fromarray(image)
    mask = None if content is None else Image.fromarray(content.astype(np.uint8) * 255)
    out = np.asarray(picture.point(sky_lut(picture.histogram(mask), spec)))
    if content is None:
        return out
    return np.where(content[..., None], out, np.uint8(spec.pad_value))


def sky_lut(histogram: list[int], spec: PreprocessSpec) -> list[int]:
    """The 768-entry lookup table (R, G, B) of "sky" normalisation, from a PIL RGB histogram of the photograph.

    Background: each channel's `background_percentile` (5 %). Not the median: many photographs,
    Stellarium's among them, are filled by the nebula, and the median would subtract the nebula
    itself (a dark nebula's star field would be taken for sky); not the minimum or the 1st
    percentile: a few black pixels (a stacking border, dead pixels, a black-clipped corner) would
    set it, and nothing would be taken out. 5 % of a frame is sky in nearly every astrophoto.
    Black pixels of the photograph do count (only padding is left out): in 120 of Stellarium's
    photographs a median 24 % of pixels are exactly black sky, clipped by their processing, and
    leaving them out would take the faint nebulosity for the background.
    Gain: one for all channels, so the nebula keeps its colour relative to the neutralised sky
    (red stays red); it puts the brightest channel's `white_percentile` (99.5 %) at 255, so at
    most about 0.5 % of pixels clip in any channel, stars mostly. Per channel, not luminance: a
    saturated red nebula's red channel is far above its luminance and would clip wholesale.
    A table, not float arithmetic: the photograph is uint8, so this is exact and costs one pass.
    """
    counts = np.asarray(histogram, dtype=np.int64).reshape(3, 256)
    cumulative = counts.cumsum(axis=1)
    total = cumulative[:, -1:]
    if not total.any():
        return list(range(256)) * 3
    # the smallest level with at least q of the pixels at or below it, per channel
    background = (cumulative * 100 < total * spec.background_percentile).sum(axis=1)
    white = (cumulative * 100 < total * spec.white_percentile).sum(axis=1)
    gain = 1.0 if spec.normalize == "background" else 255.0 / max(int((white - background).max()), _SKY_MIN_SPAN)
    levels = np.arange(256)[None, :] - background[:, None]
    return np.clip(np.rint(levels * gain), 0, 255).astype(np.uint8).ravel().tolist()
