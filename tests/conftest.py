"""Shared fixtures: tiny generated sky images and a tiny trained int8 model file.

The tiny model is a real model, trained for a few seconds to tell red nebulae
("emission") from blue ("reflection") from white star fields ("other"), then
converted with the project's own int8 path — so device tests can assert answers.
"""

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_LABELS = ["emission", "reflection", "other"]


def sky_image(label: str, size: int = 64, seed: int = 0) -> np.ndarray:
    """A synthetic sky: black background, a few stars, and a coloured glow for nebula labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = rng.normal(8, 3, (size, size, 3))
    cy, cx = rng.uniform(0.35, 0.65, 2)
    glow = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.1, 0.2) ** 2))
    colour = {"emission": (230, 60, 70), "reflection": (70, 110, 235), "other": (0, 0, 0)}[label]
    image += glow[..., None] * np.array(colour) * rng.uniform(0.7, 1.0)
    for _ in range(rng.integers(5, 15 if label != "other" else 60)):
        y, x = rng.integers(0, size, 2)
        image[y, x] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


def write_sky_folder(root: Path, per_label: int = 12, size: int = 64, labels=TINY_LABELS) -> Path:
    """One sub-folder per label of generated PNGs, named <label><group>-<view>.png."""
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            Image.fromarray(sky_image(label, size, seed=zlib.crc32(f"{label}{i}".encode()))).save(root / label / f"{label}{i // 2}-{i % 2}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def no_user_settings(tmp_path_factory):
    """Tests, and the commands they start, neither read the user's config nor write to their results log or review
    folder: XDG_CONFIG_HOME and XDG_STATE_HOME point at an empty folder for the whole session."""
    home = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(home / "config"))
        patch.setenv("XDG_STATE_HOME", str(home / "state"))
        yield home


@pytest.fixture(scope="session")
def sky_folder(tmp_path_factory) -> Path:
    return write_sky_folder(tmp_path_factory.mktemp("sky"))


@pytest.fixture(scope="session")
def tiny_keras_classifier():
    """(model, spec): the tiny backbone with a softmax head, trained on generated skies."""
    import keras

    from nebula.device.preprocess import PreprocessSpec, prepare
    from nebula.train import backbones

    keras.utils.set_random_seed(0)
    spec = PreprocessSpec(input_size=backbones.get("tiny").input_size)
    features = backbones.create("tiny", weights=None)
    model = keras.Sequential([features, keras.layers.Dense(len(TINY_LABELS), activation="softmax", name="classifier")])
    x = np.stack([prepare(sky_image(label, seed=i), spec) for label in TINY_LABELS for i in range(40)]).astype("float32")
    y = np.repeat(np.arange(len(TINY_LABELS)), 40)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=25, batch_size=20, verbose=0, shuffle=True)
    return model, spec


@pytest.fixture(scope="session")
def tiny_flatbuffer(tiny_keras_classifier) -> tuple[bytes, dict]:
    """(flatbuffer, manifest): the tiny classifier as the converter gives it, before anything is added."""
    from nebula.convert.quantize import io_quantization, quantize_int8
    from nebula.device.preprocess import prepare

    model, spec = tiny_keras_classifier
    representative = [prepare(sky_image(label, seed=1000 + i), spec) for label in TINY_LABELS for i in range(20)]
    flatbuffer = quantize_int8(model, representative)
    manifest = {"preprocess": spec.to_dict(), **io_quantization(flatbuffer), "backbone": "tiny", "run": {"name": "tiny-fixture"}}
    return flatbuffer, manifest


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory, tiny_flatbuffer) -> Path:
    """A self-describing int8 .tflite of the tiny classifier (labels: emission, reflection, other)."""
    from nebula.convert.tflite_metadata import add_metadata
    from nebula.device import modelfile

    flatbuffer, manifest = tiny_flatbuffer
    path = tmp_path_factory.mktemp("model") / "tiny.tflite"
    path.write_bytes(modelfile.embed(add_metadata(flatbuffer, TINY_LABELS, manifest), TINY_LABELS, manifest))
    return path


@pytest.fixture(scope="session")
def mediapipe_venv(tmp_path_factory) -> Path:
    """Where the slow MediaPipe tests keep the venv they share (made on first use, 650 MB)."""
    return tmp_path_factory.mktemp("venv") / "mediapipe"


@pytest.fixture(scope="session")
def tiny_old_model_file(tmp_path_factory, tiny_flatbuffer) -> Path:
    """The tiny classifier as `nebula convert` wrote it before standard TFLite metadata (see embed_the_old_way)."""
    flatbuffer, manifest = tiny_flatbuffer
    path = tmp_path_factory.mktemp("old-model") / "old.tflite"
    path.write_bytes(embed_the_old_way(flatbuffer, TINY_LABELS, manifest))
    return path


def embed_the_old_way(flatbuffer: bytes, labels: list[str], manifest: dict) -> bytes:
    """Model files before standard metadata: no TFLITE_METADATA entry, and a deflated zip made on its own
    and concatenated after the flatbuffer (its offsets count from the zip's start, not the file's)."""
    import hashlib
    import io
    import json
    import zipfile

    manifest = {**manifest, "format": "nebula-classifier/1", "labels": list(labels), "sha256": hashlib.sha256(flatbuffer).hexdigest()}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels.txt", "".join(f"{label}\n" for label in labels))
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return flatbuffer + archive.getvalue()
