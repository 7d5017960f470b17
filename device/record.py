"""The result record: what one classified (or failed, or skipped) input becomes, on every route.

``nebula classify --format jsonl/csv``, the daemon's results log (and its
sidecars) and the web page's answer are all `ResultRecord.to_dict()`. To add a
field, add it to the dataclass with a default of None: it is written when set
and left out when not, and it becomes a CSV column of ``nebula classify``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timezone


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the millisecond, 'Z' for UTC: every record's `utc`."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _not_in_csv():
    return field(default=None, metadata={"csv": False})


@dataclass
class ResultRecord:
    """One input and what became of it. Fields are written in this order; None is left out.

    Which input (one of the two):
      file          the image file (classify, a watched folder's capture; the upload's name on the page)
      frame         a live source's frame number (camera, fake)

    The answer, when classified:
      label         the top label, or "unknown" when its score is below the threshold
      score         that label's score (smoothed on live sources)
      top_k         [[label, score], ...], best first
      inference_ms  the model's invoke time for this input
      decode_ms     reading the file into pixels (the web page; a watched folder puts it in `extras`)
      model_sha256  which model answered
      utc           when (``utc_now()``); classify leaves it off its error and skipped lines

    Where it points and what is there (``--catalog``, or ``[catalog] enabled`` in the config; files only):
      position      {ra, dec, field_deg, width_deg, height_deg, source: "header" | "solve", target}
      catalog       {main: object, next: [objects]}: designation, name, type, label, label_rule,
                    size_arcmin, offset_arcmin, fill, score (`nebula.device.skycatalog`)
      agrees        the model's label is the catalog's label for the main object (left out when
                    either has none)
      position_note why there is no position (or no catalog), and header warnings; one line

    Or why there is none (the run goes on either way):
      skipped       the reason it was deliberately not classified (a dark, flat or bias frame)
      error         the cause, one line

    Live sources only:
      frame_label   this frame's own label, before smoothing
      smoothed_over how many frames `label` averages

    Written afterwards:
      sidecar_error a watched capture whose <capture>.json could not be written
      annotated_fits the annotated copy of a FITS file (``--annotate-fits DIR``), or why there is none

    extras: the source's own keys, appended as they are: ``size``, ``mtime_ns``, ``target``,
    ``filter``, ``decode_ms`` (watched captures); ``exposure_us``, ``gain``, ``sensor_timestamp_ns``
    (camera); ``scene`` (fake); ``type``, ``width``, ``height`` (web uploads).
    """

    file: str | None = None
    frame: int | str | None = _not_in_csv()
    label: str | None = None
    score: float | None = None
    top_k: list[list] | None = None
    inference_ms: float | None = None
    decode_ms: float | None = _not_in_csv()
    model_sha256: str | None = None
    position: dict | None = _not_in_csv()
    catalog: dict | None = _not_in_csv()
    agrees: bool | None = None
    position_note: str | None = None
    utc: str | None = field(default_factory=utc_now)
    skipped: str | None = None
    error: str | None = None
    frame_label: str | None = _not_in_csv()
    smoothed_over: int | None = _not_in_csv()
    sidecar_error: str | None = _not_in_csv()
    annotated_fits: str | None = None
    extras: dict = field(default_factory=dict, metadata={"csv": False})

    @classmethod
    def answer(cls, prediction, model_sha256: str, **fields_) -> "ResultRecord":
        """The record of a `Prediction` (its invoke time is the record's inference_ms), plus any other fields."""
        return cls(
            label=prediction.label,
            score=round(prediction.score, 4),
            top_k=[[label, round(score, 4)] for label, score in prediction.top_k],
            inference_ms=round(prediction.timings_ms["invoke"], 3),
            model_sha256=model_sha256,
            **fields_,
        )

    def to_dict(self) -> dict:
        """The JSON-ready record: the fields that are set, in order, then the extras."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras" and getattr(self, f.name) is not None}
        out.update(self.extras)
        return out


# The columns of `nebula classify --format csv`: every field a file's record can have.
CSV_COLUMNS = tuple(f.name for f in fields(ResultRecord) if f.metadata.get("csv", True))
