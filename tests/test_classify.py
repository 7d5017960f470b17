"""`nebula classify` on folders of mixed inputs with the tiny trained model, and the device-only install."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits as astrofits
from click.testing import CliRunner
from PIL import Image

from conftest import sky_image
from nebula.cli import cli
from nebula.device import runtime
from nebula.device.bench import TENSORFLOW_BLOCKER
from nebula.device.classify import Result, ResultWriter, find_images
from nebula.device.decode import load_image
from nebula.device.runtime import Classifier, Prediction

JSONL_KEYS = {"file", "label", "score", "top_k", "inference_ms", "model_sha256", "utc"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def captures(tmp_path) -> Path:
    """A night's captures: nebulae as PNG and JPEG in sub-folders, a dark frame, a broken file, clutter."""
    root = tmp_path / "captures"
    for label, folder in (("emission", "m42"), ("reflection", "m45")):
        (root / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(sky_image(label, size=96, seed=5000 + i)).save(root / folder / f"{label}{i}.png")
    Image.fromarray(sky_image("emission", size=96, seed=5003)).save(root / "m42" / "emission-z.jpg", quality=95)
    astrofits.PrimaryHDU(np.full((16, 16), 1000, np.uint16)).writeto(root / "dark_001.fits")
    with astrofits.open(root / "dark_001.fits", mode="update") as hdus:
        hdus[0].header["IMAGETYP"] = "Dark Frame"
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("seeing 3/5")
    (root / ".DS_Store").write_bytes(b"\0\0")
    return root


def _invoke(*args, env=None):
    return CliRunner().invoke(cli, ["classify", *map(str, args)], env=env)


def test_folders_are_walked_recursively_in_a_stable_order(captures):
    found = [p.relative_to(captures).as_posix() for p in find_images([captures])]
    assert found == ["broken.jpg", "dark_001.fits", "m42/emission-z.jpg", "m42/emission0.png", "m42/emission1.png",
                     "m45/reflection0.png", "m45/reflection1.png"]
    # A file named on the command line is tried whatever its name: it gets its own error if it is not an image.
    assert list(find_images([captures / "notes.txt"])) == [captures / "notes.txt"]


def test_jsonl_has_one_record_per_input_and_the_run_goes_on(captures, tiny_model_file):
    result = _invoke(captures, "--model", tiny_model_file, "--format", "jsonl", "--top-k", "2")
    assert result.exit_code == 1  # broken.jpg failed; everything else was still classified
    records = [json.loads(line) for line in result.stdout.splitlines()]
    by_name = {Path(r["file"]).name: r for r in records}
    assert len(records) == 7
    assert set(by_name["broken.jpg"]) == {"file", "error"}
    assert set(by_name["dark_001.fits"]) == {"file", "skipped"} and "Dark Frame" in by_name["dark_001.fits"]["skipped"]
    classified = [r for r in records if "label" in r]
    assert len(classified) == 5
    classifier = Classifier(tiny_model_file)
    sha = classifier.sha256
    for record in classified:
        assert set(record) == JSONL_KEYS
        assert record["model_sha256"] == sha and record["utc"].endswith("Z")
        assert len(record["top_k"]) == 2 and record["top_k"][0] == [record["label"], record["score"]]
        assert record["inference_ms"] > 0
        # The CLI says what the library says about the same file.
        assert record["label"] == classifier.classify(load_image(record["file"], classifier.spec)).label
    correct = sum(Path(r["file"]).name.startswith(r["label"]) for r in classified)
    assert correct >= 4, classified
    errors = result.stderr.strip().splitlines()
    assert errors[0] == f"error: {captures / 'broken.jpg'}: {by_name['broken.jpg']['error']}"
    assert errors[-1] == "1 of 7 inputs failed"


def test_all_good_exits_0_and_the_table_is_aligned(captures, tiny_model_file):
    result = _invoke(captures / "m42", captures / "m45", "--model", tiny_model_file)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert len(rows) == 5
    file_column = header.index("file")
    for row in rows:
        assert Path(row[file_column:]).is_file(), row


def test_csv_reads_back_in_a_spreadsheet(captures, tiny_model_file):
    result = _invoke(captures, "--model", tiny_model_file, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 7
    assert {Path(r["file"]).name for r in rows if r["error"]} == {"broken.jpg"}
    assert {Path(r["file"]).name for r in rows if r["skipped"]} == {"dark_001.fits"}
    good = [r for r in rows if r["label"]]
    assert len(good) == 5 and all(0 <= float(r["score"]) <= 1 and len(r["top_k"].split()) == 3 for r in good)


def test_below_the_threshold_the_answer_is_unknown_with_candidates(captures, tiny_model_file):
    result = _invoke(captures / "m42" / "emission0.png", "--model", tiny_model_file, "--format", "jsonl", "--threshold", "1.0")
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["label"] == "unknown" and len(record["top_k"]) == 3
    table = _invoke(captures / "m42" / "emission0.png", "--model", tiny_model_file, "--threshold", "1.0").stdout
    assert "unknown" in table and all(label in table for label in ("emission", "reflection", "other"))


def test_an_empty_folder_is_an_error(tmp_path, tiny_model_file):
    result = _invoke(tmp_path, "--model", tiny_model_file)
    assert result.exit_code == 1 and "no images found" in result.stderr


def test_no_model_says_how_to_get_one(tmp_path, captures):
    result = _invoke(captures, env={"NEBULA_MODEL": str(tmp_path / "none.tflite")})
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "none.tflite" in line and "make convert" in line and "--model" in line and "NEBULA_MODEL" in line


def test_a_corrupt_model_is_one_line(tmp_path, captures, tiny_model_file):
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(tiny_model_file.read_bytes()[:5000])
    result = _invoke(captures, "--model", corrupt)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(corrupt) in line


def test_no_runtime_is_one_line(captures, tiny_model_file, monkeypatch):
    def none_installed(prefer=None):
        raise runtime.RuntimeMissing("no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime)")

    monkeypatch.setattr(runtime, "load_interpreter_class", none_installed)
    result = _invoke(captures, "--model", tiny_model_file)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "pip install ai-edge-litert" in line


def test_results_are_flushed_line_by_line():
    class Counting(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1

    out = Counting()
    writer = ResultWriter("jsonl", "0" * 64, ["a", "b"], top_k=2, out=out, err=io.StringIO())
    for i in range(3):
        writer.write(Result(f"{i}.png", prediction=Prediction("a", 0.9, [("a", 0.9), ("b", 0.1)], {"invoke": 1.0}), utc="now"))
        assert out.flushes == i + 1 and out.getvalue().count("\n") == i + 1


def test_classify_works_where_tensorflow_cannot_be_imported(captures, tiny_model_file):
    """The device path in a process where `import tensorflow` (or keras) raises."""
    code = TENSORFLOW_BLOCKER + (
        "import atexit\n"
        "atexit.register(lambda: print('loaded:', sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}), file=sys.stderr))\n"
        "from nebula.cli import main\n"
        "sys.argv = ['nebula'] + sys.argv[1:]\n"
        "main()\n"
    )
    check = subprocess.run([sys.executable, "-c", TENSORFLOW_BLOCKER + "import tensorflow"], capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr  # the blocker itself works
    done = subprocess.run(
        [sys.executable, "-c", code, "classify", str(captures / "m42"), "--model", str(tiny_model_file), "--format", "jsonl"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 3 and all("label" in r for r in records)
    assert "loaded: []" in done.stderr


@pytest.mark.slow
def test_device_extra_installs_no_tensorflow(tmp_path):
    """`pip install .[device]` into a fresh venv: no TensorFlow, `nebula --help` runs, workstation commands say what to install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", f"{REPO}[device]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    python = str(bin_dir / "python")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "tf-keras"}, names
    assert {"ai-edge-litert", "astropy", "nebula-classifier"} <= names
    assert subprocess.run([python, "-c", "import tensorflow"], capture_output=True).returncode != 0
    nebula = str(bin_dir / "nebula")
    assert subprocess.run([nebula, "--help"], capture_output=True, text=True).returncode == 0
    (tmp_path / "x").mkdir()
    train = subprocess.run([nebula, "train", "--data", str(tmp_path / "x"), "--out", str(tmp_path / "y")],
                           capture_output=True, text=True)
    assert train.returncode == 2
    (line,) = train.stderr.strip().splitlines()
    assert "nebula-classifier[train]" in line


def test_files_from_reads_paths_one_per_line(tiny_model_file, tmp_path):
    from PIL import Image

    from conftest import sky_image

    listed = []
    for i, label in enumerate(["emission", "reflection"]):
        path = tmp_path / f"{label}-{i}.png"
        Image.fromarray(sky_image(label, size=64, seed=900 + i)).save(path)
        listed.append(str(path))
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n\n")
    result = CliRunner().invoke(cli, ["classify", "--model", str(tiny_model_file), "--format", "jsonl", "--files-from", str(tmp_path / "list.txt")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["file"] for r in records] == listed
    assert [r["label"] for r in records] == ["emission", "reflection"]


def test_no_paths_at_all_is_a_usage_error(tiny_model_file):
    result = CliRunner().invoke(cli, ["classify", "--model", str(tiny_model_file)])
    assert result.exit_code == 2 and "--files-from" in result.output


# --- bad inputs: each gets one line, the good ones are still classified -------------------------


def _nebula(*args, timeout=120):
    """`nebula ...` in a fresh process (a hang fails the test instead of stopping it)."""
    return subprocess.run([sys.executable, "-m", "nebula", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_file_open_errors_are_one_line_each_and_the_run_goes_on(tmp_path, tiny_model_file):
    good = tmp_path / "good.jpg"
    Image.fromarray(sky_image("emission", size=96, seed=5000)).save(good, quality=95)
    os.symlink(tmp_path / "l2.jpg", tmp_path / "l1.jpg")
    os.symlink(tmp_path / "l1.jpg", tmp_path / "l2.jpg")
    os.mkfifo(tmp_path / "f.jpg")
    long_name = tmp_path / ("n" * 300 + ".jpg")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'l1.jpg'}\n{good}\n")
    done = _nebula("classify", "--model", tiny_model_file, "--format", "jsonl", tmp_path / "l1.jpg", good / "x.jpg",
                   long_name, tmp_path / "f.jpg", good, "--files-from", tmp_path / "list.txt")
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r.get("label") is not None for r in records] == [False, False, False, False, True, False, True]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {tmp_path / 'l1.jpg'}: symlink loop (too many levels of symbolic links)",
        f"error: {good / 'x.jpg'}: not a file path (a part of it is a file, not a folder)",
        f"error: {long_name}: file name too long",
        f"error: {tmp_path / 'f.jpg'}: not an image file: a FIFO (named pipe)",
        f"error: {tmp_path / 'l1.jpg'}: symlink loop (too many levels of symbolic links)",
    ]
    assert "Traceback" not in done.stderr and "XNNPACK" not in done.stderr
    assert done.stderr.splitlines()[-1] == "5 of 7 inputs failed"


def test_verbose_shows_the_runtimes_info_line_once(captures, tiny_model_file):
    done = _nebula("classify", "-v", "--model", tiny_model_file, captures / "m42", captures / "m45")
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "XNNPACK" in line] == [
        "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."]


def test_a_folder_without_images_next_to_other_inputs_gets_an_error_line(captures, tmp_path, tiny_model_file):
    empty = tmp_path / "empty_night"
    empty.mkdir()
    (empty / "notes.txt").write_text("clouds")
    result = _invoke(empty, captures / "m42", "--model", tiny_model_file)
    assert result.exit_code == 1
    assert f"error: {empty}: no images found in this folder (no JPEG, PNG, TIFF or FITS files)" in result.stderr
    assert len(result.stdout.splitlines()) == 1 + 3  # the header and m42's three images


def test_broken_symlinks_and_fifos_inside_a_folder_each_get_a_line(captures, tiny_model_file):
    os.symlink(captures / "deleted.jpg", captures / "m42" / "gone.jpg")
    os.symlink(captures / "m42" / "b.png", captures / "m42" / "a.png")
    os.symlink(captures / "m42" / "a.png", captures / "m42" / "b.png")
    os.mkfifo(captures / "m42" / "pipe.fits")
    result = _invoke(captures / "m42", "--model", tiny_model_file, "--format", "jsonl")
    errors = {Path(r["file"]).name: r["error"] for r in map(json.loads, result.stdout.splitlines()) if "error" in r}
    assert errors == {"gone.jpg": "dangling symlink (its target does not exist)",
                      "a.png": "symlink loop (too many levels of symbolic links)",
                      "b.png": "symlink loop (too many levels of symbolic links)",
                      "pipe.fits": "not an image file: a FIFO (named pipe)"}
    assert result.exit_code == 1


def test_a_newline_in_a_file_name_does_not_break_the_table_or_the_error_line(tmp_path, tiny_model_file):
    odd = tmp_path / "M42\nlast night.png"
    Image.fromarray(sky_image("emission", size=96, seed=5000)).save(odd)
    (tmp_path / "cut\n.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    result = _invoke(odd, tmp_path / "cut\n.png", "--model", tiny_model_file)
    header, row = result.stdout.splitlines()
    assert row.endswith("M42\\nlast night.png") and row.split()[0] == "emission"
    assert result.stderr.splitlines()[0].startswith(f"error: {tmp_path}/cut\\n.png: ")
