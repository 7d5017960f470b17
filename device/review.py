"""The review queue and the labelled folder: the user's own sky, back into training.

The daemon hands every result to `ReviewQueue.consider`; an uncertain one (see
`review_reason`) is copied, once, into the queue. The web page's review view
(`nebula.device.review_page`) lists the queue and files each item with `ReviewQueue.file`.

The review folder (``RunConfig.review_dir``, default ``review/`` beside the results log)::

    queue/<id>.<ext>                          the capture's own bytes, or a live frame as PNG
    queue/<id>.json                           its result line, why it was queued, whether it was skipped
    labelled/<label>/<id>.<ext>               the `nebula data merge` layout: merge takes labelled/ as it is
    labelled/<label>/<id>.<ext>.reason.json   who labelled it, when, the model's answer (merge reads it)
    not_deep_sky/<id>.<ext> (+ .reason.json)  what the user said is no deep-sky frame: kept out of training
    seen.txt                                  every id ever queued, so nothing is queued twice

Every file appears whole: it is written to a temporary name and moved in place with
`os.replace`. Filing writes the reason file first, then moves the image (one
rename), then removes the queue record, so a crash at any point leaves the old
state (still queued; a reason file without its image, which nothing reads) or the
new one (labelled; a queue record without its image). Opening the folder tidies
both leftovers and any temporary file.

Standard library only at import; PIL is imported to write a live frame's PNG.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nebula.device import formats
from nebula.device.record import utc_now

QUEUE, LABELLED, NOT_DEEP_SKY, SEEN = "queue", "labelled", "not_deep_sky", "seen.txt"
REASON_SUFFIX = ".reason.json"  # <image>.reason.json beside each filed image; not an image name, so walks skip it
_TMP_PREFIX = ".tmp-"


class ReviewError(Exception):
    """A filing that cannot be done (no such item, a bad label); one line for the page."""


class NotQueued(ReviewError):
    """The item is not in the queue (any more: filed, or dropped for space)."""


def review_reason(record: dict, below: float, gap: float) -> str | None:
    """Why a result line needs a person's eye, or None: no answer, or a confident one that the catalog does not contradict."""
    top = record.get("top_k")
    if not top or record.get("error") is not None or record.get("skipped") is not None:
        return None
    if record.get("agrees") is False:
        return f"the model says {top[0][0]}, the catalog says {catalog_label(record)}"
    first = top[0][1]
    second = top[1][1] if len(top) > 1 else 0.0
    if first < below:
        return f"top score {first:.2f} is below {below:g}"
    if first - second < gap:
        return f"{top[0][0]} {first:.2f} and {top[1][0]} {second:.2f} are closer than {gap:g}"
    return None


def catalog_label(record: dict) -> str | None:
    """The catalog's label for the main object in the field, where the record has one (``catalog.main.label``)."""
    catalog = record.get("catalog")
    main = catalog.get("main") if isinstance(catalog, dict) else None
    return main.get("label") if isinstance(main, dict) else None


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all: a temporary file in the same folder, fsynced, then renamed."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _json_bytes(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


@dataclass
class QueuedItem:
    id: str
    image: Path
    record: dict  # queue/<id>.json: {"id", "queued_utc", "seq", "reason", "image", "result", "skipped"}


def _queue_order(item: QueuedItem) -> tuple:
    """Oldest first, by the number it was queued with: a millisecond stamp ties on a fast device and goes back
    when the clock is set. Items queued before there were numbers (0) come first, by their stamp."""
    return item.record.get("seq", 0), item.record.get("queued_utc", "")


