"""Read any image a telescope user has (JPEG, PNG, TIFF, FITS) into an RGB uint8 array.

Every failure is an `ImageError` whose message is one line naming the file and
the cause; calibration frames are a `SkippedImage`, not an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nebula.device.preprocess import PreprocessSpec


class ImageError(Exception):
    """An input that cannot be classified. str() is '<file>: <cause>'."""

    def __init__(self, path, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"{path}: {cause}")


class SkippedImage(ImageError):
    """An input deliberately not classified (a dark, flat or bias frame)."""


def load_image(path: str | Path, spec: PreprocessSpec | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 RGB array, upright per EXIF, alpha flattened onto black.

    With `spec`, a JPEG much larger than the model input is decoded at reduced size.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if spec is not None and image.format == "JPEG":
                image.draft("RGB", spec.content_size(*image.size))
            image = ImageOps.exif_transpose(image)
            return to_rgb_array(image)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except OSError as err:
        raise ImageError(path, f"cannot decode image ({err})") from None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    return np.asarray(image.convert("RGB"))
