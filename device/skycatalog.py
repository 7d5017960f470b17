"""What the catalogs say is in a field: deep-sky objects ranked by how much of it they fill, with our label.

This module owns the catalog type -> label rules that training uses too
(`STELLARIUM_TYPES`, `OPENNGC_TYPES`, `PREFIX_LABELS`; `nebula.train.catalogs`
imports them from here), and the compact catalog file the Pi reads.

**The file** (``skycatalog.npz``, written by ``nebula catalog build`` from
Stellarium's catalog.dat and names.dat and from OpenNGC): one row per object,
numpy arrays only (loaded with ``allow_pickle=False``): ``ra``, ``dec``
(degrees, float32), ``size`` (major axis in degrees, 0 when unknown), ``type_code``
(Stellarium's type), ``label`` and ``rule`` (indices into ``labels`` and ``rules``:
our label and the rule that gave it, 255 for none), and ``text`` + ``offsets``
(UTF-8 bytes: each object's designations joined by ``|``, a tab, its proper
name), decoded only for the objects a look-up returns. ``about`` is a JSON
string with the sources, their credits and licences, and when it was built.

**Ranking.** Each object is a disc of its major axis (1' when the catalog gives
no size), the field a disc of the same area as the frame. ``fill`` is the share
of the field the object's disc covers (1.0 for a nebula larger than the frame
that covers it), ``centrality`` is ``exp(-(d / r)^2 / 2)`` for an object whose
centre is ``d`` from the frame's centre, ``r`` the field's radius. The score is
their product: the object the photographer framed fills the frame and sits in
its middle; a huge cloud whose centre is far away scores low even though it
covers the field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nebula.device.config import default_catalog_path
from nebula.device.position import SkyPosition

# Nebula::NebulaType (Stellarium src/core/modules/Nebula.hpp): code -> (description, label or None when vague).
STELLARIUM_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("galaxy", "other"),
    1: ("active galaxy", "other"),
    2: ("radio galaxy", "other"),
    3: ("interacting galaxy", "other"),
    4: ("quasar", "other"),
    5: ("star cluster", "other"),
    6: ("open star cluster", "other"),
    7: ("globular star cluster", "other"),
    8: ("stellar association", "other"),
    9: ("star cloud", "other"),
    10: ("nebula", None),
    11: ("planetary nebula", "planetary"),
    12: ("dark nebula", "dark"),
    13: ("reflection nebula", "reflection"),
    14: ("bipolar nebula", None),
    15: ("emission nebula", "emission"),
    16: ("cluster associated with nebulosity", None),
    17: ("HII region", "emission"),
    18: ("supernova remnant", "supernova_remnant"),
    19: ("interstellar matter", None),
    20: ("emission object", None),
    21: ("BL Lac object", "other"),
    22: ("blazar", "other"),
    23: ("molecular cloud", "dark"),
    24: ("young stellar object", None),
    25: ("possible quasar", "other"),
    26: ("possible planetary nebula", "planetary"),
    27: ("protoplanetary nebula", "protoplanetary"),
    28: ("star", "other"),
    29: ("symbiotic star", "other"),
    30: ("emission-line star", "other"),
    31: ("supernova candidate", None),
    32: ("supernova remnant candidate", "supernova_remnant"),
    33: ("cluster of galaxies", "other"),
    34: ("part of a galaxy", "other"),
    35: ("region of the sky", None),
    36: ("object of unknown nature", None),
}

# OpenNGC object types (pyongc's objTypes table) -> label, or None when vague.
OPENNGC_TYPES: dict[str, str | None] = {
    "PN": "planetary", "HII": "emission", "EmN": "emission", "RfN": "reflection", "SNR": "supernova_remnant",
    "DrkN": "dark", "G": "other", "GPair": "other", "GTrpl": "other", "GGroup": "other", "GCl": "other",
    "OCl": "other", "*": "other", "**": "other", "*Ass": "other", "Nova": "other",
    "Neb": None, "Cl+N": None, "Other": None, "NonEx": None, "Dup": None,
}

# Catalogs whose membership alone says what an object is (the "catalog-prefix rule").
PREFIX_LABELS: dict[str, tuple[str, str]] = {
    "B": ("dark", "Barnard's catalogue of dark markings"),
    "LDN": ("dark", "Lynds' catalogue of dark nebulae"),
    "vdB": ("reflection", "van den Bergh's catalogue of reflection nebulae"),
    "Sh2": ("emission", "Sharpless' catalogue of H II regions"),
    "RCW": ("emission", "Rodgers-Campbell-Whiteoak catalogue of H-alpha emission regions"),
    "Abell": ("planetary", "Abell's catalogue of planetary nebulae"),
    "PK": ("planetary", "Perek-Kohoutek catalogue of planetary nebulae"),
    "PN G": ("planetary", "Strasbourg-ESO catalogue of galactic planetary nebulae"),
    "SNR G": ("supernova_remnant", "Green's catalogue of galactic supernova remnants"),
    "UGC": ("other", "Uppsala General Catalogue of galaxies"),
    "PGC": ("other", "Principal Galaxies Catalogue"),
    "ACO": ("other", "Abell-Corwin-Olowin catalogue of galaxy clusters"),
    "Arp": ("other", "Arp's atlas of peculiar galaxies"),
    "Cr": ("other", "Collinder's catalogue of open clusters"),
    "Mel": ("other", "Melotte's catalogue of star clusters"),
}

DEFAULT_FIELD_DEG = 1.0  # a look-up for a position without a field size assumes this (and says so)
UNKNOWN_SIZE_DEG = 1 / 60  # an object the catalog gives no size: 1'
NEXT_OBJECTS = 4  # listed after the main object
NONE = 255  # no label / no rule
_ARRAYS = ("ra", "dec", "size", "type_code", "label", "rule", "offsets", "text", "labels", "rules", "about")


class CatalogFileError(Exception):
    """A catalog file that cannot be used; one line naming the file and the cause."""


@dataclass(frozen=True)
class CatalogEntry:
    """One object as the file stores it (what `write` takes)."""

    ids: tuple[str, ...]  # designations, preferred first
    ra: float
    dec: float
    size_deg: float
    type_code: int
    label: str | None
    rule: str | None = None  # which rule gave the label ("catalog type", "override", ...)
    name: str = ""


@dataclass(frozen=True)
class FoundObject:
    """An object in a field, with how it ranks there."""

    designation: str
    other_ids: tuple[str, ...]
    name: str
    type_name: str
    label: str | None
    rule: str | None
    size_deg: float
    offset_deg: float  # from the field's centre
    fill: float
    score: float

    def to_record(self) -> dict:
        return {"designation": self.designation, "name": self.name or None, "type": self.type_name,
                "label": self.label, "label_rule": self.rule, "also": list(self.other_ids[:3]),
                "size_arcmin": round(self.size_deg * 60, 2), "offset_arcmin": round(self.offset_deg * 60, 2),
                "fill": round(self.fill, 3), "score": round(self.score, 3)}


@dataclass(frozen=True)
class FieldAnswer:
    """The catalog's answer for one field: the main object and the next few, best first."""

    objects: tuple[FoundObject, ...]
    field_deg: tuple[float, float]
    field_assumed: bool = False

    @property
    def main(self) -> FoundObject | None:
        return self.objects[0] if self.objects else None

    @property
    def label(self) -> str | None:
        return self.main.label if self.main else None

    def to_record(self) -> dict:
        record = {"main": self.main.to_record() if self.main else None,
                  "next": [o.to_record() for o in self.objects[1:]]}
        if self.field_assumed:
            record["field_assumed_deg"] = self.field_deg[0]
        return record


