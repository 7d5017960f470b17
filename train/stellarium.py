"""The real training set: Stellarium's deep-sky photographs, each labelled with the reason why.

Debian's `stellarium-data` ships ~555 photographs in nebulae/default/ with
textures.json (each image's sky footprint and credit) and the deep-sky catalog
(catalog.dat, names.dat). Each image's object is identified from its file name
(m42.png, sh2-240.png, barnard_loop-2.png, calabash.png) or, failing that, from
the catalog object at its footprint's centre; its label comes from the curated
override table (label_overrides.csv), the catalog type (Stellarium, then
OpenNGC), Stellarium's morphology string, or the catalog-prefix rule, in that order. Images share a group when
they show one object (by designation), are tiles of one mosaic (lmc_01..16), or
one lies inside the other's footprint at a comparable scale (M 20 in M 8).
A catalog-guided crop joins its photograph's group, its object's, and that of any
other photograph whose footprint holds the crop's window at a comparable scale.

    nebula data stellarium --out data/stellarium
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from nebula.device.skycatalog import radec, unit_vectors
from nebula.train import catalogs
from nebula.train.catalogs import Dso, OpenNgc, StellariumCatalog, parse_designation
from nebula.train.manifest import LABELS, MANIFEST_NAME, ManifestRow, group_from_stem, write_manifest

DEFAULT_SOURCE = Path("/usr/share/stellarium/nebulae/default")
OVERRIDES_PATH = Path(__file__).with_name("label_overrides.csv")
APT_PACKAGE = "stellarium-data"
SMALL_LABEL = 20  # fewer images than this in a label gets a note in the summary
# A photograph centred inside a bigger one's footprint, at most this much smaller, joins its group;
# a crop window centred inside a photograph's footprint, within this factor either way, joins that photo's group.
OVERLAP_SCALE = 5.0

# File names that are nicknames, not designations -> the designation or names.dat proper name of what they show.
NICKNAMES = {
    "barnard_loop": "Sh2-276",
    "calabash": "Calabash Nebula",
    "cassiopeia_a": "SNR G111.7-02.1",
    "coma_cluster": "ACO 1656",
    "darkshark": "LDN 1235",
    "etacarinae": "NGC 3372",
    "fornax_cluster": "ACO S373",
    "gammacygni": "IC 1318",
    "hercules_cluster": "ACO 2151",
    "hydra_cluster": "ACO 1060",
    "jones-emberson1": "PK 164+31.1",
    "leo_cluster": "ACO 1367",
    "lmc": "PGC 17223",
    "medusa": "Sh2-274",
    "perseus_cluster": "ACO 426",
    "pleiades": "M 45",
    "red_rectangle": "Red Rectangle",
    "rho": "rho Ophiuchi cloud complex",  # rho-a00 .. rho-a11: a 2 x 2 mosaic; each tile is labelled by its own footprint
    "smc-ha": "NGC 292",
    "smc29": "NGC 292",
    "velasnr": "SNR G263.9-03.0",
    "virgo_cluster": "Virgo Cluster",
    "wilds": "PGC 36723",
}
# Photographer / survey tags Stellarium appends to file names: m1dumont.png, n2903oleg.png, m51-vasey.png, ic348-dss.png.
_CREDIT_TAG = re.compile(r"(?:-(?:vasey|dss|trev|sdss2?|2mass|darkskies)|dumont|oleg|spano|(?<=\d)h)$")
_TILE = re.compile(r"(?:[-_]\d+|-a\d\d)$")  # ic2118-1, lmc_07, smc29-3, rho-a10: one tile of a bigger picture


class StellariumError(ValueError):
    """Stellarium data that cannot be used; the message names the file and the cause."""


# ---------------------------------------------------------------- textures.json


def parse_lenient_json(text: str, source: str = "<text>"):
    """json.loads for the hand-written JSON of Stellarium's textures.json.

    Accepts numbers such as `-.97`, `.5` and `5.`, a leading `+`, trailing commas
    and // or /* */ comments; string contents are left exactly as written.
    """
    out, i, n = [], 0, len(text)
    plain_start = 0

    def fix(segment: str) -> str:
        segment = re.sub(r"(?<![\w.])([-+]?)\.(\d)", r"\g<1>0.\2", segment)  # -.97 -> -0.97
        segment = re.sub(r"(\d)\.(?![\deE])", r"\1.0", segment)  # 5. -> 5.0
        segment = re.sub(r"(?<![\w.])\+(?=\d)", "", segment)  # +5 -> 5
        return segment

    while i < n:
        ch = text[i]
        if ch == '"':
            out.append(fix(text[plain_start:i]))
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = plain_start = j + 1
        elif text.startswith("//", i) or text.startswith("/*", i):
            out.append(fix(text[plain_start:i]))
            end = text.find("\n", i) if text[i + 1] == "/" else text.find("*/", i) + 2
            i = plain_start = n if end <= 1 or end == -1 else end
        else:
            i += 1
    out.append(fix(text[plain_start:]))
    cleaned = re.sub(r",(\s*[}\]])", r"\1", "".join(out))  # trailing commas (strings contain no bare ',]')
    try:
        return json.loads(cleaned)
    except json.JSONDecodeError as err:
        raise StellariumError(f"{source}: not readable even as lenient JSON (line {err.lineno}: {err.msg})") from None


@dataclass
class Texture:
    """One photograph of textures.json: its file, credit, and sky footprint (corners in degrees)."""

    image: str
    corners: list[tuple[float, float]]  # (ra, dec) of the first footprint polygon
    credit: str = ""
    info_url: str = ""

    @property
    def stem(self) -> str:
        return Path(self.image).stem

    @property
    def corner_vectors(self) -> np.ndarray:
        """Unit vectors (4 x 3) of the footprint's corners."""
        return unit_vectors(*np.array(self.corners).T)

    @property
    def centre(self) -> np.ndarray:
        """Unit vector of the footprint's centre (mean of its corners; safe across RA 0/360)."""
        mean = self.corner_vectors.mean(axis=0)
        return mean / np.linalg.norm(mean)

    @property
    def centre_radec(self) -> tuple[float, float]:
        ra, dec = radec(self.centre)
        return float(ra), float(dec)

    @property
    def radius(self) -> float:
        """Degrees from the centre to the farthest corner."""
        return math.degrees(math.acos(float(np.clip((self.corner_vectors @ self.centre).min(), -1, 1))))

    def contains(self, xyz: np.ndarray) -> np.ndarray:
        """Whether each unit vector (N x 3) lies inside the footprint (gnomonic projection about its centre)."""
        xyz = np.atleast_2d(xyz)
        polygon, points = self.project(self.corner_vectors), self.project(xyz)
        inside = np.zeros(len(xyz), dtype=bool)
        x, y = points[:, 0], points[:, 1]
        for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, axis=0)):
            crosses = (y1 > y) != (y2 > y)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            inside ^= crosses & (x < x_at)
        return inside & (xyz @ self.centre > 0)

    def project(self, xyz: np.ndarray) -> np.ndarray:
        """Gnomonic (tangent-plane) coordinates of unit vectors (N x 3) about the footprint's centre."""
        centre, east, north = self._tangent_basis()
        depth = np.maximum(xyz @ centre, 1e-9)
        return np.stack([(xyz @ east) / depth, (xyz @ north) / depth], axis=1)

    def deproject(self, plane: np.ndarray) -> np.ndarray:
        """Unit vectors (N x 3) of gnomonic coordinates (N x 2): the inverse of `project`."""
        centre, east, north = self._tangent_basis()
        plane = np.atleast_2d(plane)
        xyz = centre + plane[:, :1] * east + plane[:, 1:2] * north
        return xyz / np.linalg.norm(xyz, axis=1, keepdims=True)

    def _tangent_basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(centre, east, north) unit vectors of the tangent plane at the footprint's centre."""
        centre = self.centre
        east = np.cross([0.0, 0.0, 1.0], centre)
        east = east / np.linalg.norm(east) if np.linalg.norm(east) > 1e-9 else np.array([0.0, 1.0, 0.0])
        return centre, east, np.cross(centre, east)


