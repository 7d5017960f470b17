"""How an RGB image becomes the model's input: defined once, as data, used everywhere.

Training-time evaluation, the conversion checks and the Raspberry Pi all call
`prepare`, so what the Pi feeds the model is exactly what training was scored on.
The normalisation (x - mean) / std lives inside the model (its first layer is built
from this spec), so the input is raw RGB bytes and the int8 model's input
quantization is (scale 1.0, zero point 0). Each backbone in `nebula.train.backbones`
carries its own spec; the run folder and the .tflite carry the model's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

RESIZE_MODES = ("fit", "center_crop", "stretch")
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

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATIONS)}, not {self.interpolation!r}")
        if self.color_order != "RGB":
            raise ValueError("only RGB colour order is supported")
        if not self.std > 0:
            raise ValueError(f"std must be positive, not {self.std!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        """Read a spec written by to_dict, or an older one whose free-text `normalization` held mean and std."""
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
    """Resize an RGB image (PIL or HxWx3 uint8) per `spec`; returns (S, S, 3) uint8."""
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
    if spec.resize_mode == "stretch":
        return np.asarray(image)
    if spec.resize_mode == "center_crop":
        left, top = (w - s) // 2, (h - s) // 2
        return np.asarray(image.crop((left, top, left + s, top + s)))
    canvas = np.full((s, s, 3), spec.pad_value, dtype=np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top : top + h, left : left + w] = np.asarray(image)
    return canvas
