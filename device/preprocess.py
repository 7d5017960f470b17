"""How an RGB image becomes the model's input: defined once, as data, used everywhere.

Training-time evaluation, the conversion checks and the Raspberry Pi all call
`prepare`, so what the Pi feeds the model is exactly what training was scored on.
The normalisation (x - 127) / 128 lives inside the model, so the input is raw
RGB bytes and the int8 model's input quantization is (scale 1.0, zero point 0).
"""

from __future__ import annotations

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
    normalization: str = "(x - 127) / 128, inside the model"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATIONS)}, not {self.interpolation!r}")
        if self.color_order != "RGB":
            raise ValueError("only RGB colour order is supported")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def content_size(self, width: int, height: int) -> tuple[int, int]:
        """Size the image is resized to before padding ("fit") or cropping ("center_crop")."""
        s = self.input_size
        if self.resize_mode == "stretch":
            return s, s
        pick = max if self.resize_mode == "fit" else min
        scale = s / pick(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))


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
