"""The dataset manifest: one CSV row per image, with its label, why, and its object group.

A dataset folder is `<root>/<label>/<image>` plus `<root>/manifest.csv`. Every
split is made by group, so no object is ever in both train and test.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nebula.device import formats

LABELS = ("dark", "emission", "reflection", "planetary", "protoplanetary", "supernova_remnant", "other")
MANIFEST_NAME = "manifest.csv"
SPLITS = ("train", "val", "test")


@dataclass
class ManifestRow:
    file: str  # relative to the dataset root, e.g. "emission/m42.png"
    label: str
    label_reason: str
    designation: str = ""
    group: str = ""
    credit: str = ""
    source_file: str = ""
    width: int = 0
    height: int = 0
    origin: str = "photo"  # "photo", or "crop": a catalog-guided crop of a photo (nebula.train.crops), for training only


COLUMNS = tuple(f.name for f in fields(ManifestRow))
OPTIONAL_COLUMNS = ("origin",)  # manifests written before the column existed are all photos


def group_from_stem(stem: str) -> str:
    """'barnard_loop-3' -> 'barnard_loop', 'M42_2' -> 'm42': numbered views of one object share a group.

    Only a short suffix (1-2 digits) is a view number: camera names like 'IMG_0001' stay distinct.
    """
    return re.sub(r"[-_]\d{1,2}$", "", stem.lower()) or stem.lower()


def write_manifest(rows: list[ManifestRow], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_manifest(path: str | Path) -> list[ManifestRow]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(OPTIONAL_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
        return [
            ManifestRow(**{**{k: r[k] for k in COLUMNS if k in r}, "width": int(r["width"] or 0), "height": int(r["height"] or 0)})
            for r in reader
        ]


def manifest_from_folder(root: str | Path) -> list[ManifestRow]:
    """Rows for a folder with one sub-folder per label (a user's own photos), in any format of `nebula.device.formats`.

    An image labelled on the device's review page has a reason file beside it (`nebula.device.review`);
    its row says who labelled it, and groups it as `labelled_row` says.
    """
    from nebula.device.review import read_reason

    root = Path(root)
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(label_dir.rglob("*")):
            if image.is_file() and formats.is_image_name(image.name):
                stem = formats.stem(image.name)  # 'M42.fits.gz' -> 'M42'
                row = ManifestRow(
                    file=image.relative_to(root).as_posix(),
                    label=label_dir.name,
                    label_reason=f"folder '{label_dir.name}'",
                    designation=stem,
                    group=group_from_stem(stem),
                    source_file=str(image),
                )
                reason = read_reason(image)
                rows.append(labelled_row(row, reason) if reason is not None else row)
    return rows


def labelled_row(row: ManifestRow, reason: dict) -> ManifestRow:
    """A review-page image's row: the person who labelled it is its photographer (their own captures), and one
    target is one group -- the capture's target (Ekos/KStars folder), else its file name's object, else one group
    per photographer and night when nothing names the target."""
    who = reason.get("labelled_by") or "unknown"
    model = reason.get("model") or {}
    said = f"{model.get('label')} {model['score']:.2f}" if isinstance(model.get("score"), (int, float)) else "no answer"
    target = reason.get("target") or object_in_name(formats.stem(Path(str(reason.get("source") or "")).name)) or ""
    night = (reason.get("captured_utc") or reason.get("labelled_utc") or "")[:10]
    return ManifestRow(
        file=row.file, label=row.label,
        label_reason=f"labelled by {who} on the review page {reason.get('labelled_utc', '')} (model said {said})",
        designation=target,  # nebula data merge joins a designation with the catalog's object group (M42 with M 42)
        group=_object_group(target) if target else f"{who}/{night}",
        credit=who, source_file=row.source_file,
    )


def object_in_name(stem: str) -> str | None:
    """The object a capture's file name names, as capture programs write them: 'M42_Light_001' -> 'M42',
    'Light_NGC_7000_300s' -> 'NGC 7000'; None when no word (or pair of words) is a designation."""
    words = [w for w in re.split(r"[\s_\-.]+", stem) if w]
    for i, word in enumerate(words):
        for candidate in (word, " ".join(words[i:i + 2])):
            if _object_group(candidate, strict=True):
                return candidate
    return None


def _object_group(name: str, strict: bool = False) -> str | None:
    from nebula.train.stellarium import designation_group  # stellarium imports this module

    return designation_group(name) or (None if strict else group_from_stem(name))


def load_dataset(root: str | Path) -> list[ManifestRow]:
    """The manifest of a dataset folder: its manifest.csv, or one made from its sub-folders."""
    root = Path(root)
    if (root / MANIFEST_NAME).exists():
        return read_manifest(root / MANIFEST_NAME)
    return manifest_from_folder(root)


def grouped_split(rows: list[ManifestRow], val: float = 0.15, test: float = 0.15, seed: int = 0) -> dict[str, list[ManifestRow]]:
    """Split by group, stratified by each group's majority label; a group never straddles two splits.

    A label with three or more groups gets at least one group in val and in test;
    with two, one goes to test; with one, it stays in train.
    """
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        groups[row.group or row.file].append(row)
    by_label: dict[str, list[str]] = defaultdict(list)
    for name, members in groups.items():
        by_label[Counter(r.label for r in members).most_common(1)[0][0]].append(name)

    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for label in sorted(by_label):
        names = sorted(by_label[label])
        rng.shuffle(names)
        total = sum(len(groups[n]) for n in names)
        quota = {"test": test * total, "val": val * total}
        minimum = {"test": 1 if len(names) >= 2 else 0, "val": 1 if len(names) >= 3 else 0}
        for split in ("test", "val"):
            taken = 0
            while names and len(names) > 1 and (taken < quota[split] or minimum[split] > 0):
                name = names.pop()
                assignment[name] = split
                taken += len(groups[name])
                minimum[split] -= 1
                if taken >= quota[split] and minimum[split] <= 0:
                    break
        for name in names:
            assignment[name] = "train"

    splits = {split: [] for split in SPLITS}
    for name, members in groups.items():
        splits[assignment[name]].extend(members)
    for split in SPLITS:
        splits[split].sort(key=lambda r: r.file)
    return splits


def label_counts(rows: list[ManifestRow]) -> Counter:
    return Counter(r.label for r in rows)
