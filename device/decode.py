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
- PNG: palette, grey and 16-bit (RGB, RGBA, grey, grey+alpha); alpha is composited onto
  black (the sky's colour), at 16 bits for 16-bit images.
- TIFF: 8 and 16 bit. 16-bit data goes through the FITS module's linear test:
  a linear export (median in the bottom few percent, see `nebula.device.fits`)
  is auto-stretched like a FITS frame, a finished picture is scaled to 8 bits
  (v / 257). PIL has no 16-bit RGB mode and keeps only each sample's high byte,
  so 16-bit RGB(A) PNGs and TIFFs (any compression PIL reads) are decoded twice, the
  second time with the byte order swapped, which yields the low bytes: all 16 bits
  reach the stretch, and PIL's own decoders do the work.
- FITS: `nebula.device.fits` (numpy; astropy is imported only for tile-compressed `.fz`).

Every input is under one pixel limit, PIL's ``Image.MAX_IMAGE_PIXELS``: PIL
formats by PIL's own check, FITS by the size its header declares, before any
pixel is read.

Files are opened without blocking and must be regular files: a FIFO named
``x.jpg`` would otherwise wait for a writer forever. Every open error (no such
file, a folder, permission, a symlink loop, a path through a file, a name too
long) is one line. A file that reads as cut short (empty, truncated, FITS data
shorter than its header declares) is an `IncompleteImage`, so a folder watcher
can wait for the writer instead of reporting it.

A truncated file is an error, never a silently grey image: PIL's
``LOAD_TRUNCATED_IMAGES`` is left False and every image is fully decoded here.
Images over PIL's ``Image.MAX_IMAGE_PIXELS`` are refused as decompression bombs
(PIL's warning counts as the error too).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
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
# A 16-bit RGB rawmode -> the one that reads the other byte of each sample as PIL's 8 bits.
_NATIVE16 = "RGB;16L" if sys.byteorder == "little" else "RGB;16B"
_SWAPPED16 = {"RGB;16L": "RGB;16B", "RGB;16B": "RGB;16L", "RGB;16N": "RGB;16B" if _NATIVE16 == "RGB;16L" else "RGB;16L",
              "RGBA;16L": "RGBA;16B", "RGBA;16B": "RGBA;16L"}
# PIL opens a 16-bit grey+alpha PNG as RGBA from "LA;16B" (high bytes only) and has no LA;16L. Its four bytes a
# pixel, read as 8-bit "RGBA", are grey high, grey low, alpha high, alpha low: all 16 bits in one decode.
_GREY_ALPHA16 = "LA;16B"
_OPEN_CAUSES = {
    errno.ENOENT: "no such file",
    errno.EISDIR: "is a folder, not an image",
    errno.EACCES: "permission denied (cannot read the file)",
    errno.EPERM: "permission denied (cannot read the file)",
    errno.ELOOP: "symlink loop (too many levels of symbolic links)",
    errno.ENOTDIR: "not a file path (a part of it is a file, not a folder)",
    errno.ENAMETOOLONG: "file name too long",
}
_NOT_REGULAR = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


class ImageError(Exception):
    """An input that cannot be classified. str() is '<file>: <cause>'."""

    def __init__(self, path, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"{path}: {cause}")


class SkippedImage(ImageError):
    """An input deliberately not classified (a dark, flat or bias frame)."""


class IncompleteImage(ImageError):
    """An input that reads as cut short (empty, truncated): perhaps still being written."""


def pixel_limit() -> int:
    """The most pixels any input may have: PIL's setting, read at each call so a change to it applies."""
    return int(Image.MAX_IMAGE_PIXELS)


def open_error_cause(path: str | Path, err: OSError) -> str:
    """One line for why `path` could not be opened."""
    if err.errno == errno.ENOENT and os.path.islink(path):
        return "dangling symlink (its target does not exist)"
    return _OPEN_CAUSES.get(err.errno) or f"cannot read the file ({err.strerror or err})"


def _open_nonblocking(path, flags):
    # Without O_NONBLOCK, opening a FIFO for reading waits for a writer, forever if none comes.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))


def _require_regular_file(path: Path, file) -> None:
    mode = os.fstat(file.fileno()).st_mode
    if not stat.S_ISREG(mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise ImageError(path, f"not an image file: {kind}")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(file.fileno(), True)


def load_image(path: str | Path, spec: PreprocessSpec | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 RGB array, upright per EXIF, alpha flattened onto black.

    With `spec`, a JPEG much larger than the model input is decoded at reduced size
    and a large FITS frame is binned down before its stretch.
    """
    path = Path(path)
    try:
        with open(path, "rb", opener=_open_nonblocking) as file:
            _require_regular_file(path, file)
            head = file.read(formats.HEAD_BYTES)
            if not head:
                raise IncompleteImage(path, "empty file (0 bytes)")
            found = formats.by_content(head) or formats.by_name(path.name)
            file.seek(0)
            return _DECODERS[found.decoder if found else "pil"](file, path, spec)
    except ImageError:
        raise
    except OSError as err:
        raise ImageError(path, open_error_cause(path, err)) from None
    except MemoryError:
        raise ImageError(path, "too large to decode in memory") from None


def _load_fits(file, path: Path, spec: PreprocessSpec | None) -> np.ndarray:
    # read from the open file (gzip recognised by content): no second open by name
    try:
        return fits.read_fits(file, spec.content_size if spec else None, max_pixels=pixel_limit())
    except fits.CalibrationFrame as reason:
        raise SkippedImage(path, str(reason)) from None
    except fits.TruncatedFits as cause:
        raise IncompleteImage(path, str(cause)) from None
    except fits.FitsError as cause:
        raise ImageError(path, str(cause)) from None
    except ImportError:
        raise ImageError(path, "reading tile-compressed FITS needs astropy: pip install 'nebula-classifier[device]'") from None


def _load_with_pil(file, path: Path, spec: PreprocessSpec | None) -> np.ndarray:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files would decode as grey")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(file)
            if spec is not None and image.format == "JPEG":
                image.draft("RGB", spec.content_size(*image.size))
            rgb16 = _decode_16bit(file, image)
            if rgb16 is None:
                image.load()  # decode now, so a truncated file fails here and not later
            upright = _UPRIGHT.get(image.getexif().get(_EXIF_ORIENTATION, 1))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(path, f"decompression bomb: more pixels than the limit of {Image.MAX_IMAGE_PIXELS} "
                                   "(PIL.Image.MAX_IMAGE_PIXELS)") from None
        except UnidentifiedImageError:
            raise ImageError(path, "not an image (unrecognised format)") from None
        except _DECODE_ERRORS as err:
            cause = _decode_cause(err)
            raise (IncompleteImage if cause.startswith("truncated") else ImageError)(path, cause) from None
    if rgb16 is not None:
        planes = np.moveaxis(rgb16, 2, 0).astype(np.float32)
        del rgb16
        if len(planes) in (2, 4):  # alpha composited onto black (the sky's colour), as to_rgb_array does at 8 bits
            planes = planes[:-1] * (planes[-1] / np.float32(65535.0))
        if spec is not None:
            planes = fits.bin_to(planes, spec.content_size)
        array = _display_or_error(path, planes, 65535.0)
        return array if upright is None else np.asarray(Image.fromarray(array).transpose(upright))
    if upright is not None:
        image = image.transpose(upright)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image).astype(np.float32)
        full_scale = 65535.0 if image.mode.startswith("I;16") else None
        return _display_or_error(path, values[None], full_scale)
    return to_rgb_array(image)


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


def _decode_16bit(file, image: Image.Image) -> np.ndarray | None:
    """All 16 bits of a 16-bit RGB, RGBA or grey+alpha image as HxWxC uint16 (C = 3, 4 or 2), else None."""
    rawmodes = {_rawmode(tile) for tile in image.tile} if image.tile else set()
    if image.mode in ("RGB", "RGBA") and rawmodes and rawmodes <= set(_SWAPPED16):
        return _decode_rgb16(file, image)
    if image.mode == "RGBA" and rawmodes == {_GREY_ALPHA16}:
        image.tile = [_with_rawmode(tile, "RGBA") for tile in image.tile]
        image.load()
        bytes_ = np.asarray(image).astype(np.uint16)
        out = bytes_[..., 0::2] << 8
        out |= bytes_[..., 1::2]
        return out  # grey, alpha
    return None


def _rawmode(tile):
    args = tile.args if hasattr(tile, "args") else tile[3]
    return args[0] if isinstance(args, tuple) else args


def _decode_rgb16(file, image: Image.Image) -> np.ndarray:
    """A 16-bit RGB(A) PNG or TIFF as an HxWxC uint16 array: PIL's high bytes, then the low bytes by a swapped rawmode."""
    image.load()
    high = np.asarray(image)
    file.seek(0)
    with Image.open(file) as again:
        again.tile = [_with_rawmode(tile, _SWAPPED16[_rawmode(tile)]) for tile in again.tile]
        again.load()
        low = np.asarray(again)
    out = high.astype(np.uint16)
    out <<= 8
    out |= low
    return out


def _with_rawmode(tile, rawmode: str):
    args = tile.args if hasattr(tile, "args") else tile[3]
    fields = (tile[0], tile[1], tile[2], (rawmode, *args[1:]) if isinstance(args, tuple) else rawmode)
    return type(tile)(*fields) if hasattr(tile, "_fields") else fields  # a NamedTuple since Pillow 11


def _decode_cause(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return f"truncated or corrupt image ({text})"
    return f"cannot decode image ({text})"
