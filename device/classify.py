"""Classify files and folders with one loaded model, and write the results as table, JSON lines or CSV.

`find_images` walks the inputs in a stable order, `classify_paths` yields one
`Result` per input as soon as it is known, and `ResultWriter` streams each
result out (flushed per line) in the chosen format. `classify_paths` decodes and
prepares the next file in a thread (`nebula.device.prefetch`) while the
interpreter runs the current one, so on two or more cores the decode is off the
critical path; results keep the inputs' order.

Each input's record is a `nebula.device.record.ResultRecord` (its docstring lists
the fields): classified, failed (``error``: the run goes on, the exit code is 1) or
skipped (a dark, flat or bias frame: not a failure, since a calibration frame in a
capture folder is expected, not broken). The web page classifies an upload with
the same `classify_file`.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ContextManager, Iterable, Iterator

import numpy as np

from nebula.device.config import RunConfig
from nebula.device.decode import ImageError, SkippedImage, load_image
from nebula.device.formats import is_image_name, names_text
from nebula.device.identify import Identifier, SkyAnswer, catalog_line
from nebula.device.prefetch import DEPTH, Prefetched
from nebula.device.preprocess import prepare
from nebula.device.record import CSV_COLUMNS, ResultRecord, utc_now
from nebula.device.runtime import UNKNOWN, Classifier, Prediction

FORMATS = ("table", "jsonl", "csv")


@dataclass
class Result:
    """What classifying one file gave: its prediction (with stage timings), or why there is none."""

    file: str
    prediction: Prediction | None = None
    error: str | None = None
    skipped: str | None = None
    utc: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None  # (width, height) of the decoded picture
    sky: SkyAnswer | None = None  # position, catalog and agreement, when the catalog is on
    annotated_fits: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def record(self, model_sha256: str) -> ResultRecord:
        if self.error is not None or self.skipped is not None:
            return ResultRecord(file=self.file, error=self.error, skipped=self.skipped, utc=None)
        return ResultRecord.answer(self.prediction, model_sha256, file=self.file, utc=self.utc,
                                   annotated_fits=self.annotated_fits, **(self.sky.fields() if self.sky else {}))

    def to_record(self, model_sha256: str) -> dict:
        return self.record(model_sha256).to_dict()


@dataclass(frozen=True)
class EmptyFolder:
    """A folder given as input that holds no image: it gets an error line of its own, not silence."""

    path: Path


def find_images(paths: Iterable[str | Path]) -> Iterator[Path | EmptyFolder]:
    """Files as given (even unknown kinds: they get an error of their own); folders walked
    recursively in sorted order, keeping image names and skipping hidden ones (.DS_Store, ._x.jpg).

    In a folder, every image name that is not a folder is kept, broken symlinks and
    FIFOs included, so that each gets its error line instead of being skipped unseen.
    """
    for path in map(Path, paths):
        if _is_dir(path):
            found = sorted((p for p in path.rglob("*") if is_image_name(p.name) and not _hidden(p.relative_to(path))
                            and not _is_dir(p)), key=lambda p: p.relative_to(path).parts)
            yield from found if found else [EmptyFolder(path)]
        else:
            yield path


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long: not a folder; opening it says why in one line
        return False


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


@dataclass
class Decoded:
    """One input made ready for the model: its prepared (S, S, 3) image, or the `Result` that ends it."""

    path: Path
    image: np.ndarray | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of the decoded picture
    timings_ms: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # perf_counter() when its decode began
    result: Result | None = None  # failed or skipped: nothing for the model to do


def classify_paths(classifier: Classifier, paths: Iterable[str | Path], *, top_k: int = RunConfig.top_k,
                   threshold: float = RunConfig.threshold, prefetch: int = DEPTH, identifier: Identifier | None = None,
                   annotate_dir: str | Path | None = None) -> Iterator[Result]:
    """One `Result` per input image, in order, as each is done; `prefetch` files decoded ahead (0: none, no thread).

    With `identifier`, each also gets its position, catalog answer and agreement; with
    `annotate_dir`, each classified FITS file is copied there with the answers in its header.
    """
    decoded = (decode_file(classifier, path) for path in find_images(paths))
    with Prefetched(decoded, prefetch) if prefetch else nullcontext(decoded) as ahead:
        for item in ahead:
            result = classify_decoded(classifier, item, top_k=top_k, threshold=threshold, identifier=identifier)
            if annotate_dir is not None and result.prediction is not None:
                result.annotated_fits = _annotate(result, annotate_dir, classifier.sha256)
            yield result


def _annotate(result: Result, out_dir: str | Path, model_sha256: str) -> str:
    """The annotated copy's path, or why there is none (in the record, one line; the run goes on)."""
    from nebula.device.formats import by_content, by_name
    from nebula.device.identify import annotate_fits

    path = Path(result.file)
    try:
        with open(path, "rb") as file:
            kind = by_content(file.read(80)) or by_name(path.name)
        if kind is None or kind.name != "FITS":
            return "not annotated: not a FITS file"
        return str(annotate_fits(path, out_dir, result.record(model_sha256).to_dict()))
    except (OSError, ValueError) as err:
        return f"not annotated: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"


def classify_file(classifier: Classifier, path: Path, *, top_k: int = RunConfig.top_k,
                  threshold: float = RunConfig.threshold, lock: ContextManager | None = None,
                  identifier: Identifier | None = None) -> Result:
    """Decode and classify one file. `lock` is held around the model only (the web page shares it with the daemon)."""
    return classify_decoded(classifier, decode_file(classifier, path), top_k=top_k, threshold=threshold, lock=lock,
                            identifier=identifier)


