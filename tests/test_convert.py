"""nebula convert: a tiny real run -> a gated, self-describing int8 model the device reads."""

import json
import re
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY_LABELS, sky_image
from nebula.cli import cli
from nebula.convert import export
from nebula.convert.export import check_gate, gate_figures
from nebula.device import modelfile
from nebula.device.runtime import Classifier
from nebula.train.run import load_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, sky_folder):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = CliRunner().invoke(
        cli, ["train", "--data", str(sky_folder), "--out", str(out), "--backbone", "tiny", "--epochs", "3", "--unfreeze", "0", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    return out


def test_convert_writes_a_model_that_describes_itself(tiny_run, tmp_path):
    out = tmp_path / "models" / "nebula.tflite"
    result = CliRunner().invoke(cli, ["convert", str(tiny_run), "--out", str(out), "--representative", "20", "--force"])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output
    model = modelfile.read(out)
    assert model.labels == sorted(TINY_LABELS) or set(model.labels) == set(TINY_LABELS)
    assert b"TFLITE_METADATA" in model.flatbuffer  # the standard metadata, for other runtimes (test_tflite_metadata.py)
    manifest = model.manifest
    assert manifest["backbone"] == "tiny" and manifest["run"]["snap_weights"] is True
    assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["scale"] == pytest.approx(1.0)
    assert manifest["input"]["zero_point"] == 0
    assert manifest["versions"]["tensorflow"]
    metrics = manifest["metrics"]
    assert metrics["test_images"] > 0 and 0.0 <= metrics["top1_agreement"] <= 1.0
    assert 0.0 <= metrics["mean_abs_probability_difference"] < 0.5 and "mean |p_float - p_int8|" in result.output
    assert set(metrics["float"]) == {"accuracy", "macro_f1"} == set(metrics["int8"])
    # The gate scores validation and test photographs together; the figures above stay the test split's.
    gate, run = metrics["gate"], load_run(tiny_run)
    assert gate["splits"] == {"val": len(run.splits["val"]), "test": len(run.splits["test"])} and gate["splits"]["val"] > 0
    assert gate["images"] == gate["splits"]["val"] + gate["splits"]["test"] == metrics["test_images"] + len(run.splits["val"])
    assert gate["float_correct"] - gate["int8_correct"] == gate["right_to_wrong"] - gate["wrong_to_right"]
    assert gate["max_fewer_correct"] == 1 and gate["top1_agreement"] == pytest.approx(gate["agreed"] / gate["images"])
    assert gate["passed"] == (check_gate(gate["images"], gate["float_correct"], gate["int8_correct"], gate["agreed"]) == [])
    assert f"gate on {gate['images']} photographs" in result.output and f"for {gate['agreed']} of {gate['images']}" in result.output
    # The same facts beside the model, for people and scripts without zipfile.
    assert (out.parent / "labels.txt").read_text().split() == model.labels
    assert json.loads((out.parent / "manifest.json").read_text()) == manifest
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("manifest.json"))["sha256"] == manifest["sha256"]
    # And the device runs it.
    classifier = Classifier(out)
    assert classifier.classify(sky_image("emission", size=80, seed=3)).label in model.labels


def test_gate_refuses_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "MIN_TOP1_AGREEMENT", 1.01)  # no model can pass this
    out = tmp_path / "refused.tflite"
    result = CliRunner().invoke(cli, ["convert", str(tiny_run), "--out", str(out), "--representative", "10"])
    assert result.exit_code == 1
    assert "agree on top-1" in result.output and "--force" in result.output
    assert re.search(r"Error: int8 and float agree on top-1 for \d+ of \d+ \(\d+\.\d %, limit 101 %\)", result.output), result.output
    assert "top-1 agreement float/int8:" in result.output and "int8 " in result.output  # the scores it refused on
    assert not out.exists()


def test_gate_counts_images_not_points():
    # 176 images (validation + test): 1 % is 1.76, so int8 may get 2 fewer right; 3 fewer is refused.
    assert check_gate(176, 150, 149, 175) == []  # one net flip: passes (on 90 test images alone it was refused)
    assert check_gate(176, 150, 148, 174) == []  # the limit itself
    assert check_gate(176, 150, 147, 173) == ["int8 gets 3 fewer of 176 images right than float (limit 2)"]
    assert check_gate(176, 140, 145, 171) == []  # int8 better than float is no failure


