"""Read any image a telescope user has (JPEG, PNG, TIFF, FITS) into an RGB uint8 array.

Which decoder reads a file comes from the format table (`nebula.device.formats`):
by its first bytes, else by its name; `_DECODERS` maps each format's decoder
name to the function here. A file of no known format goes to PIL, which says
what it is not.

Every failure is an `ImageError` whose message is one line naming the file and
the cause; calibration frames are a `SkippedImage`, not an error.

- JPEG: decoded at reduced size when much larger than the model input (PIL's
  ``draft``: the DCT scales by 1/2, 1/4 or 1/8), so a camera-sized file costs
  little more than the model; upright per EXIF orientation.
- PNG: palette, grey and 16-bit; alpha is flattened onto black (the sky's colour).
- TIFF: 8 and 16 bit. 16-bit data goes through the FITS module's linear test:
  a linear export (median in the bottom few percent, see `nebula.device.fits`)
  is auto-stretched like a FITS frame, a finished picture is scaled to 8 bits
  (v / 257). PIL reduces 16-bit *RGB* to 8 bits itself, so uncompressed 16-bit
  RGB TIFF strips are read directly with numpy to keep the faint end; compressed
  ones and 16-bit RGB PNGs fall back to PIL's 8 bits before the same test.
- FITS: `nebula.device.fits` (astropy, imported only for FITS inputs).

A truncated file is an error, never a silently grey image: PIL's
``LOAD_TRUNCATED_IMAGES`` is left False and every image is fully decoded here.
Images over PIL's ``Image.MAX_IMAGE_PIXELS`` are refused as decompression bombs
(PIL's warning counts as the error too).
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from nebula.device import fits, formats
from nebula.device.preprocess import PreprocessSpec

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
_RGB16_RAWMODES = {"RGB;16L": "<u2", "RGB;16B": ">u2", "RGB;16N": "=u2"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


class ImageError(Exception):
    """An input that cannot be classified. str() is '<file>: <cause>'."""

    def __init__(self, path, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"{path}: {cause}")


class SkippedImage(ImageError):
    """An input deliberately not classified (a dark, flat or bias frame)."""


def load_image(path: str | Path, spec: PreprocessSpec | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 RGB array, upright per EXIF, alpha flattened onto black.

    With `spec`, a JPEG much larger than the model input is decoded at reduced size
    and a large FITS frame is binned down before its stretch.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(formats.HEAD_BYTES)
            if not head:
                raise ImageError(path, "empty file (0 bytes)")
            found = formats.by_content(head) or formats.by_name(path.name)
            file.seek(0)
            return _DECODERS[found.decoder if found else "pil"](file, path, spec)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image") from None
    except PermissionError:
        raise ImageError(path, "permission denied (cannot read the file)") from None
    except MemoryError:
        raise ImageError(path, "too large to decode in memory") from None


def _load_fits(file, path: Path, spec: PreprocessSpec | None) -> np.ndarray:
    # astropy opens the file by name itself: it undoes gzip from the name
    try:
        return fits.read_fits(path, spec.content_size if spec else None)
    except fits.CalibrationFrame as reason:
        raise SkippedImage(path, str(reason)) from None
    except fits.FitsError as cause:
        raise ImageError(path, str(cause)) from None
    except ImportError:
        raise ImageError(path, "reading FITS needs astropy: pip install 'nebula-classifier[device]'") from None


def _load_with_pil(file, path: Path, spec: PreprocessSpec | None) -> np.ndarray:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files would decode as grey")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(file)
            if spec is not None and image.format == "JPEG":
                image.draft("RGB", spec.content_size(*image.size))
            rgb16 = _read_raw_rgb16(file, image)
            depth16 = rgb16 is not None or _is_16bit_rgb(image)
            if rgb16 is None:
                image.load()  # decode now, so a truncated file fails here and not later
            upright = _UPRIGHT.get(image.getexif().get(_EXIF_ORIENTATION, 1))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(path, f"decompression bomb: more pixels than the limit of {Image.MAX_IMAGE_PIXELS} "
                                   "(PIL.Image.MAX_IMAGE_PIXELS)") from None
        except UnidentifiedImageError:
            raise ImageError(path, "not an image (unrecognised format)") from None
        except _DECODE_ERRORS as err:
            raise ImageError(path, _decode_cause(err)) from None
    if rgb16 is not None:
        array = _display_or_error(path, np.moveaxis(rgb16.astype(np.float32), 2, 0), 65535.0)
        return array if upright is None else np.asarray(Image.fromarray(array).transpose(upright))
    if upright is not None:
        image = image.transpose(upright)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image).astype(np.float32)
        full_scale = 65535.0 if image.mode.startswith("I;16") else None
        return _display_or_error(path, values[None], full_scale)
    array = to_rgb_array(image)
    if depth16 and fits.looks_linear(array, full_scale=255.0):
        return _display_or_error(path, np.moveaxis(array.astype(np.float32), 2, 0), 255.0)
    return array


def to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


# decoder name in the format table -> function(open file, path, spec) -> HxWx3 uint8
_DECODERS = {"pil": _load_with_pil, "fits": _load_fits}
_unknown = {fmt.decoder for fmt in formats.FORMATS} - set(_DECODERS)
if _unknown:
    raise ImportError(f"nebula.device.formats names decoders that decode.py lacks: {sorted(_unknown)}")


def _display_or_error(path: Path, planes: np.ndarray, full_scale: float | None) -> np.ndarray:
    try:
        return fits.to_display(planes, full_scale=full_scale)
    except fits.FitsError as cause:
        raise ImageError(path, str(cause)) from None


def _is_16bit_rgb(image: Image.Image) -> bool:
    return image.mode == "RGB" and any(";16" in str(_rawmode(tile)) for tile in image.tile)


def _rawmode(tile):
    args = tile.args if hasattr(tile, "args") else tile[3]
    return args[0] if isinstance(args, tuple) else args


def _read_raw_rgb16(file, image: Image.Image) -> np.ndarray | None:
    """Uncompressed 16-bit RGB TIFF strips as an HxWx3 uint16 array (PIL would keep only the high bytes)."""
    if image.format != "TIFF" or image.mode != "RGB" or not image.tile:
        return None
    strips = []
    for tile in image.tile:
        codec, extents, offset, args = tile
        if codec != "raw" or not isinstance(args, tuple) or args[0] not in _RGB16_RAWMODES or args[1:] not in ((0, 1), ()):
            return None
        strips.append((extents, offset, _RGB16_RAWMODES[args[0]]))
    width, height = image.size
    out = np.empty((height, width, 3), dtype=np.uint16)
    for (x0, y0, x1, y1), offset, dtype in strips:
        count = (x1 - x0) * (y1 - y0) * 3
        file.seek(offset)
        values = np.fromfile(file, dtype=dtype, count=count)
        if values.size != count:
            raise EOFError("image file is truncated")
        out[y0:y1, x0:x1] = values.reshape(y1 - y0, x1 - x0, 3)
    return out


def _decode_cause(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return f"truncated or corrupt image ({text})"
    return f"cannot decode image ({text})"
