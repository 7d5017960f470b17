"""The "learn from your own sky" loop, measured: how much N labelled frames of a new photographer help.

    nebula own-sky --data data/stellarium --photographer "Plover Hill Observatory" --n 10 --n 50 --out models/own_sky

One photographer of the dataset plays the user. Their photographs leave the dataset, with every image
of the same objects (so the base model has seen neither their gear nor their targets), and the base run
is trained on the rest: N = 0. Then, for each N, N of their photographs go through the product's loop as a
user's captures would: named as a capture program names them, classified on the device path by the base
model, queued (`nebula.device.review`; every one, since these are the frames the user chose to label),
filed under their label by the photographer, merged with the base set (`nebula data merge`) and
fine-tuned from the base run (`nebula train --init-from`, the README's quick settings). Every run is
converted to int8 (the gate's verdict is recorded; the model is kept either way, so the curve has no
holes) and scored through the device path on the same held-out photographs: those of the photographer
that no N labelled. Larger N labels a superset of smaller N's frames; `--draws` repeats the whole with
other frames drawn, each draw with its own held-out set.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from nebula.train.manifest import MANIFEST_NAME, ManifestRow, load_dataset, write_manifest

# The README's quick fine-tune from a run (section "Learn from your own sky").
FINE_TUNE = {"head_epochs": 10, "epochs": 4}
MIN_HELD_OUT = 5  # fewer held-out photographs than this would make the curve noise


class OwnSkyError(ValueError):
    """The experiment cannot be set up (unknown photographer, too few photographs); one line."""


@dataclass
class Point:
    """One run of the curve: N labelled frames, where they went, the int8 gate, the held-out scores."""

    draw: int
    n: int
    run: str
    model: str
    labelled_in_split: dict[str, int] = field(default_factory=dict)  # of the N frames: how many train/val/test took
    gate_failures: list[str] = field(default_factory=list)
    held_out: int = 0
    accuracy: float = 0.0
    macro_f1: float = 0.0
    recall: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, str] = field(default_factory=dict)  # held-out file name -> int8 answer


def plan(rows: list[ManifestRow], photographer: str) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(base rows, the photographer's photographs): the base holds no image of theirs (crops included)
    and no image of any object group that one of their photographs is in."""
    theirs = sorted((r for r in rows if credited_to(r, photographer) and r.origin != "crop"), key=lambda r: r.file)
    if not theirs:
        credits = Counter(r.credit for r in rows if r.origin != "crop" and r.credit)
        raise OwnSkyError(f"no photographs credited to {photographer!r}; the most frequent credits: "
                          + "; ".join(f"{name} ({n})" for name, n in credits.most_common(5)))
    groups = {r.group for r in theirs}
    base = [r for r in rows if not credited_to(r, photographer) and r.group not in groups]
    return base, theirs


def credited_to(row: ManifestRow, photographer: str) -> bool:
    """The row's credit is the photographer's: the whole credit, or its name without the address
    ('Plover Hill Observatory <http://...>' is Plover Hill Observatory's)."""
    return row.credit == photographer or row.credit.split(" <", 1)[0].strip() == photographer


def draw_frames(theirs: list[ManifestRow], largest_n: int, seed: int) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(frames to label, in labelling order; held-out photographs): the first N of the order are N's frames."""
    if len(theirs) - largest_n < MIN_HELD_OUT:
        raise OwnSkyError(f"the photographer has {len(theirs)} photographs: labelling {largest_n} leaves "
                          f"{len(theirs) - largest_n} to score on (at least {MIN_HELD_OUT}); use a smaller --n")
    order = list(theirs)
    random.Random(seed).shuffle(order)
    return order[:largest_n], sorted(order[largest_n:], key=lambda r: r.file)


def capture_name(row: ManifestRow, index: int) -> str:
    """The file name a capture program gives a light frame of this target: 'NGC_2371_Light_003.png'."""
    target = re.sub(r"[^A-Za-z0-9]+", "_", row.designation).strip("_") or Path(row.file).stem
    return f"{target}_Light_{index:03d}{Path(row.file).suffix}"


