"""nebula train / nebula evaluate on tiny generated skies with the tiny backbone, plus one slow real run."""

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_LABELS, sky_image, write_sky_folder
from nebula.cli import cli
from nebula.device.preprocess import PreprocessSpec
from nebula.train import augment, int8_grid
from nebula.train.evaluate import score
from nebula.train.manifest import grouped_split, load_dataset
from nebula.train.run import load_run

# A random-weights backbone needs all its units trained and brisk learning rates to learn in seconds, and
# patience: its head barely moves in 5 epochs, and fine-tuning can take 5 before validation improves.
# The Adam-trained head, named (--head dense) because these flags steer it; test_linear_head.py trains --head logistic.
TINY_ARGS = ["--backbone", "tiny", "--unfreeze", "4", "--head", "dense", "--head-epochs", "5", "--epochs", "15",
             "--head-lr", "0.01", "--finetune-lr", "0.003", "--views", "8", "--patience", "8"]
RUN_FILES = ["model.keras", "labels.txt", "preprocess.json", "split.csv", "config.json", "metrics.json", "history.json",
             "confusion_matrix.png", "training_curves.png", "augment_samples.png", "mistakes.html"]
SCORE_KEYS = {"accuracy", "macro_f1", "per_class", "confusion"}


def _train(data, out, *extra):
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return write_sky_folder(tmp_path_factory.mktemp("sky"), per_label=12)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, sky):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = _train(sky, out, *TINY_ARGS, "--seed", "1")
    return out, result.output


def test_train_writes_the_whole_run_folder(tiny_run):
    out, output = tiny_run
    for name in RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    assert "Test split" in output and "macro-F1" in output
    for png in ("confusion_matrix.png", "training_curves.png", "augment_samples.png"):
        with Image.open(out / png) as image:
            assert image.width > 100 and image.height > 50
    assert "<img src=\"data:image/png;base64," in (out / "mistakes.html").read_text() or "No mistakes" in (out / "mistakes.html").read_text()


def test_run_folder_reads_back(tiny_run, sky):
    import keras

    out, _ = tiny_run
    run = load_run(out)
    assert run.labels == TINY_LABELS  # the project's fixed label order
    assert run.spec == PreprocessSpec(input_size=32, resize_mode="fit")
    assert run.data_dir == sky.resolve()
    assert all(run.image_path(r).exists() for split in run.splits.values() for r in split)
    config = run.config
    assert config["backbone"] == "tiny" and config["seed"] == 1 and config["unfreeze"] == 4
    assert config["versions"]["tensorflow"] and config["versions"]["keras"] and config["created_utc"]
    assert sum(sum(c.values()) for c in config["label_counts"].values()) == 36
    # One loadable model, raw RGB in, softmax over labels.txt out, no custom objects.
    model = keras.saving.load_model(run.model_path, compile=False)
    assert tuple(model.input_shape) == (None, 32, 32, 3)
    probs = np.asarray(model(np.full((2, 32, 32, 3), 40.0, np.float32)))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # Fine-tuned units included, the saved backbone's kernels sit on the int8 grid.
    assert config["snap_weights"] is True and config["snapped_kernels"] == 4
    assert config["int8_grid_max_offset"] < 1e-3 and int8_grid.max_offset(model) < 1e-3


def test_split_is_grouped_saved_and_respected(tiny_run, sky):
    out, _ = tiny_run
    run = load_run(out)
    expected = grouped_split(load_dataset(sky), seed=1)
    assert {s: [r.file for r in rows] for s, rows in run.splits.items()} == {s: [r.file for r in rows] for s, rows in expected.items()}
    owner = {}
    for split, rows in run.splits.items():
        for row in rows:
            assert owner.setdefault(row.group, split) == split, f"group {row.group} in two splits"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == len(run.splits["test"])
    assert sum(metrics["per_class"][label]["support"] for label in run.labels) == len(run.splits["test"])
    listed = (out / "test_images.txt").read_text().split("\n")[:-1]
    assert listed == [str(run.image_path(row).resolve()) for row in run.splits["test"]]


def test_trained_model_learned_and_saved_model_matches_training(tiny_run):
    """The saved model (backbone + head put back together) scores validation exactly as training measured it."""
    from nebula.train.evaluate import predict_keras
    import keras

    out, _ = tiny_run
    run = load_run(out)
    metrics = json.loads((out / "metrics.json").read_text())
    model = keras.saving.load_model(run.model_path, compile=False)
    val = run.splits["val"]
    probs = predict_keras(model, run.image_paths("val"), run.spec, batch_size=4)
    val_scores = score([r.label for r in val], [run.labels[i] for i in probs.argmax(1)], run.labels)
    assert val_scores["macro_f1"] == pytest.approx(metrics["validation"]["final"]["macro_f1"])
    assert metrics["validation"]["final"]["macro_f1"] >= 0.8  # red, blue and white skies are easy
    assert set(metrics["wall_time_s"]) >= {"decode_s", "cache_s", "phase1_s", "phase2_s", "test_s", "total_s"}


