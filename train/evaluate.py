"""Scoring, and predictions for Keras and .tflite models, with images loaded exactly as the device loads them.

    probs = predict_keras(model, paths, spec)      # decode.load_image(path, spec) -> prepare -> model
    probs = predict_tflite("models/nebula.tflite", paths)  # the device's own Classifier; no TensorFlow
    result = score(true_labels, predicted_labels, labels)  # accuracy, macro_f1, per_class, confusion

Scoring itself (`score`, `format_scores`, `format_confusion`) lives in
`nebula.device.scoring`, which needs neither TensorFlow nor training code.
TensorFlow is imported only inside `predict_keras` and `load_keras`, so a .tflite
evaluation runs on a device install.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nebula.device.decode import ImageError, load_image
from nebula.device.preprocess import PreprocessSpec, prepare
from nebula.device.scoring import format_confusion, format_scores, score  # noqa: F401 - fit (and callers) import them from here
from nebula.train.manifest import load_dataset


def prepared_images(image_paths, spec: PreprocessSpec, skipped: list | None = None):
    """Yield (index, (S,S,3) uint8) per readable image, as the device prepares it.

    An unreadable image raises ImageError, or, when `skipped` is a list, is appended
    to it and left out.
    """
    for i, path in enumerate(image_paths):
        try:
            yield i, prepare(load_image(path, spec), spec)
        except ImageError as err:
            if skipped is None:
                raise
            skipped.append(err)


def predict_keras(model, image_paths, spec: PreprocessSpec, batch_size: int = 32, skipped: list | None = None) -> np.ndarray:
    """(N, n_labels) probabilities of a Keras classifier; rows of skipped images are NaN."""
    import keras

    n_out = int(model.output_shape[-1])
    probs = np.full((len(image_paths), n_out), np.nan, dtype=np.float32)
    batch, where = [], []

    def flush():
        if batch:
            probs[where] = keras.ops.convert_to_numpy(model(np.stack(batch).astype(np.float32), training=False))
            batch.clear()
            where.clear()

    for i, image in prepared_images(image_paths, spec, skipped):
        batch.append(image)
        where.append(i)
        if len(batch) == batch_size:
            flush()
    flush()
    return probs


def predict_tflite(model_path, image_paths, skipped: list | None = None, num_threads: int | None = None,
                   tta: int = 1) -> np.ndarray:
    """(N, n_labels) probabilities of a .tflite model file through the device's Classifier; no TensorFlow needed."""
    from nebula.device.runtime import Classifier

    classifier = Classifier(model_path, num_threads=num_threads, tta=tta)
    probs = np.full((len(image_paths), len(classifier.labels)), np.nan, dtype=np.float32)
    for i, image in prepared_images(image_paths, classifier.spec, skipped):
        probs[i] = classifier.invoke_views(image)
    return probs


def load_keras(model_path):
    """(keras model, labels, spec) from a run folder or a model.keras inside one."""
    import keras

    from nebula.train.run import model_companions

    model_file, labels, spec = model_companions(model_path)
    model = keras.saving.load_model(model_file, compile=False)
    if int(model.output_shape[-1]) != len(labels):
        raise ValueError(f"{model_file}: the model has {model.output_shape[-1]} outputs but labels.txt has {len(labels)} labels")
    return model, labels, spec


def is_tflite(model_path) -> bool:
    return Path(model_path).suffix.lower() == ".tflite"


@dataclass
class Evaluation:
    labels: list[str]  # the model's labels, in output order
    spec: PreprocessSpec
    paths: list[Path]  # readable images, in order
    true_labels: list[str]
    probabilities: np.ndarray  # (len(paths), len(labels))
    scores: dict  # score(...)
    skipped: list[ImageError] = field(default_factory=list)

    @property
    def predicted_labels(self) -> list[str]:
        return [self.labels[i] for i in self.probabilities.argmax(1)]


def evaluate_paths(model_path, paths, true_labels, batch_size: int = 32, tta: int = 1) -> Evaluation:
    """Score a Keras run/.keras or a .tflite on labelled images; unreadable ones are skipped and listed."""
    skipped: list[ImageError] = []
    if is_tflite(model_path):
        from nebula.device import modelfile

        model_file = modelfile.read(model_path)
        labels, spec = model_file.labels, model_file.preprocess
        probs = predict_tflite(model_path, paths, skipped, tta=tta)
    else:
        if tta != 1:
            raise ValueError("--tta is for .tflite models (the device path)")
        model, labels, spec = load_keras(model_path)
        probs = predict_keras(model, paths, spec, batch_size, skipped)
    keep = ~np.isnan(probs).any(axis=1)
    kept_paths = [Path(p) for p, k in zip(paths, keep) if k]
    kept_truth = [t for t, k in zip(true_labels, keep) if k]
    probs = probs[keep]
    predicted = [labels[i] for i in probs.argmax(1)] if len(probs) else []
    return Evaluation(labels, spec, kept_paths, kept_truth, probs, score(kept_truth, predicted, labels), skipped)


def evaluate_folder(model_path, data_dir, batch_size: int = 32, only: set[str] | None = None, tta: int = 1) -> Evaluation:
    """Score a model on a labelled folder: one sub-folder per label, or a dataset with manifest.csv.

    only: resolved paths to keep (e.g. a run's test_images.txt); None keeps every image.
    """
    data_dir = Path(data_dir)
    rows = load_dataset(data_dir)
    if only is not None:
        rows = [r for r in rows if str((data_dir / r.file).resolve()) in only]
    if not rows:
        raise ValueError(f"{data_dir}: no labelled images (expected one sub-folder per label, or manifest.csv; "
                         "with --images-from, none of the listed images is in the folder)")
    return evaluate_paths(model_path, [data_dir / r.file for r in rows], [r.label for r in rows], batch_size, tta)