def write_subset(rows: list[ManifestRow], source: Path, out: Path) -> Path:
    """A dataset folder of `rows` (paths as in `source`), hard-linked where the file system allows."""
    if out.exists():
        shutil.rmtree(out)
    for row in rows:
        target = out / row.file
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / row.file, target)
        except OSError:
            shutil.copy2(source / row.file, target)
    write_manifest(rows, out / MANIFEST_NAME)
    return out


def label_as_the_user(frames: list[ManifestRow], source: Path, model: Path, review_dir: Path, photographer: str) -> Path:
    """The frames as captures -> classified by `model` on the device path -> queued -> filed under their label.

    Returns the review folder's labelled/ folder, the `nebula data merge` layout."""
    from nebula.device.camera import Frame
    from nebula.device.classify import classify_file
    from nebula.device.review import ReviewQueue
    from nebula.device.runtime import Classifier

    if review_dir.exists():
        shutil.rmtree(review_dir)
    captures = review_dir.parent / f"{review_dir.name}-captures"
    if captures.exists():
        shutil.rmtree(captures)
    captures.mkdir(parents=True)
    classifier = Classifier(model, num_threads=1)
    # below > 1: every frame is queued; here the user picks the frames, not the model's uncertainty.
    queue = ReviewQueue(review_dir, below=1.01, gap=0.0, max_mb=1e6, echo=lambda line: None)
    for index, row in enumerate(frames):
        capture = captures / capture_name(row, index)
        shutil.copy2(source / row.file, capture)
        record = classify_file(classifier, capture).to_record(classifier.sha256)
        item = queue.consider(record, Frame(id=str(capture), path=capture))
        if item is None:
            raise OwnSkyError(f"{capture}: not queued ({record.get('error') or 'no answer'})")
        queue.file(item, row.label, by=photographer, labels=classifier.labels)
    return review_dir / "labelled"


def own_sky_curve(data: str | Path, photographer: str, ns: list[int], out: str | Path, draws: int = 1, seed: int = 0,
                  recipe: dict | None = None, echo: Callable[[str], None] = print) -> list[Point]:
    """Train the base run, then one fine-tuned run per (draw, N > 0); score each on its draw's held-out photographs.

    `recipe`: TrainConfig fields for every run (tests pass the tiny backbone); the fine-tunes add FINE_TUNE.
    Writes own_sky.json (and own_sky.png) in `out`; returns the points in the order run.
    """
    from nebula.convert.export import convert_run
    from nebula.train.evaluate import evaluate_paths
    from nebula.train.fit import TrainConfig, train
    from nebula.train.run import load_run
    from nebula.train.stellarium import merge

    data, out = Path(data), Path(out)
    recipe = dict(recipe or {})
    ns = sorted(set(ns) | {0})
    base_rows, theirs = plan(load_dataset(data), photographer)
    held = {d: draw_frames(theirs, ns[-1], seed + d) for d in range(draws)}  # fail before any training
    echo(f"{photographer}: {len(theirs)} photographs ({_counts(theirs)}); base set without them and their objects: "
         f"{len(base_rows)} images")
    base_data = write_subset(base_rows, data, out / "data" / "base")

    def convert_and_score(run_dir: Path, name: str, draw: int, n: int, held_out: list[ManifestRow]) -> Point:
        model = out / "models" / f"{name}.tflite"
        report = convert_run(run_dir, model, force=True, echo=echo)  # the gate's verdict is recorded below
        evaluation = evaluate_paths(model, [data / r.file for r in held_out], [r.label for r in held_out])
        scores = evaluation.scores
        point = Point(draw, n, str(run_dir), str(model), gate_failures=report.failures, held_out=len(held_out),
                      accuracy=scores["accuracy"], macro_f1=scores["macro_f1"],
                      recall={label: s["recall"] for label, s in scores["per_class"].items() if s["support"]},
                      predicted={Path(p).name: a for p, a in zip(evaluation.paths, evaluation.predicted_labels)})
        echo(f"draw {draw}, N = {n}: held-out accuracy {point.accuracy:.3f}, macro-F1 {point.macro_f1:.3f} "
             f"({point.held_out} photographs); int8 gate {'passed' if not report.failures else 'failed: ' + '; '.join(report.failures)}")
        return point

    base_run = out / "runs" / "n0"
    echo(f"training the base run (N = 0) into {base_run}")
    train(TrainConfig(data=str(base_data), out=str(base_run), seed=seed, **recipe), echo=echo)
    points = [convert_and_score(base_run, "n0", d, 0, held[d][1]) for d in range(draws)]
    base_model = Path(points[0].model)
    for d in range(draws):
        frames, held_out = held[d]
        for n in ns[1:]:
            name = f"draw{d}-n{n}"
            labelled = label_as_the_user(frames[:n], data, base_model, out / "review" / name, photographer)
            merged = out / "data" / name
            if merged.exists():
                shutil.rmtree(merged)
            merge(merged, [base_data, labelled], link=True)
            run_dir = out / "runs" / name
            echo(f"draw {d}, N = {n}: fine-tuning {base_run} on the base set + {n} labelled frames into {run_dir}")
            train(TrainConfig(data=str(merged), out=str(run_dir), seed=seed, init_from=str(base_run), **{**recipe, **FINE_TUNE}),
                  echo=echo)
            point = convert_and_score(run_dir, name, d, n, held_out)
            splits = load_run(run_dir).splits
            point.labelled_in_split = {s: sum(credited_to(r, photographer) for r in rows) for s, rows in splits.items()}
            points.append(point)
    _write(out, photographer, theirs, held, points)
    return points