class ReviewQueue:
    """The review folder of one device: admits uncertain results, lists them, files them under labels."""

    def __init__(self, root: str | Path, below: float, gap: float, max_mb: float, every_s: float = 0.0,
                 echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
        self.root = Path(root)
        self.below, self.gap, self.max_bytes, self.every_s, self.echo = below, gap, int(max_mb * 2**20), every_s, echo
        self.queue_dir = self.root / QUEUE
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        (self.root / LABELLED).mkdir(exist_ok=True)
        self._lock = threading.Lock()  # the daemon adds while the page files
        self._last_live = float("-inf")
        self._seen = self._read_seen()
        self._tidy()
        self._next_seq = 1 + max((item.record.get("seq", 0) for item in self._items()), default=0)

    @classmethod
    def from_config(cls, config, **options) -> "ReviewQueue":
        return cls(review_folder(config), config.review_below, config.review_gap, config.review_max_mb,
                   config.review_every_s, **options)

    # --- admission (the daemon's side) ---------------------------------------------------

    def consider(self, record: dict, frame) -> str | None:
        """Daemon callback: queue this result's image if it is uncertain and new; returns its id when queued.

        A watched capture is copied as it is; a live frame is written as PNG (its full-size
        preview where the camera has one), at most one every `every_s` seconds.
        """
        reason = review_reason(record, self.below, self.gap)
        if reason is None:
            return None
        live = frame.path is None
        if live and time.monotonic() - self._last_live < self.every_s:
            return None
        picture = None if not live else (frame.preview if frame.preview is not None else frame.rgb)
        if live and picture is None:
            return None
        try:
            item_id = _capture_id(frame.path) if not live else hashlib.sha256(picture.tobytes()).hexdigest()[:16]
        except OSError:  # the capture went away after it was classified
            return None
        with self._lock:
            if item_id in self._seen:
                return None
            try:
                self._copy_in(item_id, frame, picture, {"id": item_id, "queued_utc": utc_now(), "seq": self._next_seq,
                                                        "reason": reason, "result": record, "skipped": False})
                self._next_seq += 1
                self._remember(item_id)
                self._bound()
            except (OSError, ValueError) as err:  # a full disk, an odd frame: the run goes on, and says so
                self.echo(f"review: cannot queue {_source_name(record)} ({getattr(err, 'strerror', None) or err}); the run goes on")
                return None
            if live:
                self._last_live = time.monotonic()
        return item_id

    def _copy_in(self, item_id: str, frame, picture, queued: dict) -> None:
        """The image (a capture's bytes, or a PNG of `picture`), then its record; on failure, neither."""
        suffix = ".png" if picture is not None else (formats.image_suffix(frame.path.name) or frame.path.suffix).lower()
        image = self.queue_dir / f"{item_id}{suffix}"
        try:
            if picture is not None:
                _write_png(image, picture)
            else:
                tmp = image.with_name(_TMP_PREFIX + image.name)
                shutil.copyfile(frame.path, tmp)
                os.replace(tmp, image)
            write_atomic(self._record_path(item_id), _json_bytes({**queued, "image": image.name}))
        except BaseException:
            for leftover in (image, image.with_name(_TMP_PREFIX + image.name)):
                leftover.unlink(missing_ok=True)
            raise

    def _bound(self) -> None:
        """Drop the oldest skipped, then the oldest unlabelled items until the queue fits its size limit."""
        items = self._items()
        size = sum(_size(item.image) + _size(self._record_path(item.id)) for item in items)
        order = sorted(items, key=lambda item: (not item.record.get("skipped"), _queue_order(item)))
        for item in order[:-1]:  # the newest item stays, whatever its size
            if size <= self.max_bytes:
                return
            size -= _size(item.image) + _size(self._record_path(item.id))
            self._remove(item)
            self.echo(f"review: queue over {self.max_bytes / 2**20:g} MB: dropped the oldest "
                      f"{'skipped' if item.record.get('skipped') else 'unlabelled'} item {item.id} "
                      f"({_source_name(item.record['result'])}, queued {item.record.get('queued_utc')})")

    # --- the page's side -----------------------------------------------------------------

    def items(self) -> list[QueuedItem]:
        """The queue, not-yet-skipped first, each oldest first."""
        with self._lock:
            items = self._items()
        return sorted(items, key=lambda item: (bool(item.record.get("skipped")), _queue_order(item)))

    def get(self, item_id: str) -> QueuedItem:
        record_path = self._record_path(item_id)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise NotQueued(f"no queued item {item_id!r} (already filed or dropped?)") from None
        image = self.queue_dir / record.get("image", "")
        if not image.is_file() or image.parent != self.queue_dir:
            raise NotQueued(f"no queued item {item_id!r} (already filed or dropped?)")
        return QueuedItem(item_id, image, record)

    def file(self, item_id: str, label: str | None, by: str = "", labels: list[str] = ()) -> Path:
        """File item `item_id` under `label` (one of `labels`), or as no deep-sky frame (label None). Returns its new path."""
        if label is not None and label not in labels:
            raise ReviewError(f"{label!r} is not one of the model's labels ({', '.join(labels)})")
        by = by.strip() or default_labeller()
        with self._lock:
            item = self.get(item_id)
            folder = self.root / LABELLED / label if label is not None else self.root / NOT_DEEP_SKY
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / item.image.name
            result = item.record["result"]
            reason = {
                "label": label, "labelled_by": by, "labelled_utc": utc_now(),
                "model": {k: result.get(k) for k in ("label", "score", "top_k", "model_sha256")},
                "catalog": catalog_label(result), "agrees": result.get("agrees"),
                "queued_because": item.record.get("reason"), "captured_utc": result.get("utc"),
                "source": _source_name(result), "target": result.get("target"), "filter": result.get("filter"),
            }
            write_atomic(target.with_name(target.name + REASON_SUFFIX), _json_bytes(reason))
            os.replace(item.image, target)
            self._record_path(item_id).unlink(missing_ok=True)
        return target

    def skip(self, item_id: str) -> None:
        """Leave an item unlabelled for now: it moves to the end of the list and is the first dropped when space runs out."""
        with self._lock:
            item = self.get(item_id)
            write_atomic(self._record_path(item_id), _json_bytes({**item.record, "skipped": True}))

    # --- the folder ------------------------------------------------------------------------

    def _record_path(self, item_id: str) -> Path:
        if not item_id.isalnum():
            raise NotQueued(f"no queued item {item_id!r}")
        return self.queue_dir / f"{item_id}.json"

    def _items(self) -> list[QueuedItem]:
        items = []
        for path in self.queue_dir.glob("*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            items.append(QueuedItem(path.stem, self.queue_dir / record.get("image", ""), record))
        return items

    def _remove(self, item: QueuedItem) -> None:
        self._record_path(item.id).unlink(missing_ok=True)  # the record first: an image without one is tidied away
        item.image.unlink(missing_ok=True)

    def _read_seen(self) -> set[str]:
        try:
            return set((self.root / SEEN).read_text(encoding="utf-8").split())
        except FileNotFoundError:
            return set()

    def _remember(self, item_id: str) -> None:
        self._seen.add(item_id)
        with open(self.root / SEEN, "a", encoding="utf-8") as file:
            file.write(item_id + "\n")

    def _tidy(self) -> None:
        """Finish what a crash left: temporary files, queue records without an image, images without a record,
        and reason files without their image."""
        for path in self.root.rglob(_TMP_PREFIX + "*"):
            path.unlink(missing_ok=True)
        records = {path.stem: path for path in self.queue_dir.glob("*.json")}
        images = {}
        for path in self.queue_dir.iterdir():
            if path.suffix != ".json":
                images[path.name.split(".", 1)[0]] = path
        for item_id, path in records.items():
            if item_id not in images:
                path.unlink(missing_ok=True)
        for item_id, path in images.items():
            if item_id not in records:
                path.unlink(missing_ok=True)
        for folder in (self.root / LABELLED, self.root / NOT_DEEP_SKY):
            for reason in folder.rglob("*" + REASON_SUFFIX) if folder.is_dir() else ():
                if not reason.with_name(reason.name[: -len(REASON_SUFFIX)]).exists():
                    reason.unlink(missing_ok=True)


def review_folder(config) -> Path:
    """The review folder of a configuration: its review_dir, else ``review/`` beside the results log."""
    return Path(config.review_dir) if config.review_dir else Path(config.log).parent / "review"


def read_reason(image: Path) -> dict | None:
    """The reason file beside a filed image (``<image>.reason.json``), or None when there is none or it is unreadable."""
    try:
        return json.loads(image.with_name(image.name + REASON_SUFFIX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def default_labeller() -> str:
    """Who labels when the page sends no name: the user the device runs as."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _capture_id(path: Path) -> str:
    """A capture is the same capture only with the same path, size and mtime (the daemon's FileKey)."""
    stat = path.stat()
    return hashlib.sha256(f"{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _write_png(path: Path, rgb) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _source_name(result: dict) -> str:
    return result["file"] if "file" in result else f"frame {result.get('frame')}"
