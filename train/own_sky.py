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
holes) and scored through the device path on the photographer's photographs it did not label, beside the
base run on the same photographs: with few photographs a held-out set is small, so each run is compared
with N = 0 photo for photo, never with another set. Larger N labels a superset of smaller N's frames;
`--draws` repeats the fine-tunes with other frames drawn.
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
    """One run of the curve, scored on the photographer's photographs it never saw, beside the base run on the same ones."""

    draw: int
    n: int
    run: str
    model: str
    labelled_in_split: dict[str, int] = field(default_factory=dict)  # of the N frames: how many train/val/test took
    gate_failures: list[str] = field(default_factory=list)
    held_out: int = 0  # the photographer's photographs this run did not label: all but its N
    accuracy: float = 0.0
    macro_f1: float = 0.0
    recall: dict[str, float] = field(default_factory=dict)
    base_accuracy: float = 0.0  # the base run (N = 0) on the same held-out photographs: the pair to compare with
    base_macro_f1: float = 0.0
    predicted: dict[str, str] = field(default_factory=dict)  # held-out dataset file -> int8 answer


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
    ('Plover Hill Observatory <http://...>' is Plover Hill Observatory's, as crossval names photographers)."""
    from nebula.train.crossval import photographer as name_of

    return row.credit == photographer or name_of(row) == photographer


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
                  recipe: dict | None = None, resume: bool = False, echo: Callable[[str], None] = print) -> list[Point]:
    """Train the base run, then one fine-tuned run per (draw, N > 0); score each on the photographer's photographs
    it did not label, beside the base run on the same photographs.

    `recipe`: TrainConfig fields for every run (tests pass the tiny backbone); the fine-tunes add FINE_TUNE.
    `resume`: reuse runs and models already in `out` that were made with the same data, seed and start.
    Writes own_sky.json (and own_sky.png) in `out`; returns the points in the order run.
    """
    from nebula.train.fit import TrainConfig
    from nebula.train.run import load_run
    from nebula.train.stellarium import merge

    data, out = Path(data), Path(out)
    recipe = dict(recipe or {})
    ns = sorted(set(ns) | {0})
    base_rows, theirs = plan(load_dataset(data), photographer)
    frames = {d: draw_frames(theirs, ns[-1], seed + d)[0] for d in range(draws)}  # fail before any training
    echo(f"{photographer}: {len(theirs)} photographs ({_counts(theirs)}); base set without them and their objects: "
         f"{len(base_rows)} images")
    base_data = write_subset(base_rows, data, out / "data" / "base")

    base_run = out / "runs" / "n0"
    _train(TrainConfig(data=str(base_data), out=str(base_run), seed=seed, **recipe), resume, echo)
    base_model, base_failures = _convert(base_run, out / "models" / "n0.tflite", resume, echo)
    base_answers = _answers(base_model, data, theirs)
    points = [_point(0, 0, base_run, base_model, base_failures, theirs, base_answers, base_answers, echo)]
    for d in range(draws):
        for n in ns[1:]:
            name = f"draw{d}-n{n}"
            labelled = label_as_the_user(frames[d][:n], data, base_model, out / "review" / name, photographer)
            merged = out / "data" / name
            if merged.exists():
                shutil.rmtree(merged)
            merge(merged, [base_data, labelled], link=True)
            run_dir = out / "runs" / name
            echo(f"draw {d}, N = {n}: fine-tuning {base_run} on the base set + {n} labelled frames into {run_dir}")
            _train(TrainConfig(data=str(merged), out=str(run_dir), seed=seed, init_from=str(base_run), **{**recipe, **FINE_TUNE}),
                   resume, echo)
            model, failures = _convert(run_dir, out / "models" / f"{name}.tflite", resume, echo)
            labelled_files = {r.file for r in frames[d][:n]}
            held_out = [r for r in theirs if r.file not in labelled_files]
            point = _point(d, n, run_dir, model, failures, held_out, _answers(model, data, held_out), base_answers, echo)
            splits = load_run(run_dir).splits
            point.labelled_in_split = {s: sum(credited_to(r, photographer) for r in rows) for s, rows in splits.items()}
            points.append(point)
    _write(out, photographer, theirs, frames, points)
    return points


def _train(config, resume: bool, echo) -> None:
    """`nebula train`, or with `resume` the finished run already there when it was made with the same data, seed and start."""
    from nebula.train.fit import train

    done = Path(config.out) / "metrics.json"
    if resume and done.exists():
        made = json.loads((Path(config.out) / "config.json").read_text())
        if [made.get(k) for k in ("data", "seed", "init_from")] == [config.data, config.seed, config.init_from]:
            echo(f"{config.out}: reusing the finished run (--resume)")
            return
    echo(f"training {config.out}" + (f" from {config.init_from}" if config.init_from else ""))
    train(config, echo=echo)


