"""The run folder: what `nebula train` writes and what conversion and evaluation read back.

    models/runs/<name>/
        model.keras           the whole classifier: (S,S,3) float32 raw RGB 0..255 -> softmax
        labels.txt            one label per line, in output order
        preprocess.json       PreprocessSpec.to_dict() (input size, resize mode ...)
        split.csv             the manifest columns + `split` (train/val/test)
        test_images.txt       the held-out photographs, one path a line (nebula classify --files-from)
        config.json           the resolved configuration, versions, label counts per split
        metrics.json          test-split scores, validation scores, wall time per phase
        history.json          per-epoch loss / val accuracy / val macro-F1 of each phase
        confusion_matrix.png  training_curves.png  augment_samples.png  mistakes.html

No TensorFlow here: reading a run is plain files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nebula.device.preprocess import PreprocessSpec
from nebula.train.manifest import COLUMNS, OPTIONAL_COLUMNS, SPLITS, ManifestRow

MODEL_NAME = "model.keras"
LABELS_NAME = "labels.txt"
PREPROCESS_NAME = "preprocess.json"
SPLIT_NAME = "split.csv"
TEST_IMAGES_NAME = "test_images.txt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
AUGMENT_PNG = "augment_samples.png"
MISTAKES_HTML = "mistakes.html"


class RunError(Exception):
    """A run folder that cannot be used; the message is one line naming the file and the cause."""


@dataclass
class Run:
    path: Path
    labels: list[str]
    spec: PreprocessSpec
    config: dict
    splits: dict[str, list[ManifestRow]]
    data_dir: Path

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME

    def image_path(self, row: ManifestRow) -> Path:
        return self.data_dir / row.file

    def image_paths(self, split: str) -> list[Path]:
        return [self.image_path(row) for row in self.splits[split]]


def write_labels(path: Path, labels: list[str]) -> None:
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")


def read_labels(path: Path) -> list[str]:
    try:
        labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise RunError(f"{path}: no such file (not a run folder written by 'nebula train'?)") from None
    if not labels:
        raise RunError(f"{path}: no labels in it")
    return labels


def read_spec(path: Path) -> PreprocessSpec:
    try:
        return PreprocessSpec.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise RunError(f"{path}: no such file (not a run folder written by 'nebula train'?)") from None
    except (ValueError, TypeError) as err:
        raise RunError(f"{path}: not a valid preprocessing spec ({err})") from None


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_image_list(path: Path, images: list[Path]) -> None:
    path.write_text("".join(f"{image.resolve()}\n" for image in images), encoding="utf-8")


def write_split(path: Path, splits: dict[str, list[ManifestRow]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "split"])
        writer.writeheader()
        for split in SPLITS:
            for row in splits.get(split, []):
                writer.writerow({**asdict(row), "split": split})


def read_split(path: Path) -> dict[str, list[ManifestRow]]:
    splits: dict[str, list[ManifestRow]] = {split: [] for split in SPLITS}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {*COLUMNS, "split"} - set(OPTIONAL_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise RunError(f"{path}: lacks columns {sorted(missing)}")
            for r in reader:
                if r["split"] not in splits:
                    raise RunError(f"{path}: unknown split {r['split']!r} for {r['file']}")
                row = ManifestRow(**{k: r[k] for k in COLUMNS if k not in ("width", "height") and k in r},
                                  width=int(r["width"] or 0), height=int(r["height"] or 0))
                splits[r["split"]].append(row)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file (not a run folder written by 'nebula train'?)") from None
    return splits


def load_run(run_dir: str | Path, data_dir: str | Path | None = None) -> Run:
    """Read a run folder; `data_dir` overrides the dataset location recorded in config.json."""
    path = Path(run_dir)
    if path.is_file() and path.name == MODEL_NAME:
        path = path.parent
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder")
    config_path = path / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{config_path}: no such file (not a run folder written by 'nebula train'?)") from None
    except ValueError as err:
        raise RunError(f"{config_path}: not valid JSON ({err})") from None
    if not (path / MODEL_NAME).exists():
        raise RunError(f"{path / MODEL_NAME}: no such file (the run did not finish?)")
    return Run(
        path=path,
        labels=read_labels(path / LABELS_NAME),
        spec=read_spec(path / PREPROCESS_NAME),
        config=config,
        splits=read_split(path / SPLIT_NAME),
        data_dir=Path(data_dir or config.get("data_dir", ".")).resolve(),
    )


def model_companions(model_path: str | Path) -> tuple[Path, list[str], PreprocessSpec]:
    """For a Keras model (run folder or .keras file): (model file, labels, spec) from the folder it is in."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    model_file = folder / MODEL_NAME if path.is_dir() else path
    if not model_file.exists():
        raise RunError(f"{model_file}: no such model file")
    return model_file, read_labels(folder / LABELS_NAME), read_spec(folder / PREPROCESS_NAME)
