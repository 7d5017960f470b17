"""Astronomical data to a display image: FITS reading, Bayer debayering and the auto-stretch.

A telescope camera writes *linear* data: the pixel value is proportional to the
light collected, so the sky background and a faint nebula sit in the bottom few
percent of the range and look black. The model was trained on finished, stretched
pictures, so linear data is stretched first, the way an astrophotographer's
screen shows it.

**Stretch: the midtones transfer function (MTF) with STF-style automatic
parameters** (PixInsight's ScreenTransferFunction "auto stretch", also what Siril
and N.I.N.A. show). Per channel, the shadows are clipped at
``median - 2.8 * MAD`` and the midtones balance is solved so that the median
(the sky background) lands at `TARGET_BACKGROUND`. Chosen over asinh because
every parameter comes from robust statistics of the frame itself (median and
MAD): it needs no per-camera softening or white point, ignores hot pixels and
stars (they barely move a median), and gives every frame the same dark-grey
background whatever the sensor's offset, bit depth or exposure. asinh would
need a hand-picked softening factor per camera to look the same. The white
point is the 99.99th percentile, so a few hundred hot pixels clip to white
instead of darkening everything else. Channels are stretched unlinked: that
neutralises the background colour cast (light pollution, the green excess of a
Bayer sensor) as finished pictures are, which matters because colour is what
tells emission (red) from reflection (blue). NaNs (stacking borders) are
ignored by the statistics and drawn black.

**Is it linear?** Data whose median lies below `LINEAR_MEDIAN` of the format's
full scale (65535 for 16-bit integers, 1.0 for float data in [0, 1], else the
data's maximum) is linear: a linear sky background, camera offset included, is
a few percent of the range. Except when a large share of its pixels sits
exactly at the minimum: that is a finished picture whose background was clipped
to black, and it is only scaled. The same test decides for 16-bit TIFF and PNG.

**Debayer: 2x2 superpixel.** Each RGGB cell becomes one RGB pixel (R, mean of
the two G, B). It is exact (no interpolated colour, no zipper artefacts around
stars), numpy slicing only, and halves the resolution, which costs nothing: the
model sees 224 pixels, and a camera frame is binned far below that anyway.
``BAYERPAT`` is read as the pattern of the array as stored (first row first),
shifted by ``XBAYROFF``/``YBAYROFF`` when present; the FITS bottom-up row order
is not flipped, since a nebula's type does not depend on which way up it is.

**Reading without astropy.** The headers are parsed in pure Python
(`nebula.device.fits_header`) and the stored values read in order from the stream
(plain or gzipped) with numpy: BITPIX, BSCALE/BZERO (the unsigned conventions give
unsigned integers, as astropy gives them), BLANK. Importing astropy costs a Pi about
24 MB, so only a tile-compressed ``.fz`` image, whose tiles need its decompressors,
goes through astropy; `tests/test_decode.py` checks that both readers give the same
picture for every way of storing pixels.

Large frames are binned (block mean) to about twice the model's content size
as they are read, a strip of rows at a time: a 9576x6388 16-bit frame never
exists in memory at full size, binning averages noise and dilutes hot pixels.
A frame over the pixel limit is refused from its header alone.
"""

from __future__ import annotations

import os
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from nebula.device.fits_header import NoImage, data_bytes, first_image_header, padded, skip_bytes, unzipped

TARGET_BACKGROUND = 0.15  # darker than PixInsight's 0.25: the training pictures have a dark sky
SHADOWS_CLIP_MADS = -2.8  # PixInsight's STF default
WHITE_PERCENTILE = 99.99
LINEAR_MEDIAN = 0.1
CLIPPED_SHARE = 0.2  # a quarter of the pixels at exactly the minimum: a finished picture with a black sky
_STRIP_BYTES = 4 * 2**20  # float32 bytes of stored rows read at once when binning on read
_STATS_SAMPLES = 500_000  # robust statistics on a strided subsample: a 24 MP frame costs what 0.5 MP does
_BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
_CALIBRATION_WORDS = ("dark", "flat", "bias")
_CALIBRATION_TOKENS = ("zero", "offset")  # IRAF's and some capture programs' names for a bias frame


class FitsError(Exception):
    """A FITS file that cannot be turned into an image; the message is the cause (no file name)."""


