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


def read_header_blocks(file) -> bytes | None:
    """The next HDU's header bytes, through the block that holds END; None at a clean end of the file.

    Raises EOFError when the file ends inside a header, ValueError when no END comes in
    _MAX_HEADER_BLOCKS blocks.
    """
    chunks = []
    for _ in range(_MAX_HEADER_BLOCKS):
        block = file.read(_BLOCK)
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


def fits_headers(file) -> Iterator[dict]:
    """Each HDU's header of an open binary FITS file, in order, skipping the data between them."""
    first = True
    while True:
        try:
            data = read_header_blocks(file)
        except (EOFError, ValueError):
            data = None
        if data is None:
            if first:
                raise ValueError("no complete FITS header")
            return
        if first and not data.startswith(b"SIMPLE  ="):
            raise ValueError("not a FITS file (no SIMPLE card)")
        first = False
        header = parse_header_cards(data)
        yield header
        skip = padded(data_bytes(header))
        if skip and len(file.read(skip)) < skip:
            return


def read_fits_header(path: str | Path) -> tuple[dict, tuple[int, int] | None]:
    """The header of a FITS file's first image HDU (a tile-compressed one too) and that image's (width, height).

    Reads only header blocks, in pure Python (no astropy: the Pi pays for that import);
    gzip-compressed files are read through gzip. Raises ValueError for a file that is not FITS.
    """
    import gzip

    path = Path(path)
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as file:
        for header in fits_headers(file):
            if header.get("ZIMAGE") is True and header.get("ZNAXIS1"):
                return header, (int(header["ZNAXIS1"]), int(header.get("ZNAXIS2") or 1))
            if int(header.get("NAXIS") or 0) >= 2 and header.get("XTENSION", "IMAGE") == "IMAGE":
                return header, (int(header["NAXIS1"]), int(header["NAXIS2"]))
    raise ValueError("no image HDU")
