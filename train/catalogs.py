"""Deep-sky catalogs that say what a photographed object is: Stellarium's own and OpenNGC.

Stellarium's `nebulae/default/catalog.dat` is a gzip-compressed Qt QDataStream
(big-endian, doubles for floating point): two QStrings (version, edition),
then one record per object as `Nebula::readDSO` in Stellarium's
src/core/modules/Nebula.cpp reads it. `names.dat` maps designations to proper
names. OpenNGC ships with the `pyongc` package as SQLite (ra/dec in radians).
Each catalog's object type becomes one of the seven labels, or None where the
type does not settle it ("nebula", "cluster with nebulosity"): the caller then
needs another rule or a curated entry.
"""

from __future__ import annotations

import gzip
import math
import re
import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The type -> label rules are the device's (it labels catalog look-ups on the Pi with them): one home, imported here.
from nebula.device.skycatalog import OPENNGC_TYPES, PREFIX_LABELS, STELLARIUM_TYPES  # noqa: F401  (re-exported)
from nebula.device.skycatalog import unit_vectors

# Stellarium record fields after the morphological type, in stream order (Nebula::readDSO, catalog 3.16).
_INT_IDS = ("NGC", "IC", "M", "C", "B", "Sh2", "vdB", "RCW", "LDN", "LBN", "Cr", "Mel", "PGC", "UGC")
_STR_IDS_A = ("PK", "PN G", "SNR G", "ACO", "HCG", "ESO", "vdBH")
_INT_IDS_B = ("DWB", "Tr", "St", "Ru", "vdB-Ha")
# Order in which a designation is preferred when naming an object (Messier first, as Stellarium does).
_PREFERRED = ("M", "NGC", "IC", "C", "B", "Sh2", "vdB", "RCW", "LDN", "LBN", "Cr", "Mel", "SNR G", "PN G", "PK",
              "Abell", "ACO", "Arp", "VV", "HCG", "Ced", "UGC", "PGC", "ESO", "vdBH", "DWB", "Tr", "St", "Ru", "vdB-Ha")

_HEAD = struct.Struct(">I4dI")  # DSO_nb, ra, dec, bMag, vMag, type
_MIDDLE = struct.Struct(">2di6d14I")  # axes, orientation, redshift.., distance.., 14 catalog numbers
_ARP_VV = struct.Struct(">2I")
_TAIL = struct.Struct(">5I")


class CatalogError(ValueError):
    """A catalog file that cannot be read; the message names the file and the cause."""


@dataclass(frozen=True)
class Dso:
    """One deep-sky object of a catalog, positions in degrees (J2000)."""

    number: int  # Stellarium's DSO number (unique in catalog.dat)
    ra: float
    dec: float
    type_code: int
    morphology: str
    size: float  # major axis, degrees (0 when unknown)
    ids: tuple[str, ...] = field(default=())  # designations, preferred first: ("M 42", "NGC 1976", "Sh2-281", ...)

    @property
    def designation(self) -> str:
        return self.ids[0] if self.ids else f"DSO {self.number}"

    @property
    def type_name(self) -> str:
        return STELLARIUM_TYPES.get(self.type_code, ("undocumented type", None))[0]

    @property
    def type_label(self) -> str | None:
        return STELLARIUM_TYPES.get(self.type_code, ("", None))[1]


def designation(prefix: str, number) -> str:
    """The one spelling of a designation used as a key: 'M 42', 'NGC 1976', 'Sh2-240', 'SNR G111.7-02.1'."""
    number = str(number).strip()
    if number.isdigit():
        number = str(int(number))
    if prefix == "Sh2":
        return f"Sh2-{number}"
    if prefix in ("PN G", "SNR G"):
        return f"{prefix}{number}"
    return f"{prefix} {number}"