def _credit_field(credits: dict, name: str) -> str:
    for key, value in credits.items():  # textures.json spells it "short" and "Short"
        if key.lower() == name.lower():
            return str(value).strip()
    return ""


def read_textures(path: str | Path) -> list[Texture]:
    """The photographs listed in a textures.json (sub-tiles at any depth)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise StellariumError(f"{path}: cannot read ({err.strerror})") from None
    textures = []

    def walk(node):
        if isinstance(node, dict):
            if "imageUrl" in node:
                coords = node.get("worldCoords") or []
                if not coords or len(coords[0]) < 3:
                    raise StellariumError(f"{path}: {node['imageUrl']} has no footprint (worldCoords)")
                credits = node.get("imageCredits") or {}
                textures.append(Texture(node["imageUrl"], [(float(ra), float(dec)) for ra, dec in coords[0]],
                                        _credit_field(credits, "short"), _credit_field(credits, "infoUrl")))
            for child in node.get("subTiles", []):
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(parse_lenient_json(text, str(path)))
    return textures


# ---------------------------------------------------------------- labelling


@dataclass(frozen=True)
class Override:
    designation: str
    label: str
    source: str


def read_overrides(path: str | Path = OVERRIDES_PATH) -> dict[str, Override]:
    """The curated table: designation -> label, with the source that settles it."""
    overrides = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            if row["label"] not in LABELS:
                raise StellariumError(f"{path}:{line_no}: label {row['label']!r} is not one of {', '.join(LABELS)}")
            if not row["source"].strip():
                raise StellariumError(f"{path}:{line_no}: {row['designation']} has no source")
            key = parse_designation(row["designation"]) or row["designation"].strip()
            overrides[key] = Override(key, row["label"], row["source"].strip())
    return overrides


@dataclass
class Labelled:
    texture: Texture
    label: str
    reason: str
    designation: str
    group: str = ""
    obj: Dso | None = None  # the catalog object the photograph is of, when the catalog has it


@dataclass
class Identification:
    designation: str  # the key spelling, or a proper name when no catalog has the object
    how: str  # how it was found: file name, nickname, or the footprint's centre
    obj: Dso | None = None  # Stellarium's record of the object, when it has one

    @property
    def keys(self) -> list[str]:
        """Every designation the object goes by, for the override table."""
        return list(dict.fromkeys([self.designation, *(self.obj.ids if self.obj else ()),
                                   *([f"DSO {self.obj.number}"] if self.obj else [])]))


def _name_keys(stem: str) -> list[str]:
    """'m51-vasey' -> ['m51'], 'ic2118-1' -> ['ic2118-1', 'ic2118'], 'n691group-vasey' -> ['n691group', 'n691']."""
    key = _CREDIT_TAG.sub("", stem.lower())
    keys = [key, re.sub(r"group$", "", key), _TILE.sub("", key)]
    return list(dict.fromkeys(k for k in keys if k))


def _tile_family(stem: str) -> str | None:
    """'lmc_07' -> 'lmc', 'sh2-1-2' -> 'sh2-1', but 'sh2-106' -> None: its number is the designation, not a tile."""
    key = _CREDIT_TAG.sub("", stem.lower())
    family = _TILE.sub("", key)
    return family if family != key and not parse_designation(key) else None


def identify(texture: Texture, catalog: StellariumCatalog) -> Identification:
    """Which object a photograph shows: from its file name, else the catalog object at its footprint's centre."""
    for key in _name_keys(texture.stem):
        nickname = NICKNAMES.get(key)
        if nickname:
            found, how = parse_designation(nickname) or nickname, f"file name '{texture.stem}' (a nickname of {nickname})"
        else:
            found, how = parse_designation(key), f"file name '{texture.stem}'"
        if not found:
            continue
        obj = catalog.get(found) or catalog.named(found)
        if obj is None:  # e.g. Abell 31 (Stellarium lists it as Sh2-290): take the object the photograph is centred on
            obj = object_at_footprint(texture, catalog)
            how += f", not in Stellarium's catalog, so by its footprint: {obj.designation} is the biggest object inside" if obj else ""
        return Identification(found, how, obj)
    obj = object_at_footprint(texture, catalog)
    if obj is None:
        return Identification(group_from_stem(texture.stem), f"file name '{texture.stem}' (no catalog object in footprint)")
    return Identification(obj.designation, "footprint centre (biggest catalog object inside)", obj)


