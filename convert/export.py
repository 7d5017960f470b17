"""A training run folder -> a self-describing, gated int8 model file.

    nebula convert models/runs/main --out models/nebula.tflite

Steps: quantize with a representative set of training images (fixed seed), read
the real quantization parameters back, score float and int8 on the run's test
split through the device's own preprocessing, refuse the model if int8 lost
accuracy, and embed labels + manifest (with both scores) in the file, next to
the standard TFLite Metadata that other runtimes read (convert/tflite_metadata.py).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nebula.convert.tflite_metadata import add_metadata
from nebula.device import modelfile
from nebula.device.decode import ImageError, load_image
from nebula.device.preprocess import prepare

# The gate: int8 may cost at most this much accuracy, and must agree on top-1 this often.
MAX_ACCURACY_DROP = 0.010
MIN_TOP1_AGREEMENT = 0.97


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


def check_gate(float_metrics: dict, int8_metrics: dict, agreement: float) -> list[str]:
    failures = []
    drop = float_metrics["accuracy"] - int8_metrics["accuracy"]
    if drop > MAX_ACCURACY_DROP + 1e-9:
        failures.append(f"int8 accuracy is {100 * drop:.1f} points below float (limit {100 * MAX_ACCURACY_DROP:.1f})")
    if agreement < MIN_TOP1_AGREEMENT:
        failures.append(f"int8 and float agree on top-1 for {100 * agreement:.1f}% of test images (limit {100 * MIN_TOP1_AGREEMENT:.0f}%)")
    return failures


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

    test_rows = run.splits["test"]
    paths = [run.image_path(r) for r in test_rows]
    truth = [r.label for r in test_rows]
    echo(f"Scoring float and int8 on the run's test split ({len(paths)} images)")
    float_probs = predict_keras(model, paths, run.spec)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "candidate.tflite"
        candidate.write_bytes(modelfile.embed(flatbuffer, run.labels, manifest))
        int8_probs = predict_tflite(candidate, paths)
    float_pred = [run.labels[i] for i in float_probs.argmax(1)]
    int8_pred = [run.labels[i] for i in int8_probs.argmax(1)]
    float_metrics = score(truth, float_pred, run.labels)
    int8_metrics = score(truth, int8_pred, run.labels)
    agreement = float(np.mean(float_probs.argmax(1) == int8_probs.argmax(1))) if paths else 0.0
    probability_gap = float(np.abs(float_probs - int8_probs).mean()) if paths else 0.0
    failures = check_gate(float_metrics, int8_metrics, agreement) if paths else ["the run's test split is empty"]

    float_bytes = int(sum(np.prod(w.shape) for w in model.weights)) * 4
    manifest["metrics"] = {
        "test_images": len(paths),
        "float": {k: float_metrics[k] for k in ("accuracy", "macro_f1")},
        "int8": {k: int8_metrics[k] for k in ("accuracy", "macro_f1")},
        "int8_per_class": int8_metrics["per_class"],
        "top1_agreement": agreement,
        "mean_abs_probability_difference": probability_gap,
        "gate": {"passed": not failures, "forced": bool(failures and force), "failures": failures},
    }
    report = ConversionReport(out, manifest, float_metrics, int8_metrics, agreement, probability_gap, len(flatbuffer), float_bytes,
                              failures)
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