def agreement(model_label: str | None, catalog_label: str | None) -> bool | None:
    """Whether the model and the catalog say the same; None when either has no answer ('unknown', a vague type)."""
    if not model_label or model_label == "unknown" or not catalog_label:
        return None
    return model_label == catalog_label


def unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    """Unit vectors (..., 3) of sky positions in degrees: the one conversion every sky module uses."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def radec(xyz) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees, ra in [0, 360), of unit vectors (..., 3): the inverse of `unit_vectors`."""
    xyz = np.asarray(xyz, dtype=np.float64)
    ra = np.degrees(np.arctan2(xyz[..., 1], xyz[..., 0])) % 360
    return ra, np.degrees(np.arcsin(np.clip(xyz[..., 2], -1.0, 1.0)))


def _separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    ra1, dec1, ra2, dec2 = (np.radians(v) for v in (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.minimum(1.0, np.sqrt(s))))


def disc_overlap(r1: np.ndarray, r2: float, d: np.ndarray) -> np.ndarray:
    """Area shared by discs of radii r1 and r2 whose centres are d apart (flat geometry, same units)."""
    r1, d = np.asarray(r1, dtype=np.float64), np.asarray(d, dtype=np.float64)
    small = np.minimum(r1, r2)
    area = np.where(d <= np.abs(r1 - r2), math.pi * small ** 2, 0.0)
    partial = (d < r1 + r2) & (d > np.abs(r1 - r2))
    if partial.any():
        a, dd = r1[partial], d[partial]
        alpha = np.arccos(np.clip((dd ** 2 + a ** 2 - r2 ** 2) / (2 * dd * a), -1, 1))
        beta = np.arccos(np.clip((dd ** 2 + r2 ** 2 - a ** 2) / (2 * dd * r2), -1, 1))
        lens = a ** 2 * alpha + r2 ** 2 * beta - 0.5 * np.sqrt(np.clip(
            (-dd + a + r2) * (dd + a - r2) * (dd - a + r2) * (dd + a + r2), 0, None))
        area[partial] = lens
    return area


