"""Images for training: decoded once, kept small in memory, fed to the model through tf.data.

Stellarium's PNGs are large, so each image is decoded once through the device's
decoder and kept twice: `prepared`, the exact (S, S, 3) input the device would
feed (used for validation), and `reduced`, a copy at most `2 * S` on a side that
augmentation crops and rotates before the device's `prepare` makes the view.

    decoded = decode_rows(rows, data_dir, spec)
    views = augmented_views(decoded, spec, views=8, seed=0)   # tf.data.Dataset of (S,S,3) float32 batches
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from nebula.device.decode import ImageError, load_image
from nebula.device.preprocess import PreprocessSpec, prepare
from nebula.train.augment import augment, view_rng
from nebula.train.manifest import ManifestRow


@dataclass
class DecodedImages:
    rows: list[ManifestRow]  # readable rows only, in order
    labels: np.ndarray  # int label index per row
    prepared: np.ndarray  # (N, S, S, 3) uint8, exactly as the device prepares it
    reduced: list[np.ndarray] = field(default_factory=list)  # HxWx3 uint8, long side <= 2 * S (train only)
    skipped: list[ImageError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def decode_rows(
    rows: list[ManifestRow],
    data_dir: str | Path,
    spec: PreprocessSpec,
    labels: list[str],
    keep_reduced: bool = False,
    progress: str | None = None,
    warn: Callable[[str], None] = print,
) -> DecodedImages:
    """Decode each image once; an unreadable one gets one line through `warn` and is skipped."""
    from tqdm import tqdm

    index = {label: i for i, label in enumerate(labels)}
    reduced_side = 2 * spec.input_size
    reduced_spec = PreprocessSpec(input_size=reduced_side)
    kept, prepared, reduced, skipped = [], [], [], []
    for row in tqdm(rows, desc=progress, unit="img", disable=progress is None, leave=False):
        path = Path(data_dir) / row.file
        try:
            # Decoding at the reduced size lets big JPEGs use draft mode; other formats decode fully.
            image = load_image(path, reduced_spec if keep_reduced else spec)
        except ImageError as err:
            warn(f"skipped {err}")
            skipped.append(err)
            continue
        kept.append(row)
        prepared.append(prepare(image, spec))
        if keep_reduced:
            picture = Image.fromarray(image)
            if max(picture.size) > reduced_side:
                picture.thumbnail((reduced_side, reduced_side), Image.BILINEAR)
            reduced.append(np.asarray(picture))
    s = spec.input_size
    return DecodedImages(
        rows=kept,
        labels=np.array([index[r.label] for r in kept], dtype=np.int32),
        prepared=np.stack(prepared) if prepared else np.zeros((0, s, s, 3), np.uint8),
        reduced=reduced,
        skipped=skipped,
    )


def view_images(decoded: DecodedImages, spec: PreprocessSpec, views: int, seed: int, augmenter=augment):
    """Yield the `views` views of each image in order: view 0 is the plain prepared image, the rest augmented."""
    for i in range(len(decoded)):
        yield decoded.prepared[i]
        for v in range(1, views):
            yield augmenter(decoded.reduced[i], spec, view_rng(seed, decoded.rows[i].file, v))


def view_labels(decoded: DecodedImages, views: int) -> np.ndarray:
    return np.repeat(decoded.labels, views)


def augmented_views(decoded: DecodedImages, spec: PreprocessSpec, views: int, seed: int, batch_size: int = 32,
                    augmenter=augment):
    """A tf.data pipeline of the training views as float32 batches (raw RGB 0..255), in a fixed order."""
    import tensorflow as tf

    s = spec.input_size
    dataset = tf.data.Dataset.from_generator(
        lambda: view_images(decoded, spec, views, seed, augmenter),
        output_signature=tf.TensorSpec((s, s, 3), tf.uint8),
    )
    return dataset.map(lambda x: tf.cast(x, tf.float32)).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def image_batches(images: np.ndarray, batch_size: int = 32):
    """A tf.data pipeline over an in-memory uint8 image array, as float32 batches."""
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices(images)
        .map(lambda x: tf.cast(x, tf.float32))
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def training_pipeline(inputs: np.ndarray, labels: np.ndarray, weights: np.ndarray, batch_size: int, seed: int):
    """Shuffled (input, label, sample weight) batches over cached tensors; reshuffled each epoch, seeded."""
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((inputs, labels, weights))
        .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def class_weights(labels: np.ndarray, n_labels: int, power: float = 0.5) -> np.ndarray:
    """Per-label loss weights (n / (k * n_label)) ** power over the k labels present, scaled to average 1 per sample.

    power 1 is fully balanced; with one label 190 times rarer than another (Stellarium's
    2 protoplanetary vs 380 'other') that makes a few images dominate the loss, so the
    default 0.5 (square root) narrows a 190:1 imbalance to about 14:1.
    """
    counts = np.bincount(labels, minlength=n_labels).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_labels)
    weights[present] = (counts.sum() / (present.sum() * counts[present])) ** power
    weights *= counts.sum() / (weights * counts).sum()
    return weights.astype(np.float32)
