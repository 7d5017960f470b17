"""Where a capture points: sky position, field size and target from its FITS header.

Capture programs spell the same facts differently, so the header is read in
order of trust:

1. **A WCS** (``CTYPE1/2`` RA/DEC, ``CRVAL1/2``, ``CRPIX1/2`` with ``CD1_1..CD2_2``,
   or ``CDELT1/2`` with ``PC1_1..PC2_2`` or ``CROTA2``): written by a plate solver,
   so it is the truth. The centre is the image's middle pixel projected through
   the WCS (gnomonic, exact for TAN; CRVAL itself is often not at the middle), the
   field is the pixel scale times the image size.
2. **Pointing keywords**: ``RA``/``DEC`` (Ekos, N.I.N.A., SharpCap, ASIAIR:
   degrees as numbers; strings with ``:``, spaces or ``h m s`` are sexagesimal
   hours and degrees), then ``OBJCTRA``/``OBJCTDEC`` (MaxIm/SBIG: always
   sexagesimal, hours for RA).
3. **Field size without a WCS**: ``FOCALLEN`` (mm) with the pixel size: ``XPIXSZ``/
   ``YPIXSZ`` are microns *after* binning (the MaxIm/SBIG convention N.I.N.A.
   and INDI follow), ``PIXSIZE1``/``PIXSIZE2`` are the sensor's unbinned pixels
   (INDI) and get multiplied by ``XBINNING``/``YBINNING``; or a ``PIXSCALE``/
   ``SCALE`` in arcsec per pixel. Times ``NAXIS1``/``NAXIS2`` (or ``IMAGEW``/``IMAGEH``).
4. ``OBJECT``: the target's name as the user typed it; reported, not trusted for position.

A value that cannot be read (RA 400, a Dec of "north", a singular CD matrix)
or two sources that disagree by more than the field (WCS against RA/DEC) give
a one-line warning in ``HeaderPosition.warnings``; nothing here raises on a header.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from nebula.device.fits_header import read_fits_header

ARCSEC_PER_RADIAN = 206264.806
DISAGREE_MIN_DEG = 0.5  # header RA/DEC further than max(this, the field) from the WCS centre: warn
_SEXAGESIMAL = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?)(?:[\s:hdD°]+(\d+(?:\.\d*)?))?(?:[\s:m']+(\d+(?:\.\d*)?))?[\s\"s]*$")


@dataclass(frozen=True)
class SkyPosition:
    """Where a frame points: its centre (J2000 degrees) and, when known, its field (degrees)."""

    ra: float
    dec: float
    width_deg: float | None = None
    height_deg: float | None = None
    source: str = "header"  # "header" or "solve"
    keywords: str = ""  # which header keywords gave it, e.g. "WCS (CRVAL, CD)" or "OBJCTRA/OBJCTDEC"

    @property
    def field_deg(self) -> float | None:
        """The larger side of the field, the figure a plate solver's scale range speaks of."""
        if self.width_deg is None or self.height_deg is None:
            return None
        return max(self.width_deg, self.height_deg)

    def to_record(self) -> dict:
        record = {"ra": round(self.ra, 5), "dec": round(self.dec, 5),
                  "field_deg": None if self.field_deg is None else round(self.field_deg, 4),
                  "source": self.source}
        if self.width_deg is not None:
            record["width_deg"], record["height_deg"] = round(self.width_deg, 4), round(self.height_deg, 4)
        return record


@dataclass
class HeaderPosition:
    """What a header says: a position (or None), the field when known without a position, the target, and warnings."""

    position: SkyPosition | None = None
    field_deg: tuple[float, float] | None = None  # (width, height), also when there is no position: a solver's scale hint
    target: str | None = None
    warnings: list[str] = field(default_factory=list)


