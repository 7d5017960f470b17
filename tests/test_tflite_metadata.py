"""Standard TFLite metadata in the model file: written as the schema says, read by MediaPipe, old files still read."""

import zipfile

import flatbuffers
import numpy as np
import pytest
from flatbuffers.table import Table
from PIL import Image

from conftest import TINY_LABELS, sky_image
from nebula.convert import mediapipe_check
from nebula.convert.tflite_metadata import METADATA_NAME, add_metadata
from nebula.device import modelfile
from nebula.device.runtime import Classifier


def metadata_entries(flatbuffer: bytes) -> dict[str, bytes]:
    """The model's Model.metadata entries: name -> the bytes of the buffer it points at."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer)
    entries = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        entries[entry.Name().decode()] = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return entries


class _Fields:
    """Read a flatbuffer table by slot number, as metadata_schema.fbs numbers the fields."""

    def __init__(self, table: Table):
        self.t = table

    def _offset(self, slot):
        return self.t.Offset(4 + 2 * slot)

    def string(self, slot):
        o = self._offset(slot)
        return self.t.String(o + self.t.Pos).decode() if o else None

    def byte(self, slot):
        o = self._offset(slot)
        return self.t.Get(flatbuffers.number_types.Uint8Flags, o + self.t.Pos) if o else 0

    def table(self, slot):
        o = self._offset(slot)
        return _Fields(Table(self.t.Bytes, self.t.Indirect(o + self.t.Pos))) if o else None

    def tables(self, slot):
        o = self._offset(slot)
        start = self.t.Vector(o)
        return [_Fields(Table(self.t.Bytes, self.t.Indirect(start + 4 * i))) for i in range(self.t.VectorLen(o))]

    def floats(self, slot):
        o = self._offset(slot)
        start = self.t.Vector(o)
        return [self.t.Get(flatbuffers.number_types.Float32Flags, start + 4 * i) for i in range(self.t.VectorLen(o))]


def test_model_file_carries_standard_metadata(tiny_model_file):
    model = modelfile.read(tiny_model_file)
    entries = metadata_entries(model.flatbuffer)
    assert {"min_runtime_version", METADATA_NAME} <= set(entries)  # the converter's own entry is kept
    data = entries[METADATA_NAME]
    assert data[4:8] == b"M001"
    root = _Fields(Table(bytearray(data), flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0)))
    assert root.string(0) == "nebula-classifier" and root.string(2) == "tiny-fixture" and root.string(7) == "1.0.0"
    (subgraph,) = root.tables(3)
    (image,), (scores,) = subgraph.tables(2), subgraph.tables(3)
    assert image.table(3).byte(0) == 2 and image.table(3).table(1).byte(0) == 1  # ImageProperties, RGB
    (unit,) = image.tables(4)
    assert unit.byte(0) == 1 and unit.table(1).floats(0) == [0.0] * 3 and unit.table(1).floats(1) == [1.0] * 3
    assert image.table(5).floats(1) == [0.0] and image.table(5).floats(0) == [255.0]  # Stats: min, max of the bytes
    (labels_file,) = scores.tables(6)
    assert labels_file.string(0) == "labels.txt" and labels_file.byte(2) == 2  # TENSOR_AXIS_LABELS
    (manifest_file,) = root.tables(6)
    assert manifest_file.string(0) == "manifest.json" and manifest_file.byte(2) == 1  # DESCRIPTIONS
    # The associated files are where readers of the metadata look: a stored (uncompressed) zip, offsets from the file's start.
    with zipfile.ZipFile(tiny_model_file) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        assert zf.read("labels.txt").decode().split() == TINY_LABELS
    assert {info.compress_type for info in infos.values()} == {zipfile.ZIP_STORED}
    assert min(info.header_offset for info in infos.values()) == len(model.flatbuffer)


def test_adding_metadata_leaves_the_model_bit_for_bit_the_same_in_its_answers(tiny_flatbuffer):
    flatbuffer, manifest = tiny_flatbuffer
    with_metadata = add_metadata(flatbuffer, TINY_LABELS, manifest)
    assert METADATA_NAME not in metadata_entries(flatbuffer) and METADATA_NAME in metadata_entries(with_metadata)
    from nebula.device.runtime import load_interpreter_class

    Interpreter, _ = load_interpreter_class()
    outputs = []
    for model in (flatbuffer, with_metadata):
        interpreter = Interpreter(model_content=model, num_threads=1)
        interpreter.allocate_tensors()
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        answers = []
        for i, label in enumerate(TINY_LABELS * 3):
            image = sky_image(label, size=inp["shape"][1], seed=900 + i)
            interpreter.set_tensor(inp["index"], image[None])
            interpreter.invoke()
            answers.append(interpreter.get_tensor(out["index"]).copy())
        outputs.append(np.concatenate(answers))
    assert np.array_equal(*outputs)
    # Converting again replaces the entry instead of adding a second one.
    again = add_metadata(with_metadata, TINY_LABELS, manifest)
    assert list(metadata_entries(again)).count(METADATA_NAME) == 1 and len(again) == len(with_metadata)


def test_files_written_before_standard_metadata_still_read(tiny_old_model_file, tiny_model_file):
    old, new = modelfile.read(tiny_old_model_file), modelfile.read(tiny_model_file)
    assert METADATA_NAME not in metadata_entries(old.flatbuffer)
    assert old.labels == new.labels == TINY_LABELS and old.preprocess == new.preprocess
    assert old.sha256 != new.sha256  # the hash covers the flatbuffer, metadata entry included
    image = sky_image("reflection", size=80, seed=31)
    old_answer, new_answer = Classifier(tiny_old_model_file).classify(image), Classifier(tiny_model_file).classify(image)
    assert (old_answer.label, old_answer.score) == (new_answer.label, new_answer.score)


def test_metadata_entry_is_under_the_hash(tiny_model_file, tmp_path):
    """Changing the metadata (say, the normalisation another runtime applies) is caught like any other change."""
    data = bytearray(tiny_model_file.read_bytes())
    metadata = metadata_entries(modelfile.read(tiny_model_file).flatbuffer)[METADATA_NAME]
    at = bytes(data).index(metadata) + len(metadata) // 2
    data[at] ^= 0xFF
    (tmp_path / "edited.tflite").write_bytes(bytes(data))
    with pytest.raises(modelfile.ModelFileError, match="sha256 mismatch"):
        modelfile.read(tmp_path / "edited.tflite")


def test_mediapipe_venv_is_made_once_and_again_when_its_pins_change(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mediapipe_check.subprocess, "run", lambda command, check: calls.append(command))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / ".nebula-ready").write_text(mediapipe_check.venv_fingerprint() + "\n")
    assert mediapipe_check.ensure_venv(venv) == venv.resolve() / "bin" / "python" and calls == []
    monkeypatch.setattr(mediapipe_check, "MEDIAPIPE", ["mediapipe==9.9.9"])
    mediapipe_check.ensure_venv(venv)
    assert "--clear" in calls[0] and calls[1][-1] == "mediapipe==9.9.9"
    assert (venv / ".nebula-ready").read_text().strip() == mediapipe_check.venv_fingerprint()


@pytest.mark.slow
def test_mediapipe_names_our_labels_and_agrees_on_top1(tiny_model_file, tiny_old_model_file, mediapipe_venv, tmp_path):
    """MediaPipe Tasks' ImageClassifier (PyPI mediapipe, own venv) reads the labels from the metadata alone."""
    images = []
    for i, label in enumerate(TINY_LABELS * 4):
        path = tmp_path / f"{label}-{i}.png"
        Image.fromarray(sky_image(label, size=72, seed=700 + i)).save(path)
        images.append(path)
    report = mediapipe_check.compare_with_mediapipe(tiny_model_file, images, mediapipe_venv)
    assert report.images == len(images) and not report.errors
    assert report.unnamed == 0 and not report.differences, report
    assert report.same_top1 + len(report.ties) == len(images) and report.same_top1 >= len(images) - 2
    assert report.largest_score_gap < 1e-6  # the same int8 kernels on the same bytes
    # Without the metadata (a file from before it), MediaPipe runs the model but knows no label names.
    old = mediapipe_check.compare_with_mediapipe(tiny_old_model_file, images[:3], mediapipe_venv)
    assert old.unnamed == 3 and not old.agrees