def object_at_footprint(texture: Texture, catalog: StellariumCatalog) -> Dso | None:
    """The catalog object a photograph is centred on: the biggest inside its footprint, nearest the centre on ties."""
    near = catalog.within(texture.centre, texture.radius)
    inside = near[texture.contains(catalog.positions[near])] if len(near) else near
    if len(inside) == 0:
        return None
    sizes = np.array([catalog.objects[i].size for i in inside])
    distance = -(catalog.positions[inside] @ texture.centre)
    return catalog.objects[inside[np.lexsort((distance, -sizes))[0]]]


_NEBULA_CATALOGS = ("B ", "LDN ", "vdB ", "Sh2-", "RCW ", "LBN ", "PK ", "PN G", "SNR G")


def label_object(ident: Identification, overrides: dict[str, Override], openngc: OpenNgc | None) -> tuple[str, str] | None:
    """(label, reason) for an identified object, by the first rule that settles it; None when none does.

    Order: the curated override table; Stellarium's catalog type; OpenNGC's type;
    Stellarium's morphology string (EN / RN, Sharpless or van den Bergh classes);
    the catalog-prefix rule over every designation the object has.
    """
    for key in ident.keys:
        if key in overrides:
            o = overrides[key]
            return o.label, f"override: {key} is {o.label} ({o.source})"
    obj = ident.obj
    if obj and obj.type_label:
        # Stellarium types some Sharpless nebulae by their exciting star; the nebula catalog then says more.
        star_typed = obj.type_code in (28, 29, 30) and any(i.startswith(_NEBULA_CATALOGS) for i in obj.ids)
        if not star_typed:
            return obj.type_label, f"catalog type: Stellarium lists {obj.designation} as {obj.type_name}"
    for key in ident.keys:
        entry = openngc.get(key) if openngc else None
        if entry and catalogs.OPENNGC_TYPES.get(entry.type):
            return catalogs.OPENNGC_TYPES[entry.type], f"catalog type: OpenNGC lists {key} ({entry.name}) as {entry.type}"
    if obj and obj.morphology:
        morph = obj.morphology
        for pattern, label, meaning in (
            (r"\bEN\b", "emission", "EN, emission nebula"),
            (r"\bRN\b", "reflection", "RN, reflection nebula"),
            (r"\b[1-3], [1-3], [1-3]\b", "emission", "a Sharpless H II region class"),
            (r"\b(?:I|II|I-II|II P|P), (?:VBR|VB|BR|M|F|VF)\b", "reflection", "a van den Bergh reflection nebula class"),
        ):
            if re.search(pattern, morph):
                return label, f"catalog morphology: Stellarium's '{morph}' for {obj.designation} is {meaning}"
    for key in ident.keys:
        prefix = catalogs.designation_prefix(key)
        if prefix in catalogs.PREFIX_LABELS:
            label, catalogue = catalogs.PREFIX_LABELS[prefix]
            return label, f"catalog prefix: {key} is in {catalogue}"
    return None