def test_evaluate_keras_json(tiny_run, sky, tmp_path):
    out, _ = tiny_run
    json_out, png_dir = tmp_path / "scores.json", tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", str(out), str(sky), "--json", str(json_out), "--out", str(png_dir)])
    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "recall" in result.output
    scores = json.loads(json_out.read_text())
    assert SCORE_KEYS <= set(scores)
    assert set(scores["per_class"]) == set(TINY_LABELS)
    for row in scores["per_class"].values():
        assert set(row) == {"precision", "recall", "f1", "support"}
    assert sum(sum(row.values()) for row in scores["confusion"].values()) == 36 == scores["images"]
    assert (png_dir / "confusion_matrix.png").exists() and (png_dir / "mistakes.html").exists()
    # A model.keras path works the same as its run folder.
    again = CliRunner().invoke(cli, ["evaluate", str(out / "model.keras"), str(sky), "--json", str(tmp_path / "again.json")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again.json").read_text())["accuracy"] == scores["accuracy"]


def test_evaluate_folder_with_some_labels_and_a_broken_image(tiny_run, sky, tmp_path):
    out, _ = tiny_run
    partial = tmp_path / "partial"
    shutil.copytree(sky / "emission", partial / "emission")
    (partial / "emission" / "broken.jpg").write_bytes(b"not a jpeg at all")
    json_out = tmp_path / "partial.json"
    result = CliRunner().invoke(cli, ["evaluate", str(out), str(partial), "--json", str(json_out)])
    assert result.exit_code == 0, result.output
    assert len([line for line in result.output.splitlines() if "broken.jpg" in line]) == 1
    scores = json.loads(json_out.read_text())
    assert scores["skipped"] == 1 and scores["images"] == 12
    assert list(scores["confusion"]) == ["emission"]  # macro-F1 is over the labels present
    assert scores["macro_f1"] == pytest.approx(scores["per_class"]["emission"]["f1"])


def test_evaluate_tflite_needs_no_tensorflow(tiny_model_file, sky, tmp_path):
    code = (
        "import sys, json; from nebula.train.evaluate import evaluate_folder\n"
        f"r = evaluate_folder({str(tiny_model_file)!r}, {str(sky)!r})\n"
        "print(json.dumps({'acc': r.scores['accuracy'], 'tf': any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["tf"] is False
    assert reply["acc"] >= 0.8  # the fixture model tells red, blue and white skies apart

    result = CliRunner().invoke(cli, ["evaluate", str(tiny_model_file), str(sky), "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "t.json").read_text())["accuracy"] == pytest.approx(reply["acc"])


def test_same_seed_same_result(tmp_path):
    data = write_sky_folder(tmp_path / "sky", per_label=8)
    args = ["--backbone", "tiny", "--unfreeze", "1", "--head-epochs", "3", "--epochs", "3", "--views", "2", "--seed", "7"]
    _train(data, tmp_path / "a", *args)
    _train(data, tmp_path / "b", *args)
    assert (tmp_path / "a" / "split.csv").read_text() == (tmp_path / "b" / "split.csv").read_text()
    # With TF op determinism on CPU, the whole training history and the test answers repeat exactly.
    assert json.loads((tmp_path / "a" / "history.json").read_text()) == json.loads((tmp_path / "b" / "history.json").read_text())
    metrics_a, metrics_b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in "ab")
    assert metrics_a["confusion"] == metrics_b["confusion"] and metrics_a["validation"] == metrics_b["validation"]


def test_bad_data_is_one_clear_line(tmp_path):
    (tmp_path / "only").mkdir()
    Image.fromarray(sky_image("emission")).save(tmp_path / "only" / "a-1.png")
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--backbone", "tiny"])
    assert result.exit_code == 1
    assert "only one label" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 1 and "model.keras: no such model file" in result.output


def test_unfreeze_beyond_the_backbone_is_one_clear_line(tmp_path):
    data = write_sky_folder(tmp_path / "sky", per_label=8, size=48)
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone", "tiny",
                                      "--unfreeze", "9"])
    assert result.exit_code == 1 and "--unfreeze 9: backbone tiny has only 4 units" in result.output
    assert "Traceback" not in result.output


def test_score_by_hand():
    s = score(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"], ["a", "b", "c", "d"])
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert s["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and s["per_class"]["b"]["recall"] == 1.0
    assert s["per_class"]["c"]["f1"] == 0.0 and s["per_class"]["d"]["support"] == 0
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # d is absent from the truth: not averaged
    assert s["confusion"]["a"] == {"a": 1, "b": 1, "c": 0, "d": 0} and "d" not in s["confusion"]


def _channel_means(image):
    return image.reshape(-1, 3).astype(float).mean(0)


def test_augment_keeps_shape_dtype_and_colour():
    spec = PreprocessSpec(input_size=48)
    for label, (hi, lo) in {"emission": (0, 2), "reflection": (2, 0)}.items():
        source = sky_image(label, size=120, seed=5)
        for i in range(40):
            view = augment.augment(source, spec, augment.view_rng(3, "a.png", i))
            assert view.shape == (48, 48, 3) and view.dtype == np.uint8
            means = _channel_means(view)
            assert means[hi] > 1.5 * means[lo], f"{label} view {i} changed colour: RGB means {means.round(1)}"


def test_augment_varies_and_is_reproducible():
    spec = PreprocessSpec(input_size=48)
    source = sky_image("emission", size=120, seed=5)
    first = augment.augment(source, spec, augment.view_rng(0, "b.png", 1))
    assert np.array_equal(first, augment.augment(source, spec, augment.view_rng(0, "b.png", 1)))
    assert not np.array_equal(first, augment.augment(source, spec, augment.view_rng(0, "b.png", 2)))


def test_augment_pads_rotation_with_black():
    """A white frame, rotated by a random angle: what the rotation uncovers is black sky, not grey or colour."""
    spec = PreprocessSpec(input_size=64)
    white = np.full((200, 200, 3), 255, np.uint8)
    views = [augment.augment(white, spec, np.random.default_rng(s)) for s in range(10)]
    black = np.mean([(v < 40).all(axis=2).mean() for v in views])
    bright = np.mean([(v > 150).all(axis=2).mean() for v in views])
    assert black > 0.03  # the uncovered corners
    assert black + bright > 0.97  # and hardly anything in between but the blurred edge


@pytest.mark.slow
def test_real_backbone_head_for_one_epoch(tmp_path):
    """efficientnet_lite0 with its offline ImageNet weights: one head-only epoch on a small real subset."""
    import keras

    from nebula.train import backbones

    if "efficientnet_lite0" not in backbones.REGISTRY:
        pytest.skip("the efficientnet_lite0 backbone is not registered in nebula.train.backbones")
    source = Path(__file__).resolve().parents[1] / "data" / "stellarium"
    if not (source / "manifest.csv").exists():
        from nebula.train import stellarium

        if not (stellarium.DEFAULT_SOURCE / "textures.json").exists():
            pytest.skip(f"neither data/stellarium nor Stellarium's photographs ({stellarium.DEFAULT_SOURCE}) are here: "
                        "apt install stellarium-data, then make data")
        source = tmp_path / "stellarium"
        stellarium.build(out=source)
    rows = load_dataset(source)
    subset = tmp_path / "subset"
    taken = Counter()
    for row in rows:  # up to 8 images of each of the 3 largest labels, folder-per-label
        if row.label in [label for label, _ in Counter(r.label for r in rows).most_common(3)] and taken[row.label] < 8:
            (subset / row.label).mkdir(parents=True, exist_ok=True)
            shutil.copy(source / row.file, subset / row.label / f"{row.group}-{taken[row.label]}{Path(row.file).suffix}")
            taken[row.label] += 1
    out = tmp_path / "run"
    _train(subset, out, "--backbone", "efficientnet_lite0", "--unfreeze", "0", "--head-epochs", "1", "--views", "2")
    for name in RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    run = load_run(out)
    assert run.spec.input_size == backbones.get("efficientnet_lite0").input_size
    model = keras.saving.load_model(run.model_path, compile=False)
    assert model.output_shape[-1] == len(run.labels) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert SCORE_KEYS <= set(metrics) and metrics["images"] == len(run.splits["test"])


def test_shifted_augment_never_swaps_red_and_blue():
    """Other people's processing (white balance, saturation, gradients, bicolour) must not turn red into blue or back."""
    spec = PreprocessSpec(input_size=48)
    for label, (hi, lo) in {"emission": (0, 2), "reflection": (2, 0)}.items():
        source = sky_image(label, size=120, seed=5)
        for i in range(60):
            view = augment.augment_shifted(source, spec, augment.view_rng(3, "a.png", i))
            assert view.shape == (48, 48, 3) and view.dtype == np.uint8
            pixels = view.reshape(-1, 3).astype(float)
            glow = pixels[pixels.sum(1) >= np.percentile(pixels.sum(1), 90)]  # the nebula, not the gradient behind it
            means = glow.mean(0)
            assert means[hi] > means[lo], f"{label} view {i} swapped colour: RGB means {means.round(1)}"
    assert set(augment.RECIPES) == {"sky", "shifted"}