class CalibrationFrame(Exception):
    """A dark, flat or bias frame: there is nothing to classify; the message is the reason."""


def read_fits(source, content_size=None, max_pixels: int | None = None) -> np.ndarray:
    """Read the first image HDU of a FITS file (a path or a binary file object) as HxWx3 uint8 RGB.

    Everything is decided from the header before any pixel is read: the shape, the
    pixel limit (`max_pixels`, of the stored width x height; also for tile-compressed
    ``.fz``, whose header declares the image's size) and the stored format.
    `content_size(width, height) -> (w, h)`, when given, lets a large frame be binned
    to about twice the size the model needs as it is read, a strip of rows at a time,
    so memory stays near the binned size whatever the frame's. A file that holds less
    than its header declares (data and padding) is a `TruncatedFits`.

    Plain and gzipped images are read with numpy alone, straight from the stream:
    importing astropy costs the Pi about 24 MB, so only a tile-compressed image
    (``.fz``, whose tiles need its decompressors) is handed to astropy.
    """
    with _stream(source) as (stream, raw):
        header = first_image_header(stream)
        if header.get("ZIMAGE") is True:
            raw.seek(0)
            return _read_with_astropy(raw, content_size, max_pixels)
        _refuse_calibration(header)
        layout = _Layout.of(header)
        pixels = _StoredPixels(stream, header)
        _check_pixels(layout, max_pixels)
        factor = _bin_factor(layout.width, layout.height, content_size) if content_size else 1
        planes = _read_planes(pixels, layout, factor)
        pixels.finish()
    return to_display(planes, pixels.full_scale())


@contextmanager
def _stream(source):
    """(the FITS bytes as a stream, the file under it): the file (opened here when given a path), through gzip
    when gzipped; the file under it is what astropy reads (it recognises gzip itself). Errors of the
    stream become FitsError and TruncatedFits."""
    import gzip

    opened = open(source, "rb") if isinstance(source, (str, os.PathLike)) else None
    raw = opened or source
    try:
        try:
            stream = unzipped(raw)
        except OSError as err:  # io.UnsupportedOperation (a pipe) is one too
            raise FitsError(f"not a readable FITS file ({_first_line(err)})") from None
        try:
            yield stream, raw
        except EOFError as err:  # a file or a gzip stream cut short
            raise TruncatedFits(f"truncated FITS file ({_first_line(err)})") from None
        except NoImage as err:
            raise FitsError(str(err)) from None
        except (gzip.BadGzipFile, zlib.error, ValueError, TypeError) as err:
            raise FitsError(f"not a readable FITS file ({_first_line(err)})") from None
    finally:
        if opened:
            opened.close()


