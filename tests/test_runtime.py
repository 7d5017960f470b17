"""The device runtime on a real (tiny, trained, int8) model file."""

import json
import zipfile

import numpy as np
import pytest

from conftest import TINY_LABELS, sky_image
from nebula.device import modelfile
from nebula.device.modelfile import ModelFileError
from nebula.device.preprocess import prepare
from nebula.device.runtime import UNKNOWN, Classifier


def test_model_file_describes_itself_to_the_standard_library(tiny_model_file):
    with zipfile.ZipFile(tiny_model_file) as zf:
        assert zf.read("labels.txt").decode().split() == TINY_LABELS
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["labels"] == TINY_LABELS
    assert manifest["input"]["dtype"] == "uint8" and manifest["output"]["dtype"] == "uint8"
    # (x - 127) / 128 inside the model puts the input quantization at exactly (1.0, 0).
    assert manifest["input"]["scale"] == pytest.approx(1.0) and manifest["input"]["zero_point"] == 0


def test_classifier_tells_red_from_blue_from_stars(tiny_model_file):
    classifier = Classifier(tiny_model_file, num_threads=1)
    answers = {label: [classifier.classify(sky_image(label, size=96, seed=5000 + i)).label for i in range(10)] for label in TINY_LABELS}
    for label, got in answers.items():
        assert got.count(label) >= 8, f"{label}: {got}"


def test_prediction_ranks_and_thresholds(tiny_model_file):
    classifier = Classifier(tiny_model_file)
    prediction = classifier.classify(sky_image("emission", seed=1), top_k=3)
    scores = [s for _, s in prediction.top_k]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert sum(scores) == pytest.approx(1.0, abs=0.02)
    assert set(prediction.timings_ms) == {"preprocess", "invoke", "postprocess"}
    assert classifier.classify(sky_image("emission", seed=1), threshold=1.01).label == UNKNOWN


def test_ties_break_by_label_order_like_argmax():
    """uint8 outputs tie often; the device must name the label the evaluation's argmax names."""
    from nebula.device.runtime import Prediction

    labels = ["dark", "emission", "reflection", "planetary"]
    probs = np.array([0.0, 98, 60, 98], np.float32) / 256
    prediction = Prediction.from_probabilities(probs, labels, top_k=4)
    assert prediction.label == labels[int(probs.argmax())] == "emission"
    assert [label for label, _ in prediction.top_k] == ["emission", "planetary", "reflection", "dark"]


def test_truncated_model_is_refused_in_one_line(tiny_model_file, tmp_path):
    data = tiny_model_file.read_bytes()
    flatbuffer = modelfile.parse(data).flatbuffer
    cases = {
        "truncated.tflite": data[: len(data) // 2],
        "bare.tflite": flatbuffer,
        "empty.tflite": b"",
        "flipped.tflite": flatbuffer[:100] + bytes([flatbuffer[100] ^ 0xFF]) + data[101:],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError) as err:
            Classifier(tmp_path / name)
        message = str(err.value)
        assert message.startswith(str(tmp_path / name)) and "\n" not in message


def test_labels_that_do_not_match_the_outputs_are_refused(tiny_model_file, tmp_path):
    model = modelfile.read(tiny_model_file)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(modelfile.embed(model.flatbuffer, TINY_LABELS + ["dark"], {k: v for k, v in model.manifest.items() if k not in ("labels", "sha256", "format")}))
    with pytest.raises(ModelFileError, match="3 outputs but 4 labels"):
        Classifier(bad)


def test_the_runtimes_routine_info_line_is_kept_not_printed(tiny_model_file):
    import subprocess
    import sys

    # A fresh process: the runtime prints its XNNPACK line only for the first interpreter of a process.
    code = "import sys; from nebula.device.runtime import Classifier; print(Classifier(sys.argv[1]).runtime_notes)"
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "XNNPACK" not in done.stderr
    assert "INFO: Created TensorFlow Lite XNNPACK delegate" in done.stdout


def test_anything_else_the_runtime_prints_still_reaches_stderr(capfd):
    import os

    from nebula.device.runtime import _native_stderr_into

    notes = []
    with _native_stderr_into(notes):
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nERROR: something real\n")
    assert notes == ["INFO: Created TensorFlow Lite XNNPACK delegate for CPU."]
    assert capfd.readouterr().err == "ERROR: something real\n"


def test_tta_averages_symmetric_views_and_one_view_is_the_plain_invoke(tiny_model_file):
    from nebula.device.runtime import TTA_VIEWS, Classifier

    plain, tta = Classifier(tiny_model_file), Classifier(tiny_model_file, tta=4)
    image = prepare(sky_image("emission", seed=3), plain.spec)
    assert np.array_equal(plain.invoke_views(image), plain.invoke(image))
    expected = np.mean([plain.invoke(view(image)) for view in TTA_VIEWS[:4]], axis=0)
    assert np.allclose(tta.invoke_views(image), expected)
    marked = np.zeros((8, 8, 3), np.uint8)
    marked[0, 1] = 255  # one pixel off every axis of symmetry: the 8 views of it are 8 different images
    views = [view(marked) for view in TTA_VIEWS]
    assert len({v.tobytes() for v in views}) == 8
    assert all(v.sum() == marked.sum() and v.shape == marked.shape for v in views)  # each view moves pixels, keeps them
    with pytest.raises(ValueError, match="tta"):
        Classifier(tiny_model_file, tta=9)