def parse_ra(value) -> float:
    """RA in degrees: a number is degrees; a string with ':', spaces or h/m/s is sexagesimal hours.

    '05 35 17.3' -> 83.822, '5h35m17.3s' -> 83.822, '83.822' -> 83.822. Raises ValueError.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        degrees = float(value)
    else:
        text = str(value).strip()
        if _is_plain_number(text):
            degrees = float(text)
        elif "d" in text.lower() or "°" in text:  # '83d49m' is degrees, written as such
            degrees = _sexagesimal(text)
        else:
            degrees = _sexagesimal(text) * 15.0
    if not (math.isfinite(degrees) and 0.0 <= degrees < 360.0 + 1e-9):
        raise ValueError(f"RA {value!r} is outside 0..360 degrees (0..24 h)")
    return degrees % 360.0


def parse_dec(value) -> float:
    """Dec in degrees from a number or a sexagesimal string; the sign is the string's ('-00 30 00' is -0.5)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        degrees = float(value)
    else:
        text = str(value).strip()
        degrees = float(text) if _is_plain_number(text) else _sexagesimal(text)
    if not (math.isfinite(degrees) and -90.0 <= degrees <= 90.0):
        raise ValueError(f"Dec {value!r} is outside -90..+90 degrees")
    return degrees


def _is_plain_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _sexagesimal(text: str) -> float:
    match = _SEXAGESIMAL.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a number or a sexagesimal value")
    sign, whole, minutes, seconds = match.groups()
    value = float(whole) + float(minutes or 0) / 60 + float(seconds or 0) / 3600
    if (minutes and float(minutes) >= 60) or (seconds and float(seconds) >= 60):
        raise ValueError(f"{text!r} has minutes or seconds of 60 or more")
    return -value if sign == "-" else value


class _Header:
    """Case-insensitive, type-tolerant access to a FITS header (astropy Header or a plain dict)."""

    def __init__(self, header: Mapping):
        self._values = {str(k).upper(): v for k, v in dict(header).items() if k}

    def get(self, key: str):
        value = self._values.get(key)
        if isinstance(value, str):
            value = value.strip()
        return None if value in ("", None) else value

    def number(self, key: str) -> float | None:
        """The keyword as a float; None when absent; ValueError when it is there but not a number."""
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError(f"{key} = {value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} = {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{key} = {value!r} is not a finite number")
        return number


def read_header_position(header: Mapping, image_size: tuple[int, int] | None = None) -> HeaderPosition:
    """Position, field and target from a FITS header (any Mapping); `image_size` (width, height) when NAXIS is not in it."""
    h = _Header(header)
    found = HeaderPosition(target=str(h.get("OBJECT")) if h.get("OBJECT") is not None else None)
    size = _image_size(h, image_size, found.warnings)
    wcs = _wcs_position(h, size, found.warnings)
    pointing = _pointing_position(h, found.warnings)
    field_deg = (wcs.width_deg, wcs.height_deg) if wcs and wcs.width_deg else None
    if field_deg is None:
        field_deg = _optics_field(h, size, found.warnings)
    found.field_deg = field_deg
    if wcs is not None:
        found.position = wcs
        if pointing is not None:
            apart = separation_deg(wcs.ra, wcs.dec, pointing.ra, pointing.dec)
            if apart > max(DISAGREE_MIN_DEG, wcs.field_deg or 0.0):
                found.warnings.append(f"{pointing.keywords} ({pointing.ra:.3f}, {pointing.dec:+.3f}) is {apart:.2f} deg "
                                      f"from the WCS centre ({wcs.ra:.3f}, {wcs.dec:+.3f}); using the WCS")
    elif pointing is not None:
        width, height = field_deg or (None, None)
        found.position = SkyPosition(pointing.ra, pointing.dec, width, height, "header", pointing.keywords)
    return found


def _image_size(h: _Header, given, warnings: list[str]) -> tuple[int, int] | None:
    for keys in (("ZNAXIS1", "ZNAXIS2"), ("NAXIS1", "NAXIS2"), ("IMAGEW", "IMAGEH")):  # ZNAXIS: a tile-compressed image
        try:
            width, height = h.number(keys[0]), h.number(keys[1])
        except ValueError as err:
            warnings.append(f"image size: {err}")
            continue
        if width and height and width > 0 and height > 0:
            return int(width), int(height)
    return tuple(given) if given else None