_READ_PIECE_BYTES = 16 * 2**20
_STORED_TYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class _StoredPixels:
    """An image HDU's values, read from the stream in stored order and turned into physical values.

    BSCALE/BZERO apply as FITS says; the usual unsigned conventions (BITPIX 16 with BZERO 32768,
    and their 8/32/64-bit kin) give unsigned integers, as astropy does, so 16-bit camera data keeps
    its format's full scale (65535). BLANK marks missing values of integer data: with it the values
    are float32 and the missing ones NaN (drawn black, left out of the stretch), as astropy reads them.
    """

    def __init__(self, stream, header: dict):
        bitpix = header.get("BITPIX")
        if bitpix not in _STORED_TYPES:
            raise ValueError(f"BITPIX = {bitpix} is not a FITS pixel type" if bitpix is not None else "no BITPIX card")
        self.stream, self.dtype = stream, np.dtype(_STORED_TYPES[bitpix])
        self.bscale, self.bzero = float(header.get("BSCALE") or 1.0), float(header.get("BZERO") or 0.0)
        blank = header.get("BLANK")
        self.blank = blank if self.dtype.kind in "ui" and isinstance(blank, int) and not isinstance(blank, bool) else None
        self.left = data_bytes(header)
        self.padding = padded(self.left) - self.left
        self.out_dtype, self.peak = None, -np.inf

    def read(self, count: int) -> np.ndarray:
        """The next `count` values, physical (unsigned or float32 where scaled, native byte order)."""
        size = count * self.dtype.itemsize
        # In pieces: one read() of the declared size allocates all of it first, even when a cut-short file
        # holds a few KB (a whole read of a frame whose header declares gigabytes).
        pieces, got = [], 0
        while got < size:
            piece = self.stream.read(min(size - got, _READ_PIECE_BYTES))
            if not piece:
                raise EOFError("shorter than its header declares")
            pieces.append(piece)
            got += len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self.left -= size
        values = self._physical(np.frombuffer(data, self.dtype))
        self.out_dtype, self.peak = values.dtype, max(self.peak, _peak(values))
        return values

    def _physical(self, raw: np.ndarray) -> np.ndarray:
        kind, bits = raw.dtype.kind, raw.dtype.itemsize * 8
        if self.blank is None:  # integers stay integers; with BLANK they become float, the missing ones NaN
            if self.bscale == 1.0 and self.bzero == 0.0:
                return raw.astype(raw.dtype.newbyteorder("="))
            if kind == "u" and self.bscale == 1.0 and self.bzero == -128.0:  # signed bytes
                return (raw ^ np.uint8(0x80)).view(np.int8)
            if kind == "i" and self.bscale == 1.0 and self.bzero == 2.0 ** (bits - 1):  # unsigned 16/32/64-bit
                unsigned = raw.view(f">u{bits // 8}").astype(f"u{bits // 8}")
                return unsigned ^ np.array(1 << (bits - 1), dtype=unsigned.dtype)
        values = raw.astype(np.float32) * np.float32(self.bscale) + np.float32(self.bzero)
        if self.blank is not None:
            values[raw == self.blank] = np.nan
        return values

    def finish(self) -> None:
        """Past the rest of the data and its padding: a file cut short anywhere before its end is truncated."""
        skip_bytes(self.stream, self.left + self.padding)
        self.left = self.padding = 0

    def full_scale(self) -> float | None:
        return _full_scale(self.out_dtype, self.peak)


def _read_with_astropy(source, content_size, max_pixels: int | None) -> np.ndarray:
    """A tile-compressed image (.fz), through astropy: the header decides as in read_fits, then the pixels."""
    from astropy.io import fits  # imported here: only tile-compressed FITS pays for astropy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(source, memmap=False, lazy_load_hdus=True) as hdus:
                hdu = _first_astropy_image(hdus)
                header = hdu.header
                _refuse_calibration(header)
                layout = _Layout.of(header)
                _check_pixels(layout, max_pixels)
                if _cut_short(caught):
                    raise TruncatedFits("truncated FITS file (shorter than its header declares)")
                factor = _bin_factor(layout.width, layout.height, content_size) if content_size else 1
                planes, full_scale = _read_astropy_planes(hdu, layout, factor)
        except (FitsError, CalibrationFrame):
            raise
        except (OSError, ValueError, TypeError, IndexError, EOFError) as err:
            if _cut_short(caught) or isinstance(err, EOFError):
                raise TruncatedFits("truncated FITS file") from None
            raise FitsError(f"not a readable FITS file ({_first_line(err)})") from None
    if _cut_short(caught):
        raise TruncatedFits("truncated FITS file")
    return to_display(planes, full_scale)


class TruncatedFits(FitsError):
    """The file holds less than its header declares: cut short, or still being written."""


def _cut_short(caught) -> bool:
    return any("truncated" in str(w.message) or "not multiple of 2880" in str(w.message) for w in caught)