_DESIGNATION_PATTERNS = [
    (re.compile(r"^(?:m|messier)\s*(\d+)$"), "M"),
    (re.compile(r"^(?:ngc|n)\s*(\d+)$"), "NGC"),
    (re.compile(r"^ic\s*(\d+)$"), "IC"),
    (re.compile(r"^(?:b|barnard)\s*(\d+)$"), "B"),
    (re.compile(r"^(?:sh\s*2|sh2)\s*-?\s*(\d+)$"), "Sh2"),
    (re.compile(r"^vdb\s*(\d+)$"), "vdB"),
    (re.compile(r"^rcw\s*(\d+)$"), "RCW"),
    (re.compile(r"^ldn\s*(\d+)$"), "LDN"),
    (re.compile(r"^lbn\s*(\d+)$"), "LBN"),
    (re.compile(r"^abell\s*(\d+)$"), "Abell"),
    (re.compile(r"^(?:ugc|u)\s*(\d+)$"), "UGC"),
    (re.compile(r"^(?:pgc|p)\s*(\d+)$"), "PGC"),
    (re.compile(r"^(?:cr|collinder)\s*(\d+)$"), "Cr"),
    (re.compile(r"^(?:mel|melotte)\s*(\d+)$"), "Mel"),
    (re.compile(r"^(?:aco|acoi)\s*(\w+)$"), "ACO"),
    (re.compile(r"^arp\s*(\d+)$"), "Arp"),
    (re.compile(r"^pk\s*([\d+.-]+)$"), "PK"),
    (re.compile(r"^snr\s*g\s*([\d+.-]+)$"), "SNR G"),
    (re.compile(r"^pn\s*g\s*([\d+.-]+)$"), "PN G"),
]


def parse_designation(text: str) -> str | None:
    """'NGC 7000', 'n7000', 'sh2-240', 'Barnard 33' -> the key spelling; None when it is not a designation."""
    text = text.strip().lower()
    for pattern, prefix in _DESIGNATION_PATTERNS:
        match = pattern.match(text)
        if match:
            return designation(prefix, match.group(1).upper() if prefix == "ACO" else match.group(1))
    return None


