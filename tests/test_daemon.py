"""The daemon: one log line per item, smoothing, robustness, restarts, signals, flat memory."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sky_image
from nebula.device.camera import FakeCamera, Frame, FrameSource, WatchFolder
from nebula.device.config import RunConfig
from nebula.device.daemon import Daemon, ResultsLog, Smoother, processed_files, run
from nebula.device.runtime import UNKNOWN, Classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier(tiny_model_file):
    return Classifier(tiny_model_file, num_threads=1)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _daemon(classifier, source, log_path, **kw):
    source.open(classifier.spec)
    return Daemon(classifier, source, ResultsLog(log_path), **kw)


def test_fake_frames_are_logged_one_line_each_with_the_classify_keys(classifier, tmp_path):
    daemon = _daemon(classifier, FakeCamera(hold=20), tmp_path / "r.jsonl", max_frames=60, smooth=3, threshold=0.0)
    assert daemon.run() == 60
    daemon.log.close()
    lines = _lines(tmp_path / "r.jsonl")
    assert [line["frame"] for line in lines] == list(range(1, 61))
    first = lines[0]
    assert {"frame", "label", "score", "top_k", "inference_ms", "model_sha256", "utc", "frame_label", "smoothed_over", "scene"} <= set(first)
    assert first["model_sha256"] == classifier.sha256 and len(first["top_k"]) == 3
    # After the smoothing window fills, the label follows the scene shown.
    settled = [line for line in lines if (line["frame"] - 1) % 20 >= 3]
    agree = sum(line["label"] == line["scene"] for line in settled)
    assert agree >= 0.9 * len(settled), [(line["scene"], line["label"]) for line in settled]


class _Sequence(FrameSource):
    """A live source showing given scenes in order."""

    live = True

    def __init__(self, scenes):
        super().__init__()
        self.scenes = scenes

    def frames(self):
        for i, scene in enumerate(self.scenes, 1):
            yield Frame(id=str(i), rgb=sky_image(scene, seed=i % 3))


def test_smoothing_keeps_the_label_steady_through_odd_frames(classifier, tmp_path):
    scenes = ["emission" if i % 4 else "reflection" for i in range(1, 41)]  # every 4th frame looks blue
    daemon = _daemon(classifier, _Sequence(scenes), tmp_path / "r.jsonl", smooth=5, threshold=0.0)
    daemon.run()
    lines = _lines(tmp_path / "r.jsonl")
    single = [line["frame_label"] for line in lines]
    smoothed = [line["label"] for line in lines]
    assert single.count("reflection") >= 8  # the single frames do flicker...
    assert smoothed[1:] == ["emission"] * 39  # ...the smoothed label does not
    assert lines[-1]["smoothed_over"] == 5


def test_smoother_averages_the_last_n():
    smoother = Smoother(2)
    smoother.add(np.array([1.0, 0.0]))
    smoother.add(np.array([0.0, 1.0]))
    assert smoother.add(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_below_the_threshold_is_unknown(classifier, tmp_path):
    daemon = _daemon(classifier, FakeCamera(), tmp_path / "r.jsonl", max_frames=5, threshold=0.999)
    daemon.run()
    assert {line["label"] for line in _lines(tmp_path / "r.jsonl")} == {UNKNOWN}


def test_bad_frames_get_an_error_line_and_the_loop_goes_on(classifier, tmp_path):
    daemon = _daemon(classifier, FakeCamera(corrupt_every=4), tmp_path / "r.jsonl", max_frames=12)
    assert daemon.run() == 12
    lines = _lines(tmp_path / "r.jsonl")
    errors = [line for line in lines if "error" in line]
    assert [line["frame"] for line in errors] == [4, 8, 12]
    assert errors[0]["error"].startswith("cannot classify (expected an HxWx3 uint8 RGB array")
    assert daemon.errors == 3 and sum("label" in line for line in lines) == 9


def _png(path, label="emission", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sky_image(label, seed=seed)).save(path)


def _run_watch_until(classifier, root, log, expected_lines, timeout=20, **kw):
    """Run the daemon on a watched folder in a thread until the log has `expected_lines`, then stop it."""
    # The files are written whole before the daemon starts: short waits for stability and for cut-short files.
    source = WatchFolder(root, poll_s=0.02, done=processed_files(log), settle_s=0.05, truncated_grace_s=0.2)
    daemon = _daemon(classifier, source, log, **kw)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (not Path(log).exists() or len(_lines(log)) < expected_lines):
        time.sleep(0.02)
    time.sleep(0.2)  # a few more polls: nothing else may arrive
    daemon.stop()
    thread.join(5)
    assert not thread.is_alive()
    daemon.log.close()
    return _lines(log) if Path(log).exists() else []


def test_watch_folder_classifies_each_capture_once_also_across_restarts(classifier, tmp_path):
    root, log = tmp_path / "captures", tmp_path / "results.jsonl"
    _png(root / "M42" / "Light" / "Ha" / "M42_Light_Ha_001.png", "emission")
    _png(root / "M78" / "Light" / "L" / "M78_Light_L_001.png", "reflection", seed=1)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(64))
    lines = _run_watch_until(classifier, root, log, 3, sidecar=True, threshold=0.0)
    assert len(lines) == 3
    by_name = {Path(line["file"]).name: line for line in lines}
    assert by_name["M42_Light_Ha_001.png"]["label"] == "emission"
    assert by_name["M42_Light_Ha_001.png"]["target"] == "M42" and by_name["M42_Light_Ha_001.png"]["filter"] == "Ha"
    assert by_name["M78_Light_L_001.png"]["label"] == "reflection"
    assert "error" in by_name["broken.jpg"] and "label" not in by_name["broken.jpg"]
    sidecar = json.loads((root / "M42" / "Light" / "Ha" / "M42_Light_Ha_001.png.json").read_text())
    assert sidecar == by_name["M42_Light_Ha_001.png"]

    # A restart reads the log: nothing is classified again; a new capture is.
    _png(root / "M42" / "Light" / "Ha" / "M42_Light_Ha_002.png", "emission", seed=2)
    lines = _run_watch_until(classifier, root, log, 4)
    assert len(lines) == 4
    assert Path(lines[-1]["file"]).name == "M42_Light_Ha_002.png"
    assert len({line["file"] for line in lines}) == 4


def test_processed_files_ignores_a_line_cut_by_a_power_cut(tmp_path):
    log = tmp_path / "r.jsonl"
    log.write_text('{"file": "/a.png", "size": 10, "mtime_ns": 5, "label": "other"}\n{"frame": 3, "label": "x"}\n{"file": "/b.png", "si')
    assert processed_files(log) == {("/a.png", 10, 5)}
    assert processed_files(tmp_path / "missing.jsonl") == set()


def test_run_writes_the_resolved_configuration_next_to_the_log(tiny_model_file, tmp_path):
    config = RunConfig(source="fake", model=str(tiny_model_file), log=str(tmp_path / "logs" / "night.jsonl"), max_frames=3, max_fps=0)
    daemon = run(config, announce=lambda line: None)
    assert daemon.count == 3 and len(_lines(tmp_path / "logs" / "night.jsonl")) == 3
    written = json.loads((tmp_path / "logs" / "night.config.json").read_text())
    assert written["config"]["max_frames"] == 3 and written["config"]["source"] == "fake"
    assert written["model_sha256"] == daemon.classifier.sha256


def _start_cli(args, env_extra=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "nebula", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_current_item_and_exits_0(tiny_model_file, tmp_path, signum):
    log = tmp_path / "r.jsonl"
    process = _start_cli(["run", "--source", "fake", "--max-fps", "50", "--model", str(tiny_model_file), "--log", str(log)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    text = log.read_text()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["frame"] for line in lines] == list(range(1, len(lines) + 1))
    assert f"stopped after {len(lines)} items (0 errors)" in stderr
    assert "Traceback" not in stderr


def test_run_without_a_model_is_one_line_and_exit_2(tmp_path):
    process = _start_cli(["run", "--source", "fake", "--model", str(tmp_path / "none.tflite"), "--log", str(tmp_path / "r.jsonl")])
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.strip().count("\n") == 0 and "no model at" in stderr


_SOAK = """
import json, sys
from nebula.device.camera import FakeCamera
from nebula.device.daemon import Daemon, ResultsLog
from nebula.device.runtime import Classifier
from nebula.device.web import LiveState