def _convert(run_dir: Path, model: Path, resume: bool, echo) -> tuple[Path, list[str]]:
    """`nebula convert` with the gate's verdict recorded, not enforced (the curve keeps every point); the model and its failures."""
    from nebula.convert.export import convert_run
    from nebula.device import modelfile

    if resume and model.exists() and model.stat().st_mtime >= (run_dir / "metrics.json").stat().st_mtime:
        echo(f"{model}: reusing the converted model (--resume)")
        return model, modelfile.read(model).manifest["metrics"]["gate"]["failures"]
    return model, convert_run(run_dir, model, force=True, echo=echo).failures


def _answers(model: Path, data: Path, rows: list[ManifestRow]) -> dict[str, str]:
    """The int8 model's top-1 answer for each row's image, through the device's preprocessing."""
    from nebula.train.evaluate import evaluate_paths

    evaluation = evaluate_paths(model, [data / r.file for r in rows], [r.label for r in rows])
    if evaluation.skipped:
        raise OwnSkyError(f"unreadable photographs: {'; '.join(map(str, evaluation.skipped))}")
    by_path = {str(data / r.file): r.file for r in rows}
    return {by_path[str(p)]: answer for p, answer in zip(evaluation.paths, evaluation.predicted_labels)}


def _point(draw: int, n: int, run_dir: Path, model: Path, failures: list[str], held_out: list[ManifestRow],
           answers: dict[str, str], base_answers: dict[str, str], echo) -> Point:
    from nebula.device.scoring import score

    truth = [r.label for r in held_out]
    labels = sorted(set(truth) | set(answers.values()))
    mine = score(truth, [answers[r.file] for r in held_out], labels)
    base = score(truth, [base_answers[r.file] for r in held_out], labels)
    point = Point(draw, n, str(run_dir), str(model), gate_failures=failures, held_out=len(held_out),
                  accuracy=mine["accuracy"], macro_f1=mine["macro_f1"],
                  recall={label: s["recall"] for label, s in mine["per_class"].items() if s["support"]},
                  base_accuracy=base["accuracy"], base_macro_f1=base["macro_f1"], predicted=dict(answers))
    echo(f"draw {draw}, N = {n}: on {point.held_out} held-out photographs accuracy {point.accuracy:.3f} (base {point.base_accuracy:.3f}), "
         f"macro-F1 {point.macro_f1:.3f} (base {point.base_macro_f1:.3f}); int8 gate "
         + ("passed" if not failures else "failed: " + "; ".join(failures)))
    return point


def _counts(rows: list[ManifestRow]) -> str:
    return ", ".join(f"{label} {n}" for label, n in Counter(r.label for r in rows).most_common())


def _write(out: Path, photographer: str, theirs, frames, points: list[Point]) -> None:
    record = {
        "photographer": photographer,
        "photographs": {r.file: r.label for r in theirs},
        "draws": {str(d): {"labelled_order": [r.file for r in chosen]} for d, chosen in frames.items()},
        "points": [asdict(p) for p in points],
    }
    (out / "own_sky.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(points, out / "own_sky.png", photographer)


def _plot(points: list[Point], path: Path, photographer: str) -> None:
    """Accuracy and macro-F1 against N, each run beside the base run on the same held-out photographs."""
    from nebula.train.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=110, sharey=True)
    for ax, metric in zip(axes, ("accuracy", "macro_f1")):
        for d in sorted({p.draw for p in points if p.n}):
            mine = sorted((p for p in points if p.draw == d or p.n == 0), key=lambda p: p.n)
            colour = f"C{d}"
            ax.plot([p.n for p in mine], [getattr(p, metric) for p in mine], marker="o", color=colour,
                    label=f"fine-tuned, draw {d}")
            ax.plot([p.n for p in mine], [getattr(p, "base_" + metric) for p in mine], marker="x", linestyle=":",
                    color=colour, label=f"base run on the same photos, draw {d}")
        ax.set_xlabel("frames the user labelled (N)")
        ax.set_title(metric.replace("_", "-"), fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{photographer}: each run scored on the photographs it did not label", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(points: list[Point]) -> str:
    """One line per run: N, where its labelled frames went, the gate, and on its held-out photographs its accuracy and
    macro-F1 beside the base run's, then its recall by label."""
    labels = sorted({label for p in points for label in p.recall})
    lines = [f"{'draw':>4} {'N':>4} {'train/val/test':>14}  {'gate':6} {'held out':>8}  {'accuracy (base)':>16}  {'macro-F1 (base)':>16}  "
             + " ".join(f"{label[:5]:>5}" for label in labels)]
    for p in points:
        where = "/".join(str(p.labelled_in_split.get(s, 0)) for s in ("train", "val", "test")) if p.n else "-"
        lines.append(f"{p.draw if p.n else '-':>4} {p.n:>4} {where:>14}  {'passed' if not p.gate_failures else 'failed':6} "
                     f"{p.held_out:>8}  {p.accuracy:>7.3f} ({p.base_accuracy:.3f})  {p.macro_f1:>7.3f} ({p.base_macro_f1:.3f})  "
                     + " ".join(f"{p.recall[label]:>5.2f}" if label in p.recall else f"{'':>5}" for label in labels))
    return "\n".join(lines)