def designation_prefix(key: str) -> str:
    for prefix in ("PN G", "SNR G", "Sh2"):
        if key.startswith(prefix):
            return prefix
    return key.split(" ")[0]


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def unpack(self, layout: struct.Struct) -> tuple:
        values = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return values

    def qstring(self) -> str:
        (length,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        if length == 0xFFFFFFFF:  # a null QString
            return ""
        text = self.data[self.pos:self.pos + length].decode("utf-16-be")
        self.pos += length
        return text.strip()


def read_stellarium_catalog(path: str | Path) -> list[Dso]:
    """Every object of Stellarium's catalog.dat (record layout of catalog 3.16, Stellarium 0.22; checked on read)."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise CatalogError(f"{path}: cannot read a gzip-compressed Stellarium catalog ({err})") from None
    reader = _Reader(data, path)
    try:
        version = reader.qstring()
        reader.qstring()  # edition ("standard" or "extended")
        if not re.fullmatch(r"3\.(1[6-9]|[2-9]\d)", version):
            raise CatalogError(f"{path}: Stellarium DSO catalog version {version!r} is not supported (3.16 or later)")
        objects = []
        while reader.pos < len(data):
            number, ra, dec, _bmag, _vmag, type_code = reader.unpack(_HEAD)
            if not (0 <= ra <= 2 * math.pi + 1e-6 and abs(dec) <= math.pi / 2 + 1e-6):
                raise CatalogError(f"{path}: record near byte {reader.pos} has RA/Dec out of range: "
                                   f"the file's record layout differs from Stellarium {version}'s as read here")
            morphology = reader.qstring()
            major, *_rest = reader.unpack(_MIDDLE)
            numbers = dict(zip(_INT_IDS, _rest[-14:]))
            ced = reader.qstring()
            numbers["Arp"], numbers["VV"] = reader.unpack(_ARP_VV)
            texts = {name: reader.qstring() for name in _STR_IDS_A}
            numbers.update(zip(_INT_IDS_B, reader.unpack(_TAIL)))
            texts["Ced"] = ced
            ids = {prefix: designation(prefix, n) for prefix, n in numbers.items() if n}
            ids.update({prefix: designation(prefix, t) for prefix, t in texts.items() if t})
            objects.append(Dso(number, math.degrees(ra), math.degrees(dec), type_code, morphology, float(major),
                               tuple(ids[p] for p in _PREFERRED if p in ids)))
    except (struct.error, UnicodeDecodeError) as err:
        raise CatalogError(f"{path}: truncated or corrupt record near byte {reader.pos} ({err})") from None
    return objects


_NAME_LINE = re.compile(r'^(.{5})(.*?)\s_\("(.*?)"\)')  # prefix in columns 1-5, then the id, then _("name")
_NAMES_PREFIX = {"M": "M", "NGC": "NGC", "IC": "IC", "C": "C", "B": "B", "SH2": "Sh2", "VDB": "vdB", "RCW": "RCW",
                 "LDN": "LDN", "LBN": "LBN", "CR": "Cr", "MEL": "Mel", "PGC": "PGC", "UGC": "UGC", "CED": "Ced",
                 "ARP": "Arp", "VV": "VV", "PK": "PK", "PNG": "PN G", "SNRG": "SNR G", "ACO": "ACO", "HCG": "HCG",
                 "ESO": "ESO", "VDBH": "vdBH", "DWB": "DWB", "TR": "Tr", "ST": "St", "RU": "Ru", "VDB-HA": "vdB-Ha"}


def read_stellarium_names(path: str | Path) -> dict[str, list[str]]:
    """names.dat: designation key -> proper names. Entries without a catalog prefix are keyed 'DSO <number>'."""
    names: dict[str, list[str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = _NAME_LINE.match(line)
        if not match or line.startswith("#"):
            continue
        prefix, number, name = match.group(1).strip(), match.group(2).strip(), match.group(3)
        key = designation(_NAMES_PREFIX[prefix.upper()], number) if prefix else f"DSO {number}"
        names.setdefault(key, []).append(name)
    return names


class StellariumCatalog:
    """Stellarium's objects, looked up by any of their designations or by position."""

    def __init__(self, objects: list[Dso], names: dict[str, list[str]] | None = None):
        self.objects = objects
        self.names = names or {}
        self.by_id: dict[str, Dso] = {}
        for obj in objects:
            self.by_id.setdefault(f"DSO {obj.number}", obj)
            for key in obj.ids:
                self.by_id.setdefault(key, obj)
        self.positions = unit_vectors([o.ra for o in objects], [o.dec for o in objects]).reshape(-1, 3)

    @classmethod
    def load(cls, folder: str | Path) -> "StellariumCatalog":
        folder = Path(folder)
        names_path = folder / "names.dat"
        return cls(read_stellarium_catalog(folder / "catalog.dat"),
                   read_stellarium_names(names_path) if names_path.exists() else {})

    def get(self, key: str) -> Dso | None:
        return self.by_id.get(key)

    def named(self, name: str) -> Dso | None:
        """The object whose proper name (names.dat) is `name`, case-insensitively."""
        wanted = name.lower()
        for key, proper in self.names.items():
            if any(p.lower() == wanted for p in proper):
                return self.get(key)
        return None

    def within(self, xyz: np.ndarray, radius_deg: float) -> np.ndarray:
        """Indices of objects within radius_deg of the unit vector xyz."""
        return np.nonzero(self.positions @ xyz >= math.cos(math.radians(radius_deg)))[0]


@dataclass(frozen=True)
class OpenNgcEntry:
    name: str  # e.g. "NGC1976"
    type: str
    common_names: str


class OpenNgc:
    """OpenNGC (the pyongc package's SQLite copy), looked up by the same designation keys."""

    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        self._db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)

    @classmethod
    def from_pyongc(cls) -> "OpenNgc":
        from pyongc import ongc

        return cls(ongc.DBPATH)

    def close(self) -> None:
        self._db.close()

    def _row(self, where: str, value: str):
        return self._db.execute(f"SELECT name, type, ngc, ic, commonnames FROM objects WHERE {where} = ?", (value,)).fetchone()

    def get(self, key: str) -> OpenNgcEntry | None:
        """The entry for 'M 42', 'NGC 1976', 'IC 443', 'B 33', 'PGC 10074', 'UGC 10214'; duplicates resolved."""
        prefix, _, number = key.partition(" ")
        row = None
        if prefix == "M" and number.isdigit():
            row = self._db.execute("SELECT name, type, ngc, ic, commonnames FROM objects WHERE messier = ? "
                                   "ORDER BY type = 'Dup'", (f"{int(number):03d}",)).fetchone()
        elif prefix in ("NGC", "IC") and number.isdigit():
            row = self._row("name", f"{prefix}{int(number):04d}")
        elif prefix in ("B", "C", "Mel") and number.isdigit():
            row = self._row("name", f"{prefix}{int(number):03d}")
        elif prefix in ("PGC", "UGC") and number.isdigit():
            found = self._db.execute("SELECT name FROM objIdentifiers WHERE identifier = ?",
                                     (f"{prefix}{int(number):06d}" if prefix == "PGC" else f"{prefix}{int(number):05d}",)).fetchone()
            row = found and self._row("name", found[0])
        if row and row[1] == "Dup":  # a duplicate record points at the main one through its ngc/ic column
            main = f"NGC{row[2]}" if row[2] else f"IC{row[3]}" if row[3] else None
            row = (main and self._row("name", main)) or row
        return OpenNgcEntry(row[0], row[1], row[4] or "") if row else None
