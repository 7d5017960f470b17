"""A training run folder -> a self-describing, gated int8 model file.

    nebula convert models/runs/main --out models/nebula.tflite

Steps: quantize with a representative set of training images (fixed seed), read
the real quantization parameters back, score float and int8 on the run's
validation and test photographs through the device's own preprocessing, refuse
the model if int8 lost accuracy, and embed labels + manifest (with both scores)
in the file, next to the standard TFLite Metadata that other runtimes read
(convert/tflite_metadata.py).

The gate counts images, on validation and test together (about 176 photographs):
int8 may get at most max(1, ceil(1 % of them)) fewer right than float, and must
agree with float on top-1 for at least 97 % of them. On the test split alone (90
images) one image is 1.1 points, so a 1-point limit refused a model for a single
net flip. The reported accuracy and macro-F1 stay those of the test split.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nebula.convert.tflite_metadata import add_metadata
from nebula.device import modelfile
from nebula.device.decode import ImageError, load_image
from nebula.device.preprocess import prepare

# The gate: int8 may cost at most this share of the scored images (never less than one image),
# and must agree with float on top-1 for at least this share of them.
MAX_ACCURACY_DROP = 0.010
MIN_TOP1_AGREEMENT = 0.97
GATE_SPLITS = ("val", "test")  # whole photographs of these splits are what the gate scores


class ConversionRefused(Exception):
    """The int8 model failed the gate; the message says which check and by how much, `report` has the scores."""

    def __init__(self, message: str, report: "ConversionReport"):
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    out: Path
    manifest: dict
    float_metrics: dict
    int8_metrics: dict
    agreement: float
    mean_abs_probability_difference: float  # mean |p_float - p_int8| over test images and labels: less grainy than top-1
    int8_bytes: int
    float_bytes: int
    failures: list[str]
    gate: dict  # the gate's own figures, on validation + test photographs (manifest["metrics"]["gate"])


def representative_images(run, count: int, seed: int) -> list[np.ndarray]:
    """`count` training-split photographs, picked with a fixed seed, prepared exactly as the device does.

    Whole photographs only: the int8 ranges should be those of what the device is shown, and the
    catalog-guided crops (darker, closer fields) are training material, not frames.
    """
    rows = sorted((r for r in run.splits["train"] if r.origin != "crop"), key=lambda r: r.file)
    random.Random(seed).shuffle(rows)
    images = []
    for row in rows:
        if len(images) == count:
            break
        try:
            images.append(prepare(load_image(run.image_path(row), run.spec), run.spec))
        except ImageError:
            continue
    return images


def fewer_correct_limit(images: int) -> int:
    """How many fewer of `images` int8 may get right than float: MAX_ACCURACY_DROP of them, at least one."""
    return max(1, math.ceil(MAX_ACCURACY_DROP * images - 1e-9))


def agreement_needed(images: int) -> int:
    """How many of `images` int8 and float must agree on (top-1): MIN_TOP1_AGREEMENT of them, rounded up."""
    return math.ceil(MIN_TOP1_AGREEMENT * images - 1e-9)


def gate_figures(truth: list[str], float_pred: list[str], int8_pred: list[str], splits: dict[str, int]) -> dict:
    """Counts the gate decides on: images scored, right answers of each model, flips each way, top-1 agreement, limits.

    splits: images per split scored, e.g. {"val": 86, "test": 90}.
    """
    n = len(truth)
    float_right = [f == t for f, t in zip(float_pred, truth)]
    int8_right = [q == t for q, t in zip(int8_pred, truth)]
    agreed = sum(f == q for f, q in zip(float_pred, int8_pred))
    return {
        "images": n,
        "splits": dict(splits),
        "float_correct": sum(float_right),
        "int8_correct": sum(int8_right),
        "right_to_wrong": sum(f and not q for f, q in zip(float_right, int8_right)),  # float right, int8 wrong
        "wrong_to_right": sum(q and not f for f, q in zip(float_right, int8_right)),
        "agreed": agreed,
        "top1_agreement": agreed / n if n else 0.0,
        "max_fewer_correct": fewer_correct_limit(n),
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
        "min_agreed": agreement_needed(n),
    }


def check_gate(images: int, float_correct: int, int8_correct: int, agreed: int) -> list[str]:
    """The gate's failures (empty when int8 passes), from counts over the `images` scored."""
    if images == 0:
        return ["no validation or test photographs to score"]
    failures = []
    if float_correct - int8_correct > fewer_correct_limit(images):
        failures.append(accuracy_sentence(images, float_correct, int8_correct))
    if agreed < agreement_needed(images):
        failures.append(agreement_sentence(images, agreed))
    return failures


def accuracy_sentence(images: int, float_correct: int, int8_correct: int) -> str:
    """'int8 gets 3 fewer of 176 images right than float (limit 2)': the gate's accuracy check, in the refusal and the table."""
    fewer = float_correct - int8_correct
    how = f"{fewer} fewer" if fewer >= 0 else f"{-fewer} more"
    return f"int8 gets {how} of {images} images right than float (limit {fewer_correct_limit(images)})"


