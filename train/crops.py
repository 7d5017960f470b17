"""Catalog-guided crops: more labelled sky cut from the photographs we already have.

Each Stellarium photograph knows its sky footprint (the four corners in
textures.json), and Stellarium's catalog knows where the Barnard and Lynds dark
clouds, van den Bergh reflection nebulae, Sharpless H II regions, Green's
supernova remnants and planetary nebulae are, and how big. So inside the 555
photographs there are hundreds more catalogued nebulae than the photographs are
named for. `plan_crops` finds each one that is large enough in the photo and
frames it a few ways; `cut` makes the images.

Rules, each with the reason it exists (the contact sheets show what they keep):

- big enough: the object spans at least MIN_OBJECT_PX source pixels, or the crop
  is mostly empty sky upscaled into blur;
- fits: the framed window lies inside the photo (shifted inward if needed) and is
  at most MAX_FRACTION of the photo's shorter side, or it is the photo again;
- no nebula inside a galaxy or cluster photo: a dark lane or H II knot inside the
  photo's main object, when that object is a galaxy or cluster ('other'), looks
  like the galaxy, not like the nebula (rule "inside-other");
- no small knot inside a bigger nebula of another kind: a crop centred inside a
  different-label nebula at least ENCLOSED_SCALE times larger mostly shows that
  nebula (rule "enclosed"). Dark clouds are exempt: they are seen against bright
  nebulae by nature (B 33 on IC 434);
- something to see: a crop that is mostly the photo's transparent border (pure
  black) or holds no pixel above the sky's noise is dropped (rule "empty");
- a dark cloud must look dark: the object's disk must be clearly darker than the
  ring around it in this photo (median luminance below DARK_CONTRAST of the
  ring's), else the big Lynds clouds behind bright H II regions would teach that
  red glow is "dark" (rule "not-dark");
- no near-copies: a framing that overlaps an already kept crop of the same label
  by more than MAX_OVERLAP (intersection over union) is skipped, and at most
  MAX_OBJECTS_PER_PHOTO objects are taken from one photo, largest first, so one
  rich field (NGC 7000's dozens of LBN patches) cannot dominate a label;
- labelled like photographs: the same label rules (override table, catalog
  types, morphology, prefix) that label whole photographs.

Geometry: textureCoords (0,0),(1,0),(1,1),(0,1) map to the footprint's corners, with
v = 0 at the bottom row of the image, so a pixel (x, y) with y down has
u = x / W and v = 1 - y / H. Sky positions are projected gnomonically about the
footprint centre and mapped to (u, v) by the homography through the four corners.
The inverse maps a crop's window back to the sky (`Crop.corners`), so a window can
be compared with other photographs' footprints like a photograph (see
nebula.train.stellarium, where crops join groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nebula.device.skycatalog import radec, unit_vectors

MIN_OBJECT_PX = 40  # object's major axis in source pixels
MIN_CROP_PX = 96  # crop side in source pixels
MAX_FRACTION = 0.8  # crop side at most this fraction of the photo's shorter side
FRAMINGS = (1.4, 2.2, 3.2)  # crop side / object size
ENCLOSED_SCALE = 3.0
MAX_OBJECTS_PER_PHOTO = 8  # largest objects first
MAX_OVERLAP = 0.5
DARK_CONTRAST = 0.85
EMPTY_BLACK_FRACTION = 0.25  # pure-black pixels: the photo's flattened transparent border
EMPTY_LEVEL = 24  # 99th-percentile luminance (0..255) below this: nothing visible
CROP_LABELS = ("dark", "emission", "reflection", "planetary", "protoplanetary", "supernova_remnant")


@dataclass(frozen=True)
class Crop:
    """One window of one photograph around one catalogued object."""

    designation: str
    label: str
    reason: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in source pixels
    framing: float
    object_px: float  # the object's major axis in source pixels
    corners: tuple[tuple[float, float], ...] = ()  # the window on the sky: (ra, dec) of its corners, in textures.json's order


@dataclass(frozen=True)
class Dropped:
    designation: str
    label: str
    rule: str  # "inside-other" or "enclosed"
    detail: str


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 H with dst ~ H @ [src, 1] through four point pairs (direct linear transform)."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.array(rows, dtype=np.float64))
    h = vt[-1].reshape(3, 3)
    return h / h[2, 2]


class Footprint:
    """Sky <-> pixel mapping of one photograph from its four footprint corners."""

    TEXTURE_CORNERS = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)

    def __init__(self, texture, width: int, height: int):
        self.texture, self.width, self.height = texture, width, height
        corners = texture.corner_vectors
        self._to_uv = _homography(texture.project(corners), self.TEXTURE_CORNERS)
        # Degrees per pixel along each axis, from the footprint's edge lengths.
        angle = lambda a, b: math.degrees(math.acos(float(np.clip(corners[a] @ corners[b], -1, 1))))  # noqa: E731
        self.deg_per_px = 0.5 * ((angle(0, 1) + angle(3, 2)) / 2 / width + (angle(0, 3) + angle(1, 2)) / 2 / height)

    def pixels(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 2) pixel positions (x right, y down) of unit vectors (N, 3)."""
        plane = self.texture.project(np.atleast_2d(xyz))
        uvw = np.c_[plane, np.ones(len(plane))] @ self._to_uv.T
        uv = uvw[:, :2] / uvw[:, 2:3]
        return np.c_[uv[:, 0] * self.width, (1 - uv[:, 1]) * self.height]

    def sky(self, pixels: np.ndarray) -> np.ndarray:
        """Unit vectors (N, 3) of pixel positions (N, 2), x right, y down: the inverse of `pixels`."""
        pixels = np.atleast_2d(np.asarray(pixels, dtype=np.float64))
        uvw = np.c_[pixels[:, 0] / self.width, 1 - pixels[:, 1] / self.height, np.ones(len(pixels))]
        plane = uvw @ np.linalg.inv(self._to_uv).T
        return self.texture.deproject(plane[:, :2] / plane[:, 2:3])

    def window_corners(self, box: tuple[int, int, int, int]) -> tuple[tuple[float, float], ...]:
        """(ra, dec) of a pixel box's corners in textures.json's order (bottom-left, bottom-right, top-right, top-left),
        so a crop's window reads like a photograph's footprint."""
        left, top, right, bottom = box
        ra, dec = radec(self.sky(np.array([[left, bottom], [right, bottom], [right, top], [left, top]])))
        return tuple((float(r), float(d)) for r, d in zip(ra, dec))


