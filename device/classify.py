"""Classify files and folders with one loaded model, and write the results as table, JSON lines or CSV.

`find_images` walks the inputs in a stable order, `classify_paths` yields one
`Result` per input as soon as it is known, and `ResultWriter` streams each
result out (flushed per line) in the chosen format.

A record per input:
- classified: ``file, label, score, top_k, inference_ms, model_sha256, utc``
  (``inference_ms`` is the model's invoke time, the part the model is to blame for);
- failed: ``file, error`` (the cause, one line) — the run goes on, the exit code is 1;
- skipped (a dark, flat or bias frame): ``file, skipped`` (the reason) — not a failure,
  since a calibration frame in a capture folder is expected, not broken.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterable, Iterator

from nebula.device.decode import ImageError, SkippedImage, load_image
from nebula.device.fits import FITS_SUFFIXES
from nebula.device.runtime import UNKNOWN, Classifier, Prediction

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff") + FITS_SUFFIXES
FORMATS = ("table", "jsonl", "csv")


@dataclass
class Result:
    file: str
    prediction: Prediction | None = None
    error: str | None = None
    skipped: str | None = None
    utc: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_record(self, model_sha256: str) -> dict:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        if self.skipped is not None:
            return {"file": self.file, "skipped": self.skipped}
        p = self.prediction
        return {
            "file": self.file,
            "label": p.label,
            "score": round(p.score, 4),
            "top_k": [[label, round(score, 4)] for label, score in p.top_k],
            "inference_ms": round(p.timings_ms["invoke"], 3),
            "model_sha256": model_sha256,
            "utc": self.utc,
        }


def is_image_name(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def find_images(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given (even unknown kinds: they get an error of their own); folders walked
    recursively in sorted order, keeping image files and skipping hidden ones (.DS_Store, ._x.jpg)."""
    for path in map(Path, paths):
        if path.is_dir():
            found = (p for p in path.rglob("*") if is_image_name(p) and not _hidden(p.relative_to(path)) and p.is_file())
            yield from sorted(found, key=lambda p: p.relative_to(path).parts)
        else:
            yield path


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def classify_paths(classifier: Classifier, paths: Iterable[str | Path], top_k: int = 3, threshold: float = 0.0) -> Iterator[Result]:
    """One `Result` per input image, in order, as each is done."""
    for path in find_images(paths):
        yield classify_file(classifier, path, top_k, threshold)


def classify_file(classifier: Classifier, path: Path, top_k: int = 3, threshold: float = 0.0) -> Result:
    t0 = time.perf_counter()
    try:
        rgb = load_image(path, classifier.spec)
    except SkippedImage as reason:
        return Result(str(path), skipped=reason.cause, utc=_utc_now())
    except ImageError as err:
        return Result(str(path), error=err.cause, utc=_utc_now())
    decode_ms = (time.perf_counter() - t0) * 1e3
    prediction = classifier.classify(rgb, top_k=top_k, threshold=threshold)
    timings = {"decode": decode_ms, **prediction.timings_ms}
    timings["end_to_end"] = (time.perf_counter() - t0) * 1e3
    return Result(str(path), prediction=prediction, utc=_utc_now(), timings_ms=timings)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ResultWriter:
    """Streams results in one format: `table` for people, `jsonl` for programs, `csv` for spreadsheets.

    Errors always go to `err` as one line; in jsonl and csv they are also records in `out`,
    so a program reading the output sees every input.
    """

    CSV_FIELDS = ("file", "label", "score", "top_k", "inference_ms", "model_sha256", "utc", "skipped", "error")

    def __init__(self, fmt: str, model_sha256: str, labels: list[str], top_k: int, out: IO | None = None, err: IO | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
        self.fmt, self.sha256 = fmt, model_sha256
        self.out, self.err = out or sys.stdout, err or sys.stderr  # looked up now: tests and click swap them
        self.label_width = max(len(label) for label in [*labels, "unknown", "skipped", "label"])
        self.others_width = max(len("others"), top_k * (self.label_width + 7) - 2)
        self._csv = csv.DictWriter(self.out, fieldnames=self.CSV_FIELDS, lineterminator="\n") if fmt == "csv" else None
        self._header_done = False

    def write(self, result: Result) -> None:
        if not self._header_done:
            self._header()
        record = result.to_record(self.sha256)
        if result.failed:
            print(f"error: {result.file}: {result.error}", file=self.err, flush=True)
        if self.fmt == "jsonl":
            self.out.write(json.dumps(record) + "\n")
        elif self.fmt == "csv":
            if "top_k" in record:
                record["top_k"] = " ".join(f"{label}:{score:.4f}" for label, score in record["top_k"])
            self._csv.writerow(record)
        elif not result.failed:
            self.out.write(self._table_row(result) + "\n")
        self.out.flush()

    def _header(self) -> None:
        self._header_done = True
        if self.fmt == "csv":
            self._csv.writeheader()
        elif self.fmt == "table":
            self.out.write(f"{'label':<{self.label_width}}  {'score':>5}  {'others':<{self.others_width}}  {'ms':>6}  file\n")

    def _table_row(self, result: Result) -> str:
        w = self.label_width
        if result.skipped is not None:
            return f"{'skipped':<{w}}  {'-':>5}  {'-':<{self.others_width}}  {'-':>6}  {result.file}  ({result.skipped})"
        p = result.prediction
        # An 'unknown' answer lists every candidate; a confident one, the runners-up.
        candidates = p.top_k if p.label == UNKNOWN else p.top_k[1:]
        others = ", ".join(f"{label} {score:.2f}" for label, score in candidates) or "-"
        return f"{p.label:<{w}}  {p.score:5.2f}  {others:<{self.others_width}}  {p.timings_ms['invoke']:6.1f}  {result.file}"


class ModelUnavailable(Exception):
    """No usable model or runtime; the message is one line saying what to do."""


def open_classifier(model: str | Path | None = None, num_threads: int | None = None) -> Classifier:
    """Load the model once (`model`, else $NEBULA_MODEL, else models/nebula.tflite), or raise `ModelUnavailable`."""
    from nebula.device.modelfile import ModelFileError
    from nebula.device.runtime import RuntimeMissing, default_model_path

    path = Path(model) if model else default_model_path()
    if not path.exists():
        raise ModelUnavailable(
            f"no model at {path}: make one with 'make convert' (or copy a nebula .tflite there), "
            "or pass --model FILE or set NEBULA_MODEL"
        )
    try:
        return Classifier(path, num_threads=num_threads)
    except (ModelFileError, RuntimeMissing) as err:
        raise ModelUnavailable(str(err)) from None