def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

model, log, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
classifier = Classifier(model, num_threads=1)
source = FakeCamera(hold=50, corrupt_every=97)
source.open(classifier.spec)
state, samples = LiveState(), {}

def on_result(record, frame):
    state.update(record, frame)  # the web page's state too: its history must stay bounded
    if record["frame"] in (1000, frames):
        samples[record["frame"]] = rss_kib()

daemon = Daemon(classifier, source, ResultsLog(log), smooth=5, max_frames=frames, on_result=on_result)
daemon.run()
print(json.dumps({"count": daemon.count, "errors": daemon.errors, "rss_kib": samples, "history": len(state.snapshot()["history"]),
                  "tensorflow_loaded": any(m.split(".")[0] == "tensorflow" for m in sys.modules)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc (Linux)")
def test_soak_10000_fake_frames_keeps_memory_flat(tiny_model_file, tmp_path):
    """The device path alone, in a fresh process: RSS at frame 1,000 vs frame 10,000."""
    frames = 10_000
    done = subprocess.run([sys.executable, "-c", _SOAK, str(tiny_model_file), str(tmp_path / "soak.jsonl"), str(frames)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    rss = {int(k): v / 1024 for k, v in report["rss_kib"].items()}
    growth_mib = rss[frames] - rss[1000]
    print(f"\nsoak: RSS {rss[1000]:.1f} MiB at frame 1000, {rss[frames]:.1f} MiB at frame {frames}, growth {growth_mib:+.2f} MiB")
    assert not report["tensorflow_loaded"]
    assert report["count"] == frames and report["errors"] == frames // 97 and report["history"] == 30
    assert sum(1 for _ in open(tmp_path / "soak.jsonl")) == frames
    assert growth_mib < 20


def test_a_rotated_log_still_remembers_every_capture_across_a_restart(tiny_model_file, tmp_path):
    """`nebula run` settings: a tiny log_max_mb rotates after every line, log_keep=1 drops the old lines."""
    root, log = tmp_path / "captures", tmp_path / "results.jsonl"
    for i in range(5):
        _png(root / f"M42_{i:03d}.png", "emission", seed=i)
    config = RunConfig(source="watch", watch_dir=str(root), model=str(tiny_model_file), log=str(log), poll_s=0.02,
                       settle_s=0.05, log_max_mb=0.0005, log_keep=1, log_fsync_s=0, max_frames=5)
    assert run(config, announce=lambda line: None).count == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("results.jsonl")) == [
        "results.jsonl", "results.jsonl.1", "results.jsonl.done"]
    assert len(_lines(log)) + len(_lines(tmp_path / "results.jsonl.1")) < 5  # some lines are gone with the dropped file
    # A restart classifies only the new capture: the dropped lines' captures are still known.
    _png(root / "M42_005.png", "emission", seed=5)
    config.max_frames = 1
    assert run(config, announce=lambda line: None).count == 1
    assert Path(_lines(log)[-1]["file"]).name == "M42_005.png"
    assert len(processed_files(log)) == 6


def test_a_full_disk_does_not_stop_the_loop_and_every_frame_gets_its_line_once_there_is_room(classifier, tmp_path, monkeypatch):
    import errno

    from nebula.device import resultslog

    real_write, full = os.write, {"now": False}

    def write(fd, data):  # ENOSPC for the log's folder only, while `full`
        if full["now"] and os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def disk_fills_then_frees(record, _frame):
        full["now"] = 3 <= record["frame"] < 9

    monkeypatch.setattr(resultslog.os, "write", write)
    said = []
    source = FakeCamera()
    source.open(classifier.spec)
    daemon = Daemon(classifier, source, ResultsLog(tmp_path / "r.jsonl", echo=said.append), max_frames=12,
                    on_result=disk_fills_then_frees)
    assert daemon.run() == 12
    daemon.log.close()
    assert [line["frame"] for line in _lines(tmp_path / "r.jsonl")] == list(range(1, 13))
    assert len(said) == 2 and "No space left on device" in said[0] and "6 lines" in said[1], said