def _window(cx: float, cy: float, side: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A square of `side` centred on (cx, cy), shifted inward to fit the photo; None when it cannot fit."""
    side = int(round(side))
    if side > width or side > height:
        return None
    left = min(max(int(round(cx - side / 2)), 0), width - side)
    top = min(max(int(round(cy - side / 2)), 0), height - side)
    return left, top, left + side, top + side


def plan_crops(texture, luminance: np.ndarray, photo_object, photo_label: str, catalog, label_of) -> tuple[list[Crop], list[Dropped]]:
    """The crops worth cutting from one photograph, and those a rule dropped (with the rule).

    luminance: the photo as an (H, W) array, 0..255 (for the "empty" and "not-dark" rules).
    photo_object: the catalog object the photograph is of (a Dso) or None; photo_label its label.
    label_of(obj) -> (label, reason) or None: the same rules that label whole photographs.
    """
    height, width = luminance.shape
    footprint = Footprint(texture, width, height)
    near = catalog.within(texture.centre, texture.radius)
    inside = near[texture.contains(catalog.positions[near])] if len(near) else near
    candidates = []
    for i in inside:
        obj = catalog.objects[i]
        size_px = obj.size / footprint.deg_per_px if obj.size > 0 else 0.0
        if size_px < MIN_OBJECT_PX:
            continue
        found = label_of(obj)
        if found is None or found[0] not in CROP_LABELS:
            continue
        candidates.append((obj, found, size_px, catalog.positions[i]))
    candidates.sort(key=lambda c: -c[2])

    crops, dropped = [], []
    nebulae = [(obj, found[0], obj.size, xyz) for obj, found, _, xyz in candidates]
    for obj, (label, reason), size_px, xyz in candidates:
        (cx, cy), = footprint.pixels(xyz)
        if not (0 <= cx < width and 0 <= cy < height):
            continue
        rule = _conflict(obj, label, xyz, photo_object, photo_label, nebulae) or _invisible(luminance, cx, cy, size_px, label)
        if rule:
            dropped.append(Dropped(obj.designation, label, *rule))
            continue
        kept = []
        for framing in FRAMINGS:
            side = size_px * framing
            if side < MIN_CROP_PX or side > MAX_FRACTION * min(width, height):
                continue
            box = _window(cx, cy, side, width, height)
            if box is None or any(c.label == label and _iou(box, c.box) > MAX_OVERLAP for c in crops + kept):
                continue
            window = luminance[box[1]:box[3], box[0]:box[2]]
            if (window == 0).mean() > EMPTY_BLACK_FRACTION or np.percentile(window, 99) < EMPTY_LEVEL:
                dropped.append(Dropped(obj.designation, label, "empty", f"framing {framing}: transparent border or nothing visible"))
                continue
            kept.append(Crop(obj.designation, label, reason, box, framing, size_px, footprint.window_corners(box)))
        crops += kept
        if len({c.designation for c in crops}) >= MAX_OBJECTS_PER_PHOTO:
            break
    return crops, dropped


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _invisible(luminance: np.ndarray, cx: float, cy: float, size_px: float, label: str) -> tuple[str, str] | None:
    """("not-dark", detail) for a dark cloud no darker than the ring around it in this photo, else None."""
    if label != "dark":
        return None
    r = size_px / 2
    height, width = luminance.shape
    x0, x1 = int(max(0, cx - 2 * r)), int(min(width, cx + 2 * r + 1))
    y0, y1 = int(max(0, cy - 2 * r)), int(min(height, cy + 2 * r + 1))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    distance = np.hypot(xx - cx, yy - cy)
    patch = luminance[y0:y1, x0:x1]
    disk, ring = patch[distance <= r], patch[(distance > r) & (distance <= 2 * r)]
    if len(disk) == 0 or len(ring) < len(disk) // 4:
        return None
    inner, outer = float(np.median(disk)), float(np.median(ring))
    if inner >= DARK_CONTRAST * outer:
        return "not-dark", f"disk median {inner:.0f} vs ring {outer:.0f}: not darker than its surroundings here"
    return None


def _separation(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(float(np.clip(a @ b, -1.0, 1.0))))


def _conflict(obj, label, xyz, photo_object, photo_label, nebulae) -> tuple[str, str] | None:
    """(rule, detail) when a crop's label would mislead, else None."""
    if photo_object is not None and photo_label == "other" and obj is not photo_object:
        main_xyz = unit_vectors(photo_object.ra, photo_object.dec)
        if photo_object.size > 0 and _separation(xyz, main_xyz) < photo_object.size / 2:
            return "inside-other", f"inside {photo_object.designation} ({photo_object.type_name}), the photo's main object"
    if label != "dark":
        for other, other_label, other_size, other_xyz in nebulae:
            if other is obj or other_label == label or other_size < ENCLOSED_SCALE * obj.size:
                continue
            if _separation(xyz, other_xyz) < other_size / 2:
                return "enclosed", f"inside {other.designation} ({other_label}), {other_size / obj.size:.0f}x larger"
    return None


def cut(image, crop: Crop):
    """The crop as a PIL image (no resampling: the device's prepare resizes it like any photo)."""
    return image.crop(crop.box)


def contact_sheet(tiles: list[tuple[str, object]], path, tile: int = 128, columns: int = 10) -> None:
    """A PNG grid of (caption, PIL image) tiles, so a person can check the crops of one label by eye."""
    from PIL import Image, ImageDraw

    caption_h = 12
    rows = max(1, math.ceil(len(tiles) / columns))
    sheet = Image.new("RGB", (columns * (tile + 2), rows * (tile + caption_h + 2)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for k, (caption, image) in enumerate(tiles):
        x, y = (k % columns) * (tile + 2), (k // columns) * (tile + caption_h + 2)
        thumb = image.convert("RGB")
        thumb.thumbnail((tile, tile))
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + caption_h + (tile - thumb.height) // 2))
        draw.text((x + 1, y), caption[:22], fill=(230, 230, 230))
    sheet.save(path)
