"""Evidence for "know the object": plate solving and catalog labels, measured on Stellarium's photographs.

Each photograph in Stellarium's textures.json has a known sky footprint, so:

(a) **Solving.** A sample of photographs, spread over field sizes, goes through
    `nebula.device.platesolve.solve` with no position hint and, by default, the
    footprint's field size as the scale hint (what a header's FOCALLEN and pixel
    size give; ``--blind`` drops it); per field-size bin: the share solved, and
    the median distance between the solved centre and the footprint's centre.
(b) **Catalog labels.** For every whole photograph of a dataset (its manifest
    names the source file; crops are left out), the catalog look-up of its footprint (centre and sides)
    gives a main object; how often that object's label is the dataset's label.

    nice -n 10 nebula catalog evaluate --dataset data/stellarium --sample 40 --cpulimit 20
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nebula.device import platesolve
from nebula.device.position import SkyPosition, separation_deg
from nebula.device.skycatalog import SkyCatalog
from nebula.train.manifest import LABELS, MANIFEST_NAME, read_manifest
from nebula.train.stellarium import DEFAULT_SOURCE, Texture, read_textures

FIELD_BINS_ARCMIN = (0.0, 22.0, 60.0, 180.0, float("inf"))  # 22': the smallest Debian Tycho-2 index


def footprint_position(texture: Texture) -> SkyPosition:
    """The footprint as a frame: its centre, and its two sides measured between consecutive corners."""
    ra, dec = texture.centre_radec
    (ra0, dec0), (ra1, dec1), (ra2, dec2) = texture.corners[:3]
    return SkyPosition(ra, dec, separation_deg(ra0, dec0, ra1, dec1), separation_deg(ra1, dec1, ra2, dec2), "footprint")


def field_bin(field_deg: float) -> str:
    arcmin = field_deg * 60
    for low, high in zip(FIELD_BINS_ARCMIN, FIELD_BINS_ARCMIN[1:]):
        if low <= arcmin < high:
            return f"{low:.0f}'+" if high == float("inf") else f"{low:.0f}-{high:.0f}'"
    return "?"


def bin_names() -> list[str]:
    return [field_bin((low + 1e-6) / 60) for low in FIELD_BINS_ARCMIN[:-1]]


def sample_textures(textures: list[Texture], per_bin: int) -> list[Texture]:
    """`per_bin` photographs from each field-size bin, spread evenly over that bin's sorted file names."""
    by_bin: dict[str, list[Texture]] = defaultdict(list)
    for texture in sorted(textures, key=lambda t: t.image):
        by_bin[field_bin(footprint_position(texture).field_deg)].append(texture)
    chosen = []
    for name in bin_names():
        items = by_bin.get(name, [])
        step = max(1, len(items) / per_bin) if items else 1
        chosen += [items[int(i * step)] for i in range(min(per_bin, len(items)))]
    return chosen


@dataclass
class SolveOutcome:
    image: str
    field_bin: str
    solved: bool
    error_arcmin: float | None
    reason: str | None
    seconds: float


def evaluate_solving(source: Path, per_bin: int, cpulimit_s: int, scale_hint: bool = True, timeout_s: float | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> list[SolveOutcome]:
    import time

    textures = sample_textures(read_textures(source / "textures.json"), per_bin)
    outcomes = []
    for done, texture in enumerate(textures, start=1):
        truth = footprint_position(texture)
        t0 = time.perf_counter()
        hint = (truth.width_deg, truth.height_deg) if scale_hint else None
        result = platesolve.solve(source / texture.image, field_hint_deg=hint, cpulimit_s=cpulimit_s, timeout_s=timeout_s)
        seconds = time.perf_counter() - t0
        error = None
        if result.solved:
            error = separation_deg(result.position.ra, result.position.dec, truth.ra, truth.dec) * 60
        outcomes.append(SolveOutcome(texture.image, field_bin(truth.field_deg), result.solved, error, result.reason, seconds))
        if progress:
            progress("solving", done, len(textures))
    return outcomes


@dataclass
class LabelOutcome:
    image: str
    dataset_label: str
    dataset_designation: str
    catalog_label: str | None
    catalog_designation: str | None


def evaluate_labels(dataset: Path, source: Path, catalog: SkyCatalog) -> list[LabelOutcome]:
    textures = {str(source / t.image): t for t in read_textures(source / "textures.json")}
    by_name = {Path(k).name: t for k, t in textures.items()}
    outcomes = []
    for row in read_manifest(dataset / MANIFEST_NAME):
        texture = textures.get(row.source_file) or by_name.get(Path(row.source_file).name)
        if texture is None or Path(row.file).stem != Path(row.source_file).stem:
            continue  # not a Stellarium photograph (merged data), or a crop of one: its footprint is not the photo's
        main = catalog.field(footprint_position(texture)).main
        outcomes.append(LabelOutcome(row.file, row.label, row.designation, main.label if main else None,
                                     main.designation if main else None))
    return outcomes


def solving_table(outcomes: list[SolveOutcome]) -> str:
    lines = [f"{'field':9} {'photos':>6} {'solved':>7} {'median error':>13} {'median s':>9}",
             f"{'-' * 9} {'-' * 6} {'-' * 7} {'-' * 13} {'-' * 9}"]
    for name in [*bin_names(), "all"]:
        items = [o for o in outcomes if name == "all" or o.field_bin == name]
        if not items:
            continue
        solved = [o for o in items if o.solved]
        error = f"{statistics.median(o.error_arcmin for o in solved):.2f}'" if solved else "-"
        lines.append(f"{name:9} {len(items):6d} {len(solved):3d} {len(solved) / len(items):3.0%} {error:>13} "
                     f"{statistics.median(o.seconds for o in items):9.1f}")
    reasons = Counter(_reason_kind(o.reason) for o in outcomes if o.reason)
    if reasons:
        lines.append("why not: " + "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common()))
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """A solve's reason without its numbers' detail, so that like reasons count together."""
    reason = reason.removeprefix("not solved: ").split(" (")[0]
    return "narrower than the smallest Tycho-2 index" if "narrower than the smallest" in reason else reason


def labels_table(outcomes: list[LabelOutcome]) -> str:
    lines = [f"{'dataset label':18} {'photos':>6} {'agree':>6} {'share':>6} {'no label':>8}",
             f"{'-' * 18} {'-' * 6} {'-' * 6} {'-' * 6} {'-' * 8}"]
    for label in [*LABELS, "all"]:
        items = [o for o in outcomes if label == "all" or o.dataset_label == label]
        if not items:
            continue
        agree = sum(o.catalog_label == o.dataset_label for o in items)
        unlabelled = sum(o.catalog_label is None for o in items)
        lines.append(f"{label:18} {len(items):6d} {agree:6d} {agree / len(items):6.1%} {unlabelled:8d}")
    same_object = sum(o.catalog_designation == o.dataset_designation for o in outcomes)
    lines.append(f"main object is the dataset's own designation: {same_object} of {len(outcomes)}")
    return "\n".join(lines)

