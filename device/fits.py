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

Large frames are binned (block mean) to about twice the model's content size
before stretching: faster, and binning averages noise and dilutes hot pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

TARGET_BACKGROUND = 0.15  # darker than PixInsight's 0.25: the training pictures have a dark sky
SHADOWS_CLIP_MADS = -2.8  # PixInsight's STF default
WHITE_PERCENTILE = 99.99
LINEAR_MEDIAN = 0.1
CLIPPED_SHARE = 0.2  # a quarter of the pixels at exactly the minimum: a finished picture with a black sky
_STATS_SAMPLES = 500_000  # robust statistics on a strided subsample: a 24 MP frame costs what 0.5 MP does
_BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
_CALIBRATION_WORDS = ("dark", "flat", "bias")
_CALIBRATION_TOKENS = ("zero", "offset")  # IRAF's and some capture programs' names for a bias frame


class FitsError(Exception):
    """A FITS file that cannot be turned into an image; the message is the cause (no file name)."""


class CalibrationFrame(Exception):
    """A dark, flat or bias frame: there is nothing to classify; the message is the reason."""


def read_fits(path: str | Path, content_size=None) -> np.ndarray:
    """Read the first image HDU of a FITS file as an HxWx3 uint8 RGB array (stretched if linear).

    `content_size(width, height) -> (w, h)`, when given, lets large frames be binned
    down to about twice the size the model needs before the stretch.
    """
    from astropy.io import fits  # imported here: only FITS inputs pay for astropy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdus:
                header, data = _first_image(hdus)
                _refuse_calibration(header)
                full_scale = _full_scale(data)
                data = np.asarray(data, dtype=np.float32)
        except (FitsError, CalibrationFrame):
            raise
        except (OSError, ValueError, TypeError, IndexError, EOFError) as err:
            if any("truncated" in str(w.message) for w in caught):
                raise FitsError("truncated FITS file") from None
            raise FitsError(f"not a readable FITS file ({_first_line(err)})") from None
    if any("truncated" in str(w.message) for w in caught):
        raise FitsError("truncated FITS file")
    planes = _to_planes(data, header)
    if content_size is not None:
        planes = bin_to(planes, content_size)
    return to_display(planes, full_scale)


def _full_scale(data: np.ndarray) -> float | None:
    """The white of the stored format, to scale data that is already stretched."""
    if data.dtype.kind in "ui" and data.dtype.itemsize <= 2:
        return float(np.iinfo(data.dtype).max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        peak = np.nanmax(data) if data.size else np.nan
    return 1.0 if np.isfinite(peak) and 0 < peak <= 1.0 else None


def _first_image(hdus):
    for hdu in hdus:
        if hdu.is_image and hdu.header.get("NAXIS", 0) >= 2 and hdu.data is not None:
            return hdu.header, hdu.data
    raise FitsError("no image HDU (only tables or empty headers)")


def _refuse_calibration(header) -> None:
    kind = str(header.get("IMAGETYP", header.get("FRAME", ""))).strip()
    lowered = kind.lower()
    words = lowered.replace("_", " ").replace("-", " ").split()
    if any(word in lowered for word in _CALIBRATION_WORDS) or any(token in words for token in _CALIBRATION_TOKENS):
        raise CalibrationFrame(f"calibration frame, not a sky image (IMAGETYP = '{kind}')")


def _to_planes(data: np.ndarray, header) -> np.ndarray:
    """A (C, H, W) float32 array with C = 1 (mono) or 3 (RGB)."""
    data = np.squeeze(data)
    if data.ndim == 2:
        pattern = str(header.get("BAYERPAT", "")).strip().upper()
        if pattern in ("", "NONE", "MONO"):
            return data[None]
        if pattern not in _BAYER_PATTERNS:
            raise FitsError(f"unsupported BAYERPAT '{pattern}' (expected one of {', '.join(_BAYER_PATTERNS)})")
        return debayer_superpixel(data, pattern, int(header.get("XBAYROFF", 0) or 0), int(header.get("YBAYROFF", 0) or 0))
    if data.ndim == 3:
        if data.shape[0] == 3:  # FITS' usual NAXIS3 = 3: planes first
            return data
        if data.shape[2] == 3:
            return np.moveaxis(data, 2, 0)
    raise FitsError(f"unsupported data shape {data.shape} (expected 2-D mono/Bayer or a 3-plane RGB cube)")


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
    cw, ch = content_size(w, h)
    factor = max(1, min(w // (2 * cw), h // (2 * ch)))
    if factor == 1:
        return planes
    c, hb, wb = planes.shape[0], h // factor, w // factor
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
        raise FitsError("no finite pixels (all NaN)")
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


def looks_linear(values: np.ndarray, full_scale: float | None = None) -> bool:
    """The linear-data test of `to_display` on its own (see the module docstring)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return False
    sample = _subsample(finite)
    return _is_linear(sample, float(sample.min()), full_scale or float(finite.max()))


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