def agreement_sentence(images: int, agreed: int) -> str:
    """'int8 and float agree on top-1 for 169 of 176 (96.0 %, limit 97 %)'."""
    share = 100 * agreed / images if images else 0.0
    return f"int8 and float agree on top-1 for {agreed} of {images} ({share:.1f} %, limit {100 * MIN_TOP1_AGREEMENT:.0f} %)"


def convert_run(run_dir, out, representative: int = 200, seed: int = 0, force: bool = False, echo=print) -> ConversionReport:
    import keras
    import tensorflow as tf

    from nebula.convert.quantize import io_quantization, quantize_int8
    from nebula.device.scoring import score
    from nebula.train.evaluate import predict_keras, predict_tflite
    from nebula.train.run import load_run

    run = load_run(run_dir)
    out = Path(out)
    model = keras.saving.load_model(run.model_path, compile=False)

    echo(f"Quantizing {run.model_path} with {representative} representative training images (seed {seed})")
    flatbuffer = quantize_int8(model, representative_images(run, representative, seed))
    quantization = io_quantization(flatbuffer)

    manifest = {
        "preprocess": run.spec.to_dict(),
        **quantization,
        "backbone": run.config.get("backbone"),
        "run": {
            "name": run.config.get("run_name", Path(run.path).name),
            "created_utc": run.config.get("created_utc"),
            "seed": run.config.get("seed"),
            "unfreeze": run.config.get("unfreeze"),
            "snap_weights": run.config.get("snap_weights", False),  # backbone kernels on the int8 grid (nebula.train.int8_grid)
        },
        "training_data": {
            "data_dir": run.config.get("data_dir"),
            "label_counts": run.config.get("label_counts"),
        },
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "converter": "TFLiteConverter.from_keras_model, int8"},
        "converted_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Before scoring: the int8 scores below are then those of the very flatbuffer written.
    flatbuffer = add_metadata(flatbuffer, run.labels, manifest)

    # Each image is scored once: validation photographs then test photographs, sliced apart afterwards.
    val_rows, test_rows = ([r for r in run.splits[split] if r.origin != "crop"] for split in GATE_SPLITS)
    rows = val_rows + test_rows
    paths = [run.image_path(r) for r in rows]
    echo(f"Scoring float and int8 on the run's validation and test photographs ({len(val_rows)} + {len(test_rows)} images)")
    float_probs = predict_keras(model, paths, run.spec) if paths else np.zeros((0, len(run.labels)))
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "candidate.tflite"
        candidate.write_bytes(modelfile.embed(flatbuffer, run.labels, manifest))
        int8_probs = predict_tflite(candidate, paths) if paths else np.zeros((0, len(run.labels)))
    truth = [r.label for r in rows]
    float_pred = [run.labels[i] for i in float_probs.argmax(1)]
    int8_pred = [run.labels[i] for i in int8_probs.argmax(1)]

    # What the README quotes: the test split, as before the gate moved to validation + test.
    test = slice(len(val_rows), len(rows))
    float_metrics = score(truth[test], float_pred[test], run.labels)
    int8_metrics = score(truth[test], int8_pred[test], run.labels)
    test_float, test_int8 = float_probs[test], int8_probs[test]
    agreement = float(np.mean(test_float.argmax(1) == test_int8.argmax(1))) if test_rows else 0.0
    probability_gap = float(np.abs(test_float - test_int8).mean()) if test_rows else 0.0

    gate = gate_figures(truth, float_pred, int8_pred, {"val": len(val_rows), "test": len(test_rows)})
    failures = check_gate(gate["images"], gate["float_correct"], gate["int8_correct"], gate["agreed"])

    float_bytes = int(sum(np.prod(w.shape) for w in model.weights)) * 4
    manifest["metrics"] = {
        "test_images": len(test_rows),
        "float": {k: float_metrics[k] for k in ("accuracy", "macro_f1")},
        "int8": {k: int8_metrics[k] for k in ("accuracy", "macro_f1")},
        "int8_per_class": int8_metrics["per_class"],
        "top1_agreement": agreement,
        "mean_abs_probability_difference": probability_gap,
        "gate": {"passed": not failures, "forced": bool(failures and force), "failures": failures, **gate},
    }
    report = ConversionReport(out, manifest, float_metrics, int8_metrics, agreement, probability_gap, len(flatbuffer), float_bytes,
                              failures, gate)
    if failures and not force:
        raise ConversionRefused("; ".join(failures) + " — model not written (use --force to write it anyway)", report)

    out.parent.mkdir(parents=True, exist_ok=True)
    data = modelfile.embed(flatbuffer, run.labels, manifest)
    out.write_bytes(data)
    written = modelfile.read(out)  # the file must read back as the device will read it
    (out.parent / "labels.txt").write_text("".join(f"{label}\n" for label in written.labels))
    (out.parent / "manifest.json").write_text(json.dumps(written.manifest, indent=2, sort_keys=True) + "\n")
    report.manifest = written.manifest
    return report