def _counts(rows: list[ManifestRow]) -> str:
    return ", ".join(f"{label} {n}" for label, n in Counter(r.label for r in rows).most_common())


def _write(out: Path, photographer: str, theirs, held, points: list[Point]) -> None:
    record = {
        "photographer": photographer,
        "photographs": len(theirs),
        "draws": {str(d): {"labelled_order": [r.file for r in frames], "held_out": [r.file for r in held_out]}
                  for d, (frames, held_out) in held.items()},
        "points": [asdict(p) for p in points],
    }
    (out / "own_sky.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(points, out / "own_sky.png", photographer)


def _plot(points: list[Point], path: Path, photographer: str) -> None:
    from nebula.train.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for metric, marker in (("accuracy", "o"), ("macro_f1", "s")):
        for d in sorted({p.draw for p in points}):
            mine = sorted((p for p in points if p.draw == d), key=lambda p: p.n)
            ax.plot([p.n for p in mine], [getattr(p, metric) for p in mine], marker=marker, alpha=0.8,
                    label=f"{metric.replace('_', '-')}" + (f", draw {d}" if d else ""))
    ax.set_xlabel("frames the user labelled (N)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Held-out photographs of {photographer}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(points: list[Point]) -> str:
    """One line per run: N, where the labelled frames went, the gate, held-out accuracy and macro-F1, recall by label."""
    labels = sorted({label for p in points for label in p.recall})
    lines = [f"{'draw':>4} {'N':>4}  {'train/val/test':>14}  {'gate':6} {'held out':>8} {'accuracy':>9} {'macro-F1':>9}  "
             + " ".join(f"{label[:5]:>5}" for label in labels)]
    for p in points:
        where = "/".join(str(p.labelled_in_split.get(s, 0)) for s in ("train", "val", "test"))
        lines.append(f"{p.draw:>4} {p.n:>4}  {where:>14}  {'passed' if not p.gate_failures else 'failed':6} {p.held_out:>8} "
                     f"{p.accuracy:>9.3f} {p.macro_f1:>9.3f}  " + " ".join(
                         f"{p.recall[label]:>5.2f}" if label in p.recall else f"{'':>5}" for label in labels))
    return "\n".join(lines)