def _wcs_position(h: _Header, size, warnings: list[str]) -> SkyPosition | None:
    if h.get("CRVAL1") is None and h.get("CRVAL2") is None:
        return None
    ctype1, ctype2 = str(h.get("CTYPE1") or "").upper(), str(h.get("CTYPE2") or "").upper()
    if not (ctype1.startswith("RA") and ctype2.startswith("DEC")):
        warnings.append(f"WCS ignored: CTYPE1/CTYPE2 are {ctype1 or 'missing'}/{ctype2 or 'missing'}, not RA---/DEC--")
        return None
    try:
        ra0, dec0 = parse_ra(h.number("CRVAL1")), parse_dec(h.number("CRVAL2"))
        matrix = _cd_matrix(h)
    except (TypeError, ValueError) as err:
        warnings.append(f"WCS ignored: {err}")
        return None
    if matrix is None:  # a pointing without a scale: CRVAL alone is still where the reference pixel looks
        return SkyPosition(ra0, dec0, None, None, "header", "WCS (CRVAL only)")
    (a, b), (c, d) = matrix
    if abs(a * d - b * c) < 1e-20:
        warnings.append("WCS ignored: its CD matrix is singular")
        return SkyPosition(ra0, dec0, None, None, "header", "WCS (CRVAL only)")
    if size is None:
        return SkyPosition(ra0, dec0, None, None, "header", "WCS (no image size)")
    width, height = size
    try:
        crpix1, crpix2 = h.number("CRPIX1") or 0.0, h.number("CRPIX2") or 0.0
    except ValueError as err:
        warnings.append(f"WCS centre taken at CRVAL: {err}")
        crpix1, crpix2 = (width + 1) / 2, (height + 1) / 2
    dx, dy = (width + 1) / 2 - crpix1, (height + 1) / 2 - crpix2  # FITS pixels count from 1
    ra, dec = _deproject_tan(ra0, dec0, a * dx + b * dy, c * dx + d * dy)
    return SkyPosition(ra, dec, math.hypot(a, c) * width, math.hypot(b, d) * height, "header", "WCS")