def _group_key(designation: str) -> str:
    """'M 42' -> 'm42', 'Sh2-276' -> 'sh2-276', 'Calabash Nebula' -> 'calabashnebula'."""
    return re.sub(r"\s+", "", designation.lower())


class _Groups:
    """Union-find over image stems: tiles of one picture and images of one object end up together."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _comparable_scale(radius_a: float, radius_b: float) -> bool:
    """Two fields of view close enough in scale to show the same sky alike: the larger at most OVERLAP_SCALE times the smaller."""
    return max(radius_a, radius_b) <= OVERLAP_SCALE * min(radius_a, radius_b)


def label_textures(textures: list[Texture], catalog: StellariumCatalog, overrides: dict[str, Override],
                   openngc: OpenNgc | None) -> list[Labelled]:
    """Identify, label and group every photograph; raises StellariumError listing any that no rule labels."""
    labelled, unlabelled = [], []
    groups = _Groups()
    for texture in textures:
        ident = identify(texture, catalog)
        found = label_object(ident, overrides, openngc)
        if found is None:
            unlabelled.append(f"{texture.image} ({ident.designation}, {ident.how})")
            continue
        label, reason = found
        labelled.append(Labelled(texture, label, f"{reason}; identified by {ident.how}", ident.designation, obj=ident.obj))
        # The object's own name joins images of one object under different file names (m42 vs n1976);
        # the file name without its tile number joins the tiles of one mosaic (lmc_01..16, rho-a00..a11).
        obj_key = _group_key(ident.obj.designation if ident.obj else ident.designation)
        groups.union(f"stem:{texture.stem}", f"object:{obj_key}")
        tile_family = _tile_family(texture.stem)
        if tile_family:
            groups.union(f"stem:{texture.stem}", f"tiles:{tile_family}")
    if unlabelled:
        raise StellariumError("no rule labels these images; add them to label_overrides.csv: " + "; ".join(unlabelled))
    # Photographs of one patch of sky at a comparable scale (M 20 inside the M 8 picture) share pixels: one group.
    centres = np.stack([t.centre for t in textures])
    for big in textures:
        for i in np.nonzero(big.contains(centres))[0]:
            small = textures[i]
            if small is not big and big.radius >= small.radius and _comparable_scale(big.radius, small.radius):
                groups.union(f"stem:{small.stem}", f"stem:{big.stem}")
    # Name each group after its mosaic or its object, so group ids read like 'lmc' or 'm42'.
    names: dict[str, str] = {}
    for item in sorted(groups.parent, key=lambda i: (not i.startswith("tiles:"), not i.startswith("object:"), i)):
        names.setdefault(groups.find(item), item.split(":", 1)[1])
    for item in labelled:
        item.group = names[groups.find(f"stem:{item.texture.stem}")]
    return labelled


# ---------------------------------------------------------------- writing


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def flatten(image):
    """Alpha (or palette transparency) composited onto black; palette expanded; no resampling."""
    from PIL import Image

    image.load()  # read the pixels now: the caller may close the file
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba).convert("RGB" if image.mode != "LA" else "L")
    return image


def build(source: str | Path = DEFAULT_SOURCE, out: str | Path = "data/stellarium",
          progress: Callable[[Iterable], Iterable] = lambda items: items, with_crops: bool = True) -> list[ManifestRow]:
    """Write `out/<label>/<image>.png` and `out/manifest.csv` from Stellarium's nebulae folder.

    with_crops also cuts catalog-guided crops (nebula.train.crops) into `out/<label>/crops/`,
    writes a contact sheet per label (`out/crops_<label>.png`) and `out/crops_dropped.csv`
    (each crop a rule dropped, with the rule).
    """
    from PIL import Image

    from nebula.train import crops as cropping

    source, out = Path(source), Path(out)
    for needed in ("textures.json", "catalog.dat"):
        if not (source / needed).exists():
            raise StellariumError(f"{source}: no {needed} (is this Stellarium's nebulae/default folder?)")
    textures = read_textures(source / "textures.json")
    catalog = StellariumCatalog.load(source)
    openngc = OpenNgc.from_pyongc()
    overrides = read_overrides()
    try:
        labelled = label_textures(textures, catalog, overrides, openngc)
        missing = [t.image for t in textures if not (source / t.image).exists()]
        if missing:
            raise StellariumError(f"{source}: textures.json lists images that are not there: {', '.join(missing[:5])}")

        out.mkdir(parents=True, exist_ok=True)
        for label in LABELS:  # a rebuild replaces the previous images, so no stale file keeps an old label
            shutil.rmtree(out / label, ignore_errors=True)
            (out / label).mkdir()
        for stale in [*out.glob("crops_*.png"), out / "crops_dropped.csv"]:
            stale.unlink(missing_ok=True)
        rows, crop_items, dropped = [], [], []
        label_of = lambda obj: label_object(Identification(obj.designation, "catalog crop", obj), overrides, openngc)  # noqa: E731
        for item in progress(labelled):
            path = source / item.texture.image
            relative = f"{item.label}/{Path(item.texture.image).stem}.png"
            try:
                with Image.open(path) as opened:
                    opened.load()  # a broken file fails here, with its name
                    size = opened.size
                    picture = flatten(opened) if with_crops or _has_alpha(opened) or opened.format != "PNG" else None
                    if _has_alpha(opened) or opened.format != "PNG":
                        picture.save(out / relative, compress_level=3)
                    else:  # nothing to flatten: keep the file byte for byte
                        shutil.copyfile(path, out / relative)
            except OSError as err:
                raise StellariumError(f"{path}: cannot read the image ({err})") from None
            rows.append(ManifestRow(file=relative, label=item.label, label_reason=item.reason, designation=item.designation,
                                    group=item.group, credit=_credit_text(item.texture), source_file=str(path),
                                    width=size[0], height=size[1]))
            if with_crops:
                luminance = np.asarray(picture.convert("L"), dtype=np.float32)
                planned, rejected = cropping.plan_crops(item.texture, luminance, item.obj, item.label, catalog, label_of)
                crop_items += [(item, picture.convert("RGB"), crop) for crop in planned]
                dropped += [(item, d) for d in rejected]
    finally:
        openngc.close()
    if with_crops:
        crop_rows = _write_crops(out, crop_items, labelled)
        joined = {f"{i.label}/{i.texture.stem}.png": i.group for i in labelled}  # crops may have joined photo groups
        for row in rows:
            row.group = joined[row.file]
        rows += crop_rows
        _write_dropped(out / "crops_dropped.csv", dropped)
    rows.sort(key=lambda r: r.file)
    write_manifest(rows, out / MANIFEST_NAME)
    return rows


def _crop_name(item: Labelled, crop) -> str:
    slug = re.sub(r"[^a-z0-9.+-]+", "", crop.designation.lower().replace(" ", ""))
    return f"{crop.label}/crops/{item.texture.stem}__{slug}__x{crop.framing:g}.png"


def join_crop_groups(labelled: list[Labelled], crops: list[tuple[Labelled, object]]) -> list[str]:
    """The group of each (photo, crop) pair; photos whose group a crop joined to another take the joined name.

    A crop joins its photo's group, its own object's group, and the group of any other photograph
    whose footprint holds the crop window's centre at a comparable scale (the rule photographs follow
    among themselves in label_textures): etaCarinae's crop of IC 2599 shows the sky of rcw53.
    So no photo, no object and no patch of sky is ever on both sides of a split.
    """
    groups = _Groups()
    for item in labelled:
        groups.union(f"stem:{item.texture.stem}", f"group:{item.group}")
    for item, crop in crops:
        obj_group = next((i.group for i in labelled if i.obj is not None and i.obj.designation == crop.designation), None)
        groups.union(f"stem:{item.texture.stem}", f"object:{_group_key(crop.designation)}")
        if obj_group:
            groups.union(f"object:{_group_key(crop.designation)}", f"group:{obj_group}")
    if crops:
        windows = [Texture("", list(crop.corners)) for _, crop in crops]
        centres, radii = np.stack([w.centre for w in windows]), [w.radius for w in windows]
        for other in labelled:
            for k in np.nonzero(other.texture.contains(centres))[0]:
                item = crops[k][0]
                if item is not other and _comparable_scale(radii[k], other.texture.radius):
                    groups.union(f"stem:{item.texture.stem}", f"stem:{other.texture.stem}")
    names: dict[str, str] = {}
    for key in sorted(groups.parent, key=lambda k: (not k.startswith("group:"), k)):
        names.setdefault(groups.find(key), key.split(":", 1)[1])
    for item in labelled:  # photos whose group was joined to another by a crop take the joined name
        item.group = names[groups.find(f"stem:{item.texture.stem}")]
    return [names[groups.find(f"stem:{item.texture.stem}")] for item, _ in crops]


def _write_crops(out: Path, crop_items, labelled: list[Labelled]) -> list[ManifestRow]:
    """Save the crops, give each its group (join_crop_groups), and draw a contact sheet per label."""
    from nebula.train import crops as cropping

    crop_groups = join_crop_groups(labelled, [(item, crop) for item, _, crop in crop_items])
    rows, sheets = [], {}
    for (item, picture, crop), group in zip(crop_items, crop_groups):
        relative = _crop_name(item, crop)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        image = cropping.cut(picture, crop)
        image.save(out / relative, compress_level=3)
        rows.append(ManifestRow(
            file=relative, label=crop.label,
            label_reason=f"catalog crop: {crop.reason}; {crop.designation} is inside {item.texture.image}'s footprint "
                         f"({crop.object_px:.0f} px across, framed x{crop.framing:g})",
            designation=crop.designation, group=group,
            credit=_credit_text(item.texture), source_file=str(item.texture.image), width=image.width,
            height=image.height, origin="crop"))
        if crop.framing == cropping.FRAMINGS[1] or not any(
                c.designation == crop.designation and c.framing == cropping.FRAMINGS[1] and i is item for i, _, c in crop_items):
            sheets.setdefault(crop.label, []).append((f"{crop.designation} {item.texture.stem}", image))
    for label, tiles in sheets.items():
        cropping.contact_sheet(tiles, out / f"crops_{label}.png")
    return rows


def _write_dropped(path: Path, dropped) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["photo", "designation", "label", "rule", "detail"])
        for item, d in dropped:
            writer.writerow([item.texture.image, d.designation, d.label, d.rule, d.detail])


def _credit_text(texture: Texture) -> str:
    return f"{texture.credit} <{texture.info_url}>" if texture.info_url else texture.credit


def reason_kind(reason: str) -> str:
    """'override', 'catalog type', 'catalog morphology', 'catalog prefix' or 'folder': the rule that gave a label."""
    return reason.split(":", 1)[0] if ":" in reason.split(";")[0] else reason.split(" ")[0]


def count_table(rows: list[ManifestRow], small: int = SMALL_LABEL) -> str:
    """Photographs, crops and object groups per label, every label listed, with a note on the small ones."""
    photos = Counter(r.label for r in rows if r.origin != "crop")
    crops = Counter(r.label for r in rows if r.origin == "crop")
    groups = {label: len({r.group for r in rows if r.label == label}) for label in {*LABELS, *photos, *crops}}
    lines = [f"{'label':18} {'photos':>6} {'crops':>6} {'groups':>7}", f"{'-' * 18} {'-' * 6} {'-' * 6} {'-' * 7}"]
    for label in LABELS:
        note = "  <- small: few examples to learn from" if photos[label] + crops[label] < small else ""
        lines.append(f"{label:18} {photos[label]:6d} {crops[label]:6d} {groups[label]:7d}{note}")
    for label in sorted(set(photos) | set(crops) - set(LABELS)):
        if label not in LABELS:
            lines.append(f"{label:18} {photos[label]:6d} {crops[label]:6d} {groups[label]:7d}  <- not one of the seven labels")
    lines.append(f"{'total':18} {sum(photos.values()):6d} {sum(crops.values()):6d} {len({r.group for r in rows}):7d}")
    return "\n".join(lines)


# ---------------------------------------------------------------- installing stellarium-data


def install_command() -> list[str] | None:
    """The apt-get command that installs stellarium-data from here (as root, or through non-interactive sudo), or None."""
    if not shutil.which("apt-get"):
        return None
    command = ["apt-get", "install", "-y", "--no-install-recommends", APT_PACKAGE]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return command
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", *command]
    return None


def install_stellarium_data(echo: Callable[[str], None] = print) -> bool:
    """Install stellarium-data with apt; False when this user cannot (the caller prints what to run)."""
    command = install_command()
    if command is None:
        return False
    echo("Installing: " + " ".join(command))
    update = [*command[:command.index("apt-get")], "apt-get", "update"]
    if subprocess.run(update).returncode != 0:
        echo("apt-get update failed; trying the install with the package lists as they are")
    return subprocess.run(command).returncode == 0


# ---------------------------------------------------------------- merging


def merge(out: str | Path, sources: list[str | Path], link: bool = False,
          progress: Callable[[Iterable], Iterable] = lambda items: items) -> list[ManifestRow]:
    """One dataset from several: each source is a dataset with manifest.csv or a folder with one sub-folder per label.

    Images go to `out/<label>/<source name>/...`, copied (or hard-linked with link=True).
    A source's groups stay whole, and images that name one object (M 42, M42_2.jpg) share one group
    across sources, so no object is ever on both sides of a split.
    """
    from nebula.train.manifest import load_dataset

    out = Path(out)
    plan, taken = [], set()
    for source in map(Path, sources):
        if not source.is_dir():
            raise StellariumError(f"{source}: not a folder")
        if out.resolve() == source.resolve():
            raise StellariumError(f"{source}: is the output folder")
        rows = load_dataset(source)
        if not rows:
            raise StellariumError(f"{source}: no images (expected manifest.csv or one sub-folder per label)")
        wrong = sorted({r.label for r in rows} - set(LABELS))
        if wrong:
            raise StellariumError(f"{source}: sub-folders {', '.join(wrong)} are not labels (use: {', '.join(LABELS)})")
        name = source.resolve().name
        while name in taken:
            name += "_"
        taken.add(name)
        for row in rows:
            if not (source / row.file).is_file():
                raise StellariumError(f"{source / row.file}: listed in {source}/{MANIFEST_NAME} but missing")
            plan.append((source, name, row))

    # One object is one group across sources: Stellarium's M 42 (inside its Barnard's Loop group) and your M42-1.jpg.
    groups = _Groups()
    for source, name, row in plan:
        own = f"group:{name}/{row.group or Path(row.file).stem}"  # a source's own group ids never collide with another's
        groups.union(f"row:{name}/{row.file}", own)
        obj = designation_group(row.designation or Path(row.file).stem)
        if obj:
            groups.union(own, f"object:{obj}")
    group_names: dict[str, str] = {}
    for item in sorted(groups.parent, key=lambda i: (not i.startswith("object:"), i)):
        group_names.setdefault(groups.find(item), item.split(":", 1)[1])

    merged = []
    for source, name, row in progress(plan):
        inner = Path(row.file).relative_to(row.label) if Path(row.file).parts[0] == row.label else Path(row.file)
        relative = Path(row.label) / name / inner
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        if link:
            try:
                os.link(source / row.file, target)
            except OSError:  # another file system: copy instead
                shutil.copy2(source / row.file, target)
        else:
            shutil.copy2(source / row.file, target)
        width, height = row.width, row.height
        if not (width and height):
            width, height = _image_size(target)
        merged.append(ManifestRow(file=relative.as_posix(), label=row.label, label_reason=row.label_reason,
                                  designation=row.designation, group=group_names[groups.find(f"row:{name}/{row.file}")],
                                  credit=row.credit, source_file=row.source_file or str(source / row.file),
                                  width=width, height=height, origin=row.origin))
    merged.sort(key=lambda r: r.file)
    write_manifest(merged, out / MANIFEST_NAME)
    return merged


def designation_group(name: str) -> str | None:
    """The group id of the object a name designates, however it is spelt: 'NGC7000-2', 'ngc7000' -> 'ngc7000'; else None."""
    for candidate in (name, _TILE.sub("", name.lower())):
        found = parse_designation(candidate)
        if found:
            return _group_key(found)
    return None


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except OSError:
        return 0, 0  # FITS and unreadable files: training reports them when it loads them