@dataclass(frozen=True)
class _Layout:
    """How the pixels of an image HDU are stored, from its header alone."""

    shape: tuple  # the data's numpy shape, leading length-1 axes dropped
    kind: str  # "mono", "bayer", "planes_first" (3, H, W) or "planes_last" (H, W, 3)
    stored_width: int
    stored_height: int
    pattern: str = ""
    x_offset: int = 0
    y_offset: int = 0

    @property
    def width(self) -> int:  # of the RGB planes: a Bayer mosaic's superpixels halve it
        return self.stored_width // 2 if self.kind == "bayer" else self.stored_width

    @property
    def height(self) -> int:
        return self.stored_height // 2 if self.kind == "bayer" else self.stored_height

    @classmethod
    def of(cls, header) -> "_Layout":
        naxis = int(header.get("NAXIS", 0))
        shape = tuple(int(header.get(f"NAXIS{i}", 0)) for i in range(naxis, 0, -1))
        while len(shape) > 2 and shape[0] == 1:  # NAXIS3 = 1: a plain 2-D frame
            shape = shape[1:]
        if len(shape) == 2:
            height, width = shape
            pattern = str(header.get("BAYERPAT", "")).strip().upper()
            kind = "mono" if pattern in ("", "NONE", "MONO") else "bayer"
            if kind == "bayer" and pattern not in _BAYER_PATTERNS:
                raise FitsError(f"unsupported BAYERPAT '{pattern}' (expected one of {', '.join(_BAYER_PATTERNS)})")
            layout = cls(shape, kind, width, height, pattern if kind == "bayer" else "",
                         int(header.get("XBAYROFF", 0) or 0), int(header.get("YBAYROFF", 0) or 0))
        elif len(shape) == 3 and shape[0] == 3:  # FITS' usual NAXIS3 = 3: planes first
            layout = cls(shape, "planes_first", shape[2], shape[1])
        elif len(shape) == 3 and shape[2] == 3:
            layout = cls(shape, "planes_last", shape[1], shape[0])
        else:
            raise FitsError(f"unsupported data shape {shape} (expected 2-D mono/Bayer or a 3-plane RGB cube)")
        if layout.stored_width < 2 or layout.stored_height < 2:
            raise FitsError(f"image is {layout.stored_width}x{layout.stored_height} pixels: too small to classify")
        return layout

    def planes(self, data: np.ndarray) -> np.ndarray:
        """Stored rows (any number, even for Bayer) to (C, rows, W) float32 planes, C = 1 or 3."""
        data = np.asarray(data, dtype=np.float32)
        if self.kind == "mono":
            return data[None]
        if self.kind == "bayer":
            return debayer_superpixel(data, self.pattern, self.x_offset, self.y_offset)
        return data if self.kind == "planes_first" else np.moveaxis(data, 2, 0)


def _check_pixels(layout: _Layout, max_pixels: int | None) -> None:
    pixels = layout.stored_width * layout.stored_height
    if max_pixels is not None and pixels > max_pixels:
        raise FitsError(f"header declares {layout.stored_width}x{layout.stored_height} pixels ({pixels / 1e6:.1f} MP), "
                        f"over the limit of {max_pixels / 1e6:.1f} MP (PIL.Image.MAX_IMAGE_PIXELS)")


