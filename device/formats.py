"""What counts as an image: the one table of input formats, read by every route.

Decode dispatch (`nebula.device.decode`), the watched folder, folder walks of
``nebula classify``, ``nebula data merge``, the web page's content check and the
help texts all read `FORMATS`. Adding a format is one `ImageFormat` entry here
plus its decoder in `nebula.device.decode` (named by `decoder`).

Standard library only: the watcher and the dataset tools read it without PIL or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath


@dataclass(frozen=True)
class ImageFormat:
    name: str  # what people call it, in messages and help texts
    suffixes: tuple[str, ...]  # lower case, the first is the one a nameless upload is saved with
    magic: tuple[bytes, ...]  # how its content starts; () when it cannot be told by content
    decoder: str  # the key of its decoder in nebula.device.decode


FORMATS = (
    ImageFormat("JPEG", (".jpg", ".jpeg"), (b"\xff\xd8\xff",), "pil"),
    ImageFormat("PNG", (".png",), (b"\x89PNG\r\n\x1a\n",), "pil"),
    ImageFormat("TIFF", (".tif", ".tiff"), (b"II*\x00", b"MM\x00*"), "pil"),
    # Gzipped FITS starts with gzip's magic, so it is known by name only; fpack's .fz is
    # a FITS file (tile-compressed HDUs) and starts like one.
    ImageFormat("FITS", (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fz"), (b"SIMPLE  =",), "fits"),
)

IMAGE_SUFFIXES = tuple(suffix for fmt in FORMATS for suffix in fmt.suffixes)
HEAD_BYTES = max(len(magic) for fmt in FORMATS for magic in fmt.magic)  # enough of a file to sniff it


def names_text() -> str:
    """'JPEG, PNG, TIFF or FITS': the formats, for messages and help texts."""
    names = [fmt.name for fmt in FORMATS]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def in_help(function):
    """Decorator: write the formats' names into a command's docstring (its --help) where it says {formats}."""
    function.__doc__ = function.__doc__.replace("{formats}", names_text())
    return function


def by_content(head: bytes) -> ImageFormat | None:
    """The format whose magic bytes `head` (a file's first `HEAD_BYTES`) starts with, or None."""
    return next((fmt for fmt in FORMATS if any(head.startswith(magic) for magic in fmt.magic)), None)


def image_suffix(name: str) -> str | None:
    """The known image suffix `name` ends with, case-insensitively (the longest: '.fits.gz', not '.gz'), or None."""
    lowered = name.lower()
    matches = [suffix for suffix in IMAGE_SUFFIXES if lowered.endswith(suffix)]
    return max(matches, key=len) if matches else None


def by_name(name: str) -> ImageFormat | None:
    suffix = image_suffix(name)
    return next((fmt for fmt in FORMATS if suffix in fmt.suffixes), None) if suffix else None


def is_image_name(name: str) -> bool:
    """A file name that a folder walk takes: a known image suffix and not hidden (.DS_Store, ._M42.jpg)."""
    return not name.startswith(".") and image_suffix(name) is not None


def stem(name: str) -> str:
    """The name without its image suffix: 'M42.fits.gz' -> 'M42' (Path.stem would keep 'M42.fits')."""
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else PurePath(name).stem
