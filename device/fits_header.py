"""FITS headers in pure Python: the cards, the 2880-byte header blocks, the walk from HDU to HDU.

No astropy (importing it costs a Pi about 24 MB) and no numpy: `nebula.device.position`
reads where a capture points from these headers, `nebula.device.platesolve` reads the
solver's WCS with them, and `nebula.device.fits` finds the image to read its pixels.
Lenient where astropy is (lower-case keywords, END followed by NULs), strict where a
file is not FITS at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

_BLOCK = 2880
_CARD = 80
_MAX_HEADER_BLOCKS = 1000  # 2.9 MB of header: beyond that the file is not a sane FITS header


def parse_card_value(text: str):
    """The value of one header card (the part after '= '): str, bool, int, float, or None when empty."""
    text = text.strip()
    if text.startswith("'"):
        out, i = [], 1
        while i < len(text):
            if text[i] == "'":
                if text[i + 1:i + 2] == "'":  # '' is a quote inside a string
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(text[i])
            i += 1
        return "".join(out).rstrip()
    value = text.split("/", 1)[0].strip()
    if value in ("T", "F"):
        return value == "T"
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value.replace("D", "E"))
    except ValueError:
        return value


def parse_header_cards(data: bytes) -> dict:
    """FITS header bytes (80-character cards, up to END) as {KEYWORD: value}; COMMENT/HISTORY left out."""
    header = {}
    for start in range(0, len(data) - _CARD + 1, _CARD):
        card = data[start:start + _CARD].decode("ascii", errors="replace")
        key = card[:8].strip(" \0").upper()  # lenient as astropy is: lower-case keywords, END followed by NULs
        if key == "END":
            break
        if key and card[8:10] == "= ":
            header.setdefault(key, parse_card_value(card[10:]))
    return header


class NoImage(ValueError):
    """A FITS file whose HDUs hold no image (only tables or empty headers)."""


def read_header_blocks(file, first: bool = False) -> bytes | None:
    """The next HDU's header bytes, through the block that holds END; None at a clean end of the file.

    With `first`, bytes that do not start with SIMPLE are not FITS (ValueError) however short
    they are. Raises EOFError when the file ends inside a header, ValueError when no END comes
    in _MAX_HEADER_BLOCKS blocks.
    """
    chunks = []
    for _ in range(_MAX_HEADER_BLOCKS):
        block = file.read(_BLOCK)
        if first and not chunks and not block.startswith(b"SIMPLE  ="):
            raise ValueError("no SIMPLE card at its start")
        if not block and not chunks:
            return None
        if len(block) < _BLOCK:
            raise EOFError("the file ends inside a FITS header")
        chunks.append(block)
        if any(_is_end_card(block[i:i + 8]) for i in range(0, _BLOCK, _CARD)):
            return b"".join(chunks)
    raise ValueError(f"no END card in {_MAX_HEADER_BLOCKS} header blocks")


def _is_end_card(keyword: bytes) -> bool:
    """END, then blanks; or NULs, as ImageMagick 7.0.10-13 and later write it."""
    return keyword[:3] == b"END" and not keyword[3:].strip(b" \0")


def data_bytes(header: dict) -> int:
    """How many bytes of data follow an HDU's header, before the padding to a whole 2880-byte block.

    Random groups (GROUPS = T, NAXIS1 = 0) leave NAXIS1 out of the count, as the standard says.
    Raises ValueError for a negative axis length.
    """
    naxis = int(header.get("NAXIS") or 0)
    groups = header.get("GROUPS") is True and int(header.get("NAXIS1") or 0) == 0
    cells = 1
    for axis in range(2 if groups else 1, naxis + 1):
        length = int(header.get(f"NAXIS{axis}") or 0)
        if length < 0:
            raise ValueError(f"NAXIS{axis} = {length}")
        cells *= length
    return abs(int(header.get("BITPIX") or 8)) // 8 * int(header.get("GCOUNT") or 1) \
        * ((cells if naxis else 0) + int(header.get("PCOUNT") or 0))


def padded(size: int) -> int:
    """`size` bytes rounded up to whole FITS blocks."""
    return -(-size // _BLOCK) * _BLOCK


def skip_bytes(file, size: int) -> None:
    """Past `size` bytes, read in 1 MB pieces (a gzip stream cannot seek cheaply); EOFError when the file ends first."""
    while size > 0:
        got = len(file.read(min(size, 2**20)))
        if got == 0:
            raise EOFError("the file ends inside an HDU's data")
        size -= got


def unzipped(raw):
    """The FITS bytes of an open binary file: through gzip when it is gzipped (by content), else the file itself."""
    import gzip

    gzipped = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw


def is_image(header: dict, primary: bool) -> bool:
    """An HDU holding an image of two or more axes, none empty; a tile-compressed one (ZIMAGE = T) too."""
    if header.get("ZIMAGE") is True:
        return True
    if (not primary and str(header.get("XTENSION", "")).strip() != "IMAGE") or header.get("GROUPS") is True:
        return False
    naxis = int(header.get("NAXIS") or 0)
    return naxis >= 2 and all(int(header.get(f"NAXIS{i}") or 0) > 0 for i in range(1, naxis + 1))


def fits_headers(file) -> Iterator[dict]:
    """Each HDU's header of an open binary FITS file, in order. The file is left at the start of the data of
    the header last yielded, and is read past that data only when the next header is asked for.

    Raises ValueError when it is not FITS or a header cannot be read, EOFError when the file ends inside
    a header or inside data it has to skip.
    """
    first = True
    while (blocks := read_header_blocks(file, first)) is not None:
        header = parse_header_cards(blocks)
        yield header
        skip_bytes(file, padded(data_bytes(header)))
        first = False


def first_image_header(file) -> dict:
    """The header of the first HDU holding an image (`is_image`); the file is left at the start of its data.

    Raises as `fits_headers` does, and NoImage when no HDU holds an image.
    """
    for index, header in enumerate(fits_headers(file)):
        if is_image(header, primary=index == 0):
            return header
    raise NoImage("no image HDU (only tables or empty headers)")


def read_fits_header(path: str | Path) -> tuple[dict, tuple[int, int]]:
    """The header of a FITS file's first image HDU (a tile-compressed one too) and that image's (width, height).

    Reads only header blocks, in pure Python (no astropy: the Pi pays for that import);
    gzip-compressed files are read through gzip. Raises ValueError for a file that is not FITS
    or holds no image, EOFError for one cut short before its image.
    """
    with open(path, "rb") as raw:
        header = first_image_header(unzipped(raw))
    prefix = "ZNAXIS" if header.get("ZIMAGE") is True else "NAXIS"
    return header, (int(header.get(f"{prefix}1") or 0), int(header.get(f"{prefix}2") or 1))