def decode_file(classifier: Classifier, path: "Path | EmptyFolder") -> Decoded:
    """Decode and prepare one file for `classifier` (no interpreter: safe in another thread).

    A folder without images (from `find_images`) comes back as its error line."""
    t0 = time.perf_counter()
    if isinstance(path, EmptyFolder):
        error = f"no images found in this folder (no {names_text()} files)"
        return Decoded(path.path, started=t0, result=Result(str(path.path), error=error, utc=utc_now()))
    try:
        rgb = load_image(path, classifier.spec)
    except SkippedImage as reason:
        return Decoded(path, started=t0, result=Result(str(path), skipped=reason.cause, utc=utc_now()))
    except ImageError as err:
        return Decoded(path, started=t0, result=Result(str(path), error=err.cause, utc=utc_now()))
    t1 = time.perf_counter()
    image = prepare(rgb, classifier.spec)
    t2 = time.perf_counter()
    return Decoded(path, image=image, image_size=(int(rgb.shape[1]), int(rgb.shape[0])), started=t0,
                   timings_ms={"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3})


def classify_decoded(classifier: Classifier, decoded: Decoded, *, top_k: int = RunConfig.top_k,
                     threshold: float = RunConfig.threshold, lock: ContextManager | None = None,
                     identifier: Identifier | None = None) -> Result:
    """Run the model on what `decode_file` made. ``end_to_end`` is from the start of the decode to the answer
    (with read-ahead it includes the time the file waited for the interpreter)."""
    if decoded.result is not None:
        return decoded.result
    with lock or nullcontext():
        prediction = classifier.classify_prepared(decoded.image, top_k=top_k, threshold=threshold)
    prediction.timings_ms = {"preprocess": decoded.timings_ms["preprocess"], **prediction.timings_ms}
    timings = {"decode": decoded.timings_ms["decode"], **prediction.timings_ms}
    timings["end_to_end"] = (time.perf_counter() - decoded.started) * 1e3
    sky = identifier.identify(decoded.path, prediction.label) if identifier is not None else None
    return Result(str(decoded.path), prediction=prediction, utc=utc_now(), timings_ms=timings,
                  image_size=decoded.image_size, sky=sky)


class ResultWriter:
    """Streams results in one format: `table` for people, `jsonl` for programs, `csv` for spreadsheets.

    Errors always go to `err` as one line; in jsonl and csv they are also records in `out`,
    so a program reading the output sees every input.
    """

    def __init__(self, fmt: str, model_sha256: str, labels: list[str], top_k: int, out: IO | None = None, err: IO | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
        self.fmt, self.sha256 = fmt, model_sha256
        self.out, self.err = out or sys.stdout, err or sys.stderr  # looked up now: tests and click swap them
        self.label_width = max(len(label) for label in [*labels, "unknown", "skipped", "label"])
        self.others_width = max(len("others"), top_k * (self.label_width + 7) - 2)
        self._csv = csv.DictWriter(self.out, fieldnames=CSV_COLUMNS, lineterminator="\n") if fmt == "csv" else None
        self._header_done = False

    def write(self, result: Result) -> None:
        if not self._header_done:
            self._header()
        record = result.to_record(self.sha256)
        if result.failed:
            print(f"error: {one_line(result.file)}: {result.error}", file=self.err, flush=True)
        if self.fmt == "jsonl":
            self.out.write(json.dumps(record) + "\n")
        elif self.fmt == "csv":
            if "top_k" in record:
                record["top_k"] = " ".join(f"{label}:{score:.4f}" for label, score in record["top_k"])
            self._csv.writerow(record)
        elif not result.failed:
            self.out.write(self._table_row(result) + "\n")
            annotated = record.get("annotated_fits")
            if annotated and not annotated.startswith("not annotated"):
                annotated = f"annotated copy: {annotated}"
            for line in filter(None, [catalog_line(record), annotated]):  # the catalog's answer beside the model's, indented under its row
                self.out.write(f"  {line}\n")
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
            return f"{'skipped':<{w}}  {'-':>5}  {'-':<{self.others_width}}  {'-':>6}  {one_line(result.file)}  ({result.skipped})"
        p = result.prediction
        # An 'unknown' answer lists every candidate; a confident one, the runners-up.
        candidates = p.top_k if p.label == UNKNOWN else p.top_k[1:]
        others = ", ".join(f"{label} {score:.2f}" for label, score in candidates) or "-"
        return f"{p.label:<{w}}  {p.score:5.2f}  {others:<{self.others_width}}  {p.timings_ms['invoke']:6.1f}  {one_line(result.file)}"


def one_line(name: str) -> str:
    """A file name for a line of text: control characters (a newline in a name) and undecodable bytes as escapes."""
    if name.isprintable():
        return name
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii") for ch in name)


class ModelUnavailable(Exception):
    """No usable model or runtime; the message is one line saying what to do."""


def open_classifier(model: str | Path | None = None, num_threads: int | None = None, tta: int = 1) -> Classifier:
    """Load the model once (`model`, else $NEBULA_MODEL, else models/nebula.tflite), or raise `ModelUnavailable`."""
    from nebula.device.modelfile import ModelFileError
    from nebula.device.config import default_model_path
    from nebula.device.runtime import RuntimeMissing

    path = Path(model) if model else default_model_path()
    if not path.exists():
        raise ModelUnavailable(
            f"no model at {path}: make one with 'make convert' (or copy a nebula .tflite there), "
            "or pass --model FILE or set NEBULA_MODEL"
        )
    try:
        return Classifier(path, num_threads=num_threads, tta=tta)
    except (ModelFileError, RuntimeMissing) as err:
        raise ModelUnavailable(str(err)) from None