def _cd_matrix(h: _Header):
    """The 2x2 pixel -> degrees matrix from CD, or CDELT with PC or CROTA2; None when there is no scale."""
    if any(h.get(k) is not None for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2")):
        return [[h.number("CD1_1") or 0.0, h.number("CD1_2") or 0.0], [h.number("CD2_1") or 0.0, h.number("CD2_2") or 0.0]]
    cdelt1, cdelt2 = h.number("CDELT1"), h.number("CDELT2")
    if not cdelt1 or not cdelt2:
        return None
    if any(h.get(k) is not None for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2")):
        pc = [[h.number("PC1_1") if h.get("PC1_1") is not None else 1.0, h.number("PC1_2") or 0.0],
              [h.number("PC2_1") or 0.0, h.number("PC2_2") if h.get("PC2_2") is not None else 1.0]]
    else:
        rot = math.radians(h.number("CROTA2") or 0.0)
        pc = [[math.cos(rot), -math.sin(rot) * cdelt2 / cdelt1], [math.sin(rot) * cdelt1 / cdelt2, math.cos(rot)]]
    return [[cdelt1 * pc[0][0], cdelt1 * pc[0][1]], [cdelt2 * pc[1][0], cdelt2 * pc[1][1]]]


def _deproject_tan(ra0: float, dec0: float, x_deg: float, y_deg: float) -> tuple[float, float]:
    """Sky position of intermediate coordinates (x, y) in degrees about (ra0, dec0), gnomonic projection."""
    x, y = math.radians(x_deg), math.radians(y_deg)
    dec0r = math.radians(dec0)
    denominator = math.cos(dec0r) - y * math.sin(dec0r)
    ra = ra0 + math.degrees(math.atan2(x, denominator))
    dec = math.degrees(math.atan2(math.sin(dec0r) + y * math.cos(dec0r), math.hypot(x, denominator)))
    return ra % 360.0, dec


def _pointing_position(h: _Header, warnings: list[str]) -> SkyPosition | None:
    """The first readable RA/DEC pair: RA/DEC, then OBJCTRA/OBJCTDEC; warns about each unreadable or disagreeing one."""
    found = []
    for ra_key, dec_key in (("RA", "DEC"), ("OBJCTRA", "OBJCTDEC")):
        ra_value, dec_value = h.get(ra_key), h.get(dec_key)
        if ra_value is None and dec_value is None:
            continue
        if ra_value is None or dec_value is None:
            warnings.append(f"{ra_key}/{dec_key} ignored: only {dec_key if ra_value is None else ra_key} is present")
            continue
        try:
            ra = parse_ra(ra_value) if ra_key == "RA" else parse_ra_hours(ra_value)
            found.append(SkyPosition(ra, parse_dec(dec_value), keywords=f"{ra_key}/{dec_key}"))
        except ValueError as err:
            warnings.append(f"{ra_key}/{dec_key} ignored: {err}")
    if len(found) == 2:
        apart = separation_deg(found[0].ra, found[0].dec, found[1].ra, found[1].dec)
        if apart > DISAGREE_MIN_DEG:
            warnings.append(f"RA/DEC and OBJCTRA/OBJCTDEC are {apart:.2f} deg apart; using RA/DEC")
    return found[0] if found else None


def parse_ra_hours(value) -> float:
    """OBJCTRA-style RA: hours, always (a bare number '5.5' is 5.5 h); degrees out."""
    text = str(value).strip()
    if _is_plain_number(text):
        hours = float(text)
        if not 0.0 <= hours < 24.0 + 1e-9:
            raise ValueError(f"RA {value!r} is outside 0..24 h")
        return (hours * 15.0) % 360.0
    return parse_ra(text)


def _optics_field(h: _Header, size, warnings: list[str]) -> tuple[float, float] | None:
    """(width, height) in degrees from the plate scale and the image size; None when a piece is missing."""
    if size is None:
        return None
    try:
        scale_x = scale_y = h.number("PIXSCALE") or h.number("SCALE")  # arcsec per pixel
        if not scale_x:
            focal_mm = h.number("FOCALLEN")
            if not focal_mm:
                return None
            pixel_x, pixel_y = _pixel_size_um(h)
            if not pixel_x:
                return None
            scale_x = ARCSEC_PER_RADIAN * pixel_x / (focal_mm * 1000.0)
            scale_y = ARCSEC_PER_RADIAN * (pixel_y or pixel_x) / (focal_mm * 1000.0)
    except ValueError as err:
        warnings.append(f"field size unknown: {err}")
        return None
    if scale_x <= 0 or scale_y <= 0:
        warnings.append(f"field size unknown: plate scale {scale_x:g} arcsec/pixel is not positive")
        return None
    return scale_x * size[0] / 3600.0, scale_y * size[1] / 3600.0


def _pixel_size_um(h: _Header) -> tuple[float | None, float | None]:
    """Binned pixel size (x, y) in microns: XPIXSZ as it is, else PIXSIZE1 times the binning."""
    if h.number("XPIXSZ"):
        return h.number("XPIXSZ"), h.number("YPIXSZ")
    if h.number("PIXSIZE1"):
        bin_x, bin_y = h.number("XBINNING") or 1.0, h.number("YBINNING") or h.number("XBINNING") or 1.0
        pixel_y = h.number("PIXSIZE2") or h.number("PIXSIZE1")
        return h.number("PIXSIZE1") * bin_x, pixel_y * bin_y
    return None, None


def field_from_optics(focal_mm: float, pixel_um: float, width_px: int, height_px: int) -> tuple[float, float]:
    """Field (width, height) in degrees of a sensor behind a telescope: 206265 * pixel / focal length, times pixels."""
    scale = ARCSEC_PER_RADIAN * pixel_um / (focal_mm * 1000.0)
    return scale * width_px / 3600.0, scale * height_px / 3600.0


def separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Angle between two sky positions in degrees (haversine: exact for small angles too)."""
    ra1, dec1, ra2, dec2 = map(math.radians, (ra1, dec1, ra2, dec2))
    s = math.sin((dec2 - dec1) / 2) ** 2 + math.cos(dec1) * math.cos(dec2) * math.sin((ra2 - ra1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(s))))


def position_of_file(path: str | Path) -> HeaderPosition:
    """What a file's header says about where it points; a non-FITS file or unreadable header says nothing (a warning)."""
    from nebula.device import formats

    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(80)
    except OSError as err:
        return HeaderPosition(warnings=[f"cannot read the header ({err.strerror or err})"])
    kind = formats.by_content(head) or formats.by_name(path.name)
    if kind is None or kind.name != "FITS":
        return HeaderPosition()
    try:
        header, size = read_fits_header(path)
    except (OSError, EOFError, ValueError, TypeError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return HeaderPosition(warnings=[f"header not readable ({cause})"])
    return read_header_position(header, size)