def test_gate_agreement_boundary():
    # 97 % of 176 is 170.72: 171 agreeing images pass, 170 do not.
    assert check_gate(176, 150, 150, 171) == []
    assert check_gate(176, 150, 150, 170) == ["int8 and float agree on top-1 for 170 of 176 (96.6 %, limit 97 %)"]
    assert check_gate(100, 80, 80, 97) == [] and len(check_gate(100, 80, 80, 96)) == 1  # exactly 97 % passes
    both = check_gate(176, 150, 147, 169)
    assert len(both) == 2 and "3 fewer" in both[0] and "169 of 176 (96.0 %, limit 97 %)" in both[1]


def test_gate_limit_is_never_below_one_image():
    assert export.fewer_correct_limit(10) == 1 and check_gate(10, 9, 8, 10) == []  # 1 % of 10 rounds up to one image
    assert check_gate(10, 9, 7, 10) == ["int8 gets 2 fewer of 10 images right than float (limit 1)"]
    assert [export.fewer_correct_limit(n) for n in (1, 100, 101, 200, 700)] == [1, 1, 2, 2, 7]  # 700 * 0.01 is 7.000000000000001
    assert check_gate(0, 0, 0, 0) == ["no validation or test photographs to score"]


def test_gate_figures_count_each_way():
    truth = ["a", "a", "b", "b", "c"]
    figures = gate_figures(truth, ["a", "a", "b", "c", "a"], ["a", "b", "b", "b", "b"], {"val": 2, "test": 3})
    assert figures["float_correct"] == 3 and figures["int8_correct"] == 3
    assert figures["right_to_wrong"] == 1 and figures["wrong_to_right"] == 1  # one flip each way: no net change
    assert figures["agreed"] == 2 and figures["top1_agreement"] == pytest.approx(0.4)  # wrong -> another wrong disagrees too
    assert figures["images"] == 5 and figures["splits"] == {"val": 2, "test": 3}
    assert figures["max_fewer_correct"] == 1 and figures["min_agreed"] == 5


@pytest.mark.slow
def test_old_tflite_runtime_gives_the_same_answers(tiny_model_file, tmp_path):
    """tflite-runtime 2.14.0 (numpy<2, own venv) and LiteRT agree on every top-1."""
    from PIL import Image

    from nebula.convert.compat import compare_runtimes, ensure_venv, project_fingerprint

    images = []
    for i, label in enumerate(TINY_LABELS * 4):
        path = tmp_path / f"{label}-{i}.png"
        Image.fromarray(sky_image(label, size=72, seed=700 + i)).save(path)
        images.append(path)
    venv = Path(tmp_path) / "venv-tflite214"
    report = compare_runtimes(tiny_model_file, images, venv)
    assert report["backends"] == ["ai-edge-litert", "tflite-runtime"]
    assert report["same_top1"] == len(images), report["differences"]
    assert 0.0 <= report["largest_score_gap"][0] < 0.5
    # A venv holding an older copy of the project is brought up to date, not trusted.
    (venv / ".nebula-ready").write_text("stale\n")
    ensure_venv(venv)
    assert (venv / ".nebula-ready").read_text().strip() == project_fingerprint()


@pytest.mark.slow
def test_convert_checks_its_model_with_mediapipe(tiny_run, mediapipe_venv, tmp_path, monkeypatch):
    from nebula.convert import mediapipe_check

    monkeypatch.setattr(mediapipe_check, "DEFAULT_VENV", mediapipe_venv)
    out = tmp_path / "nebula.tflite"
    result = CliRunner().invoke(cli, ["convert", str(tiny_run), "--out", str(out), "--representative", "20", "--force", "--check-mediapipe"])
    assert result.exit_code == 0, result.output
    test_images = modelfile.read(out).manifest["metrics"]["test_images"]
    assert re.search(rf"MediaPipe vs nebula classify: same top-1 for \d+ of {test_images} images", result.output), result.output


def test_project_fingerprint_follows_the_device_code(tmp_path):
    """The tflite-runtime venv holds a copy of the project; its fingerprint says when the copy is stale."""
    from nebula.convert.compat import project_fingerprint

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for folder in ("nebula", "device", "train"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "code.py").write_text("A = 1\n")
    first = project_fingerprint(tmp_path)
    (tmp_path / "train" / "code.py").write_text("A = 2\n")  # the other venv runs no training code
    assert project_fingerprint(tmp_path) == first
    (tmp_path / "device" / "code.py").write_text("A = 2\n")
    assert project_fingerprint(tmp_path) != first