class SkyCatalog:
    """The compact catalog, loaded once; `field` answers what is in a frame."""

    def __init__(self, arrays: dict, path: Path | str = "<memory>"):
        self.path = Path(path)
        self.ra = np.asarray(arrays["ra"], dtype=np.float32)
        self.dec = np.asarray(arrays["dec"], dtype=np.float32)
        self.size = np.asarray(arrays["size"], dtype=np.float32)
        self.type_code = np.asarray(arrays["type_code"], dtype=np.uint8)
        self.label_index = np.asarray(arrays["label"], dtype=np.uint8)
        self.rule_index = np.asarray(arrays["rule"], dtype=np.uint8)
        self.offsets = np.asarray(arrays["offsets"], dtype=np.uint32)
        self.text = np.asarray(arrays["text"], dtype=np.uint8)
        self.labels = [str(x) for x in arrays["labels"]]
        self.rules = [str(x) for x in arrays["rules"]]
        self.about = json.loads(str(arrays["about"]))
        lengths = {len(self.ra), len(self.dec), len(self.size), len(self.type_code), len(self.label_index),
                   len(self.rule_index), len(self.offsets) - 1}
        if len(lengths) != 1:
            raise CatalogFileError(f"{self.path}: arrays of different lengths {sorted(lengths)}: a corrupt catalog file")
        self.xyz = unit_vectors(self.ra, self.dec).astype(np.float32)

    def __len__(self) -> int:
        return len(self.ra)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "SkyCatalog":
        """Read a file `write` made; `CatalogFileError` (one line) when it is missing or not one."""
        path = Path(path) if path else default_catalog_path()
        if not path.is_file():
            raise CatalogFileError(f"{path}: no catalog file (make it on the workstation with 'nebula catalog build', "
                                   "copy it beside the model, or set NEBULA_CATALOG)")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [name for name in _ARRAYS if name not in data.files]
                if missing:
                    raise CatalogFileError(f"{path}: not a nebula catalog file (no {', '.join(missing)})")
                return cls({name: data[name] for name in _ARRAYS}, path)
        except CatalogFileError:
            raise
        except (OSError, ValueError, KeyError) as err:
            raise CatalogFileError(f"{path}: not a readable catalog file ({err})") from None

    def entry_text(self, i: int) -> tuple[tuple[str, ...], str]:
        raw = bytes(self.text[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")
        ids, _, name = raw.partition("\t")
        return tuple(ids.split("|")) if ids else (), name

    def field(self, position: SkyPosition, limit: int = 1 + NEXT_OBJECTS) -> FieldAnswer:
        """The objects in the frame at `position`, best first (see the module docstring for the score)."""
        assumed = position.width_deg is None or position.height_deg is None
        width, height = (DEFAULT_FIELD_DEG, DEFAULT_FIELD_DEG) if assumed else (position.width_deg, position.height_deg)
        field_radius = math.sqrt(width * height / math.pi)
        reach = math.hypot(width, height) / 2
        radius = np.maximum(self.size, UNKNOWN_SIZE_DEG) / 2
        centre = unit_vectors(position.ra, position.dec).astype(np.float32)
        cosine = self.xyz @ centre
        # float32 dot products pick the candidates (a 0.01 deg margin covers their rounding) ...
        near = np.nonzero(cosine >= np.cos(np.radians(np.minimum(reach + radius + 0.01, 180.0))))[0]
        if len(near) == 0:
            return FieldAnswer((), (width, height), assumed)
        # ... and haversine in float64 measures them: arccos of a float32 cosine cannot resolve an arcminute.
        offset = _separation_deg(position.ra, position.dec, self.ra[near].astype(np.float64), self.dec[near].astype(np.float64))
        fill = disc_overlap(radius[near], field_radius, offset) / (math.pi * field_radius ** 2)
        score = fill * np.exp(-0.5 * (offset / field_radius) ** 2)
        keep = score > 0
        near, offset, fill, score = near[keep], offset[keep], fill[keep], score[keep]
        order = np.lexsort((-self.size[near], -score))[:limit]
        found = []
        for k in order:
            i = int(near[k])
            ids, name = self.entry_text(i)
            label = self.label_index[i]
            rule = self.rule_index[i]
            found.append(FoundObject(
                designation=ids[0] if ids else f"#{i}", other_ids=ids[1:], name=name,
                type_name=STELLARIUM_TYPES.get(int(self.type_code[i]), ("undocumented type", None))[0],
                label=self.labels[label] if label != NONE else None, rule=self.rules[rule] if rule != NONE else None,
                size_deg=float(self.size[i]), offset_deg=float(offset[k]), fill=float(fill[k]), score=float(score[k])))
        return FieldAnswer(tuple(found), (width, height), assumed)


def write(path: str | Path, entries: list[CatalogEntry], about: dict) -> Path:
    """Write the compact catalog file (format in the module docstring); the one writer of what `SkyCatalog` reads."""
    labels = sorted({e.label for e in entries if e.label})
    rules = sorted({e.rule for e in entries if e.rule})
    if len(labels) >= NONE or len(rules) >= NONE:
        raise ValueError("too many distinct labels or rules for one byte")
    blobs = [("|".join(e.ids) + "\t" + e.name).encode("utf-8") for e in entries]
    offsets = np.zeros(len(entries) + 1, dtype=np.uint32)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        ra=np.array([e.ra for e in entries], dtype=np.float32),
        dec=np.array([e.dec for e in entries], dtype=np.float32),
        size=np.array([e.size_deg for e in entries], dtype=np.float32),
        type_code=np.array([e.type_code for e in entries], dtype=np.uint8),
        label=np.array([labels.index(e.label) if e.label else NONE for e in entries], dtype=np.uint8),
        rule=np.array([rules.index(e.rule) if e.rule else NONE for e in entries], dtype=np.uint8),
        offsets=offsets,
        text=np.frombuffer(b"".join(blobs), dtype=np.uint8),
        labels=np.array(labels, dtype=str),
        rules=np.array(rules, dtype=str),
        about=np.array(json.dumps(about, sort_keys=True)),
    )
    os.replace(tmp, path)
    return path