def _read_planes(pixels: _StoredPixels, layout: _Layout, factor: int) -> np.ndarray:
    """(C, H, W) float32 planes binned by `factor`, read in stored order: strips of rows (plane by plane
    for a planes-first cube), each binned before the next is read."""
    values_per_row = layout.stored_width * (3 if layout.kind == "planes_last" else 1)
    stored_rows = layout.stored_height
    if factor == 1:
        data = pixels.read(int(np.prod(layout.shape))).reshape(layout.shape)
        return layout.planes(data)
    rows_per_bin = factor * (2 if layout.kind == "bayer" else 1)  # stored rows per output row
    out_h, out_w = layout.height // factor, layout.width // factor
    out = np.empty((1 if layout.kind == "mono" else 3, out_h, out_w), dtype=np.float32)
    bins_per_read = max(1, _STRIP_BYTES // (rows_per_bin * values_per_row * 4))
    strip_shape = (-1,) + (layout.shape[1:] if layout.kind != "planes_first" else layout.shape[2:])
    for plane in range(3) if layout.kind == "planes_first" else [None]:
        for first in range(0, out_h, bins_per_read):
            last = min(out_h, first + bins_per_read)
            strip = pixels.read((last - first) * rows_per_bin * values_per_row).reshape(strip_shape)
            target = out[:, first:last] if plane is None else out[plane:plane + 1, first:last]
            planes = layout.planes(strip) if plane is None else strip[None].astype(np.float32)
            target[:] = _block_mean(planes, factor)[:, :, :out_w]
        if plane is not None:  # the rows below the last whole bin, before the next plane starts
            pixels.read((stored_rows - out_h * rows_per_bin) * values_per_row)
    return out


def _read_astropy_planes(hdu, layout: _Layout, factor: int) -> tuple[np.ndarray, float | None]:
    """(C, H, W) float32 planes binned by `factor`, and the stored format's full scale (astropy's HDU)."""
    if factor == 1:
        data = hdu.data
        if data is None:
            raise FitsError("no image data")
        return layout.planes(np.asarray(data).reshape(layout.shape)), _full_scale(data.dtype, _peak(data))
    rows_per_bin = factor * (2 if layout.kind == "bayer" else 1)  # stored rows per output row
    out_h, out_w = layout.height // factor, layout.width // factor
    out = np.empty((1 if layout.kind == "mono" else 3, out_h, out_w), dtype=np.float32)
    row_bytes = rows_per_bin * layout.stored_width * (3 if layout.kind.startswith("planes") else 1) * 4
    bins_per_read = max(1, _STRIP_BYTES // row_bytes)
    section, peak, dtype = hdu.section, -np.inf, None
    for first in range(0, out_h, bins_per_read):
        last = min(out_h, first + bins_per_read)
        rows = slice(first * rows_per_bin, last * rows_per_bin)
        strip = section[:, rows, :] if layout.kind == "planes_first" else section[rows]
        strip = strip.reshape((3, -1, layout.stored_width) if layout.kind == "planes_first" else (-1,) + layout.shape[1:])
        dtype, peak = strip.dtype, max(peak, _peak(strip))
        out[:, first:last] = _block_mean(layout.planes(strip), factor)[:, :, :out_w]
    return out, _full_scale(dtype, peak)


def _peak(data: np.ndarray) -> float:
    if data.dtype.kind in "ui" or data.size == 0:
        return -np.inf  # not needed: integers have a format full scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmax(data))


def _full_scale(dtype: np.dtype, peak: float) -> float | None:
    """The white of the stored format, to scale data that is already stretched."""
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        return float(np.iinfo(dtype).max)
    return 1.0 if np.isfinite(peak) and 0 < peak <= 1.0 else None


def _first_astropy_image(hdus):
    """The first HDU whose header declares an image of at least two axes (no data is read)."""
    for hdu in hdus:
        header = hdu.header
        naxis = int(header.get("NAXIS", 0))
        if hdu.is_image and naxis >= 2 and all(int(header.get(f"NAXIS{i}", 0)) > 0 for i in range(1, naxis + 1)):
            return hdu
    raise FitsError("no image HDU (only tables or empty headers)")


def _refuse_calibration(header) -> None:
    kind = str(header.get("IMAGETYP", header.get("FRAME", ""))).strip()
    lowered = kind.lower()
    words = lowered.replace("_", " ").replace("-", " ").split()
    if any(word in lowered for word in _CALIBRATION_WORDS) or any(token in words for token in _CALIBRATION_TOKENS):
        raise CalibrationFrame(f"calibration frame, not a sky image (IMAGETYP = '{kind}')")


def debayer_superpixel(mosaic: np.ndarray, pattern: str, x_offset: int = 0, y_offset: int = 0) -> np.ndarray:
    """A Bayer mosaic (H, W) to (3, H//2, W//2) RGB, one pixel per 2x2 cell; see the module docstring."""
    pattern = pattern.upper()
    if pattern not in _BAYER_PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}")
    # An odd offset means the stored array starts one column/row into the pattern.
    cell = np.array(list(pattern)).reshape(2, 2)
    cell = np.roll(cell, (-(y_offset % 2), -(x_offset % 2)), axis=(0, 1))
    h, w = mosaic.shape[0] // 2 * 2, mosaic.shape[1] // 2 * 2
    sites = {(dy, dx): mosaic[dy:h:2, dx:w:2] for dy in (0, 1) for dx in (0, 1)}
    red = next(v for k, v in sites.items() if cell[k] == "R")
    blue = next(v for k, v in sites.items() if cell[k] == "B")
    green = [v for k, v in sites.items() if cell[k] == "G"]
    return np.stack([red, (green[0] + green[1]) * np.float32(0.5), blue]).astype(np.float32, copy=False)


def bin_to(planes: np.ndarray, content_size) -> np.ndarray:
    """Block-average (C, H, W) by the largest integer factor that keeps it at least twice `content_size`."""
    _, h, w = planes.shape
    factor = _bin_factor(w, h, content_size)
    return planes if factor == 1 else _block_mean(planes, factor)


def _bin_factor(width: int, height: int, content_size) -> int:
    cw, ch = content_size(width, height)
    return max(1, min(width // (2 * cw), height // (2 * ch)))


def _block_mean(planes: np.ndarray, factor: int) -> np.ndarray:
    """(C, H, W) -> (C, H // factor, W // factor): the mean of each factor x factor block, NaNs ignored."""
    c, h, w = planes.shape
    hb, wb = h // factor, w // factor
    blocks = planes[:, : hb * factor, : wb * factor].reshape(c, hb, factor, wb, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN block stays NaN, drawn black
        return np.nanmean(blocks, axis=(2, 4), dtype=np.float32)


def to_display(planes: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """(C, H, W) float data to HxWx3 uint8: auto-stretched when linear, else scaled; NaN -> black.

    Data that is not linear is scaled by `full_scale` (the format's white: 65535 for
    16-bit) when given, else from its minimum to its white point.
    """
    finite_mask = np.isfinite(planes)
    finite = planes if finite_mask.all() else planes[finite_mask]
    if finite.size == 0:
        nans = int(np.isnan(planes).sum())
        what = "all NaN" if nans == planes.size else "all infinite" if nans == 0 else "only NaN and infinite values"
        raise FitsError(f"no finite pixels ({what})")
    sample = _subsample(finite)
    low, white = _range(sample, finite)
    if white <= low:
        raise FitsError(f"constant image (every pixel is {low:g})")
    linear = _is_linear(sample, low, full_scale or float(finite.max()))
    if linear:
        channels = [_stretch(p, low, white) for p in planes]
    elif full_scale:
        channels = [_to_uint8(np.clip(p / np.float32(full_scale), 0.0, 1.0)) for p in planes]
    else:
        channels = [_to_uint8(np.clip((p - low) / (white - low), 0.0, 1.0)) for p in planes]
    out = np.empty(planes.shape[1:] + (3,), dtype=np.uint8)
    for i in range(3):
        out[..., i] = channels[i if len(channels) == 3 else 0]
    return out


def _range(sample: np.ndarray, finite: np.ndarray) -> tuple[float, float]:
    """(minimum, white point): the white point ignores the brightest 0.01% (hot pixels)."""
    low, white = float(sample.min()), float(np.percentile(sample, WHITE_PERCENTILE))
    if white <= low:  # a nearly constant frame with a few bright pixels: use them
        white = float(finite.max())
        low = min(low, float(finite.min()))
    return low, white


def _is_linear(sample: np.ndarray, low: float, full_scale: float) -> bool:
    """Linear: the median sits in the bottom few percent of the format's range, and the sky is not clipped."""
    if full_scale <= low:
        return False
    median = float(np.median(sample)) - min(low, 0.0)
    return median / (full_scale - min(low, 0.0)) < LINEAR_MEDIAN and float(np.mean(sample <= low)) < CLIPPED_SHARE


def mtf(midtones: float, x):
    """PixInsight's midtones transfer function: maps 0->0, midtones->0.5, 1->1."""
    return (midtones - 1) * x / ((2 * midtones - 1) * x - midtones)


def _stretch(plane: np.ndarray, low: float, white: float) -> np.ndarray:
    """STF auto-stretch of one channel (see the module docstring) to uint8."""
    sample = _subsample(plane[np.isfinite(plane)] if not np.isfinite(plane).all() else plane)
    if sample.size == 0:
        return np.zeros(plane.shape, dtype=np.uint8)
    x = (sample - low) / (white - low)
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median))) * 1.4826
    shadows = min(max(0.0, median + SHADOWS_CLIP_MADS * mad), median)
    # Midtones balance that sends the (shadow-clipped) median to the target background.
    background = (median - shadows) / max(1.0 - shadows, 1e-12)
    midtones = float(mtf(TARGET_BACKGROUND, background)) if background > 0 else 0.5
    x = (plane - (low + shadows * (white - low))) / ((1.0 - shadows) * (white - low))
    np.clip(x, 0.0, 1.0, out=x)
    y = mtf(midtones, x)
    return _to_uint8(y)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    out = np.nan_to_num(unit, nan=0.0) * 255.0 + 0.5
    return out.astype(np.uint8)


def _subsample(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1)
    step = max(1, flat.size // _STATS_SAMPLES)
    return flat[::step].astype(np.float32, copy=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
